"""C2SP signed notes, tlog checkpoints and tlog cosignatures."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import nacl.signing
import pytest

from shared.ledger.checkpoint import (
    COSIGNATURE_TYPE,
    Checkpoint,
    CheckpointError,
    NoteError,
    cosign,
    cosignature_vkey,
    format_checkpoint,
    key_id,
    note_signatures,
    open_checkpoint,
    parse_checkpoint,
    parse_signer_key,
    parse_vkey,
    sign_checkpoint,
    sign_note,
    verified_cosignatures,
    verify_cosignature,
    verify_note,
    vkey,
)
from shared.ledger.keys import SigningKey

VECTOR = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "signed-note" / "go-sumdb-note.json").read_text()
)
LEDGER = SigningKey(bytes(range(32)))
WITNESS = nacl.signing.SigningKey(bytes(range(100, 132)))
WITNESS_PUB = bytes(WITNESS.verify_key)
ORIGIN = "mro-edge/HGR1"
ROOT = bytes.fromhex("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")


def test_signed_note_vector_byte_for_byte():
    name, seed = parse_signer_key(VECTOR["signer_key"])
    assert name == "PeterNeumann"
    note = sign_note(VECTOR["text"], name, seed)
    assert note == VECTOR["note"]
    assert note.encode("utf-8") == VECTOR["note"].encode("utf-8")
    vname, public = parse_vkey(VECTOR["verifier_key"])
    assert (vname, public) == (name, bytes(nacl.signing.SigningKey(seed).verify_key))
    assert vkey(name, public) == VECTOR["verifier_key"]
    assert key_id(name, 1, public).hex() == "c74f20a3"
    assert verify_note(VECTOR["note"], {name: public}) == (VECTOR["text"], [name])
    assert verify_note(VECTOR["note"].encode("utf-8"), {name: public})[0] == VECTOR["text"]


def test_same_signature_through_a_ledger_signing_key_and_nacl_key():
    _, seed = parse_signer_key(VECTOR["signer_key"])
    assert sign_note(VECTOR["text"], "PeterNeumann", SigningKey(seed)) == VECTOR["note"]
    assert sign_note(VECTOR["text"], "PeterNeumann", nacl.signing.SigningKey(seed)) == VECTOR["note"]


def test_bad_key_strings_rejected():
    name, public = parse_vkey(VECTOR["verifier_key"])
    with pytest.raises(ValueError):
        parse_vkey(VECTOR["verifier_key"].replace("c74f20a3", "c74f20a4"))
    with pytest.raises(ValueError):
        parse_vkey("PeterNeumann+c74f20a3")
    with pytest.raises(ValueError):
        vkey("Peter Neumann", public)
    with pytest.raises(ValueError):
        vkey("a+b", public)
    with pytest.raises(ValueError):
        parse_signer_key(VECTOR["signer_key"].replace("c74f20a3", "00000000"))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda n: n.replace("cryptography", "cryptographY"),
        lambda n: n.replace("problem,\n", "problem, \n"),
        lambda n: n.replace("x08go", "x08gp"),
        lambda n: n[:-1],  # no final newline
        lambda n: n.replace("\n\n\u2014", "\n\u2014"),  # no blank line
        lambda n: n.replace("\u2014", "-"),  # hyphen instead of em dash
        lambda n: n.replace("If you", "If\tyou"),  # control character
    ],
)
def test_tampered_note_rejected(tamper):
    name, public = parse_vkey(VECTOR["verifier_key"])
    with pytest.raises(NoteError):
        verify_note(tamper(VECTOR["note"]), {name: public})


def test_unknown_keys_ignored_but_at_least_one_known_must_verify():
    name, public = parse_vkey(VECTOR["verifier_key"])
    other = nacl.signing.SigningKey(bytes(32))
    extra = sign_note(VECTOR["text"], "someone-else", other).split("\n\n")[-1]
    both = VECTOR["note"] + extra
    assert verify_note(both, {name: public})[1] == [name]
    assert sorted(verify_note(both, {name: public, "someone-else": bytes(other.verify_key)})[1]) == [
        "PeterNeumann", "someone-else"]
    with pytest.raises(NoteError, match="no signature from a known key"):
        verify_note(VECTOR["note"], {"someone-else": bytes(other.verify_key)})
    # same name, different key: its key ID differs, so the signature is ignored, and none is left
    with pytest.raises(NoteError, match="no signature from a known key"):
        verify_note(VECTOR["note"], {name: bytes(other.verify_key)})
    with pytest.raises(NoteError, match="two signatures"):
        verify_note(VECTOR["note"] + VECTOR["note"].split("\n\n")[-1], {name: public})


def test_checkpoint_format_and_parse():
    text = format_checkpoint(ORIGIN, 8, ROOT)
    assert text == f"{ORIGIN}\n8\n{base64.b64encode(ROOT).decode()}\n"
    assert parse_checkpoint(text) == Checkpoint(ORIGIN, 8, ROOT)
    with_ext = format_checkpoint(ORIGIN, 0, ROOT, ["ext one"])
    assert parse_checkpoint(with_ext).extensions == ("ext one",)
    assert Checkpoint(ORIGIN, 8, ROOT).text() == text


@pytest.mark.parametrize(
    "text",
    [
        f"{ORIGIN}\n08\n{base64.b64encode(ROOT).decode()}\n",
        f"{ORIGIN}\n-1\n{base64.b64encode(ROOT).decode()}\n",
        f"{ORIGIN}\n8\n{base64.b64encode(ROOT[:31]).decode()}\n",
        f"{ORIGIN}\n8\n{base64.b64encode(ROOT).decode()}",
        f"{ORIGIN}\n8\n",
        f"\n8\n{base64.b64encode(ROOT).decode()}\n",
        f"{ORIGIN}\n8\n{base64.b64encode(ROOT).decode()}\n\n",
        f"{ORIGIN}\n8\n{base64.b64encode(ROOT).decode().rstrip('=')}\n",
    ],
)
def test_malformed_checkpoints_rejected(text):
    with pytest.raises(CheckpointError):
        parse_checkpoint(text)


def test_signed_checkpoint_round_trip_and_tamper():
    cp = Checkpoint(ORIGIN, 8, ROOT)
    note = sign_checkpoint(cp, LEDGER)
    assert note.startswith(cp.text() + "\n\u2014 " + ORIGIN + " ")
    assert open_checkpoint(note, {ORIGIN: LEDGER.public_bytes}) == (cp, [ORIGIN])
    name, kid, sig = note_signatures(note)[0]
    assert (name, kid) == (ORIGIN, key_id(ORIGIN, 1, LEDGER.public_bytes))
    nacl.signing.VerifyKey(LEDGER.public_bytes).verify(cp.text().encode(), sig)  # plain Ed25519 over the text
    for bad in (note.replace("\n8\n", "\n9\n"), note.replace(ORIGIN + "\n", "mro-edge/HGR2\n", 1)):
        with pytest.raises(NoteError):
            open_checkpoint(bad, {ORIGIN: LEDGER.public_bytes})
    other = SigningKey(bytes(range(1, 33)))
    with pytest.raises(NoteError):
        open_checkpoint(sign_checkpoint(cp, other), {ORIGIN: LEDGER.public_bytes})


def test_cosignature_round_trip():
    cp = Checkpoint(ORIGIN, 8, ROOT)
    note = sign_checkpoint(cp, LEDGER)
    line = cosign(cp.text(), "gateway.example/mro", WITNESS, 1679315147)
    assert line.startswith("\u2014 gateway.example/mro ") and line.endswith("\n")
    raw = base64.b64decode(line.split(" ")[2])
    assert len(raw) == 4 + 8 + 64
    assert raw[:4] == key_id("gateway.example/mro", COSIGNATURE_TYPE, WITNESS_PUB)
    assert int.from_bytes(raw[4:12], "big") == 1679315147
    message = b"cosignature/v1\ntime 1679315147\n" + cp.text().encode()
    nacl.signing.VerifyKey(WITNESS_PUB).verify(message, raw[12:])
    assert verify_cosignature(cp.text(), line, "gateway.example/mro", WITNESS_PUB) == 1679315147

    cosigned = note + line
    # the log signature still verifies and the cosignature (type 0x04) is ignored by note verifiers
    assert open_checkpoint(cosigned, {ORIGIN: LEDGER.public_bytes})[0] == cp
    assert verified_cosignatures(cosigned, {"gateway.example/mro": WITNESS_PUB}) == {"gateway.example/mro": 1679315147}
    assert verified_cosignatures(cosigned, {"other": WITNESS_PUB}) == {}
    assert cosignature_vkey("gateway.example/mro", WITNESS_PUB).startswith(
        "gateway.example/mro+" + raw[:4].hex() + "+BA")  # base64 of 0x04...

    other_cp = Checkpoint(ORIGIN, 9, ROOT)
    with pytest.raises(NoteError):
        verify_cosignature(other_cp.text(), line, "gateway.example/mro", WITNESS_PUB)
    forged_time = base64.b64encode(raw[:4] + (1679315148).to_bytes(8, "big") + raw[12:]).decode()
    with pytest.raises(NoteError):
        verify_cosignature(cp.text(), f"\u2014 gateway.example/mro {forged_time}\n", "gateway.example/mro", WITNESS_PUB)
    with pytest.raises(NoteError):
        verified_cosignatures(note.replace("\n8\n", "\n9\n").split("\n\n")[0] + "\n\n" + line,
                              {"gateway.example/mro": WITNESS_PUB})
    with pytest.raises(NoteError):
        verify_cosignature(cp.text(), line, "gateway.example/mro", LEDGER.public_bytes)
    with pytest.raises(ValueError):
        cosign(cp.text(), "gateway.example/mro", WITNESS, -1)
    with pytest.raises(CheckpointError):
        cosign("not a checkpoint\n", "gateway.example/mro", WITNESS, 1)
