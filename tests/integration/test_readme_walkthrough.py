"""The README's walk-through ("Sending a record by hand"), run as a technician runs it (issue 9).

A real `mro-edge run` (embedded broker, reference gateway, every service) is started the way
"Two commands on a fresh machine" says to move it off taken ports: MRO_MQTT_URL and
MRO_GATEWAY_LISTEN, here on free ports, its data directory `var` in a temporary working
directory. That directory is where the reader's second terminal is: `.venv` in it is the
project's virtualenv, and `var` is the default data directory, so the README's commands get no
MRO_* variable at all and find the stack through var/run.json.

The commands are the README's own ```sh blocks, extracted from README.md (never copied here),
pasted one after the other into one real bash, with `set -u` (an unset variable ends the shell)
and an ERR trap (every failing command is reported), talking to the stack with the real
`mosquitto_pub` and `mosquitto_sub`. A missing block fails the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from services.registry import service_names
from shared.ledger.entry import parse_export_line
from shared.ledger.keys import key_id, public_key_from_pem
from shared.ledger.verify import verify_chain
from shared.runtime.topics import Topics
from tests import readme
from tests.brokers import free_port
from tests.pipeline import ROOT
from tests.runstack import RunProc

pytestmark = pytest.mark.timeout(120)

TITLE = "Sending a record by hand"
STATION = "HGR1"
DEVICE = "TQW-01"
RECEIPTS = Topics(STATION).receipt(DEVICE)
MARK = "__walkthrough__"


class Terminal:
    """One bash reading what is pasted into it, like a terminal; stdout and stderr kept in files."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.stdout_path, self.stderr_path = cwd.parent / "terminal.out", cwd.parent / "terminal.err"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(["bash", "--norc", "--noprofile"], stdin=subprocess.PIPE, stdout=out,
                                         stderr=err, cwd=cwd, env=env, start_new_session=True)
        self.pastes = 0
        self.paste("set -u -o pipefail\n"
                   f"trap 'echo \"{MARK} failed ($?): $BASH_COMMAND\"' ERR")

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def errors(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def paste(self, text: str, timeout_s: float = 30) -> str:
        """Run `text`; what it printed on stdout (background jobs' lines included). Fails if the
        shell ends, a command fails or it takes longer than `timeout_s`."""
        self.pastes += 1
        done = f"{MARK} done {self.pastes}"
        before = len(self.output())
        self.proc.stdin.write(f"{text.rstrip()}\necho '{done}'\n".encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while done not in self.output():
            if self.proc.poll() is not None:
                raise AssertionError(f"the shell ended ({self.proc.returncode}) running:\n{text}\n"
                                     f"stderr:\n{self.errors()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not done after {timeout_s} s:\n{text}\nstderr:\n{self.errors()}")
            time.sleep(0.05)
        printed = self.output()[before:].split(done)[0]
        failed = [line for line in printed.splitlines() if line.startswith(f"{MARK} failed")]
        assert not failed, f"{failed} pasting:\n{text}\nstderr:\n{self.errors()}"
        return printed

    def value(self, name: str) -> str:
        """A shell variable's value, as the pasted commands left it."""
        printed = self.paste(f'printf "{MARK} {name}=%s\\n" "${{{name}-}}"')
        return re.search(rf"^{MARK} {name}=(.*)$", printed, flags=re.M).group(1)

    def receipts(self) -> list[dict]:
        """What the README's receipt watcher printed (`-v`: topic, space, payload), in order."""
        found = []
        for line in self.output().splitlines():
            topic, _, payload = line.partition(" ")
            if topic == RECEIPTS:
                found.append(json.loads(payload))
        return found

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the shell and its background jobs: its own group
        self.proc.wait(10)


def without_output(printed: str) -> list[str]:
    """Lines a command printed, without the background receipt watcher's."""
    return [line for line in printed.splitlines() if not line.startswith(RECEIPTS + " ")]


def wait_for_receipts(terminal: Terminal, since: int, until, what: str, timeout_s: float = 30) -> list[dict]:
    """The device receipts after the first `since`, once `until(them)` holds."""
    deadline = time.monotonic() + timeout_s
    while not until(found := [r for r in terminal.receipts() if "probe" not in r][since:]):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no {what} after {timeout_s} s; receipts: {found}\nstderr:\n{terminal.errors()}"
            )
        time.sleep(0.1)
    return found


def moved_stack_env() -> dict[str, str]:
    """The variables "Two commands on a fresh machine" moves `make run` with, on free ports."""
    block = readme.block_with("Two commands on a fresh machine", "MRO_GATEWAY_LISTEN=")
    line = next(line for line in block.splitlines() if "MRO_MQTT_URL=" in line and "make run" in line)
    settings = dict(re.findall(r"(MRO_\w+)=(\S+)", line))
    assert set(settings) == {"MRO_MQTT_URL", "MRO_GATEWAY_LISTEN"}, line
    return {name: re.sub(r":\d+$", f":{free_port()}", value) for name, value in settings.items()}


def test_the_readme_walkthrough_works_as_pasted_on_a_real_stack(tmp_path):
    # every block first: a README that lost one fails here, before anything starts
    create = readme.block_with(TITLE, "devices add")
    watch = readme.block_with(TITLE, "mosquitto_sub")
    publish = readme.block_with(TITLE, "mosquitto_pub")
    inspect = readme.block_with(TITLE, "ledger export")
    text = readme.section(TITLE)
    assert watch.rstrip().endswith("&"), "the receipt watcher runs in the background of the same terminal"
    pub_lines = publish.splitlines()
    first = next(i for i, line in enumerate(pub_lines) if line.startswith("mosquitto_pub "))
    event_id_line = next(line for line in pub_lines[:first] if line.startswith("EVENT_ID="))
    resend = "\n".join(pub_lines[first:])
    broken_field = re.search(r'`"(\w+)": "(\w+)"`\s+for a torque inside its limits', text)
    assert broken_field, "the README names the field to break"
    field, bad = broken_field.groups()
    assert resend.count(f'"{field}": "OK"') == 1
    broken = resend.replace(f'"{field}": "OK"', f'"{field}": "{bad}"')
    assert "`duplicate` with the same seq" in text and "`$.result` and `torque_result`" in text

    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")  # the project's virtualenv, where the README calls it
    moved = moved_stack_env()
    port = int(moved["MRO_MQTT_URL"].rsplit(":", 1)[1])
    run = RunProc(work / "var", moved["MRO_MQTT_URL"], **moved)  # the embedded broker, like `make run`
    terminal = None
    try:
        run.start(timeout_s=60)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
        terminal = Terminal(work, env)

        # a device login, its password and the broker's port in the reader's shell
        terminal.paste(create)
        assert terminal.value("PORT") == str(port)
        assert len(terminal.value("PW")) >= 16

        # the receipt watcher, in the background; subscribed once a probe on its topic comes through
        terminal.paste(watch)
        secret = (work / "var" / "secrets" / "ingest" / "password").read_text().strip()  # ingest sends receipts
        deadline = time.monotonic() + 20
        while not any("probe" in r for r in terminal.receipts()):
            assert time.monotonic() < deadline, f"the receipt watcher never subscribed:\n{terminal.errors()}"
            subprocess.run(["mosquitto_pub", "-p", str(port), "-u", "mro-ingest", "-P", secret, "-q", "1",
                            "-t", RECEIPTS, "-m", '{"probe": true}'], check=True, timeout=10)
            time.sleep(0.3)

        # the sample: received, then recorded with its seq
        terminal.paste(publish)
        event_id = terminal.value("EVENT_ID")
        received, recorded = wait_for_receipts(terminal, 0, lambda r: len(r) >= 2, "received and recorded")
        assert (received["status"], received["event_id"]) == ("received", event_id), received
        assert (recorded["status"], recorded["event_id"]) == ("recorded", event_id), recorded
        seq = recorded["seq"]
        assert isinstance(seq, int) and seq >= 0, recorded

        # the same mosquitto_pub again, under a new EVENT_ID: duplicate, same seq
        terminal.paste(f"{event_id_line}\n{resend}")
        new_event_id = terminal.value("EVENT_ID")
        assert new_event_id != event_id
        # (sent before ingest has heard of the seq, ingest's `duplicate` has none; sign's follows with it)
        answers = wait_for_receipts(terminal, 2, lambda r: any("seq" in a for a in r), "duplicate with a seq")
        assert {(a["status"], a["event_id"]) for a in answers} == {("duplicate", new_event_id)}, answers
        assert [a["seq"] for a in answers if "seq" in a] == [seq], answers

        # the broken variant: rejected, with errors a person can act on
        so_far = 2 + len(answers)
        terminal.paste(broken)
        answers = wait_for_receipts(terminal, so_far, lambda r: any(a["status"] == "rejected" for a in r),
                                    "rejected for the broken record")
        assert [a["status"] for a in answers] in (["rejected"], ["received", "rejected"]), answers
        rejected = answers[-1]
        errors = rejected["errors"]
        assert errors and all({"path", "rule", "expected", "received"} <= set(e) for e in errors), errors
        assert [(e["path"], e["rule"], e["received"]) for e in errors] == [("$.result", "torque_result", bad)]

        # the state of the box, its DLQ, its ledger and its key, one command after the other
        status_cmd, dlq_cmd, export_cmd, key_cmd, *rest = readme.commands(inspect)
        assert "mro-edge status" in status_cmd and "dlq list --json" in dlq_cmd
        assert "keys export-public" in key_cmd and [c.split("#")[0].strip() for c in rest] == ["kill %1"]

        status = without_output(terminal.paste(status_cmd))
        rows = {line.split()[0]: line.split()[1] for line in status[1:] if line.strip()}
        assert status[0].split()[:2] == ["service", "state"], status
        for name in service_names():
            assert rows.get(name) == "up", (name, status)

        dlq = json.loads("\n".join(without_output(terminal.paste(dlq_cmd))))
        reports = [e for e in dlq if any(err.get("rule") == "torque_result" for err in e.get("errors", []))]
        assert len(reports) == 1, dlq
        assert reports[0]["event_id"] == new_event_id

        terminal.paste(export_cmd)
        rows = [
            parse_export_line(line) for line in (work / "ledger.jsonl").read_bytes().splitlines(keepends=True)
        ]
        assert rows and rows[-1].seq == seq, [r.seq for r in rows]

        terminal.paste(key_cmd)
        pem = (work / "ledger-key.pem").read_text()
        assert pem.startswith("-----BEGIN PUBLIC KEY-----"), pem
        public = public_key_from_pem(pem)
        assert verify_chain(rows, {key_id(public): public}) == len(rows)  # the exported key checks the export

        for command in rest:
            terminal.paste(command)
        terminal.paste("wait", timeout_s=10)  # returns once the receipt watcher has ended
        assert "Traceback" not in terminal.errors(), terminal.errors()
    finally:
        if terminal is not None:
            terminal.close()
        stopped = run.stop(timeout_s=30)
    assert stopped == 0, run.console()
