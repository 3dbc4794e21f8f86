"""Signed notes, tlog checkpoints and cosignatures in the C2SP formats (DESIGN.md section 6).

- c2sp.org/signed-note@v1.0.0: a note is ``text`` (ending in a newline), a blank line, then one
  or more lines ``— <name> <base64(key ID || signature)>`` (U+2014 EM DASH). Ed25519 note
  signatures (type 0x01) are plain RFC 8032 Ed25519 over the note text bytes; this is NOT the
  ledger entries' "Ed25519 over SHA-256(E)" convention, so ``openssl pkeyutl -verify -rawin``
  checks a note signature directly against the text.
  key ID = SHA-256(name || 0x0A || type || public key)[:4].
  Verifier key ("vkey") string: ``<name>+<hex key ID>+<base64(type || public key)>``.
- c2sp.org/tlog-checkpoint@v1.0.0: the note text is ``<origin>\\n<size>\\n<base64 root>\\n``
  plus optional non-empty extension lines.
- c2sp.org/tlog-cosignature@v1.0.0 (Ed25519, type 0x04): the signature is
  ``key ID || u64 timestamp (big-endian) || Ed25519(message)`` where message =
  ``"cosignature/v1\\ntime <timestamp>\\n" || checkpoint note text``.

Keys: anything with a 32-byte Ed25519 seed: a ``shared.ledger.keys.SigningKey`` (the ledger key), a
``nacl.signing.SigningKey`` or the raw 32-byte seed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing

__all__ = [
    "COSIGNATURE_TYPE",
    "ED25519_TYPE",
    "Checkpoint",
    "CheckpointError",
    "NoteError",
    "cosign",
    "cosignature_vkey",
    "format_checkpoint",
    "key_id",
    "note_signatures",
    "open_checkpoint",
    "parse_checkpoint",
    "parse_signer_key",
    "parse_vkey",
    "sign_checkpoint",
    "sign_note",
    "signature_line",
    "split_note",
    "verified_cosignatures",
    "verify_cosignature",
    "verify_note",
    "vkey",
]

ED25519_TYPE = 0x01
COSIGNATURE_TYPE = 0x04
EM_DASH = "\u2014"
MAX_NOTE_BYTES = 1 << 20
MAX_SIGNATURES = 100  # the spec asks for at least 16
_MAX_TIMESTAMP = 2**63 - 1
_U64 = struct.Struct(">Q")
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")
_SIZE = re.compile(r"^(0|[1-9][0-9]*)\Z")
_COSIGN_HEADER = "cosignature/v1\n"


class NoteError(ValueError):
    """A note is malformed, or a signature from a known key does not verify, or none verifies."""


class CheckpointError(ValueError):
    """Note text that is not a well-formed tlog checkpoint."""


# -- keys -------------------------------------------------------------------------------------

def _check_name(name: str) -> None:
    if not name or any(ch.isspace() for ch in name) or "+" in name or _CONTROL.search(name):
        raise ValueError(f"key name {name!r} must be non-empty, without spaces, '+' or control characters")


def key_id(name: str, sig_type: int, public: bytes) -> bytes:
    """The 4-byte key ID: SHA-256(name || 0x0A || type || public key)[:4]."""
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([sig_type]) + public).digest()[:4]


def vkey(name: str, public: bytes, sig_type: int = ED25519_TYPE) -> str:
    """Verifier key string ``<name>+<hex key ID>+<base64(type || public key)>``."""
    _check_name(name)
    if len(public) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(public)}")
    material = base64.b64encode(bytes([sig_type]) + public).decode("ascii")
    return f"{name}+{key_id(name, sig_type, public).hex()}+{material}"


def cosignature_vkey(name: str, public: bytes) -> str:
    """Verifier key of a tlog-cosignature/v1 Ed25519 cosigner (signature type 0x04)."""
    return vkey(name, public, COSIGNATURE_TYPE)


def _b64(text: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not standard base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise ValueError("not canonical base64")
    return raw


def parse_vkey(text: str, sig_type: int = ED25519_TYPE) -> tuple[str, bytes]:
    """(name, 32-byte public key) of a verifier key string; ValueError if malformed or its ID is wrong."""
    parts = text.split("+", 2)  # base64 may itself contain '+'
    if len(parts) != 3:
        raise ValueError("a verifier key is <name>+<hex key ID>+<base64 key>")
    name, hex_id, material = parts
    _check_name(name)
    raw = _b64(material)
    if len(raw) != 33 or raw[0] != sig_type:
        raise ValueError(f"the verifier key is not a type 0x{sig_type:02x} Ed25519 key")
    public = raw[1:]
    if hex_id != key_id(name, sig_type, public).hex():
        raise ValueError("the verifier key's ID does not match its name and key")
    return name, public


def parse_signer_key(text: str) -> tuple[str, bytes]:
    """(name, 32-byte seed) of a Go ``note`` signer key ``PRIVATE+KEY+<name>+<hex id>+<base64(0x01||seed)>``."""
    parts = text.split("+", 4)
    if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
        raise ValueError("a signer key is PRIVATE+KEY+<name>+<hex key ID>+<base64 key>")
    name, hex_id, material = parts[2:]
    _check_name(name)
    raw = _b64(material)
    if len(raw) != 33 or raw[0] != ED25519_TYPE:
        raise ValueError("the signer key is not an Ed25519 key")
    seed = raw[1:]
    public = bytes(nacl.signing.SigningKey(seed).verify_key)
    if hex_id != key_id(name, ED25519_TYPE, public).hex():
        raise ValueError("the signer key's ID does not match its name and key")
    return name, seed


def _raw_signer(key) -> tuple[Callable[[bytes], bytes], bytes]:
    """(sign(message) -> 64-byte plain Ed25519 signature, public key) for any supported key form.

    ``shared.ledger.keys.SigningKey`` only offers ``sign_digest`` (Ed25519 over SHA-256(data)); note
    signatures are Ed25519 over the text itself, so this uses its ``sign_raw`` when it has one
    and otherwise its pynacl key (read-only; the key never leaves the process).
    """
    if isinstance(key, bytes | bytearray):
        key = nacl.signing.SigningKey(bytes(key))
    if isinstance(key, nacl.signing.SigningKey):
        return (lambda m, k=key: k.sign(m).signature), bytes(key.verify_key)
    sign_raw = getattr(key, "sign_raw", None)
    public = getattr(key, "public_bytes", None)
    if callable(sign_raw) and public is not None:
        return sign_raw, public
    inner = getattr(key, "_key", None)
    if isinstance(inner, nacl.signing.SigningKey):
        return (lambda m, k=inner: k.sign(m).signature), bytes(inner.verify_key)
    raise TypeError(f"cannot sign notes with {type(key).__name__}")


def _ed25519_ok(public: bytes, message: bytes, signature: bytes) -> bool:
    if len(signature) != 64:
        return False
    try:
        nacl.signing.VerifyKey(public).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        return False
    return True


# -- signed notes ---------------------------------------------------------------------------

def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")
    if _CONTROL.search(text):
        raise NoteError("note text must not contain control characters other than newline")


def signature_line(name: str, signature: bytes) -> str:
    """``— <name> <base64(signature)>\\n``: ``signature`` already starts with its 4-byte key ID."""
    _check_name(name)
    return f"{EM_DASH} {name} {base64.b64encode(signature).decode('ascii')}\n"


def sign_note(text: str, name: str, signing_key) -> str:
    """The signed note: ``text``, a blank line, and one Ed25519 (type 0x01) signature line."""
    _check_text(text)
    sign, public = _raw_signer(signing_key)
    sig = sign(text.encode("utf-8"))
    return text + "\n" + signature_line(name, key_id(name, ED25519_TYPE, public) + sig)


def split_note(note: str | bytes) -> tuple[str, list[tuple[str, bytes]]]:
    """(text, [(name, key ID || signature), ...]) of a note, checking only its shape."""
    if isinstance(note, bytes | bytearray):
        if len(note) > MAX_NOTE_BYTES:
            raise NoteError("note is too large")
        try:
            note = bytes(note).decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("note is not valid UTF-8") from None
    if len(note) > MAX_NOTE_BYTES:
        raise NoteError("note is too large")
    if _CONTROL.search(note):
        raise NoteError("note must not contain control characters other than newline")
    cut = note.rfind("\n\n")
    if cut < 0:
        raise NoteError("note has no blank line before its signatures")
    text, block = note[: cut + 1], note[cut + 2 :]
    if not block.endswith("\n"):
        raise NoteError("the signature block must end with a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"note has more than {MAX_SIGNATURES} signatures")
    sigs: list[tuple[str, bytes]] = []
    for line in lines:
        head, sep, rest = line.partition(" ")
        name, sep2, b64 = rest.partition(" ")
        if head != EM_DASH or not sep or not sep2 or " " in b64:
            raise NoteError(f"malformed signature line {line!r}")
        try:
            _check_name(name)
            raw = _b64(b64)
        except ValueError as exc:
            raise NoteError(f"malformed signature line {line!r}: {exc}") from None
        if len(raw) < 5:
            raise NoteError(f"signature line {line!r} is too short")
        sigs.append((name, raw))
    return text, sigs


def note_signatures(note: str | bytes) -> list[tuple[str, bytes, bytes]]:
    """[(name, key ID, signature bytes after the ID)] of a note's signature lines, unverified."""
    return [(name, raw[:4], raw[4:]) for name, raw in split_note(note)[1]]


def verify_note(note: str | bytes, verifiers: Mapping[str, bytes]) -> tuple[str, list[str]]:
    """(text, names whose Ed25519 signature verified) of a note, per the signed-note rules.

    ``verifiers`` maps key name -> 32-byte Ed25519 public key. Signatures whose (name, key ID)
    match no verifier are ignored (cosignatures, rotated keys); one from a known key that does
    not verify rejects the note; a note with no verified signature from a known key is rejected.
    """
    text, sigs = split_note(note)
    message = text.encode("utf-8")
    seen: set[tuple[str, bytes]] = set()
    names: list[str] = []
    for name, raw in sigs:
        if (name, raw[:4]) in seen:
            raise NoteError(f"note carries two signatures from key {name}")
        seen.add((name, raw[:4]))
        public = verifiers.get(name)
        if public is None or raw[:4] != key_id(name, ED25519_TYPE, public):
            continue
        if not _ed25519_ok(public, message, raw[4:]):
            raise NoteError(f"the signature of {name} does not verify: the note was altered or mis-signed")
        names.append(name)
    if not names:
        raise NoteError("no signature from a known key: the note is not trusted")
    return text, names


# -- checkpoints --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        return format_checkpoint(self.origin, self.size, self.root, self.extensions)


def format_checkpoint(origin: str, size: int, root: bytes, extensions: Iterable[str] = ()) -> str:
    """Checkpoint note text ``<origin>\\n<size>\\n<base64 root>\\n`` + one line per extension."""
    extensions = tuple(extensions)
    if not origin or "\n" in origin or _CONTROL.search(origin):
        raise CheckpointError("the origin must be one non-empty line")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**64:
        raise CheckpointError(f"tree size {size!r} is not an unsigned 64-bit integer")
    if len(root) != 32:
        raise CheckpointError(f"the root hash is 32 bytes, got {len(root)}")
    for ext in extensions:
        if not ext or "\n" in ext or _CONTROL.search(ext):
            raise CheckpointError(f"extension line {ext!r} must be one non-empty line")
    lines = [origin, str(size), base64.b64encode(root).decode("ascii"), *extensions]
    return "\n".join(lines) + "\n"


def parse_checkpoint(text: str) -> Checkpoint:
    """Strict inverse of ``format_checkpoint`` (takes the note text, not the signed note)."""
    if not text.endswith("\n") or _CONTROL.search(text):
        raise CheckpointError("checkpoint text must be newline-terminated lines without control characters")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise CheckpointError("a checkpoint has at least three lines: origin, tree size, root hash")
    origin, size_text, root_text, *extensions = lines
    if not origin:
        raise CheckpointError("the origin line is empty")
    if not _SIZE.match(size_text) or int(size_text) >= 2**64:
        raise CheckpointError(f"tree size {size_text!r} is not a decimal without leading zeroes")
    try:
        root = _b64(root_text)
    except ValueError as exc:
        raise CheckpointError(f"root hash: {exc}") from None
    if len(root) != 32:
        raise CheckpointError(f"the root hash is 32 bytes, got {len(root)}")
    if any(not ext for ext in extensions):
        raise CheckpointError("extension lines must be non-empty")
    return Checkpoint(origin, int(size_text), root, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signing_key, name: str | None = None) -> str:
    """Signed checkpoint note; the key name defaults to the origin, as tlog-checkpoint recommends."""
    return sign_note(checkpoint.text(), name or checkpoint.origin, signing_key)


def open_checkpoint(note: str | bytes, verifiers: Mapping[str, bytes]) -> tuple[Checkpoint, list[str]]:
    """Verify a signed checkpoint note, then parse it: (checkpoint, names that verified)."""
    text, names = verify_note(note, verifiers)
    return parse_checkpoint(text), names


# -- cosignatures ---------------------------------------------------------------------------------

def _cosigned_message(checkpoint_text: str, timestamp: int) -> bytes:
    return f"{_COSIGN_HEADER}time {timestamp}\n{checkpoint_text}".encode()


def cosign(checkpoint_text: str, name: str, key, timestamp: int) -> str:
    """tlog-cosignature/v1 line ``— <name> base64(key ID || u64 timestamp || Ed25519 sig)\\n``.

    ``checkpoint_text`` is the checkpoint note text (no signature lines); appending the returned
    line to the signed checkpoint note gives the cosigned note.
    """
    parse_checkpoint(checkpoint_text)
    if not isinstance(timestamp, int) or not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise ValueError(f"timestamp {timestamp!r} must be a POSIX time in 0..2^63-1")
    sign, public = _raw_signer(key)
    sig = sign(_cosigned_message(checkpoint_text, timestamp))
    return signature_line(name, key_id(name, COSIGNATURE_TYPE, public) + _U64.pack(timestamp) + sig)


def _check_cosignature(text: str, name: str, raw: bytes, public: bytes) -> int:
    if len(raw) != 4 + 8 + 64:
        raise NoteError(f"the cosignature of {name} is {len(raw)} bytes, not 76")
    timestamp = _U64.unpack(raw[4:12])[0]
    if timestamp > _MAX_TIMESTAMP:
        raise NoteError(f"the cosignature of {name} has an out-of-range timestamp")
    if not _ed25519_ok(public, _cosigned_message(text, timestamp), raw[12:]):
        raise NoteError(f"the cosignature of {name} does not verify for this checkpoint")
    return timestamp


def verify_cosignature(checkpoint_text: str, line: str, name: str, public: bytes) -> int:
    """Check one cosignature line from ``name``/``public`` over ``checkpoint_text``; returns its timestamp."""
    line = line if line.endswith("\n") else line + "\n"
    _, sigs = split_note("x\n\n" + line)
    sig_name, raw = sigs[0]
    if sig_name != name or raw[:4] != key_id(name, COSIGNATURE_TYPE, public):
        raise NoteError(f"the line is not a cosignature by {name} with the given key")
    return _check_cosignature(checkpoint_text, name, raw, public)


def verified_cosignatures(note: str | bytes, cosigners: Mapping[str, bytes]) -> dict[str, int]:
    """{cosigner name: timestamp} for every cosignature in ``note`` by a known cosigner (type 0x04).

    Unknown signatures are ignored; a known cosigner's signature that fails rejects the note.
    """
    text, sigs = split_note(note)
    out: dict[str, int] = {}
    for name, raw in sigs:
        public = cosigners.get(name)
        if public is None or raw[:4] != key_id(name, COSIGNATURE_TYPE, public):
            continue
        if name in out:
            raise NoteError(f"note carries two cosignatures from {name}")
        out[name] = _check_cosignature(text, name, raw, public)
    return out
