"""Impinj R700 RFID readers (IoT device interface): topic kind `rfid_impinj`."""
