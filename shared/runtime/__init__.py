"""The stage runtime: MQTT, LMDB, outbox, dedupe and receipts; a stage brings only its domain logic."""
