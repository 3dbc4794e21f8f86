"""The embedded MQTT broker: amqtt with the Mosquitto password and ACL files (see service.py)."""
