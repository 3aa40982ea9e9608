"""Run a benchmark and write what it printed into docs/benchmarks.md, with the command, date and machine: the
document's figures are the benchmarks' own, never copied by hand.

    python bench/record.py influence --rounds 3 --model cnn     # runs bench/influence.py --rounds 3 --model cnn

Each run replaces its own section (by benchmark and arguments: ``influence --model cnn`` and ``influence`` are two
sections); the text between sections is the document's, kept as it is. A failed run writes nothing.
"""

from __future__ import annotations

import ast
import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
VALUE_FLAGS = {"--rounds", "--seconds", "--n", "--queries", "--examples", "--epochs", "--jobs", "--pg"}
# ^ what varies the size or the place, not the case; a --db URL keeps only its backend (the case: sqlite, postgresql)


def section_key(name: str, args: list[str]) -> str:
    """The section a run writes: the benchmark and its case-defining arguments (sizes and rounds left out)."""
    kept, skip, backend = [], False, False
    for a in args:
        if skip:
            skip = False
            continue
        if backend or a.startswith("--db="):
            kept.append("--db " + re.split(r"[+:]", a.removeprefix("--db="), maxsplit=1)[0])
            backend = False
            continue
        if a == "--db":
            backend = True
            continue
        if a in VALUE_FLAGS:
            skip = True
            continue
        if a.split("=", 1)[0] in VALUE_FLAGS:
            continue
        kept.append(a)
    return " ".join([name, *kept])


def title(path: Path) -> str:
    """The benchmark's docstring, its first clause."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or path.stem
    first = " ".join(doc.split("\n\n")[0].split())
    return re.split(r"[.:;](?:\s|$)", first)[0]


def render(key: str, command: str, heading: str, output: str, when: datetime.datetime) -> str:
    body = output.rstrip("\n")
    return (f"<!-- bench:{key} begin -->\n"
            f"#### {heading}\n\n"
            f"`{command}`, {when:%Y-%m-%d %H:%M} UTC, {platform.machine()} with {os.cpu_count()} CPUs "
            f"(written by `python bench/record.py`; do not edit by hand)\n\n"
            f"```\n{body}\n```\n"
            f"<!-- bench:{key} end -->")


def replace_section(text: str, key: str, block: str) -> str:
    """``text`` with the section of ``key`` replaced by ``block`` (appended where it has none)."""
    pattern = re.compile(rf"<!-- bench:{re.escape(key)} begin -->.*?<!-- bench:{re.escape(key)} end -->", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    name, args = argv[0], argv[1:]
    script = ROOT / "bench" / f"{name}.py"
    if not re.fullmatch(r"[a-z_]+", name) or not script.is_file() or name == "record":
        print(f"bench/record.py: no benchmark named {name!r} (bench/<name>.py)", file=sys.stderr)
        return 2
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # shown as it comes, and kept
        sys.stdout.write(line)
        lines.append(line)
    if proc.wait() != 0:
        print(f"bench/record.py: {name} failed (exit {proc.returncode}); {DOC.name} unchanged", file=sys.stderr)
        return proc.returncode
    command = " ".join(["python", f"bench/{name}.py", *args])
    block = render(section_key(name, args), command, title(script), "".join(lines), datetime.datetime.now(datetime.UTC))
    DOC.write_text(replace_section(DOC.read_text() if DOC.exists() else "# Benchmarks\n", section_key(name, args),
                                   block))
    print(f"bench/record.py: wrote the section '{section_key(name, args)}' of {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
