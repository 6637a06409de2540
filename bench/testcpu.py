#!/usr/bin/env python3
"""Which tests the suite's CPU goes to.

Reads the file a run of the tests wrote with ``DIT4C_TEST_CPU=FILE``
(``tests/support/cpu.py``: each test's wall and CPU seconds, its worker's
whole process tree) and prints the tests that cost most and the cost of
each test directory. On two cores shared by six workers, a test's wall time
says how long it waited; its CPU is what it took from the others.
Prints markdown tables; never passes or fails.

    DIT4C_TEST_CPU=/tmp/cpu.jsonl bash scripts/test
    python bench/testcpu.py /tmp/cpu.jsonl --top 30
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/: tables

from tables import markdown  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="what DIT4C_TEST_CPU wrote")
    p.add_argument("--top", type=int, default=25, help="how many of the costliest tests to list")
    args = p.parse_args(argv)
    tests = [json.loads(line) for line in Path(args.file).read_text().splitlines() if line.strip()]
    total = sum(t["cpu"] for t in tests) or 1.0
    print(f"{len(tests)} tests: {total:.0f} s of CPU, {sum(t['wall'] for t in tests):.0f} s of wall time summed over workers\n")
    costliest = sorted(tests, key=lambda t: -t["cpu"])[: args.top]
    rows = [[t["test"], f"{t['cpu']:.1f}", f"{t['wall']:.1f}", f"{100 * t['cpu'] / total:.1f}"] for t in costliest]
    print("\n".join(markdown(["test", "CPU (s)", "wall (s)", "% of CPU"], rows, "lrrr")) + "\n")
    byDirectory: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for t in tests:
        directory = t["test"].split("::")[0].rsplit("/", 1)[0]
        byDirectory[directory] += t["cpu"]
        counts[directory] += 1
    rows = [[d, str(counts[d]), f"{cpu:.0f}", f"{100 * cpu / total:.1f}"] for d, cpu in byDirectory.most_common()]
    print("\n".join(markdown(["directory", "tests", "CPU (s)", "%"], rows, "lrrr")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
