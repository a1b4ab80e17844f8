#!/usr/bin/env python3
"""User and kernel CPU time by thread name over an interval (bench/threads.sh runs it).

usage: threads_cpu.py <pid> <seconds>

Threads of <pid> are summed by name (Pingora's workers, tokio's, sqlx's SQLite thread, ...);
wrk, Redis and Postgres processes are listed too, bracketed.
"""
import collections
import os
import sys
import time


def snapshot(pid):
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            st = open(f"/proc/{pid}/task/{tid}/stat").read()
        except FileNotFoundError:
            continue
        out[tid] = parse(st)
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == pid:
            continue
        try:
            st = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        name, user, system = parse(st)
        if name.startswith(("postgres", "redis", "wrk")):
            out["p" + p] = ("[" + name.split(":")[0] + "]", user, system)
    return out


def parse(stat):
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    return name, int(fields[11]), int(fields[12])


def main():
    pid, secs = int(sys.argv[1]), float(sys.argv[2])
    tick = os.sysconf("SC_CLK_TCK")
    before = snapshot(pid)
    time.sleep(secs)
    after = snapshot(pid)
    by_name = collections.defaultdict(lambda: [0, 0])
    for key, (name, user, system) in after.items():
        if key in before:
            by_name[name][0] += user - before[key][1]
            by_name[name][1] += system - before[key][2]
    total = [0, 0]
    for name, (user, system) in sorted(by_name.items(), key=lambda x: -sum(x[1])):
        if user + system:
            print(f"{name:24s} user {user * 1000 / tick:8.0f} ms  kernel {system * 1000 / tick:8.0f} ms")
            total[0] += user
            total[1] += system
    print(f"{'total':24s} user {total[0] * 1000 / tick:8.0f} ms  kernel {total[1] * 1000 / tick:8.0f} ms over {secs:g} s")


if __name__ == "__main__":
    main()
