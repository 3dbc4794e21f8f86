"""Ledger entries: canonical bytes, chain verification, tamper detection and the auditor's export."""

from __future__ import annotations

import hashlib
import shutil
import string
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.ledger.canonical import canonical_json, sha256_hex
from shared.ledger.entry import (
    GENESIS_PREV,
    LEDGER_VERSION,
    ExportLineError,
    SignedEntry,
    entry_bytes,
    entry_hash,
    export_line,
    parse_entry,
    parse_export_line,
    sign_entry,
)
from shared.ledger.keys import SigningKey
from shared.ledger.verify import LedgerVerifyError, verify_chain

KEY = SigningKey(bytes(range(32)))
KEYS = {KEY.kid: KEY.public_bytes}
ATTACKER = SigningKey(bytes(range(1, 33)))
AT = "2025-03-14T09:26:53.589Z"


def body_for(seq: int) -> dict[str, Any]:
    return {
        "schema": "mro.record/1",
        "type": "torque_event",
        "event_id": f"00000000-0000-4000-8000-{seq:012d}",
        "torque_nm": "25.5",
        "tightening_id": seq,
        "notes": 'wrench "B" \u00e9 \u2028 \U0001f527 \\ \x07',
    }


def make_entry(key: SigningKey, seq: int, prev: str, body: dict[str, Any], **overrides: Any) -> SignedEntry:
    idem = sha256_hex(canonical_json(body))
    fields: dict[str, Any] = dict(
        origin="mro-edge/HGR1",
        seq=seq,
        prev=prev,
        idem=idem,
        kid=key.kid,
        recorded_at=AT,
        type=body["type"],
        body=body,
    )
    fields.update(overrides)
    return sign_entry(key, entry_bytes(**fields), seq, fields["idem"])


def make_chain(
    n: int, key: SigningKey = KEY, bodies: list[dict[str, Any]] | None = None
) -> list[SignedEntry]:
    chain: list[SignedEntry] = []
    prev = GENESIS_PREV
    for seq in range(n):
        signed = make_entry(key, seq, prev, bodies[seq] if bodies else body_for(seq))
        chain.append(signed)
        prev = signed.hash
    return chain


def replace(e: SignedEntry, **changes: Any) -> SignedEntry:
    fields = {f: getattr(e, f) for f in SignedEntry.__struct_fields__}
    fields.update(changes)
    return SignedEntry(**fields)


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)


def broken_at(chain: list[SignedEntry], **kwargs: Any) -> LedgerVerifyError:
    with pytest.raises(LedgerVerifyError) as info:
        verify_chain(chain, KEYS, **kwargs)
    return info.value


# entry format


def test_entry_bytes_are_canonical_json_of_the_documented_fields() -> None:
    entry = entry_bytes(
        origin="mro-edge/HGR1",
        seq=0,
        prev=GENESIS_PREV,
        idem="ab" * 32,
        kid="0123456789abcdef",
        recorded_at=AT,
        type="inspection",
        body={"b": 1, "a": "\u00e9\n"},
    )
    assert entry == (
        b'{"body":{"a":"\xc3\xa9\\n","b":1},"idem":"' + b"ab" * 32 + b'","kid":"0123456789abcdef",'
        b'"origin":"mro-edge/HGR1","prev":"' + b"0" * 64 + b'","recorded_at":"2025-03-14T09:26:53.589Z",'
        b'"seq":0,"type":"inspection","v":1}'
    )
    parsed = parse_entry(entry)
    assert (parsed.v, parsed.seq, parsed.type, parsed.body) == (
        LEDGER_VERSION,
        0,
        "inspection",
        {"b": 1, "a": "\u00e9\n"},
    )


def test_entry_hash_is_sha256_of_the_exact_bytes() -> None:
    entry = make_chain(1)[0].entry
    assert entry_hash(entry) == hashlib.sha256(entry).hexdigest()


@pytest.mark.parametrize(
    "override",
    [
        {"seq": -1},
        {"seq": True},
        {"seq": 2**53},
        {"prev": "0" * 63},
        {"prev": "A" * 64},
        {"idem": "xyz"},
        {"kid": "0123"},
        {"origin": ""},
        {"type": ""},
        {"recorded_at": "2025-03-14T09:26:53Z"},
        {"recorded_at": "2025-03-14T09:26:53.589+00:00"},
        {"recorded_at": "2025-13-14T09:26:53.589Z"},
        {"body": {1: "x"}},
    ],
)
def test_entry_bytes_refuses_fields_out_of_form(override: dict[str, Any]) -> None:
    fields: dict[str, Any] = dict(
        origin="o", seq=0, prev=GENESIS_PREV, idem="ab" * 32, kid=KEY.kid, recorded_at=AT, type="t", body={}
    )
    fields.update(override)
    with pytest.raises(ValueError):
        entry_bytes(**fields)


def test_sign_entry_refuses_a_row_that_disagrees_with_its_bytes() -> None:
    entry = make_chain(1)[0].entry
    idem = parse_entry(entry).idem
    with pytest.raises(ValueError, match="seq"):
        sign_entry(KEY, entry, 1, idem)
    with pytest.raises(ValueError):
        sign_entry(KEY, entry, 0, "cd" * 32)
    with pytest.raises(ValueError):
        sign_entry(ATTACKER, entry, 0, idem)


# chain verification


def test_a_good_chain_verifies() -> None:
    chain = make_chain(10)
    assert verify_chain(chain, KEYS) == 10
    assert verify_chain(iter(chain), KEYS, expect_count=10) == 10
    assert verify_chain([], KEYS) == 0


def test_verification_resumes_from_a_trusted_point() -> None:
    chain = make_chain(10)
    assert verify_chain(chain[6:], KEYS, expect_first_seq=6, prev=chain[5].hash) == 4
    err = broken_at(chain[6:], expect_first_seq=6, prev=chain[4].hash)
    assert (err.seq, err.reason) == (6, "prev does not match hash of seq 5")


def test_verification_streams_and_stops_at_the_first_break() -> None:
    chain = make_chain(6)
    chain[2] = replace(chain[2], signature=flip(chain[2].signature, 0))
    pulled: list[int] = []

    def stream() -> Iterator[SignedEntry]:
        for e in chain:
            pulled.append(e.seq)
            yield e

    with pytest.raises(LedgerVerifyError):
        verify_chain(stream(), KEYS)
    assert pulled == [0, 1, 2]


def test_edited_body_byte_is_caught_at_its_seq() -> None:
    chain = make_chain(10)
    entry = chain[5].entry.replace(b'"torque_nm":"25.5"', b'"torque_nm":"26.5"')
    assert entry != chain[5].entry
    chain[5] = replace(chain[5], entry=entry)
    err = broken_at(chain)
    assert err.seq == 5 and "hash does not match" in err.reason
    assert str(err) == "seq 5: hash does not match SHA-256 of the entry bytes"


def test_edited_body_with_recomputed_hash_fails_the_signature() -> None:
    chain = make_chain(10)
    entry = chain[5].entry.replace(b'"torque_nm":"25.5"', b'"torque_nm":"26.5"')
    chain[5] = replace(chain[5], entry=entry, hash=entry_hash(entry))
    err = broken_at(chain)
    assert err.seq == 5 and err.reason == f"signature is not valid for key {KEY.kid}"


def test_edited_body_resigned_with_another_key_is_an_unknown_key() -> None:
    chain = make_chain(10)
    forged = make_entry(ATTACKER, 5, chain[4].hash, {**body_for(5), "torque_nm": "26.5"})
    chain[5] = forged
    err = broken_at(chain)
    assert err.seq == 5 and err.reason == f"signed with unknown key {ATTACKER.kid}"


def test_reordered_entries_are_caught() -> None:
    chain = make_chain(10)
    chain[4], chain[5] = chain[5], chain[4]
    err = broken_at(chain)
    assert err.seq == 4 and "found seq 5" in err.reason


def test_deleted_entry_is_caught() -> None:
    chain = make_chain(10)
    del chain[5]
    err = broken_at(chain)
    assert err.seq == 5 and "found seq 6" in err.reason


def test_deleted_entry_with_renumbered_rows_is_caught() -> None:
    chain = make_chain(10)
    del chain[5]
    chain = [replace(e, seq=i) for i, e in enumerate(chain)]
    err = broken_at(chain)
    assert err.seq == 5 and err.reason == "entry bytes say seq 6"


def test_inserted_entry_is_caught() -> None:
    chain = make_chain(10)
    other = make_chain(10, bodies=[{**body_for(i), "notes": "elsewhere"} for i in range(10)])
    inserted = chain[:5] + [other[5]] + chain[5:]
    err = broken_at(inserted)
    assert (err.seq, err.reason) == (5, "prev does not match hash of seq 4")

    err = broken_at(chain[:5] + [forge_as_ours(5, chain[4].hash)] + chain[5:])
    assert (err.seq, err.reason) == (5, f"signature is not valid for key {KEY.kid}")


def forge_as_ours(seq: int, prev: str) -> SignedEntry:
    """A well-formed, correctly linked row that claims our kid but is signed by someone else."""
    entry = entry_bytes(
        origin="mro-edge/HGR1",
        seq=seq,
        prev=prev,
        idem="ab" * 32,
        kid=KEY.kid,
        recorded_at=AT,
        type="t",
        body={},
    )
    return SignedEntry(seq, "ab" * 32, entry, entry_hash(entry), ATTACKER.sign_digest(entry), KEY.kid)


def test_truncated_chain_is_caught_when_the_length_is_known() -> None:
    chain = make_chain(10)
    assert verify_chain(chain[:7], KEYS) == 7
    err = broken_at(chain[:7], expect_count=10)
    assert err.seq == 7 and err.reason.startswith("missing")
    err = broken_at(chain, expect_count=8)
    assert err.seq == 8


def test_truncated_entry_bytes_are_caught() -> None:
    chain = make_chain(10)
    cut = chain[5].entry[:-20]
    chain[5] = replace(chain[5], entry=cut)
    assert broken_at(chain).seq == 5
    chain[5] = replace(chain[5], hash=entry_hash(cut))
    err = broken_at(chain)
    assert err.seq == 5 and "not a well-formed ledger entry" in err.reason


def test_duplicated_entry_is_caught() -> None:
    chain = make_chain(10)
    chain.insert(6, chain[5])
    err = broken_at(chain)
    assert err.seq == 6 and "found seq 5" in err.reason


def test_wrong_key_is_caught_at_the_first_entry() -> None:
    chain = make_chain(5)
    with pytest.raises(LedgerVerifyError) as info:
        verify_chain(chain, {ATTACKER.kid: ATTACKER.public_bytes})
    assert (info.value.seq, info.value.reason) == (0, f"signed with unknown key {KEY.kid}")


def test_chain_signed_by_a_new_key_midway_verifies_with_both_keys() -> None:
    chain = make_chain(3)
    chain.append(make_entry(ATTACKER, 3, chain[2].hash, body_for(3)))
    assert verify_chain(chain, {**KEYS, ATTACKER.kid: ATTACKER.public_bytes}) == 4
    assert broken_at(chain).seq == 3


def test_public_key_listed_under_the_wrong_kid_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="kid"):
        verify_chain(make_chain(1), {KEY.kid: ATTACKER.public_bytes})


def test_flipped_signature_is_caught() -> None:
    chain = make_chain(10)
    chain[5] = replace(chain[5], signature=flip(chain[5].signature, 63, 0x80))
    err = broken_at(chain)
    assert (err.seq, err.reason) == (5, f"signature is not valid for key {KEY.kid}")


def test_wrong_prev_is_caught_even_when_correctly_signed() -> None:
    chain = make_chain(10)
    chain[5] = make_entry(KEY, 5, chain[3].hash, body_for(5))
    err = broken_at(chain)
    assert str(err) == "seq 5: prev does not match hash of seq 4"
    chain = make_chain(2)
    chain[0] = make_entry(KEY, 0, "1" * 64, body_for(0))
    assert str(broken_at(chain)) == "seq 0: prev is not the genesis value"


def test_row_fields_must_agree_with_the_entry_bytes() -> None:
    chain = make_chain(4)
    err = broken_at([*chain[:2], replace(chain[2], idem="cd" * 32), chain[3]])
    assert err.seq == 2 and "idempotency key" in err.reason
    err = broken_at([*chain[:2], replace(chain[2], kid=ATTACKER.kid), chain[3]])
    assert err.seq == 2 and "row names" in err.reason


def test_unknown_ledger_version_is_refused() -> None:
    fields = dict(
        v=2,
        origin="o",
        seq=0,
        prev=GENESIS_PREV,
        idem="ab" * 32,
        kid=KEY.kid,
        recorded_at=AT,
        type="t",
        body={},
    )
    entry = canonical_json(fields)
    signed = sign_entry(KEY, entry, 0, "ab" * 32)
    err = broken_at([signed])
    assert err.seq == 0 and "version 2" in err.reason


# JSON Lines export


def test_export_line_round_trips_the_exact_bytes() -> None:
    for e in make_chain(5):
        line = export_line(e)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert parse_export_line(line) == e
        assert parse_export_line(line[:-1]) == e


def test_export_line_has_the_documented_fields() -> None:
    import json

    e = make_chain(1)[0]
    row = json.loads(export_line(e))
    assert list(row) == ["seq", "idempotency_key", "entry", "hash", "signature", "kid"]
    assert row["entry"].encode() == e.entry
    assert bytes.fromhex(row["signature"]) == e.signature
    assert (row["seq"], row["idempotency_key"], row["hash"], row["kid"]) == (e.seq, e.idem, e.hash, e.kid)


@pytest.mark.parametrize(
    "edit",
    [
        lambda line: line.replace(b'"signature":"', b'"signature":"A', 1)[:-1],
        lambda line: line[:-1] + b" \n",
        lambda line: line[:-1] + b"\r\n",
        lambda line: b" " + line,
        lambda line: line.replace(b'{"seq"', b'{"extra":1,"seq"', 1),
        lambda line: line.replace(b',"kid":"', b',"kidd":"', 1),
        lambda line: line[: len(line) // 2],
        lambda line: b"",
    ],
    ids=[
        "uppercase-hex",
        "trailing-space",
        "crlf",
        "leading-space",
        "unknown-field",
        "missing-field",
        "cut",
        "empty",
    ],
)
def test_parse_export_line_is_strict(edit: Any) -> None:
    line = export_line(make_chain(1)[0])
    with pytest.raises(ExportLineError):
        parse_export_line(edit(line))


def test_uppercased_signature_hex_is_refused() -> None:
    e = make_chain(1)[0]
    line = export_line(e)
    sig_hex = e.signature.hex().encode()
    with pytest.raises(ExportLineError):
        parse_export_line(line.replace(sig_hex, sig_hex.upper()))


@pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("openssl", "jq", "xxd", "sha256sum")),
    reason="needs openssl, jq, xxd and sha256sum",
)
def test_auditor_checks_an_exported_row_with_standard_tools(tmp_path: Path) -> None:
    """The README recipe: pull one row out of the export, check its hash, link and signature."""
    chain = make_chain(4)
    (tmp_path / "ledger.jsonl").write_bytes(b"".join(export_line(e) for e in chain))
    (tmp_path / "pub.pem").write_text(KEY.public_pem())
    script = (
        "set -e\n"
        "jq -j 'select(.seq==2) | .entry' ledger.jsonl > entry.bin\n"
        "jq -r 'select(.seq==2) | .signature' ledger.jsonl | xxd -r -p > sig.bin\n"
        "openssl dgst -sha256 -binary entry.bin > digest.bin\n"
        "openssl pkeyutl -verify -rawin -pubin -inkey pub.pem -in digest.bin -sigfile sig.bin\n"
        "sha256sum entry.bin | cut -d' ' -f1\n"
        "jq -r 'select(.seq==2) | .hash' ledger.jsonl\n"
        "jq -r 'select(.seq==3) | .entry | fromjson | .prev' ledger.jsonl\n"
    )
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "Signature Verified Successfully"
    assert lines[1] == lines[2] == lines[3] == chain[2].hash
    assert (tmp_path / "entry.bin").read_bytes() == chain[2].entry


# property: any single-byte change anywhere in an entry is caught at that entry's seq

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**53) + 1, 2**53 - 1), st.text(max_size=20))
json_key = st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=1, max_size=8)
json_body = st.dictionaries(
    json_key,
    st.recursive(
        json_scalar,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(json_key, inner, max_size=3),
        max_leaves=6,
    ),
    max_size=5,
).map(lambda body: {**body, "type": "maintenance_action"})
chains = st.lists(json_body, min_size=1, max_size=5).map(
    lambda bodies: make_chain(len(bodies), bodies=bodies)
)
FIELDS = ("entry", "signature", "hash", "idem", "kid", "seq")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chain=chains, data=st.data())
def test_any_single_byte_flip_in_any_entry_is_detected(chain: list[SignedEntry], data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(chain) - 1), label="entry")
    field = data.draw(st.sampled_from(FIELDS), label="field")
    mask = data.draw(st.integers(1, 255), label="mask")
    target = chain[index]
    value = getattr(target, field)
    if field == "seq":
        changed: Any = value ^ (mask << (8 * data.draw(st.integers(0, 6), label="byte")))
    else:
        raw = value if isinstance(value, bytes) else value.encode("latin-1")
        flipped = flip(raw, data.draw(st.integers(0, len(raw) - 1), label="position"), mask)
        changed = flipped if isinstance(value, bytes) else flipped.decode("latin-1")
    tampered = [*chain[:index], replace(target, **{field: changed}), *chain[index + 1 :]]
    with pytest.raises(LedgerVerifyError) as info:
        verify_chain(tampered, KEYS, expect_count=len(chain))
    assert info.value.seq == index


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chain=chains, data=st.data())
def test_any_single_byte_flip_in_an_exported_row_is_detected(
    chain: list[SignedEntry], data: st.DataObject
) -> None:
    lines = [export_line(e) for e in chain]
    index = data.draw(st.integers(0, len(lines) - 1), label="row")
    position = data.draw(st.integers(0, len(lines[index]) - 1), label="position")
    lines[index] = flip(lines[index], position, data.draw(st.integers(1, 255), label="mask"))
    try:
        entries = [parse_export_line(line) for line in lines]
    except ExportLineError:
        return
    with pytest.raises(LedgerVerifyError) as info:
        verify_chain(entries, KEYS, expect_count=len(chain))
    assert info.value.seq == index


# key rotation

NEW = SigningKey(bytes(range(2, 34)))
NEWER = SigningKey(bytes(range(3, 35)))


def rotation(old: SigningKey, new_public: bytes, seq: int, prev: str, **body_changes: Any) -> SignedEntry:
    from shared.ledger.entry import KEY_ROTATION, rotation_body

    body = {**rotation_body(new_public, seq + 1), **body_changes}
    body = {k: v for k, v in body.items() if v is not None}
    idem = sha256_hex(canonical_json(body))
    data = entry_bytes(origin="mro-edge/HGR1", seq=seq, prev=prev, idem=idem, kid=old.kid, recorded_at=AT,
                       type=KEY_ROTATION, body=body)
    return sign_entry(old, data, seq, idem)


def rotated_chain(before: int = 3, after: int = 3) -> list[SignedEntry]:
    chain = make_chain(before)
    chain.append(rotation(KEY, NEW.public_bytes, before, chain[-1].hash))
    for seq in range(before + 1, before + 1 + after):
        chain.append(make_entry(NEW, seq, chain[-1].hash, body_for(seq)))
    return chain


def test_rotation_introduces_the_new_key_and_retires_the_old() -> None:
    chain = rotated_chain()
    assert verify_chain(chain, KEYS) == 7  # only the first key is trusted up front
    # the old key after the rotation took effect
    stale = make_entry(KEY, 7, chain[-1].hash, body_for(7))
    err = broken_at([*chain, stale])
    assert err.seq == 7 and "retired" in err.reason and "seq 3" in err.reason
    # the new key before its effective seq (history rewritten by the new key's holder)
    early = make_entry(NEW, 2, chain[1].hash, body_for(2))
    err = broken_at([*chain[:2], early])
    assert err.seq == 2 and "unknown key" in err.reason
    err = broken_at([*chain[:4], make_entry(NEW, 4, chain[3].hash, body_for(40)), *chain[5:]])
    assert err.seq == 5  # a replaced seq 4 breaks the chain at 5


def test_rotation_signed_by_a_stranger_or_with_a_bad_body_is_refused() -> None:
    chain = make_chain(3)
    forged = rotation(ATTACKER, NEW.public_bytes, 3, chain[-1].hash)
    assert "unknown key" in broken_at([*chain, forged]).reason
    from shared.ledger.keys import key_id

    cases = {
        "wrong kid": dict(new_kid=key_id(NEWER.public_bytes)),
        "effective in the past": dict(effective_seq=3),
        "same key": None,
        "missing field": dict(effective_seq=None),
        "bad base64": dict(new_public_key="not base64!"),
        "extra field": dict(reason="x"),
    }
    for name, changes in cases.items():
        if changes is None:
            bad = rotation(KEY, KEY.public_bytes, 3, chain[-1].hash)
        else:
            bad = rotation(KEY, NEW.public_bytes, 3, chain[-1].hash, **changes)
        err = broken_at([*chain, bad])
        assert err.seq == 3 and "key rotation refused" in err.reason, name


def test_second_rotation_needs_the_first_in_effect_and_never_revives_a_key() -> None:
    chain = rotated_chain(2, 2)  # seq 2 rotates KEY -> NEW, seq 3..4 by NEW
    again = rotation(NEW, NEWER.public_bytes, 5, chain[-1].hash)
    chain.append(again)
    chain.append(make_entry(NEWER, 6, again.hash, body_for(6)))
    assert verify_chain(chain, KEYS) == 7
    back = rotation(NEWER, KEY.public_bytes, 7, chain[-1].hash)
    assert "retired earlier" in broken_at([*chain, back]).reason


def test_resume_from_a_trusted_point_after_a_rotation() -> None:
    chain = rotated_chain()
    assert verify_chain(chain[5:], {NEW.kid: NEW.public_bytes}, expect_first_seq=5, prev=chain[4].hash) == 2
