"""Signing keys: file safety, formats OpenSSL understands, and the auditor's verification path."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import nacl.signing
import pytest

from shared.ledger import keys as crypto
from shared.ledger.keys import (
    KeyFileError,
    KeyFormatError,
    SigningKey,
    key_id,
    public_key_from_pem,
    public_key_to_pem,
    verify_digest_signature,
)

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run(cmd: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, check=False)


def test_load_or_create_makes_owner_only_dir_and_key(tmp_path: Path) -> None:
    keys_dir = tmp_path / "var" / "keys"
    key = SigningKey.load_or_create(keys_dir)
    assert mode(keys_dir) == 0o700
    assert mode(keys_dir / "ledger.key") == 0o600
    assert (keys_dir / "ledger.key").read_text().startswith("-----BEGIN PRIVATE KEY-----\n")
    assert sorted(p.name for p in keys_dir.iterdir()) == ["ledger.key"]
    assert len(key.public_bytes) == 32


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_modes_do_not_depend_on_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        SigningKey.load_or_create(tmp_path / "keys", name="box")
    finally:
        os.umask(old)
    assert mode(tmp_path / "keys") == 0o700
    assert mode(tmp_path / "keys" / "box.key") == 0o600


def test_key_bytes_are_never_written_to_a_file_others_can_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    seen: list[int] = []

    def checked_write(fd: int, data: bytes) -> int:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            seen.append(stat.S_IMODE(st.st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(crypto.os, "write", checked_write)
    old = os.umask(0)
    try:
        SigningKey.load_or_create(tmp_path / "keys")
    finally:
        os.umask(old)
    assert seen == [0o600]


def test_load_or_create_twice_gives_the_same_key(tmp_path: Path) -> None:
    first = SigningKey.load_or_create(tmp_path / "keys")
    before = (tmp_path / "keys" / "ledger.key").read_bytes()
    second = SigningKey.load_or_create(tmp_path / "keys")
    assert second.public_bytes == first.public_bytes
    assert second.kid == first.kid
    assert (tmp_path / "keys" / "ledger.key").read_bytes() == before
    assert verify_digest_signature(first.public_bytes, b"x", second.sign_digest(b"x"))


def test_racing_creator_loses_to_the_key_already_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys_dir = tmp_path / "keys"
    winner = SigningKey.generate()
    real_link = os.link

    def link_after_rival(src: str | Path, dst: str | Path) -> None:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, winner._private_pem().encode())
        os.close(fd)
        real_link(src, dst)

    monkeypatch.setattr(crypto.os, "link", link_after_rival)
    loaded = SigningKey.load_or_create(keys_dir)
    assert loaded.public_bytes == winner.public_bytes
    assert sorted(p.name for p in keys_dir.iterdir()) == ["ledger.key"]


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_refuses_a_key_others_can_access(tmp_path: Path, bad_mode: int) -> None:
    SigningKey.load_or_create(tmp_path / "keys")
    path = tmp_path / "keys" / "ledger.key"
    path.chmod(bad_mode)
    with pytest.raises(KeyFileError, match=r"chmod 600") as info:
        SigningKey.load_or_create(tmp_path / "keys")
    assert f"{bad_mode:04o}" in str(info.value)
    with pytest.raises(KeyFileError):
        SigningKey.load(path)


def test_refuses_a_key_dir_others_can_write(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    keys_dir.chmod(0o777)
    with pytest.raises(KeyFileError, match=r"chmod 700"):
        SigningKey.load_or_create(keys_dir)


def test_existing_readable_dir_is_accepted_and_left_alone(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    keys_dir.chmod(0o755)
    SigningKey.load_or_create(keys_dir)
    assert mode(keys_dir) == 0o755
    assert mode(keys_dir / "ledger.key") == 0o600


def test_missing_key_file_says_how_to_provide_one(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"no signing key at .*openssl genpkey"):
        SigningKey.load(tmp_path / "nope.key")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a key\n",
        (b"-----BEGIN PUBLIC KEY-----\n"
         b"MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
         b"-----END PUBLIC KEY-----\n"),
        b"-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n",
        (b"-----BEGIN PRIVATE KEY-----\n"
         b"MC4CAQAwBQYDK2VuBCIEIOzA0UCPnpnLqstH2aUJrsap4Y/KAJKQ3U+hQ0zL86Fp\n"
         b"-----END PRIVATE KEY-----\n"),
        b"\xff\xfe",
    ],
    ids=["empty", "text", "public-key", "bad-base64", "x25519-key", "binary"],
)
def test_malformed_key_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ledger.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=r"PKCS#8 PEM"):
        SigningKey.load(path)


def test_key_name_must_be_a_plain_file_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SigningKey.load_or_create(tmp_path, name="../escape")


def test_kid_is_first_8_bytes_of_sha256_of_the_raw_public_key() -> None:
    key = SigningKey(bytes(range(32)))
    assert key.kid == hashlib.sha256(key.public_bytes).hexdigest()[:16]
    assert key.kid == key_id(key.public_bytes)
    assert SigningKey(bytes(range(32))).kid == key.kid


def test_sign_digest_signs_the_sha256_digest_not_the_data() -> None:
    key = SigningKey.generate()
    data = b'{"seq":0}'
    sig = key.sign_digest(data)
    assert len(sig) == 64
    nacl.signing.VerifyKey(key.public_bytes).verify(hashlib.sha256(data).digest(), sig)
    assert verify_digest_signature(key.public_bytes, data, sig)


def test_verify_digest_signature_rejects_what_it_should() -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    sig = key.sign_digest(b"data")
    assert not verify_digest_signature(key.public_bytes, b"datA", sig)
    assert not verify_digest_signature(other.public_bytes, b"data", sig)
    assert not verify_digest_signature(key.public_bytes, b"data", sig[:-1])
    assert not verify_digest_signature(key.public_bytes, b"data", bytes([sig[0] ^ 1]) + sig[1:])
    with pytest.raises(ValueError):
        verify_digest_signature(key.public_bytes[:31], b"data", sig)


def test_public_pem_round_trips() -> None:
    key = SigningKey.generate()
    pem = key.public_pem()
    assert pem.startswith("-----BEGIN PUBLIC KEY-----\n") and pem.endswith("-----END PUBLIC KEY-----\n")
    assert public_key_from_pem(pem) == key.public_bytes
    assert public_key_from_pem(pem.replace("\n", "\r\n") + "\n") == key.public_bytes
    assert public_key_to_pem(key.public_bytes) == pem


@pytest.mark.parametrize(
    "pem",
    [
        "",
        "-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n",
        ("-----BEGIN PUBLIC KEY-----\n"
         "MCowBQYDK2VuAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
         "-----END PUBLIC KEY-----\n"),
        ("-----BEGIN PUBLIC KEY-----\n"
         "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZu\n"
         "-----END PUBLIC KEY-----\n"),
        ("-----BEGIN PRIVATE KEY-----\n"
         "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
         "-----END PRIVATE KEY-----\n"),
    ],
    ids=["empty", "no-body", "x25519", "short", "wrong-label"],
)
def test_public_key_from_pem_rejects_other_things(pem: str) -> None:
    with pytest.raises(KeyFormatError):
        public_key_from_pem(pem)


@needs_openssl
def test_openssl_derives_the_same_public_pem_from_our_key_file(tmp_path: Path) -> None:
    key = SigningKey.load_or_create(tmp_path / "keys")
    out = run("openssl pkey -in keys/ledger.key -pubout", tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == key.public_pem()


@needs_openssl
def test_we_load_a_key_made_by_openssl_genpkey(tmp_path: Path) -> None:
    assert run("openssl genpkey -algorithm ed25519 -out k.pem && chmod 600 k.pem", tmp_path).returncode == 0
    key = SigningKey.load(tmp_path / "k.pem")
    assert run("openssl pkey -in k.pem -pubout", tmp_path).stdout == key.public_pem()
    (tmp_path / "entry.bin").write_bytes(b'{"v":1}')
    signed = run(
        "openssl dgst -sha256 -binary entry.bin > digest.bin && "
        "openssl pkeyutl -sign -rawin -inkey k.pem -in digest.bin -out sig.bin",
        tmp_path,
    )
    assert signed.returncode == 0, signed.stderr
    assert verify_digest_signature(key.public_bytes, b'{"v":1}', (tmp_path / "sig.bin").read_bytes())


@needs_openssl
def test_auditor_verifies_a_signature_with_stock_openssl(tmp_path: Path) -> None:
    """The exact commands the README gives auditors (OpenSSL 3.x: -rawin signs/verifies Ed25519)."""
    key = SigningKey.generate()
    entry = '{"body":{"note":"torque \\"OK\\" \u00e9\u2028"},"seq":0,"v":1}'.encode()
    (tmp_path / "pub.pem").write_text(key.public_pem())
    (tmp_path / "entry.bin").write_bytes(entry)
    (tmp_path / "sig.bin").write_bytes(key.sign_digest(entry))

    dgst = run("openssl dgst -sha256 -binary entry.bin > digest.bin", tmp_path)
    assert dgst.returncode == 0, dgst.stderr
    assert (tmp_path / "digest.bin").read_bytes() == hashlib.sha256(entry).digest()
    summed = run("sha256sum entry.bin", tmp_path)
    assert summed.stdout.split()[0] == hashlib.sha256(entry).hexdigest()

    verify = "openssl pkeyutl -verify -rawin -pubin -inkey pub.pem -in digest.bin -sigfile sig.bin"
    ok = run(verify, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "Signature Verified Successfully" in ok.stdout

    sig = bytearray(key.sign_digest(entry))
    sig[10] ^= 0x01
    (tmp_path / "sig.bin").write_bytes(bytes(sig))
    assert run(verify, tmp_path).returncode != 0

    (tmp_path / "sig.bin").write_bytes(key.sign_digest(entry))
    (tmp_path / "entry.bin").write_bytes(entry.replace(b"OK", b"NOK"))
    assert run("openssl dgst -sha256 -binary entry.bin > digest.bin && " + verify, tmp_path).returncode != 0


@needs_openssl
@pytest.mark.skipif(shutil.which("xxd") is None, reason="xxd not installed")
def test_sha256sum_digest_works_as_the_signed_message(tmp_path: Path) -> None:
    key = SigningKey.generate()
    (tmp_path / "pub.pem").write_text(key.public_pem())
    (tmp_path / "entry.bin").write_bytes(b'{"seq":7}')
    (tmp_path / "sig.bin").write_bytes(key.sign_digest(b'{"seq":7}'))
    out = run(
        "sha256sum entry.bin | cut -d' ' -f1 | xxd -r -p > digest.bin && "
        "openssl pkeyutl -verify -rawin -pubin -inkey pub.pem -in digest.bin -sigfile sig.bin",
        tmp_path,
    )
    assert out.returncode == 0, out.stderr


@needs_openssl
def test_auditor_recomputes_the_kid_from_the_public_pem(tmp_path: Path) -> None:
    key = SigningKey.generate()
    (tmp_path / "pub.pem").write_text(key.public_pem())
    out = run("openssl pkey -pubin -in pub.pem -outform DER | tail -c 32 | sha256sum | cut -c1-16", tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == key.kid


# sign_raw (signed notes) and the ledger's key files


@needs_openssl
def test_sign_raw_is_plain_ed25519_that_openssl_verifies(tmp_path: Path) -> None:
    key = SigningKey.generate()
    text = b"mro-edge/HGR1\n12\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"
    sig = key.sign_raw(text)
    nacl.signing.VerifyKey(key.public_bytes).verify(text, sig)
    assert sig != key.sign_digest(text)
    (tmp_path / "pub.pem").write_text(key.public_pem())
    (tmp_path / "text").write_bytes(text)
    (tmp_path / "sig").write_bytes(sig)
    ok = run("openssl pkeyutl -verify -rawin -pubin -inkey pub.pem -in text -sigfile sig", tmp_path)
    assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout
    (tmp_path / "text").write_bytes(text.replace(b"12", b"13"))
    assert run("openssl pkeyutl -verify -rawin -pubin -inkey pub.pem -in text -sigfile sig", tmp_path).returncode


def test_ledger_key_files_generate_rotate_and_retire(tmp_path: Path) -> None:
    files = crypto.LedgerKeyFiles(tmp_path / "keys")
    with pytest.raises(KeyFileError):
        files.stage_rotation()  # nothing to rotate from
    first = files.generate()
    assert mode(tmp_path / "keys") == 0o700 and mode(files.current_path) == 0o600
    with pytest.raises(KeyFileError, match="never overwritten"):
        files.generate()
    assert files.pending() is None
    nxt = files.stage_rotation()
    assert mode(files.next_path) == 0o600 and files.pending().kid == nxt.kid
    with pytest.raises(KeyFileError, match="already pending"):
        files.stage_rotation()
    with pytest.raises(KeyFileError, match="restore the key file"):
        files.complete_rotation("0" * 16)
    assert files.complete_rotation(nxt.kid).kid == nxt.kid
    assert files.current(create=False).kid == nxt.kid and not files.next_path.exists()
    assert [k.kid for k in files.retired()] == [first.kid]
    assert mode(tmp_path / "keys" / "retired") == 0o700
    assert mode(tmp_path / "keys" / "retired" / f"ledger.{first.kid}.key") == 0o600
    assert files.complete_rotation(nxt.kid).kid == nxt.kid  # idempotent
    assert files.public_keys() == {first.kid: first.public_bytes, nxt.kid: nxt.public_bytes}
    (tmp_path / "keys" / "retired" / f"ledger.{first.kid}.key").unlink()
    assert files.public_keys() == {first.kid: first.public_bytes, nxt.kid: nxt.public_bytes}
