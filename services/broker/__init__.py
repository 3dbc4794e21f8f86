"""The embedded MQTT 3.1.1 broker: PUBACK on device topics means committed (see core.py)."""
