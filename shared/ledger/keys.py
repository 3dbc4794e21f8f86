"""Ed25519 signing keys for the ledger (DESIGN.md section 6).

Keys live in standard files so an auditor needs nothing but OpenSSL:

- the private key is PKCS#8 PEM (``BEGIN PRIVATE KEY``), the same bytes
  ``openssl genpkey -algorithm ed25519`` writes, so ``openssl pkey -in KEY -pubout`` works;
- the public key is SubjectPublicKeyInfo PEM (``BEGIN PUBLIC KEY``).

Both DER forms are fixed-size for Ed25519, so they are built and parsed by hand from their
constant prefixes instead of pulling in an ASN.1 library.

What gets signed is the 32-byte SHA-256 digest of the data, not the data itself. That is the
ledger's contract: ``openssl dgst -sha256 -binary entry.bin > digest.bin`` followed by
``openssl pkeyutl -verify -rawin -pubin -inkey pub.pem -in digest.bin -sigfile sig.bin``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import nacl.exceptions
import nacl.signing

from shared.runtime.files import fsync_dir, write_new

_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PRIVATE_LABEL = "PRIVATE KEY"
_PUBLIC_LABEL = "PUBLIC KEY"
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_MAX_KEY_FILE_BYTES = 16384
_SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


class KeyFileError(Exception):
    """A key file is missing, unreadable, malformed or not private enough; the message says what to do."""


class KeyFormatError(ValueError):
    """Text that should hold an Ed25519 key in PEM form does not."""


def key_id(public_bytes: bytes) -> str:
    """Key id (``kid``): hex of the first 8 bytes of SHA-256 over the 32-byte raw public key.

    Short enough to sit in every ledger entry, long enough that two keys of one
    organisation never share it, and anyone can recompute it from the public PEM.
    """
    if len(public_bytes) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(public_bytes)}")
    return hashlib.sha256(public_bytes).digest()[:8].hex()


def _pem(label: str, der: bytes) -> str:
    b64 = base64.b64encode(der).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"


def _unpem(label: str, text: str) -> bytes:
    """DER inside the single ``label`` PEM block of ``text``; KeyFormatError if there is not exactly one."""
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 3 or lines[0] != begin or lines[-1] != end:
        raise KeyFormatError(f"expected one PEM block '{begin}' ... '{end}'")
    try:
        return base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFormatError(f"the {label} PEM block is not valid base64") from exc


def public_key_from_pem(pem: str) -> bytes:
    """The 32 raw public key bytes of an Ed25519 SubjectPublicKeyInfo PEM (``BEGIN PUBLIC KEY``)."""
    der = _unpem(_PUBLIC_LABEL, pem)
    if len(der) != len(_SPKI_PREFIX) + PUBLIC_KEY_BYTES or not der.startswith(_SPKI_PREFIX):
        raise KeyFormatError("the PUBLIC KEY PEM block is not an Ed25519 SubjectPublicKeyInfo")
    return der[len(_SPKI_PREFIX) :]


def public_key_to_pem(public_bytes: bytes) -> str:
    """SubjectPublicKeyInfo PEM of a raw Ed25519 public key, byte-identical to ``openssl pkey -pubout``."""
    if len(public_bytes) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(public_bytes)}")
    return _pem(_PUBLIC_LABEL, _SPKI_PREFIX + public_bytes)


def verify_digest_signature(public_bytes: bytes, data: bytes, signature: bytes) -> bool:
    """True if ``signature`` is the Ed25519 signature of SHA-256(``data``) under ``public_bytes``.

    A signature of the wrong length is simply invalid (False); a public key of the wrong
    length is a configuration error and raises ValueError.
    """
    if len(public_bytes) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(public_bytes)}")
    if len(signature) != _SIGNATURE_BYTES:
        return False
    try:
        nacl.signing.VerifyKey(public_bytes).verify(hashlib.sha256(data).digest(), signature)
    except nacl.exceptions.BadSignatureError:
        return False
    return True


class SigningKey:
    """An Ed25519 private key used to sign ledger entries, plus its public half and ``kid``."""

    __slots__ = ("_key", "kid", "public_bytes")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        self._key = nacl.signing.SigningKey(seed)
        self.public_bytes: bytes = bytes(self._key.verify_key)
        self.kid: str = key_id(self.public_bytes)

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r})"

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh key from the OS CSPRNG, held in memory only."""
        return cls(secrets.token_bytes(32))

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """Read a PKCS#8 PEM Ed25519 key, refusing a file that anyone but its owner may access."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KeyFileError(
                f"no signing key at {path}: start the sign service once to create it, or install an "
                f"Ed25519 PKCS#8 PEM key there (openssl genpkey -algorithm ed25519 -out {path}; chmod 600 {path})"
            ) from None
        except OSError as exc:
            raise KeyFileError(
                f"cannot open signing key {path}: {exc.strerror}; check its owner and mode"
            ) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(
                    f"signing key {path} is not a regular file; replace it with the PEM key file"
                )
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise KeyFileError(
                    f"signing key {path} has mode {mode:04o} and may be read by other users; make it "
                    f"owner-only with 'chmod 600 {path}', and replace the key if others could have copied it"
                )
            raw = os.read(fd, _MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        return cls(cls._seed_from_pem(path, raw))

    @staticmethod
    def _seed_from_pem(path: Path, raw: bytes) -> bytes:
        hint = (
            f"{path} must hold an Ed25519 private key in PKCS#8 PEM form (openssl genpkey -algorithm ed25519)"
        )
        if len(raw) > _MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"{path} is too large to be a key file; {hint}")
        try:
            der = _unpem(_PRIVATE_LABEL, raw.decode("ascii"))
        except (UnicodeDecodeError, KeyFormatError):
            raise KeyFileError(hint) from None
        if len(der) != len(_PKCS8_PREFIX) + 32 or not der.startswith(_PKCS8_PREFIX):
            raise KeyFileError(hint)
        return der[len(_PKCS8_PREFIX) :]

    @classmethod
    def load_or_create(cls, keys_dir: Path, name: str = "ledger") -> SigningKey:
        """Load ``keys_dir/<name>.key``, creating the directory (0700) and a new key (0600) if absent.

        The key is written to a temporary file that is created with mode 0600 (never readable by
        others, not even briefly), fsynced, then hard-linked into place so that two processes
        starting at once cannot both believe their own key won: the loser loads the winner's.
        """
        if not _KEY_NAME.match(name):
            raise ValueError(f"key name {name!r} must be a plain file name (letters, digits, '_', '.', '-')")
        keys_dir = Path(keys_dir)
        cls._ensure_private_dir(keys_dir)
        path = keys_dir / f"{name}.key"
        if path.exists() or path.is_symlink():
            return cls.load(path)
        key = cls.generate()
        try:
            key.save(path)
        except FileExistsError:
            return cls.load(path)
        return key

    def save(self, path: Path) -> None:
        """Write this key to ``path`` (PKCS#8 PEM, mode 0600), never replacing an existing file.

        FileExistsError if ``path`` exists. The bytes go to a temporary 0600 file in the same
        directory, are fsynced, and are hard-linked into place, so the file appears complete or
        not at all; the directory must already be private (``ensure_private_dir``).
        """
        try:
            write_new(Path(path), self._private_pem().encode("ascii"))
        except FileExistsError:
            raise
        except OSError as exc:
            raise KeyFileError(f"cannot write signing key {path}: {exc.strerror}") from exc

    @classmethod
    def ensure_private_dir(cls, keys_dir: Path) -> None:
        """Create ``keys_dir`` (0700) or check that only its owner can write to it (KeyFileError)."""
        cls._ensure_private_dir(Path(keys_dir))

    @staticmethod
    def _ensure_private_dir(keys_dir: Path) -> None:
        """Create ``keys_dir`` as 0700, or accept an existing one that only its owner can write to.

        A directory others can write to would let them swap the key file for one they know.
        """
        try:
            keys_dir.parent.mkdir(parents=True, exist_ok=True)
            keys_dir.mkdir(mode=0o700)
            os.chmod(keys_dir, 0o700)
            fsync_dir(keys_dir.parent)
            return
        except FileExistsError:
            pass
        except OSError as exc:
            raise KeyFileError(f"cannot create key directory {keys_dir}: {exc.strerror}") from exc
        st = keys_dir.stat()
        if not stat.S_ISDIR(st.st_mode):
            raise KeyFileError(f"{keys_dir} exists but is not a directory; point the key directory elsewhere")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            raise KeyFileError(
                f"key directory {keys_dir} has mode {mode:04o}, so other users could replace the key; "
                f"fix it with 'chmod 700 {keys_dir}'"
            )

    def _private_pem(self) -> str:
        return _pem(_PRIVATE_LABEL, _PKCS8_PREFIX + bytes(self._key))

    def sign_digest(self, data: bytes) -> bytes:
        """64-byte Ed25519 signature whose signed message is the 32-byte SHA-256 digest of ``data``."""
        return self._key.sign(hashlib.sha256(data).digest()).signature

    def sign_raw(self, message: bytes) -> bytes:
        """64-byte plain RFC 8032 Ed25519 signature over ``message`` itself (signed notes, checkpoints).

        ``openssl pkeyutl -verify -rawin`` checks it against the message bytes directly.
        """
        return self._key.sign(bytes(message)).signature

    def public_pem(self) -> str:
        """The public key as SubjectPublicKeyInfo PEM, identical to ``openssl pkey -in KEY -pubout``."""
        return public_key_to_pem(self.public_bytes)


class LedgerSigner(Protocol):
    """What the ledger needs from a signing key: ``SigningKey`` here, an HSM-held key elsewhere.

    - ``kid``: ``key_id(public_bytes)``; named in every entry the key signs.
    - ``public_bytes``: the 32-byte raw Ed25519 public key.
    - ``sign_digest(data)``: Ed25519 over SHA-256(data) (ledger entries); an HSM computes the
      digest on the host and signs those 32 bytes with CKM_EDDSA.
    - ``sign_raw(message)``: Ed25519 over ``message`` (signed notes: checkpoints); CKM_EDDSA.
    """

    kid: str
    public_bytes: bytes

    def sign_digest(self, data: bytes) -> bytes: ...

    def sign_raw(self, message: bytes) -> bytes: ...


LEDGER_KEY = "ledger"
NEXT_KEY = "ledger.next"
RETIRED_DIR = "retired"


class LedgerKeyFiles:
    """The ledger's key files in ``$MRO_DATA_DIR/keys`` (0700; every private key file 0600).

    - ``ledger.key``       the key that signs new entries and checkpoints;
    - ``ledger.next.key``  a rotation waiting for the sign service (``mro-edge keys rotate``): at
                           its next batch it appends a ``key_rotation`` entry signed by the old
                           key, signs from then on with the new one, and after the commit renames
                           this file to ``ledger.key``;
    - ``retired/ledger.<kid>.key``  keys that were rotated out; they never sign again. Verification
                           needs only their public halves (``retired/ledger.<kid>.pub.pem``, and
                           the ledger carries every later key itself): destroy the ``.key`` files
                           under your key-retention policy, keep the ``.pub.pem`` ones.
    """

    def __init__(self, keys_dir: Path) -> None:
        self.dir = Path(keys_dir)
        self.current_path = self.dir / f"{LEDGER_KEY}.key"
        self.next_path = self.dir / f"{NEXT_KEY}.key"
        self._pending: tuple[tuple[int, int], SigningKey] | None = None

    def current(self, *, create: bool = True) -> SigningKey:
        """``ledger.key`` (created on first use unless ``create`` is False: then KeyFileError)."""
        if create:
            return SigningKey.load_or_create(self.dir, LEDGER_KEY)
        return SigningKey.load(self.current_path)

    def generate(self) -> SigningKey:
        """Create ``ledger.key``; KeyFileError if one exists (a ledger key is never overwritten)."""
        SigningKey.ensure_private_dir(self.dir)
        return _save_new_key(self.current_path, lambda existing: (
            f"{self.current_path} already holds ledger key {existing.kid}; a ledger key is "
            "never overwritten: use 'mro-edge keys rotate' to replace it"))

    def pending(self) -> SigningKey | None:
        """The key of a rotation not yet taken up (``ledger.next.key``), or None. One stat per call."""
        try:
            st = os.stat(self.next_path)
        except FileNotFoundError:
            self._pending = None
            return None
        stamp = (st.st_ino, st.st_mtime_ns)
        if self._pending is None or self._pending[0] != stamp:
            self._pending = (stamp, SigningKey.load(self.next_path))
        return self._pending[1]

    def stage_rotation(self) -> SigningKey:
        """Write a fresh ``ledger.next.key`` for the sign service to rotate to; KeyFileError if one
        is already pending or there is no current key."""
        current = self.current(create=False)
        return _save_new_key(self.next_path, lambda waiting: (
            f"a rotation from {current.kid} to {waiting.kid} is already pending "
            f"({self.next_path}); the sign service takes it up with its next record"))

    def complete_rotation(self, new_kid: str) -> SigningKey:
        """After the rotation entry naming ``new_kid`` has committed: archive ``ledger.key`` under
        ``retired/`` and rename ``ledger.next.key`` over it (atomic, fsynced). Idempotent; returns the
        current key. KeyFileError if neither file holds ``new_kid``."""
        current = self.current(create=False)
        if current.kid == new_kid:
            return current
        pending = self.pending()
        if pending is None or pending.kid != new_kid:
            raise KeyFileError(
                f"the ledger rotated to key {new_kid}, but {self.dir} holds only {current.kid}"
                f"{f' and pending {pending.kid}' if pending else ''}: restore the key file of {new_kid} "
                "(ledger.key) from your key backup; the service will not sign with another key")
        retired = self.dir / RETIRED_DIR
        SigningKey.ensure_private_dir(retired)
        try:
            os.link(self.current_path, retired / f"{LEDGER_KEY}.{current.kid}.key")
        except FileExistsError:
            pass
        public = retired / f"{LEDGER_KEY}.{current.kid}.pub.pem"
        if not public.exists():
            tmp = retired / f".{public.name}.{secrets.token_hex(6)}.tmp"
            tmp.write_text(current.public_pem())
            os.replace(tmp, public)
        fsync_dir(retired)
        os.replace(self.next_path, self.current_path)
        fsync_dir(self.dir)
        self._pending = None
        return pending

    def retired(self) -> list[SigningKey]:
        """Private keys rotated out earlier and still kept (``retired/*.key``), oldest file first."""
        retired = self.dir / RETIRED_DIR
        if not retired.is_dir():
            return []
        paths = sorted(retired.glob(f"{LEDGER_KEY}.*.key"), key=lambda p: p.stat().st_mtime_ns)
        return [SigningKey.load(p) for p in paths]

    def public_keys(self) -> dict[str, bytes]:
        """kid -> public key of every ledger key this box has held: retired (``retired/*.pub.pem``, kept
        when the private file is destroyed), current and pending."""
        keys: dict[str, bytes] = {}
        retired = self.dir / RETIRED_DIR
        if retired.is_dir():
            for p in sorted(retired.glob(f"{LEDGER_KEY}.*.pub.pem")):
                try:
                    public = public_key_from_pem(p.read_text(encoding="ascii"))
                except (KeyFormatError, UnicodeDecodeError, OSError) as exc:
                    raise KeyFileError(f"{p} is not an Ed25519 public key PEM: {exc}") from None
                keys[key_id(public)] = public
        for key in self.retired():
            keys[key.kid] = key.public_bytes
        if self.current_path.exists():
            current = self.current(create=False)
            keys[current.kid] = current.public_bytes
        pending = self.pending()
        if pending is not None:
            keys[pending.kid] = pending.public_bytes
        return keys


def _save_new_key(path: Path, taken: Callable[[SigningKey], str]) -> SigningKey:
    """A fresh key saved at `path`; if a key is there already, KeyFileError with `taken(it)`."""
    key = SigningKey.generate()
    try:
        key.save(path)
    except FileExistsError:
        raise KeyFileError(taken(SigningKey.load(path))) from None
    return key
