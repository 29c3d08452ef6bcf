"""Time the stages of `make demo`: run a command, record its wall time, print them all at the end.

    python tools/stage.py --log runs/.demo-times NAME -- CMD ARGS...   run CMD, append "NAME<TAB>seconds"
    python tools/stage.py --log runs/.demo-times --report              print each stage and the total

A failing command's exit status is passed on (make stops there, as without this wrapper).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--log":
        print(__doc__, file=sys.stderr)
        return 2
    log = Path(argv[1])
    rest = argv[2:]
    if rest == ["--report"]:
        rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
        total = sum(float(s) for _, s in rows)
        width = max([len(n) for n, _ in rows] + [5])
        print("== wall time per stage ==")
        for name, secs in rows:
            print(f"{name:<{width}}  {float(secs) / 60:6.1f} min")
        print(f"{'total':<{width}}  {total / 60:6.1f} min")
        return 0
    if len(rest) < 3 or rest[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    name, cmd = rest[0], rest[2:]
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    secs = time.perf_counter() - t0
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"{name}\t{secs:.1f}\n")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
