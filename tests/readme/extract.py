#!/usr/bin/env python3
"""Extract the README's tested shell blocks.

A block is tested when the line before its ```sh fence (blank lines
allowed in between) is a marker:

    <!-- readme-test: run -->     run it, in order, in one bash per section
    <!-- readme-test: serve -->   a daemon in the foreground: run it in the
                                  background, wait until it is ready, stop it
                                  with SIGINT, expect a clean exit
    <!-- readme-test: skip -->    shown, not run (say why next to it)
    <!-- readme-test: output -->  before a ```text block: what the section's
                                  run blocks print; each of its lines must be
                                  a line of their output, where `...` stands
                                  for anything (numbers that vary)

Every ```sh / ```bash / ```shell block under a section named on the command
line must carry one of these markers, so a new block cannot slip in
untested; each such section must have at least one block that runs.

Usage: extract.py README OUTDIR SECTION...
Writes OUTDIR/blocks.tsv (one line a block: number, section, mode, README
line, file) and OUTDIR/block-N.sh (the block, verbatim).

       extract.py --check-output LOG EXPECTED README_LINE
Checks that every line of the file EXPECTED is a line of LOG.
"""

import pathlib
import re
import sys

MARKER = re.compile(r"^<!--\s*readme-test:\s*(\S+)\s*-->\s*$")
FENCE_OPEN = re.compile(r"^```(\S*)\s*$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SHELLS = {"sh", "bash", "shell"}
MODES = {"run", "serve", "skip", "output"}


def fail(msg):
    sys.exit(f"tests/readme/extract.py: {msg}")


def check_output(log, expected, line):
    """Every line of `expected` must be a line of `log` (`...` = anything)."""
    got = [g.rstrip() for g in pathlib.Path(log).read_text(errors="replace").split("\n")]
    missing = []
    for want in pathlib.Path(expected).read_text().split("\n"):
        want = want.rstrip()
        if not want:
            continue
        pattern = re.compile(".*".join(re.escape(p) for p in want.split("...")) + r"\Z")
        if not any(pattern.match(g) for g in got):
            missing.append(want)
    if missing:
        fail("the output shown at README.md line {} did not appear; missing lines:\n  {}".format(
            line, "\n  ".join(missing)))


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--check-output":
        check_output(*sys.argv[2:])
        return
    if len(sys.argv) < 4:
        fail("usage: extract.py README OUTDIR SECTION...")
    readme = pathlib.Path(sys.argv[1])
    out = pathlib.Path(sys.argv[2])
    wanted = sys.argv[3:]
    lines = readme.read_text(encoding="utf-8").split("\n")

    blocks = []  # (section, mode, line, text)
    section = None  # the current ## heading (level 2); deeper ones stay in it
    pending = None  # (mode, line) of a marker waiting for its fence
    i = 0
    while i < len(lines):
        line = lines[i]
        h = HEADING.match(line)
        if h and len(h.group(1)) <= 2:
            section = h.group(2)
        m = MARKER.match(line)
        if m:
            if m.group(1) not in MODES:
                fail(f"{readme}:{i + 1}: unknown readme-test mode {m.group(1)!r} "
                     f"(one of {', '.join(sorted(MODES))})")
            if pending:
                fail(f"{readme}:{pending[1]}: readme-test marker with no code block after it")
            pending = (m.group(1), i + 1)
            i += 1
            continue
        f = FENCE_OPEN.match(line)
        if f:
            lang = f.group(1)
            start = i + 1
            j = start
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            if j == len(lines):
                fail(f"{readme}:{i + 1}: code block never closed")
            text = "\n".join(lines[start:j]) + "\n"
            if pending and pending[0] == "output":
                if lang != "text":
                    fail(f"{readme}:{pending[1]}: an output marker goes before a ```text block")
                if section in wanted:
                    blocks.append((section, "output", i + 1, text))
            elif lang in SHELLS and section in wanted:
                if not pending:
                    fail(f"{readme}:{i + 1}: ```{lang} block in section {section!r} has no "
                         "<!-- readme-test: run|serve|skip --> marker before it")
                blocks.append((section, pending[0], i + 1, text))
            elif pending and pending[0] != "output" and lang not in SHELLS:
                fail(f"{readme}:{pending[1]}: readme-test marker before a ```{lang} block; "
                     "markers go before ```sh blocks")
            # A marked block of a section not asked for is left out.
            pending = None
            i = j + 1
            continue
        if pending and line.strip():
            fail(f"{readme}:{pending[1]}: readme-test marker not followed by a code block")
        i += 1
    if pending:
        fail(f"{readme}:{pending[1]}: readme-test marker at the end of the file")

    for s in wanted:
        if not any(b[0] == s and b[1] != "skip" for b in blocks):
            fail(f"{readme}: section {s!r} has no block marked run or serve "
                 "(missing, renamed, or every block skipped): the test would test nothing")

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "blocks.tsv", "w", encoding="utf-8") as tsv:
        for n, (sec, mode, line, text) in enumerate(blocks, 1):
            path = out / f"block-{n}.sh"
            path.write_text(text, encoding="utf-8")
            tsv.write(f"{n}\t{sec}\t{mode}\t{line}\t{path}\n")


if __name__ == "__main__":
    main()
