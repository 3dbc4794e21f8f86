"""`audit export | verify` and the gateway's cosigned checkpoints: what an export bundles
(``gateway.json``), what verify checks in it, and the loud verdict when nothing anchors the export.

The ledger is the real sign stage on LMDB (``LocalSign``); the cosignatures are made with the
gateway's own function (``shared.ledger.checkpoint.cosign``) under a key of this test, so these
run without a gateway; tests/integration/test_gateway_proofs.py does the same against a real one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from shared.ledger.audit import GATEWAY_MANIFEST, NOT_ANCHORED, AuditError, export_audit, verify_audit
from shared.ledger.checkpoint import (
    Checkpoint,
    cosign,
    cosignature_vkey,
    parse_checkpoint,
    sign_checkpoint,
    split_note,
)
from shared.ledger.keys import LedgerKeyFiles, SigningKey
from tests.support.sign import LocalSign, record_item

GATEWAY = SigningKey(bytes(range(32, 64)))
VKEY = cosignature_vkey("mro-gateway", GATEWAY.public_bytes)


def cosigned(note: bytes | str, key: SigningKey = GATEWAY, name: str = "mro-gateway") -> str:
    text = note.decode() if isinstance(note, bytes) else note
    return text + cosign(split_note(text)[0], name, key, 1_700_000_000)


def bundle(notes: list[str], vkey: str = VKEY) -> dict[str, Any]:
    return {"fetched": True, "url": "https://gw.test", "cosigner": {"name": "mro-gateway", "vkey": vkey},
            "checkpoints": [{"size": parse_checkpoint(split_note(n)[0]).size, "cosigned_checkpoint": n}
                            for n in notes]}


@pytest.fixture(scope="module")
def box(tmp_path_factory) -> tuple[LocalSign, list[bytes]]:
    data = tmp_path_factory.mktemp("anchor") / "data"
    notes = []
    with LocalSign(data).open() as sign:
        for first, count in ((0, 10), (10, 7)):
            sign.append([record_item(i) for i in range(first, first + count)])
            note = sign.checkpoint()
            assert note is not None
            notes.append(note)
    return sign, notes


def test_plain_verify_warns_and_an_anchor_removes_the_warning(box, tmp_path):
    sign, notes = box
    out = tmp_path / "e"
    summary = export_audit(sign.config, out, gateway=bundle([cosigned(n) for n in notes]))
    assert summary["gateway_checkpoints"] == 2
    report = verify_audit(out)
    assert report["anchored_by"] == [] and report["warning"] == NOT_ANCHORED
    assert report["gateway_checkpoints"] == 2 and report["gateway_manifest"]["fetched"] is True
    first = LedgerKeyFiles(sign.config.data_path / "keys").current(create=False)
    report = verify_audit(out, trusted_keys=[first.public_bytes])
    assert report["anchored_by"] == ["--trusted-key"] and "warning" not in report
    report = verify_audit(out, cosigner_key=("mro-gateway", GATEWAY.public_bytes))
    assert report["anchored_by"] == ["2 gateway cosignatures under the pinned cosigner key"]
    # another gateway key pinned: these are not that gateway's cosignatures
    other = SigningKey(bytes(range(64, 96)))
    with pytest.raises(AuditError, match="another key than the pinned"):
        verify_audit(out, cosigner_key=("mro-gateway", other.public_bytes))


def test_an_export_without_gateway_json_still_verifies_and_says_nothing_was_fetched(box, tmp_path):
    sign, _ = box
    export_audit(sign.config, tmp_path / "old")  # as before this feature: no gateway.json
    assert verify_audit(tmp_path / "old")["gateway_manifest"] is None
    export_audit(sign.config, tmp_path / "off", gateway={"fetched": False, "reason": "unreachable", "checkpoints": []})
    manifest = verify_audit(tmp_path / "off")["gateway_manifest"]
    assert manifest == {"fetched": False, "url": None, "reason": "unreachable"}


def test_export_refuses_a_gateway_view_that_contradicts_the_box(box, tmp_path):
    sign, notes = box
    key = LedgerKeyFiles(sign.config.data_path / "keys").current(create=False)
    origin = sign.config.origin
    forked = sign_checkpoint(Checkpoint(origin, 10, bytes(32)), key)
    with pytest.raises(AuditError, match="FORK: the gateway's cosigned checkpoint of size 10"):
        export_audit(sign.config, tmp_path / "f", gateway=bundle([cosigned(forked)]))
    ahead = sign_checkpoint(Checkpoint(origin, 18, bytes(32)), key)
    with pytest.raises(AuditError, match="ROLLBACK"):
        export_audit(sign.config, tmp_path / "r", gateway=bundle([cosigned(ahead)]))
    assert not (tmp_path / "f").exists() and not (tmp_path / "r").exists()


def _tamper(out: Path, edit) -> None:
    doc = json.loads((out / GATEWAY_MANIFEST).read_text())
    edit(doc)
    (out / GATEWAY_MANIFEST).write_text(json.dumps(doc))


@pytest.mark.parametrize("case, match", [
    ("not json", "not valid JSON"),
    ("no fetched", "boolean 'fetched'"),
    ("bad vkey", "vkey is malformed"),
    ("foreign cosigner", "carries no cosignature of mro-gateway"),
    ("bad cosignature", "cosignature of mro-gateway does not verify"),
    ("other origin key", r"gateway\.json checkpoint 0 \(size 10\): no signature from a known key"),
])
def test_verify_refuses_a_tampered_gateway_manifest(box, tmp_path, case, match):
    sign, notes = box
    good = tmp_path / "good"
    if not good.exists():
        export_audit(sign.config, good, gateway=bundle([cosigned(n) for n in notes]))
    out = tmp_path / "copy"
    shutil.copytree(good, out)
    intruder = SigningKey(bytes(range(96, 128)))
    if case == "not json":
        (out / GATEWAY_MANIFEST).write_text("{")
    elif case == "no fetched":
        _tamper(out, lambda d: d.pop("fetched"))
    elif case == "bad vkey":
        _tamper(out, lambda d: d["cosigner"].update(vkey="mro-gateway+00+AA"))
    elif case == "foreign cosigner":
        _tamper(out, lambda d: d["checkpoints"][0].update(cosigned_checkpoint=cosigned(notes[0], intruder)))
    elif case == "bad cosignature":
        def flip(d):
            note = d["checkpoints"][1]["cosigned_checkpoint"]
            d["checkpoints"][1]["cosigned_checkpoint"] = note.replace(note.split("\n")[-2], cosign(
                split_note(notes[1])[0], "mro-gateway", GATEWAY, 1_700_000_001).rstrip("\n")[:-6] + "AAAAA=")
        _tamper(out, flip)
    else:  # a checkpoint signed by another key than the ledger's, cosigned by the real gateway key
        text = sign_checkpoint(parse_checkpoint(split_note(notes[0])[0]), intruder)
        _tamper(out, lambda d: d["checkpoints"][0].update(cosigned_checkpoint=cosigned(text)))
    with pytest.raises(AuditError, match=match):
        verify_audit(out)
