"""What a torque controller sends for a tightening, and what the bridge publishes for it.

`tightening_result` is a MID 0061 result as our controller simulator
(`mro_edge.simulator.openprotocol.SimulatedController`) tightens it; `telegram` its frame as the
controller writes it (without the NUL, as the bridge keeps it); `op_result` the bridge's
`mro.op_result/1` publish that reaches ingest on `in/torque_controller/<id>`.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from services.torque.mids import TighteningResult, encode
from services.torque.telegram import SCHEMA, ResultTelegram, ToolCalibration, encode_telegram


def local_stamp(zone: ZoneInfo, at: datetime | None = None) -> str:
    """A time as the controller's clock shows it (local, `YYYY-MM-DD:HH:MM:SS`)."""
    return (at or datetime.now(UTC)).astimezone(zone).strftime("%Y-%m-%d:%H:%M:%S")


def tightening_result(tightening_id: int, *, zone: ZoneInfo, controller_name: str = "SIM-PF6000",
                      tool_serial: str = "B0742134", torque_nm: Decimal = Decimal("24.5"),
                      torque_min_nm: Decimal = Decimal("22"), torque_max_nm: Decimal = Decimal("27"),
                      angle_deg: int = 182, identifier: str = "WO-2026-0001", ok: bool | None = None,
                      at: datetime | None = None) -> TighteningResult:
    """One tightening's MID 0061 (every field of revision 7; earlier revisions leave some out)."""
    within = torque_min_nm <= torque_nm <= torque_max_nm
    status = within if ok is None else ok
    return TighteningResult(
        cell_id=1, channel_id=1, controller_name=controller_name, identifier=identifier, job_id=1,
        parameter_set_id=3, batch_size=4, batch_counter=(tightening_id - 1) % 4 + 1,
        tightening_status=int(status), torque_status=1 if within else (0 if torque_nm < torque_min_nm else 2),
        angle_status=1, torque_min=int(torque_min_nm * 100), torque_max=int(torque_max_nm * 100),
        torque_target=int((torque_min_nm + torque_max_nm) * 50), torque=int(torque_nm * 100),
        angle_min=90, angle_max=360, angle_target=180, angle=angle_deg, timestamp=local_stamp(zone, at),
        parameter_set_changed="2026-01-10:07:30:00", batch_status=0, tightening_id=tightening_id,
        strategy=1, strategy_options=0, rundown_angle_status=1, current_monitoring_status=1,
        selftap_status=1, prevail_torque_monitoring_status=1, prevail_torque_compensate_status=1,
        tightening_error_status=0, rundown_angle_min=0, rundown_angle_max=999, rundown_angle=540,
        current_monitoring_min=0, current_monitoring_max=999, current_monitoring_value=250,
        selftap_min=0, selftap_max=0, selftap_torque=0, prevail_torque_monitoring_min=0,
        prevail_torque_monitoring_max=0, prevail_torque=0, job_sequence_number=tightening_id,
        sync_tightening_id=0, tool_serial_number=tool_serial, parameter_set_name="WHEEL NUT M14",
        torque_unit=1, result_type=1, identifier_part2="", identifier_part3="", identifier_part4="",
        customer_error_code="", prevail_torque_compensate_value=0, tightening_error_status2=0,
        compensated_angle="0000000", final_angle_decimal="0018200")


def telegram(result: TighteningResult, revision: int = 7) -> str:
    """The MID 0061 frame the controller sends, without its NUL terminator."""
    return encode(result, revision)[:-1].decode("ascii")


def op_result(telegram_text: str, *, zone: str, tool: ToolCalibration | None, received_at: str) -> bytes:
    """The bridge's publish for one telegram."""
    return encode_telegram(ResultTelegram(schema=SCHEMA, telegram=telegram_text, received_at=received_at,
                                          zone=zone, tool=tool))


def simulate(rng: random.Random) -> bytes:
    """A realistic publish of the bridge: a tightening now, its tool calibrated a month ago."""
    zone = rng.choice(("UTC", "Europe/Berlin", "America/Chicago"))
    now = datetime.now(UTC)
    result = tightening_result(rng.randint(1, 99999), zone=ZoneInfo(zone), at=now,
                               torque_nm=Decimal(rng.randint(2250, 2650)) / 100, identifier="")
    calibrated = (now - timedelta(days=30)).date()
    tool = ToolCalibration(serial_number="B0742134", last_calibration=calibrated,
                           calibration_due=calibrated + timedelta(days=365))
    return op_result(telegram(result, rng.randint(1, 7)), zone=zone, tool=tool,
                     received_at=now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z")


