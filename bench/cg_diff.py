#!/usr/bin/env python3
"""Where one proxy thread's extra instructions per request go, against another's: the
functions whose own (exclusive) cost per request differs most between two callgrind runs of
the gateway benchmark (`bench/instructions.sh` makes them and calls this).

usage: cg_diff.py <dir A> <symbol A> <dir B> <symbol B> [rows]

Each directory holds one run's `cg.out-NN` thread profiles; the proxy thread and its request
count are found as `cg_per_request.py` finds them (the thread that calls `symbol`, once per
request). Names are as `callgrind_annotate` prints them, so a function inlined differently in
the two builds, or named after a different type, shows as a gain in one and a loss in the other.
"""
import collections
import glob
import os
import re
import subprocess
import sys

from cg_per_request import proxy_thread

COST = re.compile(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+\S+?:(.*?)(?:\s+\[[^\]]*\])?$")


def self_costs(path, requests):
    """Exclusive instructions per request by function."""
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", "--auto=no", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    costs = collections.Counter()
    for line in out.splitlines():
        m = COST.match(line)
        if m and m.group(2).strip() != "PROGRAM TOTALS":
            costs[m.group(2).strip()] += int(m.group(1).replace(",", "")) / requests
    return costs


def main():
    if len(sys.argv) not in (5, 6):
        sys.exit(__doc__)
    dir_a, sym_a, dir_b, sym_b = sys.argv[1:5]
    rows = int(sys.argv[5]) if len(sys.argv) == 6 else 30
    (pa, _, na), _ = proxy_thread(glob.glob(os.path.join(dir_a, "cg.out-*")), sym_a)
    (pb, _, nb), _ = proxy_thread(glob.glob(os.path.join(dir_b, "cg.out-*")), sym_b)
    a, b = self_costs(pa, na), self_costs(pb, nb)
    ta, tb = sum(a.values()), sum(b.values())
    print(f"instructions per request: {ta:.0f} → {tb:.0f} ({tb - ta:+.0f}; A / B = {ta / tb:.3f})")
    delta = sorted(set(a) | set(b), key=lambda k: b[k] - a[k], reverse=True)
    print(f"{'A':>8} {'B':>8} {'B − A':>8}  function (largest increases, then largest decreases)")
    shown = delta[:rows] + [k for k in delta[-max(rows // 4, 1):] if b[k] - a[k] < 0]
    for k in shown:
        print(f"{a[k]:8.0f} {b[k]:8.0f} {b[k] - a[k]:+8.0f}  {k[:140]}")


if __name__ == "__main__":
    main()
