#!/usr/bin/env python3
"""Instructions per request of a proxy's thread, from callgrind profiles of the gateway
benchmark (`bench/instructions.sh` makes them).

usage: cg_per_request.py <callgrind.out-NN files of one run> <symbol>

The proxy's worker thread is the profile whose functions include `symbol` (the target's
`upstream_peer`, called exactly once per proxied request); its total instruction count divided
by the number of calls to `symbol` is the thread's cost per request (its share of one-time
work, such as the first mandate verification, included). It also gives the audit publisher's
cost per request (`publish_loop` and everything it calls, in whichever threads ran it): it
runs on the other core, beside the load generator, the upstream and Redis. Valgrind hides the
CPU's SHA extensions, so the publisher's HMAC is counted on ring's AVX path, several times
what it costs on a CPU that has them.
"""
import re
import sys


def per_request(path, symbol):
    names = {}
    calls = 0
    pending = None
    total = None
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("summary:"):
                total = int(line.split()[1])
            elif line.startswith("cfn="):
                m = re.match(r"\((\d+)\)(?: (.*))?", line[4:])
                if m and m.group(2):
                    names[m.group(1)] = m.group(2)
                pending = names.get(m.group(1)) if m else line[4:]
            elif line.startswith("fn="):
                m = re.match(r"\((\d+)\)(?: (.*))?", line[3:])
                if m and m.group(2):
                    names[m.group(1)] = m.group(2)
            elif line.startswith("calls="):
                if pending is not None and symbol in pending:
                    calls += int(line[6:].split()[0])
    return total, calls


PUBLISHER = "caracal_shared::audit::publish_loop::{{closure}}"


def inclusive(path, function):
    """Instructions spent in `function` and everything it called, in one thread profile."""
    names = {}
    current = None
    total = 0
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("fn=") or line.startswith("cfn="):
                key, rest = line.split("=", 1)
                m = re.match(r"\((\d+)\)(?: (.*))?", rest)
                if m and m.group(2):
                    names[m.group(1)] = m.group(2)
                if key == "fn":
                    current = names.get(m.group(1)) if m else rest
            elif line and (line[0].isdigit() or line[0] in "+-*"):
                # Cost lines: the function's own, and (after `calls=`) its calls' inclusive.
                parts = line.split()
                if len(parts) >= 2 and current == function:
                    total += int(parts[1])
    return total


def main():
    *files, symbol = sys.argv[1:]
    best = None
    for p in files:
        total, calls = per_request(p, symbol)
        if calls and total and (best is None or calls > best[2]):
            best = (p, total, calls)
    if best is None:
        sys.exit(f"no profile calls {symbol}")
    p, total, calls = best
    published = sum(inclusive(f, PUBLISHER) for f in files)
    print(
        f"{total / calls:.0f} instructions per request on the proxy thread, "
        f"{published / calls:.0f} in the audit publisher ({calls} requests, thread profile {p})"
    )


if __name__ == "__main__":
    main()
