"""The README's sections and shell blocks, for the tests that run what the README says.

A missing section or block is an AssertionError naming it, never a skip: a test that runs the
README fails when the README stops saying it.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def section(title: str) -> str:
    """The text of the `## title` section, up to the next `## ` heading."""
    text = README.read_text(encoding="utf-8")
    heading = f"## {title}\n"
    start = text.find(heading)
    assert start != -1, f"README.md has no section {heading.strip()!r}"
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end != -1 else len(text)]


def shell_blocks(title: str) -> list[str]:
    """The ```sh blocks of a section, in order, each with its trailing newline."""
    blocks = re.findall(r"^```sh\n(.*?)^```$", section(title), flags=re.S | re.M)
    assert blocks, f"README.md section {title!r} has no ```sh block"
    return blocks


def block_with(title: str, needle: str) -> str:
    """The one ```sh block of a section that contains `needle`."""
    found = [b for b in shell_blocks(title) if needle in b]
    assert len(found) == 1, (
        f"README.md section {title!r}: {len(found)} ```sh blocks contain {needle!r}, not 1"
    )
    return found[0]


def commands(block: str) -> list[str]:
    """The block's commands as a reader pastes them one after the other: a line continued by an
    open quote or a trailing backslash stays with its command; blank and comment lines go."""
    out: list[str] = []
    current: list[str] = []
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current.append(line)
        text = "\n".join(current)
        if text.count("'") % 2 == 0 and not text.endswith("\\"):
            out.append(text)
            current = []
    assert not current, f"an unfinished command at the end of the block: {current!r}"
    return out


def variables_used(text: str) -> set[str]:
    """Shell variables a command expands ($NAME or ${NAME...})."""
    return set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))


def variables_assigned(text: str) -> set[str]:
    """Shell variables a block assigns at the start of a line (NAME=...)."""
    return set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)=", text, flags=re.M))
