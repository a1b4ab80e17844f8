#!/usr/bin/env python3
"""The production topology without containers, scraped by a real Prometheus.

Starts control, sts, coordinator, audit and gateway as five separate `caracal serve` processes
against PostgreSQL (a fresh database) and Redis (a fresh key prefix), all on loopback; seeds
them through the public APIs (the first admin token from `caracal admin bootstrap-token`);
sends governed traffic (allowed and denied requests through the gateway, a session revoked
through the coordinator); runs Prometheus (Debian package) scraping every /metrics endpoint;
then checks that

  * every query of the Grafana dashboard returns data, except queries that use only metrics
    deploy/README.md lists as not exported yet (reported, not failed);
  * logs are JSON lines, and the request id of a request through the gateway (which exchanged
    an API key at the STS) appears in both the gateway's and the STS's logs;
  * every service exports caracal_build_info;
  * SIGTERM stops every process within its grace period with exit code 0.

No packet leaves the machine: every listener and the upstream are on 127.0.0.1.
Usage: scrape_check.py <caracal binary>. Needs CARACAL_TEST_DATABASE_URL and
CARACAL_TEST_REDIS_URL (as .ci/run sets them).
"""

import base64
import http.server
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICES = ["control", "sts", "coordinator", "audit", "gateway"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_call(method, url, body=None, headers=None, form=None, timeout=10):
    data = None
    h = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        h["content-type"] = "application/json"
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        h["content-type"] = "application/x-www-form-urlencoded"
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def wait_for(what, pred, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"FAILED: timed out waiting for {what}")


class Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"ok": True, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def redis_cli(redis):
    """The `redis-cli` command line for the Redis at URL `redis`."""
    host = urllib.parse.urlparse(redis)
    return ["redis-cli", "-h", host.hostname or "127.0.0.1", "-p", str(host.port or 6379)]


def diagnose(logs, ports, work, redis=None, prefix=None, lines=25):
    """Print the last log lines of every service, the audit service's ledger metrics and the
    bus's consumer groups (pending entries per stream)."""
    for s, f in logs.items():
        try:
            f.flush()
            with open(f.name) as r:
                tail = r.read().splitlines()[-lines:]
        except OSError as e:
            tail = [f"(cannot read: {e})"]
        print(f"---- last {len(tail)} lines of {s}.log ----")
        for line in tail:
            print("    " + line[:400])
    if "audit" in ports:
        try:
            st, text = http_call("GET", f"http://127.0.0.1:{ports['audit']}/metrics", timeout=5)
        except OSError as e:
            st, text = 0, str(e)
        if st == 200 and isinstance(text, str):
            print("---- audit metrics (ledger, bus) ----")
            for line in text.splitlines():
                if line.startswith(("caracal_audit", "caracal_bus")) and "_bucket" not in line:
                    print("    " + line)
    if redis and prefix:
        cli = redis_cli(redis)
        try:
            keys = subprocess.run(cli + ["--scan", "--pattern", prefix + "*"], capture_output=True,
                                  text=True, timeout=10).stdout.split()
            print("---- bus consumer groups (name, consumers, pending, last delivered) ----")
            for k in sorted(keys):
                r = subprocess.run(cli + ["XINFO", "GROUPS", k], capture_output=True, text=True, timeout=10)
                if r.returncode == 0 and r.stdout.strip() and "ERR" not in r.stdout and "WRONGTYPE" not in r.stdout:
                    print(f"    {k}: " + " ".join(r.stdout.split()))
        except (OSError, subprocess.SubprocessError) as e:
            print(f"    (cannot read the bus: {e})")
    print(f"(logs in {work})")


def key():
    return "hex:" + secrets.token_hex(32)


def main():
    binary = os.path.abspath(sys.argv[1])
    pg = os.environ.get("CARACAL_TEST_DATABASE_URL", "postgres://postgres:postgres@127.0.0.1:5432/postgres")
    redis = os.environ.get("CARACAL_TEST_REDIS_URL", "redis://127.0.0.1:6379")
    work = tempfile.mkdtemp(prefix="caracal-scrape-")
    dbname = "caracal_scrape_" + secrets.token_hex(4)
    prefix = "scrape-" + secrets.token_hex(4) + ":"
    subprocess.run(["psql", pg, "-qc", f"CREATE DATABASE {dbname}"], check=True)
    db_url = pg.rsplit("/", 1)[0] + "/" + dbname
    ports = {s: free_port() for s in SERVICES}
    ports["gateway_admin"] = free_port()
    prom_port = free_port()

    up = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    up_port = up.server_address[1]

    cfg = f"""
data_dir = "{work}/data"
[database]
url = "{db_url}"
[bus]
backend = "redis"
redis_url = "{redis}"
redis_prefix = "{prefix}"
[telemetry]
log_format = "json"
# Access logs (one line per request, with its request id) come from the HTTP server module.
log_level = "info,caracal_shared::http::server=debug"
[http]
grace_period = "5s"
[control]
listen = "127.0.0.1:{ports['control']}"
[sts]
listen = "127.0.0.1:{ports['sts']}"
[coordinator]
listen = "127.0.0.1:{ports['coordinator']}"
[audit]
listen = "127.0.0.1:{ports['audit']}"
head_interval = "200ms"
[gateway]
listen = "127.0.0.1:{ports['gateway']}"
admin_listen = "127.0.0.1:{ports['gateway_admin']}"
sts_url = "http://127.0.0.1:{ports['sts']}"
upstream_bind = ["127.0.0.1"]
[keys.bus]
active = "b1"
[keys.bus.keys]
b1 = "{key()}"
[keys.internal]
active = "i1"
[keys.internal.keys]
i1 = "{key()}"
[keys.seal]
active = "s1"
[keys.seal.keys]
s1 = "{key()}"
[keys.pepper]
active = "p1"
[keys.pepper.keys]
p1 = "{key()}"
"""
    path = os.path.join(work, "caracal.toml")
    with open(path, "w") as f:
        f.write(cfg)
    os.chmod(path, 0o600)
    procs, logs = {}, {}
    prom = None
    failures = []
    try:
        subprocess.run([binary, "migrate", "--config", path], check=True, capture_output=True)
        r = subprocess.run([binary, "admin", "bootstrap-token", "--config", path], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        admin = r.stdout.strip()
        r = subprocess.run([binary, "admin", "bootstrap-token", "--config", path], capture_output=True, text=True)
        assert r.returncode == 3 and not r.stdout.strip(), "a second bootstrap must not print a token"
        for s in SERVICES:
            logs[s] = open(os.path.join(work, f"{s}.log"), "w+")
            procs[s] = subprocess.Popen([binary, "serve", s, "--config", path], stdout=logs[s], stderr=subprocess.STDOUT)
        base = {s: f"http://127.0.0.1:{ports[s]}" for s in SERVICES if s != "gateway"}
        base["gateway"] = f"http://127.0.0.1:{ports['gateway_admin']}"
        for s, b in base.items():
            wait_for(f"{s} /readyz", lambda b=b: http_call("GET", b + "/readyz")[0] == 200)
        print("ok      five services started as processes and ready")

        ctl = base["control"]
        auth = {"authorization": f"Bearer {admin}"}
        st, t = http_call("POST", ctl + "/v1/tenants", {"name": "scrape"}, auth)
        assert st == 201, t
        ta = dict(auth, **{"x-caracal-tenant": t["id"]})

        def api(m, p, b=None):
            st, v = http_call(m, ctl + p, b, ta)
            assert 200 <= st < 300, f"{p}: {st} {v}"
            return v

        res = api("POST", "/v1/resources", {"name": "api", "base_url": f"http://127.0.0.1:{up_port}",
                                             "inject": {"kind": "bearer"}, "credential": {"value": "sk-up"},
                                             "settings": {"egress_allow": ["127.0.0.1/32"]}})
        pol = api("POST", "/v1/policies", {"name": "p", "activate": True, "document":
                                           "rules:\n  - id: read\n    methods: [GET]\n    paths: [\"/v1/**\"]\n"
                                           "  - id: no-admin\n    effect: deny\n    paths: [\"/v1/admin/**\"]\n"})
        agent = api("POST", "/v1/agents", {"name": "bot"})
        k = api("POST", f"/v1/agents/{agent['id']}/api-keys", {})["secret"]
        api("POST", "/v1/grants", {"agent_id": agent["id"], "resource_id": res["id"],
                                   "policy_id": pol["policy"]["id"], "scopes": ["*"]})

        # A budget on the resource (requests; never exhausted here): reservations and settlements.
        api("POST", "/v1/budgets", {"name": "scrape-requests", "scope": {"kind": "resource", "id": res["id"]},
                                    "unit": "requests", "limit": 1000000, "window": {"kind": "daily", "tz": "UTC"}})
        # A second resource whose upstream is down (nothing listens on its port).
        down_port = free_port()
        down = api("POST", "/v1/resources", {"name": "down", "base_url": f"http://127.0.0.1:{down_port}",
                                              "settings": {"egress_allow": ["127.0.0.1/32"]}})
        api("POST", "/v1/grants", {"agent_id": agent["id"], "resource_id": down["id"],
                                   "policy_id": pol["policy"]["id"], "scopes": ["*"]})

        # Through the gateway with the API key (the gateway exchanges it at the STS).
        proxy = urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{ports['gateway']}"})
        opener = urllib.request.build_opener(proxy)
        basic = "Basic " + base64.b64encode(f"agent:{k}".encode()).decode()
        rid = "scrape-" + secrets.token_hex(8)

        def via(path, request_id=None, auth=None):
            h = {"proxy-authorization": auth or basic}
            if request_id:
                h["x-request-id"] = request_id
            req = urllib.request.Request(f"http://127.0.0.1:{up_port}{path}", headers=h)
            try:
                with opener.open(req, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        wait_for("the gateway to know the resource", lambda: via("/v1/models", rid) == 200)
        codes = [via("/v1/models") for _ in range(30)] + [via("/v1/admin/x") for _ in range(5)]
        assert codes.count(200) == 30 and codes.count(403) == 5, codes
        print("ok      governed traffic: 30 allowed, 5 denied by policy")

        # Failures the dashboard must show: an upstream that is down, a refused tunnel, a bad
        # credential at the STS.

        def via_down():
            req = urllib.request.Request(f"http://127.0.0.1:{down_port}/v1/models", headers={"proxy-authorization": basic})
            try:
                with opener.open(req, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        wait_for("the gateway to know the second resource", lambda: via_down() in (502, 504))
        with socket.create_connection(("127.0.0.1", ports["gateway"]), timeout=10) as c:
            c.sendall(f"CONNECT 127.0.0.1:{up_port} HTTP/1.1\r\nHost: 127.0.0.1:{up_port}\r\n"
                      f"Proxy-Authorization: {basic}\r\n\r\n".encode())
            status = c.recv(4096).split(b" ", 2)[1]
            assert status == b"403", f"CONNECT without a tunnel rule: {status}"
        st, _ = http_call("POST", base["sts"] + "/oauth/token", form={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token_type": "urn:caracal:params:oauth:token-type:api-key", "subject_token": "ck_wrong"})
        assert st in (400, 401), st
        print("ok      failures produced: upstream down (502), tunnel refused (403), bad credential at the STS")

        # A session started and revoked through the coordinator.
        st, tok = http_call("POST", base["sts"] + "/oauth/token", form={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token_type": "urn:caracal:params:oauth:token-type:api-key", "subject_token": k})
        assert st == 200, tok
        st, sess = http_call("POST", base["coordinator"] + "/v1/sessions", {}, {"authorization": f"Bearer {tok['access_token']}"})
        assert st == 201, sess
        st, out = http_call("POST", base["coordinator"] + f"/v1/sessions/{sess['id']}/revoke", {"reason": "scrape"}, ta)
        assert st == 200, out
        def ledger_grew():
            st, head = http_call("GET", base["audit"] + "/v1/ledger/heads/latest", headers=ta)
            return st == 200 and isinstance(head, dict) and head.get("tree_size", 0) > 30

        wait_for("the ledger to sign a head over the events", ledger_grew)
        print("ok      a session revoked through the coordinator; the ledger signed heads over the events")

        for s, b in base.items():
            st, text = http_call("GET", b + "/metrics")
            if st != 200 or "caracal_build_info" not in text:
                failures.append(f"{s}: /metrics has no caracal_build_info")
        if not failures:
            print("ok      every service exports caracal_build_info")

        # Prometheus scraping the five processes.
        targets = [f"127.0.0.1:{ports[s]}" for s in ["control", "sts", "coordinator", "audit"]]
        targets.append(f"127.0.0.1:{ports['gateway_admin']}")
        prom_cfg = os.path.join(work, "prometheus.yml")
        with open(prom_cfg, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n")
            for s, tgt in zip(["control", "sts", "coordinator", "audit", "gateway"], targets):
                f.write(f"  - job_name: caracal-{s}\n    static_configs:\n      - targets: ['{tgt}']\n        labels: {{service: {s}}}\n")
        prom_log = open(os.path.join(work, "prometheus.log"), "w")
        prom = subprocess.Popen(["prometheus", f"--config.file={prom_cfg}", f"--storage.tsdb.path={work}/tsdb",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=prom_log, stderr=subprocess.STDOUT)
        papi = f"http://127.0.0.1:{prom_port}/api/v1"

        def query(q):
            st, v = http_call("GET", papi + "/query?" + urllib.parse.urlencode({"query": q}))
            if st != 200 or not isinstance(v, dict) or v.get("status") != "success":
                return None
            return v["data"]["result"]

        def all_up():
            r = query("up")
            return r is not None and len(r) == 5 and all(x["value"][1] == "1" for x in r)

        wait_for("Prometheus to scrape all five targets", all_up, timeout=90)
        print("ok      Prometheus scrapes all five processes (up == 1)")
        # More traffic while Prometheus watches, so rates have two samples.
        for _ in range(5):
            for _ in range(10):
                via("/v1/models")
            via("/v1/admin/y")
            # Exchanges at the STS, and requests presenting the mandate itself (mandate cache).
            st, t2 = http_call("POST", base["sts"] + "/oauth/token", form={
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token_type": "urn:caracal:params:oauth:token-type:api-key", "subject_token": k})
            assert st == 200, t2
            for _ in range(5):
                via("/v1/models", auth="Bearer " + t2["access_token"])
            st, s2 = http_call("POST", base["coordinator"] + "/v1/sessions", {}, {"authorization": f"Bearer {tok['access_token']}"})
            assert st == 201, s2
            st, _ = http_call("POST", base["coordinator"] + f"/v1/sessions/{s2['id']}/revoke", {"reason": "scrape"}, ta)
            assert st == 200
            time.sleep(1)

        with open(os.path.join(ROOT, "deploy/grafana/caracal-ops.json")) as f:
            dash = json.load(f)
        planned = set(re.findall(r"^\| `(caracal_[a-z0-9_]+)`", open(os.path.join(ROOT, "deploy/README.md")).read(), re.M))
        exprs = []

        def walk(panels):
            for p in panels:
                for t in p.get("targets", []):
                    if t.get("expr"):
                        exprs.append((p.get("title", "?"), t["expr"]))
                walk(p.get("panels", []))

        walk(dash.get("panels", []))
        no_data, skipped, ok = [], [], 0
        for title, e in exprs:
            q = (e.replace("$__rate_interval", "30s").replace("$__interval", "5s").replace("$__range", "5m")
                 .replace("${job}", ".*").replace("$job", ".*"))
            q = re.sub(r'=~?"\$[a-z_]+"', '=~".*"', q)
            names = set(re.findall(r"caracal_[a-z0-9_]+", q))
            base_names = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
            if base_names and base_names <= planned:
                skipped.append(title)
                continue
            got = None
            for _ in range(20):
                # Data means at least one sample that is a number (a quantile over no
                # observations is NaN: that is no data).
                got = [r for r in (query(q) or []) if r.get("value", [0, "NaN"])[1] != "NaN"]
                if got:
                    break
                time.sleep(1)
            if got:
                ok += 1
            else:
                no_data.append(f"{title}: {q}")
        print(f"ok      dashboard queries with data: {ok}; skipped (metrics planned, per deploy/README.md): {len(skipped)}")
        for s in skipped:
            print(f"        skipped: {s}")
        for n in no_data:
            failures.append(f"dashboard query returned no data — {n}")

        # Logs: JSON lines; the gateway's request id reached the STS.
        for s in SERVICES:
            logs[s].flush()
            with open(logs[s].name) as f:
                lines = [l for l in f.read().splitlines() if l.strip()]
            bad = [l for l in lines if not l.lstrip().startswith("{")]
            if bad:
                failures.append(f"{s}: non-JSON log line: {bad[0][:200]}")
        gw_log = open(logs["gateway"].name).read()
        sts_log = open(logs["sts"].name).read()
        if rid not in sts_log:
            failures.append(f"the request id {rid} sent to the gateway does not appear in the STS's logs")
        else:
            print("ok      logs are JSON; a request id sent to the gateway appears in the STS's logs")
        _ = gw_log
    except BaseException as e:
        # Say why before the processes are stopped: what the services logged last, and how
        # far the ledger got (a CI run leaves nothing else behind to read).
        print(str(e) if isinstance(e, SystemExit) else f"FAILED  {e!r}")
        diagnose(logs, ports, work, redis, prefix)
        raise
    finally:
        # SIGTERM: each process drains and exits 0 within its grace period (5 s) plus margin.
        for s, p in procs.items():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        for s, p in procs.items():
            try:
                code = p.wait(timeout=max(0.1, deadline - time.time()))
                if code != 0:
                    failures.append(f"{s} exited with {code} after SIGTERM")
            except subprocess.TimeoutExpired:
                p.kill()
                failures.append(f"{s} did not stop within its grace period after SIGTERM")
        if prom:
            prom.terminate()
            try:
                prom.wait(timeout=10)
            except subprocess.TimeoutExpired:
                prom.kill()
        up.shutdown()
        subprocess.run(["psql", pg, "-qc", f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)"], check=False)
        cli = redis_cli(redis)
        keys = subprocess.run(cli + ["--scan", "--pattern", prefix + "*"], capture_output=True, text=True).stdout.split()
        for i in range(0, len(keys), 100):
            subprocess.run(cli + ["UNLINK"] + keys[i:i + 100], capture_output=True)
    if failures:
        for f in failures:
            print(f"FAILED  {f}")
        print(f"(logs in {work})")
        sys.exit(1)
    print("ok      SIGTERM stopped every process with exit 0 within its grace period")
    print("scrape check passed")


if __name__ == "__main__":
    main()
