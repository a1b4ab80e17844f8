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


PUBLISHER = "caracal_shared::audit::publish_loop::{{closure}}"


def read_profile(path, symbol, function):
    """One thread profile, in one pass: its total instructions, the calls to `symbol`, and the
    instructions spent in `function` and everything it called."""
    names = {}
    current = None
    callee = None
    total = None
    calls = 0
    inclusive = 0
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("summary:"):
                total = int(line.split()[1])
            elif line.startswith("fn=") or line.startswith("cfn="):
                key, rest = line.split("=", 1)
                m = re.match(r"\((\d+)\)(?: (.*))?", rest)
                if m and m.group(2):
                    names[m.group(1)] = m.group(2)
                name = names.get(m.group(1)) if m else rest
                if key == "fn":
                    current = name
                else:
                    callee = name
            elif line.startswith("calls="):
                if callee is not None and symbol in callee:
                    calls += int(line[6:].split()[0])
            elif line and (line[0].isdigit() or line[0] in "+-*"):
                # Cost lines: the function's own, and (after `calls=`) its calls' inclusive.
                parts = line.split()
                if len(parts) >= 2 and current == function:
                    inclusive += int(parts[1])
    return total, calls, inclusive


def proxy_thread(files, symbol):
    """The proxy's thread among `files` (the profile calling `symbol` most) as (path, total
    instructions, calls), and the audit publisher's instructions summed over all of them."""
    best = None
    published = 0
    for p in files:
        total, calls, inclusive = read_profile(p, symbol, PUBLISHER)
        published += inclusive
        if calls and total and (best is None or calls > best[2]):
            best = (p, total, calls)
    if best is None:
        sys.exit(f"no profile calls {symbol}")
    return best, published


def main():
    *files, symbol = sys.argv[1:]
    (p, total, calls), published = proxy_thread(files, symbol)
    print(
        f"{total / calls:.0f} instructions per request on the proxy thread, "
        f"{published / calls:.0f} in the audit publisher ({calls} requests, thread profile {p})"
    )


if __name__ == "__main__":
    main()
