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
from pathlib import Path

import nacl.exceptions
import nacl.signing

_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PRIVATE_LABEL = "PRIVATE KEY"
_PUBLIC_LABEL = "PUBLIC KEY"
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        tmp = keys_dir / f".{name}.key.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise KeyFileError(f"cannot create a key file in {keys_dir}: {exc.strerror}") from exc
        try:
            try:
                os.fchmod(fd, 0o600)
                pending = memoryview(key._private_pem().encode("ascii"))
                while pending:
                    pending = pending[os.write(fd, pending) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return cls.load(path)
            _fsync_dir(keys_dir)
        except OSError as exc:
            raise KeyFileError(f"cannot write signing key {path}: {exc.strerror}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return key

    @staticmethod
    def _ensure_private_dir(keys_dir: Path) -> None:
        """Create ``keys_dir`` as 0700, or accept an existing one that only its owner can write to.

        A directory others can write to would let them swap the key file for one they know.
        """
        try:
            keys_dir.parent.mkdir(parents=True, exist_ok=True)
            keys_dir.mkdir(mode=0o700)
            os.chmod(keys_dir, 0o700)
            _fsync_dir(keys_dir.parent)
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

    def public_pem(self) -> str:
        """The public key as SubjectPublicKeyInfo PEM, identical to ``openssl pkey -in KEY -pubout``."""
        return public_key_to_pem(self.public_bytes)
