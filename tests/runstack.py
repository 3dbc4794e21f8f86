"""`mro-edge run` as an operator starts it: a real process tree on a real broker, its console
(stderr) captured in a file, its children found with psutil.

    run = RunProc(data_dir, broker_url, "--no-broker").start()   # waits for "mro-edge is running"
    run.children()      # {name: pid}
    run.kill()          # kill -9 the supervisor only
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.brokers import free_port, mosquitto_binary
from tests.pipeline import ROOT

RUNNING = "mro-edge is running"


def cli_env(data_dir: Path, mqtt_url: str, **settings: str) -> dict[str, str]:
    # neither our settings nor make's (`make test` sets MAKELEVEL, which changes run's advice)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MRO_") and k not in ("MAKELEVEL", "MAKEFLAGS")
    }
    env.update(MRO_DATA_DIR=str(data_dir), MRO_MQTT_URL=mqtt_url, MRO_LOG_LEVEL="INFO", PYTHONPATH=str(ROOT),
               MRO_GATEWAY_LISTEN=f"127.0.0.1:{free_port()}",
               MRO_MCC_LISTEN=f"127.0.0.1:{free_port()}", MRO_STAGE_STATUS_INTERVAL_S="1",
               MRO_LINK_PROBE_INTERVAL_S="1")
    env.update(settings)
    return env


def cli(
    *args: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mro_edge", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def gone(pid: int) -> bool:
    """Not running any more (a zombie nobody reaped yet counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class RunProc:
    def __init__(self, data_dir: Path, mqtt_url: str, *args: str, **settings: str) -> None:
        self.data_dir = Path(data_dir)
        self.args = args
        self.env = cli_env(self.data_dir, mqtt_url, **settings)
        self.console_path = self.data_dir.parent / f"run-console-{time.monotonic_ns()}.txt"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90) -> RunProc:
        with open(self.console_path, "wb") as console:
            self.proc = subprocess.Popen([sys.executable, "-m", "mro_edge", "run", *self.args], env=self.env,
                                         cwd=ROOT, stdout=console, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while RUNNING not in self.console():
            if self.proc.poll() is not None:
                raise AssertionError(f"mro-edge run exited with {self.proc.returncode}:\n{self.console()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"mro-edge run not running after {timeout_s} s:\n{self.console()}")
            time.sleep(0.2)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def children(self) -> dict[str, int]:
        """{service name: pid} of the supervisor's children now."""
        found = {}
        for child in psutil.Process(self.pid).children():
            try:
                argv = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "mro_edge" in argv:
                found[argv[argv.index("mro_edge") + 2] if argv[argv.index("mro_edge") + 1] == "service"
                      else argv[argv.index("mro_edge") + 1]] = child.pid
        return found

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                for pid in self.children().values():
                    os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else 0


class AnonymousMosquitto:
    """A Mosquitto that lets anybody in and publish anything: the misconfiguration to catch."""

    def __init__(self, work_dir: Path) -> None:
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        work_dir.mkdir(parents=True, exist_ok=True)
        conf = work_dir / "anonymous.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence false"]
        if os.geteuid() == 0:
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n")
        self.log = open(work_dir / "anonymous-mosquitto.log", "ab")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=self.log, stderr=self.log)
        from shared.runtime.mqtt import mqtt_connack

        deadline = time.monotonic() + 10
        while True:
            try:
                if mqtt_connack(self.port, None, None) == 0:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the anonymous mosquitto did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
