"""Zebra IoT Connector RFID readers (FX7500, FX9600, ATR7000): topic kind `rfid_zebra`."""
