"""Hangar device formats: RFID reader events and part-mark scans, parsed into typed results.

Pure functions only: nothing here talks MQTT, touches a store or logs. Each parser takes the
bytes a device sent and returns either a typed result or `Malformed` (the project's
`FieldError`s), never an exception, so the caller can route bad input to the DLQ with
`Malformed.report`. Ingest reaches them through the device profiles.

* `profiles`: one folder per device kind (parser, simulator, mapping to contract records) and
  the one registry of them, `profiles.registry.PROFILES`.
* `rfid`: what both RFID reader profiles share: `TagRead`s and their field parsing.
* `epc`: the GS1 EPC TDS ADI-var scheme (aviation part tags) -> `AviationPart`, and its encoder.
* `dedupe`: a bounded window that turns repeated reads of one tag into one read.
"""
