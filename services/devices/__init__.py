"""Hangar device formats: RFID reader events and part-mark scans, parsed into typed results.

Pure functions only: nothing here talks MQTT, touches a store or logs. Each parser takes the
bytes a device sent and returns either a typed result or `Malformed` (the project's
`FieldError`s), never an exception, so the caller can route bad input to the DLQ with
`Malformed.report`. The lead wires these into the pipeline later.

* `rfid`: Zebra IoT Connector and Impinj IoT device interface tag events -> `TagRead`s.
* `epc`: the GS1 EPC TDS ADI-var scheme (aviation part tags) -> `AviationPart`.
* `dedupe`: a bounded window that turns repeated reads of one tag into one read.
* `partmark`: ISO/IEC 15434 envelopes, MH10.8.2 data identifiers and ATA Spec 2000 TEIs.
"""
