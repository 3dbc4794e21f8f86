"""The device profile bench (bench/devices.py) times the success path: its payloads parse into one
read each naming the intended part, the record it maps to is the reference's input, and the
MID 0061 reference record carries the telegram's values. No timing is asserted."""

from __future__ import annotations

from decimal import Decimal

from bench import devices
from services.ingest.reads import reads_of
from shared.contract import decode_record


def test_every_raw_profile_payload_is_one_read_of_a_distinct_part() -> None:
    session = devices._session()
    for kind, make in (("rfid_zebra", devices.zebra_payloads), ("rfid_impinj", devices.impinj_payloads),
                       ("partmark_scanner", devices.partmark_payloads)):
        payloads = make(30)
        reads = [reads_of(kind, devices.DEVICE_IDS[kind], p, devices.RECEIVED_AT) for p in payloads]
        assert all(isinstance(r, list) and len(r) == 1 and r[0].problem is None for r in reads), (kind, reads[0])
        parts = [(r[0].cage, r[0].part_number, r[0].serial) for r in reads if isinstance(r, list)]
        assert parts == [devices._part(i) for i in range(30)], kind
        records = devices._records_of(kind, session, payloads)
        assert len(records) == 30 and devices._raw_path(kind, session)(payloads[0]) == 1


def test_the_mid0061_reference_record_carries_the_telegrams_values() -> None:
    telegrams = devices.mid0061_telegrams(5)
    zone = devices.zone_of(devices.ZONE)
    for i, telegram in enumerate(telegrams):
        fields = devices.to_torque_fields(devices._result(telegram[:-1]), zone)
        record = decode_record(devices.torque_record(fields, i), station=devices.STATION,
                               device_kind="torque_wrench", device_id="PF6000-01")
        assert record.torque_nm == Decimal("24.5") and record.tightening_id == fields.tightening_id == i + 1
        assert record.work_order_id == fields.identifier


def test_a_small_run_gives_every_profile_with_its_reference() -> None:
    figures = devices.run_devices_bench(reads=20)
    for name in devices.LABELS:
        assert figures[name]["reads"] == 20 and figures[name]["reference_records"] == 20, name
