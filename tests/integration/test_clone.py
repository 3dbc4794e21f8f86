"""A fresh clone is self-contained (issue 9): nothing beside it, and every test still collects.

The working repository's HEAD is cloned into an empty temporary directory (so there is no
shared reference folder or anything else beside it) and `pytest --collect-only` runs there: a test module that
reaches outside the repository for data (public vectors, configuration) fails to collect.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_fresh_clone_collects_every_test_with_nothing_beside_it(tmp_path: Path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)], check=True,
                   timeout=120, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clone"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MRO_"))}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    summary = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ tests collected in [\d.]+s", summary), output
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    # every test module of the clone took part, and the vector-driven tests found their files
    modules = {line.split("::")[0] for line in collected}
    expected = {p.relative_to(clone).as_posix() for p in (clone / "tests").rglob("test_*.py")}
    assert modules == expected
    for vectors in ("tests/unit/test_merkle.py::test_inclusion_vector[",
                    "tests/unit/test_canonical.py::test_float_free_vector[",
                    "tests/unit/test_checkpoint.py::test_signed_note_vector_byte_for_byte"):
        assert any(line.startswith(vectors) for line in collected), vectors
