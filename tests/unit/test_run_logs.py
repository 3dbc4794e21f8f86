"""The log file of `mro-edge run`: every line one JSON object, rotated by size, and only the
lines a person must see reach the console."""

from __future__ import annotations

import io
import json

from mro_edge.supervisor import Console, LogSink


def test_child_output_becomes_json_lines_in_a_file_rotated_by_size(tmp_path):
    console_out = io.StringIO()
    sink = LogSink(tmp_path / "logs" / "mro-edge.log", Console(console_out), max_bytes=4000, backups=2)
    for n in range(300):
        sink.child_line("sign", json.dumps({"event": "record", "seq": n, "level": "info"}) + "\n")
        if n % 50 == 0:
            sink.child_line("simulator", f"plain text line {n}\n")
    sink.child_line("sign", "mro-edge sign: refusing to start: the store is behind checkpoint 12\n")
    sink.child_line("sign", json.dumps({"event": "batch failed; kept for retry", "level": "error",
                                        "error": "MapFullError"}) + "\n")
    own = sink.stream()
    own.write('{"event": "supervisor line"')
    own.write('}\n')
    sink.close()

    files = sorted((tmp_path / "logs").glob("mro-edge.log*"))
    assert [f.name for f in files] == ["mro-edge.log", "mro-edge.log.1", "mro-edge.log.2"]
    lines = [line for f in files for line in f.read_text().splitlines()]
    events = [json.loads(line) for line in lines]  # every line is JSON
    assert all(f.stat().st_size <= 4000 + 200 for f in files)
    wrapped = [e for e in events if e.get("event") == "output"]
    assert wrapped and all(e["service"] in ("simulator", "sign") and "text" in e for e in wrapped)
    assert any(e.get("event") == "supervisor line" for e in events)

    console = console_out.getvalue()
    assert "[sign] mro-edge sign: refusing to start" in console
    assert "[sign] error: batch failed; kept for retry (MapFullError)" in console
    assert "plain text line" not in console and '"seq"' not in console
