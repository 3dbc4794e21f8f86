"""Maintenance control (MCC): a read-only live status page and Prometheus metrics for the box."""
