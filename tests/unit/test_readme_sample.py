"""The README's hand-sent torque event ("Sending a record by hand") is accepted as written.

The shell block is taken from README.md itself and run by bash, with `mosquitto_pub` replaced by
a function that writes down its arguments: the payload is exactly what a reader's shell would
publish (EVENT_ID and NOW expanded). It then goes through what ingest and validate apply: the
device contract (decode, normalize, idempotency key, cross-field and time rules) and the
compliance rules against the registries shipped in config/registries/.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shared.compliance import Compliance, MemoryState, load_registry
from shared.compliance.settings import compliance_settings
from shared.contract import check_rules, decode_record, idempotency_key, normalize
from shared.runtime.config import load_config
from shared.runtime.topics import Topics
from tests import readme

TITLE = "Sending a record by hand"
CONFIG = load_config(env={})  # the shipped defaults, whatever the developer's MRO_* say
# what the section's earlier blocks put in the reader's shell (devices add, run.json)
EARLIER = {"PW": "the-device-password", "PORT": "1883"}


def section() -> str:
    return readme.section(TITLE)


def publish_block() -> str:
    return readme.block_with(TITLE, "mosquitto_pub")


def run_block(tmp_path: Path, resend_with_new_event_id: bool = False) -> list[list[str]]:
    """Run the README block in bash; the argument lists of each `mosquitto_pub` call.

    With `resend_with_new_event_id`, the block's own `EVENT_ID=` line and `mosquitto_pub`
    command run once more afterwards: the re-send the README says comes back `duplicate`."""
    block = publish_block()
    lines = block.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("mosquitto_pub "))
    command = "\n".join(lines[first:])
    event_id_line = next(line for line in lines[:first] if line.startswith("EVENT_ID="))
    capture = tmp_path / "published"
    script = "\n".join([
        "set -euo pipefail",
        'mosquitto_pub() { printf "%s\\0" "$@" >> "$CAPTURE"; printf "\\n" >> "$CAPTURE"; }',
        *(f"{name}={value}" for name, value in EARLIER.items()),
        block,
        *([event_id_line, command] if resend_with_new_event_id else []),
    ])
    assert shutil.which("bash") and shutil.which("python3") and shutil.which("date")
    subprocess.run(["bash", "-c", script], check=True, timeout=60, cwd=tmp_path,
                   env={"PATH": "/usr/local/bin:/usr/bin:/bin", "CAPTURE": str(capture)})
    calls = capture.read_bytes().split(b"\0\n")
    return [[arg.decode() for arg in call.split(b"\0")] for call in calls if call]


def option(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def judge(topic: str, payload: bytes):
    """(record, body, contract errors, compliance errors) as ingest and validate judge them."""
    kind, device_id = Topics(CONFIG.station).parse_device_in(topic)
    record = decode_record(payload, station=CONFIG.station, device_kind=kind, device_id=device_id,
                           max_bytes=CONFIG.limits.max_message_bytes, max_depth=CONFIG.limits.max_depth)
    body = normalize(record)
    errors = check_rules(record, received_at=datetime.now(UTC), clock_skew_s=CONFIG.limits.clock_skew_s,
                         max_backdate_s=CONFIG.limits.max_backdate_days * 86400)
    registry = load_registry(compliance_settings(CONFIG).registries_dir)
    verdict = Compliance(registry).judge(record, body, MemoryState())
    return record, body, errors, verdict.errors


@pytest.fixture
def published(tmp_path) -> list[str]:
    (args,) = run_block(tmp_path)
    return args


def test_the_sample_is_published_at_qos1_on_its_device_topic(published):
    assert option(published, "-q") == "1"
    assert option(published, "-t") == Topics(CONFIG.station).device_in("torque_wrench", "TQW-01")
    assert option(published, "-u") == "TQW-01"


def test_the_sample_passes_the_contract_and_compliance_with_the_shipped_registries(published):
    record, body, errors, compliance_errors = judge(option(published, "-t"), option(published, "-m").encode())
    assert errors == []
    assert compliance_errors == []
    assert body["type"] == "torque_event"
    registry = load_registry(compliance_settings(CONFIG).registries_dir)
    assert record.aircraft.registration in registry.aircraft
    assert record.technician.cert_no in registry.technicians
    assert record.tool.serial_number in registry.tools


def test_a_resend_is_the_same_record_even_under_a_new_event_id(tmp_path):
    first, again = run_block(tmp_path, resend_with_new_event_id=True)
    assert "`duplicate` with the same seq" in section()
    _, body1, errors1, compliance1 = judge(option(first, "-t"), option(first, "-m").encode())
    _, body2, errors2, compliance2 = judge(option(again, "-t"), option(again, "-m").encode())
    assert errors1 == errors2 == compliance1 == compliance2 == []
    assert body1["event_id"] != body2["event_id"]
    # ingest answers a known idempotency key with `duplicate` and the original's seq
    assert idempotency_key(body1) == idempotency_key(body2)


def test_the_broken_variant_is_rejected_as_the_readme_says(published):
    text = section()
    assert '`"result": "NOK"`' in text and "`$.result` and `torque_result`" in text
    payload = option(published, "-m")
    assert payload.count('"result": "OK"') == 1
    _, _, errors, _ = judge(option(published, "-t"), payload.replace('"result": "OK"', '"result": "NOK"').encode())
    assert [(e.path, e.rule) for e in errors] == [("$.result", "torque_result")]
    assert errors[0].received == "NOK" and errors[0].expected.startswith("OK")


def test_the_block_uses_only_variables_the_section_sets_before_it():
    blocks = readme.shell_blocks(TITLE)
    block = publish_block()
    before = "".join(blocks[:blocks.index(block)])
    used = readme.variables_used(block) - readme.variables_assigned(block)
    assert used == set(EARLIER), used
    assert used <= readme.variables_assigned(before), (used, readme.variables_assigned(before))
