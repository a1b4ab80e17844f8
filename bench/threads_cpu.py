#!/usr/bin/env python3
"""User and kernel CPU time by thread name over an interval (bench/threads.sh runs it).

usage: threads_cpu.py <pid> <seconds>

Threads of <pid> are summed by name (Pingora's workers, tokio's, sqlx's SQLite thread, ...);
wrk, Redis and Postgres processes are listed too, bracketed. For the threads of <pid> it also
gives the time they spent runnable but waiting for a core (run-queue wait, from
/proc/.../schedstat) and how often they were switched out while runnable (involuntary context
switches): a saturated proxy thread that waits and is preempted more serves fewer requests for
the same cost per request.
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
        out[tid] = parse(st) + sched(f"/proc/{pid}/task/{tid}")
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == pid:
            continue
        try:
            st = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        name, user, system = parse(st)
        if name.startswith(("postgres", "redis", "wrk")):
            out["p" + p] = ("[" + name.split(":")[0] + "]", user, system, None, None)
    return out


def sched(task):
    """Run-queue wait (ns) and involuntary context switches so far; None where unreadable."""
    try:
        wait = int(open(f"{task}/schedstat").read().split()[1])
        invol = next(
            int(line.split()[1])
            for line in open(f"{task}/status")
            if line.startswith("nonvoluntary_ctxt_switches")
        )
        return wait, invol
    except (OSError, IndexError, ValueError, StopIteration):
        return None, None


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
    by_name = collections.defaultdict(lambda: [0, 0, None, None])
    for key, (name, user, system, wait, invol) in after.items():
        if key in before:
            b = by_name[name]
            b[0] += user - before[key][1]
            b[1] += system - before[key][2]
            if wait is not None and before[key][3] is not None:
                b[2] = (b[2] or 0) + wait - before[key][3]
                b[3] = (b[3] or 0) + invol - before[key][4]
    total = [0, 0]
    for name, (user, system, wait, invol) in sorted(by_name.items(), key=lambda x: -(x[1][0] + x[1][1])):
        if user + system:
            sched_part = "" if wait is None else f"  run-queue wait {wait / 1e6:6.0f} ms  preempted {invol:7d}"
            print(f"{name:24s} user {user * 1000 / tick:8.0f} ms  kernel {system * 1000 / tick:8.0f} ms{sched_part}")
            total[0] += user
            total[1] += system
    print(f"{'total':24s} user {total[0] * 1000 / tick:8.0f} ms  kernel {total[1] * 1000 / tick:8.0f} ms over {secs:g} s")


if __name__ == "__main__":
    main()
