"""The gateway bounds every input: each test makes the attack on a real gateway and shows it fails.

Bodies are streamed and cut at the endpoint's limit (the RSS of a real gateway process is
measured while a 300 MB chunked body is thrown at it); request heads and bodies have
deadlines (slowloris); idle keep-alive connections are closed; requests beyond the
concurrency limit get 503; tokens rotate on re-registration and can be revoked; the SQLite
files are the gateway user's only.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from services.gateway.admin import list_tokens, register_edge, revoke_token
from services.gateway.server import MAX_CHECKPOINT_BYTES
from shared.ledger.keys import SigningKey
from shared.runtime.config import load_config
from tests.edge import GatewayProc
from tests.pipeline import ROOT, wait_until
from tests.support.gateway import ThreadedGateway, gateway_reader

pytestmark = pytest.mark.timeout(300)

MB = 1 << 20


def _registered(db_url: str) -> tuple[str, str]:
    origin = f"mro-edge/L{time.monotonic_ns() % 10**8}"
    return origin, register_edge(db_url, origin, SigningKey.generate().public_pem())


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _closed_after(sock: socket.socket, deadline_s: float) -> float | None:
    """Seconds until the peer closed ``sock`` (EOF or reset), or None if it stayed open that long;
    whatever the peer sent is read and dropped."""
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < deadline_s:
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except TimeoutError:
            continue
        except ConnectionError:
            return time.monotonic() - start
    return None


def _read_response(sock: socket.socket, timeout_s: float) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body, read from the raw socket."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


# -- bodies -----------------------------------------------------------------------------------------


def test_a_300_mb_chunked_checkpoint_body_gets_413_and_the_gateway_stays_small(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path}/central/gateway.db"
    gateway = GatewayProc(db_url, tmp_path / "central")
    gateway.start()
    try:
        _, token = _registered(db_url)
        process = psutil.Process(gateway.proc.pid)
        baseline = process.memory_info().rss
        peak = [baseline]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.02)

        sent = [0]

        def body():  # 300 blocks of 1 MiB, bounded: never a 300 MB bytes object in this process either
            block = b"x" * MB
            for _ in range(300):
                sent[0] += len(block)
                yield block

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            response = httpx.post(gateway.url + "/v1/checkpoints", content=body(), timeout=60,
                                  headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        finally:
            done.set()
            sampler.join(5)
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "body_too_large"
        assert str(MAX_CHECKPOINT_BYTES) in response.json()["error"]["message"]
        growth = peak[0] - baseline
        assert growth < 32 * MB, f"the gateway's RSS grew by {growth / MB:.1f} MB on a refused body"
        assert sent[0] < 300 * MB, "the gateway read the whole body instead of closing the connection"
        assert httpx.get(gateway.url + "/health", timeout=5).status_code == 200
    finally:
        gateway.stop()


@pytest.mark.parametrize("path", ["/v1/entries", "/v1/checkpoints"])
def test_a_declared_oversized_body_is_refused_before_it_is_read(tmp_path: Path, path: str) -> None:
    db_url = f"sqlite:///{tmp_path}/gw/gateway.db"
    with ThreadedGateway(db_url, max_body_bytes=1000) as gw:
        _, token = _registered(db_url)
        limit = 1000 if path == "/v1/entries" else MAX_CHECKPOINT_BYTES
        with _connect(gw.port) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {limit + 1}\r\n\r\n".encode())
            status, headers, body = _read_response(sock, 10)
            assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
            assert headers.get("connection") == "close"
            assert _closed_after(sock, 5) is not None


@pytest.mark.parametrize("path", ["/v1/entries", "/v1/checkpoints"])
def test_a_streamed_body_is_cut_at_the_limit_on_every_endpoint(tmp_path: Path, path: str) -> None:
    """No Content-Length: the body is counted as it arrives and the connection closed at the limit."""
    db_url = f"sqlite:///{tmp_path}/gw/gateway.db"
    with ThreadedGateway(db_url, max_body_bytes=100_000) as gw:
        _, token = _registered(db_url)
        sent = [0]

        def body():
            for _ in range(64):
                sent[0] += MB
                yield b" " * MB

        response = httpx.post(gw.url + path, content=body(), timeout=60,
                              headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
        assert sent[0] < 64 * MB, "the whole body was read"


def test_a_stalled_body_gets_408_within_the_body_timeout(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path}/gw/gateway.db"
    with ThreadedGateway(db_url, body_timeout_s=1.5) as gw:
        _, token = _registered(db_url)
        with _connect(gw.port) as sock:
            start = time.monotonic()
            sock.sendall(f"POST /v1/checkpoints HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"checkpoint\":".encode())
            status, headers, body = _read_response(sock, 15)
            took = time.monotonic() - start
            assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout"
            assert 1.0 < took < 8, f"answered after {took:.1f} s"
            assert _closed_after(sock, 5) is not None


# -- heads and idle connections ----------------------------------------------------------------------


def test_slow_headers_are_cut_off_at_the_header_deadline(tmp_path: Path) -> None:
    """Slowloris: one header byte every 0.3 s keeps uvicorn's own keep-alive timer from firing;
    the header deadline closes the connection anyway."""
    with ThreadedGateway(f"sqlite:///{tmp_path}/gw/gateway.db", header_timeout_s=2, keep_alive_s=1) as gw:
        with _connect(gw.port) as sock:
            start = time.monotonic()
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            sock.settimeout(0.3)
            closed_at = None
            while time.monotonic() - start < 15:
                try:
                    sock.sendall(b"a")
                    if sock.recv(65536) == b"":
                        closed_at = time.monotonic() - start
                        break
                except TimeoutError:
                    continue
                except (ConnectionError, BrokenPipeError):
                    closed_at = time.monotonic() - start
                    break
            assert closed_at is not None, "a client dribbling headers held the connection for 15 s"
            assert 1.5 < closed_at < 7, f"closed after {closed_at:.1f} s, the header deadline is 2 s"


def test_an_idle_keep_alive_connection_is_closed(tmp_path: Path) -> None:
    with ThreadedGateway(f"sqlite:///{tmp_path}/gw/gateway.db", keep_alive_s=1) as gw:
        with _connect(gw.port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = _read_response(sock, 10)
            assert status == 200
            took = _closed_after(sock, 10)
            assert took is not None and took < 5, "an idle keep-alive connection stayed open"


# -- concurrency -------------------------------------------------------------------------------------


def test_requests_beyond_the_concurrency_limit_get_503_not_a_queue(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path}/gw/gateway.db"
    with ThreadedGateway(db_url, max_concurrent_requests=2, body_timeout_s=60) as gw:
        _, token = _registered(db_url)
        auth = {"Authorization": f"Bearer {token}"}
        holders = []
        for _ in range(2):  # two uploads that never send their body hold both slots
            sock = _connect(gw.port)
            sock.sendall(f"POST /v1/checkpoints HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                         "Content-Length: 100\r\n\r\n".encode())
            holders.append(sock)
        try:
            busy = wait_until(lambda: (r := httpx.get(gw.url + "/v1/head", headers=auth, timeout=5))
                              .status_code == 503 and r, 15, 0.1, "a 503 while both slots are held")
            assert busy.json()["error"]["code"] == "busy"
            assert busy.headers["retry-after"] == "1"
            started = time.monotonic()
            assert httpx.get(gw.url + "/health", timeout=5).status_code == 503
            assert time.monotonic() - started < 2, "the refusal waited for a slot"
        finally:
            for sock in holders:
                sock.close()
        wait_until(lambda: httpx.get(gw.url + "/v1/head", headers=auth, timeout=5).status_code == 200, 15, 0.1,
                   "the slots to free up once the uploads are gone")


# -- tokens ------------------------------------------------------------------------------------------


def test_re_registration_rotates_the_token_and_revocation_ends_it(db_url: str, gateway: ThreadedGateway) -> None:
    key = SigningKey.generate()
    origin = f"mro-edge/R{time.monotonic_ns() % 10**8}"
    first = register_edge(db_url, origin, key.public_pem())

    def head(token: str) -> int:
        return httpx.get(gateway.url + "/v1/head", headers={"Authorization": f"Bearer {token}"},
                         timeout=10).status_code

    assert head(first) == 200
    second = register_edge(db_url, origin, key.public_pem())
    assert head(first) == 401, "the old token still works after re-registration"
    assert head(second) == 200
    assert [t.origin for t in list_tokens(db_url, origin)] == [origin]

    with pytest.raises(ValueError, match="no valid token with id"):
        revoke_token(db_url, origin, "0000000000ff")
    assert head(second) == 200, "a revocation that matched nothing revoked something"
    assert revoke_token(db_url, origin, list_tokens(db_url, origin)[0].token_id) == 1
    assert head(second) == 401
    assert list_tokens(db_url, origin) == []
    third = register_edge(db_url, origin, key.public_pem())
    assert head(third) == 200 and head(second) == 401


def _cli(tmp_path: Path, db_url: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MRO_GATEWAY_DB_URL=db_url, MRO_DATA_DIR=str(tmp_path / "box"), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mro_edge", "gateway", *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_gateway_tokens_and_revoke_token_commands_never_show_a_secret(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path}/gw/gateway.db"
    with ThreadedGateway(db_url) as gw:
        origin, token = _registered(db_url)
        other, other_token = _registered(db_url)
        with gateway_reader(db_url) as tx:
            digests = {h for _, h, _ in tx.tokens()}
        listing = _cli(tmp_path, db_url, "tokens", "--json")
        assert listing.returncode == 0, listing.stderr
        rows = json.loads(listing.stdout)
        assert {r["origin"] for r in rows} == {origin, other}
        for secret in (token, other_token, *digests):
            assert secret not in listing.stdout + listing.stderr
        plain = _cli(tmp_path, db_url, "tokens")
        assert origin in plain.stdout and token not in plain.stdout

        revoked = _cli(tmp_path, db_url, "revoke-token", origin)
        assert revoked.returncode == 0, revoked.stderr
        assert "revoked 1 token" in revoked.stderr
        status = httpx.get(gw.url + "/v1/head", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert status.status_code == 401
        assert httpx.get(gw.url + "/v1/head", headers={"Authorization": f"Bearer {other_token}"},
                         timeout=10).status_code == 200
        again = _cli(tmp_path, db_url, "revoke-token", origin)
        assert again.returncode == 2 and "has no valid token" in again.stderr


# -- files -------------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_database_is_the_gateway_users_only(tmp_path: Path) -> None:
    directory = tmp_path / "central" / "gateway"
    db_url = f"sqlite:///{directory}/gateway.db"
    with ThreadedGateway(db_url) as gw:
        _, token = _registered(db_url)
        assert httpx.get(gw.url + "/v1/head", headers={"Authorization": f"Bearer {token}"}, timeout=10).is_success
        assert _mode(directory) == 0o700
        for name in ("gateway.db", "gateway.db-wal", "gateway.db-shm"):
            assert _mode(directory / name) == 0o600, name


def test_files_an_older_gateway_left_open_are_tightened(tmp_path: Path) -> None:
    data = tmp_path / "box"
    (data / "gateway").mkdir(parents=True, mode=0o755)
    (data / "gateway").chmod(0o755)
    config = load_config(env={"MRO_DATA_DIR": str(data)})
    db_url = config.gateway_db_url
    assert _mode(data / "gateway") == 0o700
    with ThreadedGateway(db_url):
        pass
    db = data / "gateway" / "gateway.db"
    db.chmod(0o644)
    with ThreadedGateway(db_url):
        assert _mode(db) == 0o600
