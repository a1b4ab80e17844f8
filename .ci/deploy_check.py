#!/usr/bin/env python3
"""Checks of the deployment assets under deploy/ (run by .ci/deploy-check.sh).

Needs PyYAML, jsonschema, kubernetes-validate (offline Kubernetes JSON schemas) and
helm-python-sdk (Helm's Go SDK through a C library: offline `helm lint` and `helm template`);
deploy-check.sh installs them in a virtualenv. Python 3.11+ (tomllib).

Every check prints one line; the last line is "N passed, M failed".
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import traceback
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_DIR = DEPLOY / "kubernetes"
CHART = DEPLOY / "helm" / "caracal"
COMPOSE_DIR = DEPLOY / "compose"
K8S_VERSION = os.environ.get("DEPLOY_CHECK_K8S_VERSION", "1.30.0")

SERVICES = ["gateway", "sts", "control", "coordinator", "audit"]
PORTS = {"gateway": 7400, "gateway-admin": 7401, "control": 7402, "sts": 7403, "coordinator": 7404, "audit": 7405}
# CPU / memory requests (deploy/README.md "Sizing").
REQUESTS = {
    "gateway": ("1", "256Mi"),
    "sts": ("500m", "256Mi"),
    "control": ("250m", "256Mi"),
    "coordinator": ("250m", "256Mi"),
    "audit": ("250m", "256Mi"),
}
# Key rings each component may see (least privilege: shared/src/config/mod.rs KeysConfig), by
# the first word of their Secret entry / compose secret; "intercept" is the gateway's TLS
# interception CA file (Secret entry `intercept-ca`, compose secret `caracal-intercept-ca`).
RINGS = {
    "gateway": {"bus", "internal", "seal", "intercept"},
    "sts": {"bus", "internal", "seal", "pepper"},
    "control": {"bus", "internal", "seal", "pepper"},
    "coordinator": {"bus", "internal", "pepper"},
    "audit": {"bus", "internal", "seal", "pepper"},
    "migrate": {"bus", "internal"},
}

RESULTS: list[tuple[str, bool, str]] = []


def check(name):
    def deco(fn):
        def run(*a, **kw):
            try:
                detail = fn(*a, **kw) or ""
                RESULTS.append((name, True, detail))
                print(f"ok      {name}{(' — ' + detail) if detail else ''}", flush=True)
            except Exception as e:  # noqa: BLE001 - report every failure and go on
                msg = str(e) if isinstance(e, AssertionError) else traceback.format_exc(limit=3)
                RESULTS.append((name, False, msg))
                print(f"FAILED  {name}\n        " + msg.strip().replace("\n", "\n        "), flush=True)

        return run

    return deco


def fail_if(problems: list[str]):
    if problems:
        raise AssertionError("\n".join(problems))


# ----------------------------------------------------------------------------- helpers


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def plain_objects(include_example_secret=False) -> list[dict]:
    out = []
    for p in k8s_files():
        if p.name.endswith(".example.yaml") and not include_example_secret:
            continue
        out.extend(load_docs(p.read_text()))
    return out


SERVICEMONITOR_SCHEMA = {
    # A subset of monitoring.coreos.com/v1 ServiceMonitor (the fields these assets use, with
    # their upstream types); unknown fields are refused so typos are caught.
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "matchExpressions": {"type": "array"},
                    },
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["integer", "string"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}


def validate_object(obj: dict) -> None:
    import kubernetes_validate

    if obj.get("kind") == "ServiceMonitor":
        jsonschema.validate(obj, SERVICEMONITOR_SCHEMA)
        return
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def validate_objects(objs: list[dict], where: str) -> list[str]:
    problems = []
    for o in objs:
        try:
            validate_object(o)
        except Exception as e:  # noqa: BLE001
            msg = getattr(e, "message", None) or str(e).splitlines()[0]
            path = ".".join(str(x) for x in getattr(e, "absolute_path", []) or [])
            problems.append(f"{where}: {o.get('kind')}/{o.get('metadata', {}).get('name')}: {path} {msg}")
    return problems


def known_config_keys() -> tuple[set[str], set[str]]:
    """Keys the configuration loader reads (shared/src/config/mod.rs), and ring prefixes."""
    src = (ROOT / "shared" / "src" / "config" / "mod.rs").read_text()
    keys = set(re.findall(r'src\s*\.\s*(?:get|opt|require|parse_with)(?:::<[^>]*>)?\(\s*"([a-z0-9_.]+)"', src))
    keys |= set(re.findall(r'\baddr\(\s*"([a-z0-9_.]+)"', src))
    rings = set(re.findall(r'load_ring\(\s*&src,\s*"([a-z0-9_.]+)"\s*\)', src))
    assert "database.url" in keys and "gateway.listen" in keys and rings, "cannot read config keys"
    return keys, rings


def flatten(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_key_problems(toml_text: str, where: str) -> list[str]:
    keys, rings = known_config_keys()
    problems = []
    flat = flatten(tomllib.loads(toml_text))
    for k in flat:
        ring = next((r for r in rings if k == f"{r}.active" or k.startswith(f"{r}.keys.")), None)
        if ring:
            if k.startswith(f"{ring}.keys.") and not re.fullmatch(r"[a-z0-9_]+", k[len(ring) + 6 :]):
                problems.append(f"{where}: key id in {k} must be [a-z0-9_] (settable from the environment)")
            continue
        if k not in keys:
            problems.append(f"{where}: {k} is not a configuration key the services read")
    for r in rings:
        if f"{r}.active" in flat:
            active = flat[f"{r}.active"]
            if f"{r}.keys.{active}" not in flat:
                problems.append(f"{where}: {r}.active = {active!r} is not among {r}.keys")
    return problems


def env_ring_problems(env: dict[str, str], where: str) -> list[str]:
    """CARACAL__KEYS__X__ACTIVE must name a key given as CARACAL__KEYS__X__KEYS__<ID>."""
    problems = []
    for k, v in env.items():
        m = re.fullmatch(r"CARACAL__KEYS__([A-Z]+)__ACTIVE", k)
        if m and f"CARACAL__KEYS__{m.group(1)}__KEYS__{str(v).upper()}" not in env:
            problems.append(f"{where}: {k}={v} but no CARACAL__KEYS__{m.group(1)}__KEYS__{str(v).upper()}")
    return problems


def env_list_to_dict(env: list[dict]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<from:" + json.dumps(e.get("valueFrom")) + ">") for e in env}


# ----------------------------------------------------------------------------- Kubernetes


@check("kubernetes: every manifest validates against the Kubernetes schemas (strict)")
def k8s_schema():
    objs = plain_objects(include_example_secret=True)
    fail_if(validate_objects(objs, "deploy/kubernetes"))
    return f"{len(objs)} objects, Kubernetes {K8S_VERSION}"


@check("kubernetes: kustomization lists every manifest except the Secret template")
def k8s_kustomization():
    k = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = set(k["resources"])
    files = {p.name for p in k8s_files() if not p.name.endswith(".example.yaml")}
    fail_if([f"not in kustomization.yaml: {f}" for f in sorted(files - listed)]
            + [f"listed but missing: {f}" for f in sorted(listed - files)])


def check_workloads(objs: list[dict], where: str, scaled: bool = True) -> list[str]:
    """Probes, requests, hardening, key rings per component; one Service per component."""
    problems = []
    by_kind: dict[str, dict[str, dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    deployments = by_kind.get("Deployment", {})
    comps = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in deployments.values()}
    if set(comps) != set(SERVICES):
        problems.append(f"{where}: Deployments for {sorted(comps)}, expected {sorted(SERVICES)}")
    workloads = dict(comps)
    for j in by_kind.get("Job", {}).values():
        workloads["migrate"] = j
    for comp, d in workloads.items():
        pod = d["spec"]["template"]["spec"]
        c = pod["containers"][0]
        name = f"{where}: {d['kind']}/{d['metadata']['name']}"
        psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
        if not psc.get("runAsNonRoot") or not csc.get("readOnlyRootFilesystem") or csc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: must run as non-root, read-only root filesystem, no privilege escalation")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: automountServiceAccountToken must be false")
        env = env_list_to_dict(c.get("env", []))
        problems += env_ring_problems(env, name)
        items = {i["key"] for v in pod["volumes"] if v["name"] == "keys" for i in v["secret"]["items"]}
        rings_seen = {i.split("-")[0] for i in items}
        if rings_seen != RINGS[comp]:
            problems.append(f"{name}: mounts key rings {sorted(rings_seen)}, expected {sorted(RINGS[comp])}")
        for r in ("seal", "pepper"):
            has_env = f"CARACAL__KEYS__{r.upper()}__ACTIVE" in env
            if has_env != (r in RINGS[comp]):
                problems.append(f"{name}: {r} ring environment {'present' if has_env else 'missing'}")
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        if not {"/etc/caracal", "/run/secrets/caracal", "/var/lib/caracal"} <= mounts:
            problems.append(f"{name}: must mount /etc/caracal, /run/secrets/caracal, /var/lib/caracal")
        if comp == "gateway":
            problems += intercept_ca_problems(pod, c, by_kind.get("ConfigMap", {}), name)
        args = c.get("args", [])
        if comp == "migrate":
            if args[:1] != ["migrate"]:
                problems.append(f"{name}: args {args}")
            continue
        if args[:2] != ["serve", comp] or "--config" not in args:
            problems.append(f"{name}: args {args}")
        port_name = "admin" if comp == "gateway" else "http"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        want = PORTS["gateway-admin"] if comp == "gateway" else PORTS[comp]
        if ports.get(port_name) != want:
            problems.append(f"{name}: port {port_name} is {ports.get(port_name)}, expected {want}")
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
            g = c.get(probe, {}).get("httpGet", {})
            if g.get("path") != path or g.get("port") != port_name:
                problems.append(f"{name}: {probe} must GET {path} on port {port_name}, has {g}")
        req = c.get("resources", {}).get("requests", {})
        if (str(req.get("cpu")), req.get("memory")) != REQUESTS[comp]:
            problems.append(f"{name}: requests {req}, expected cpu {REQUESTS[comp][0]} memory {REQUESTS[comp][1]}")
        svc_name = d["metadata"]["name"] + ("-admin" if comp == "gateway" else "")
        svc = by_kind.get("Service", {}).get(svc_name)
        if not svc:
            problems.append(f"{where}: no Service {svc_name}")
        elif svc["metadata"]["labels"].get("caracal.io/job") != f"caracal-{comp}":
            problems.append(f"{where}: Service {svc_name} must carry caracal.io/job=caracal-{comp}")
    for comp in ("gateway", "sts") if scaled else ():
        for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget"):
            if not any(o["metadata"]["labels"].get("app.kubernetes.io/component") == comp for o in by_kind.get(kind, {}).values()):
                problems.append(f"{where}: no {kind} for {comp}")
    exposed = [s["metadata"]["name"] for s in by_kind.get("Service", {}).values() if s["spec"].get("type", "ClusterIP") != "ClusterIP"]
    if any("gateway" not in n or n.endswith("-admin") for n in exposed):
        problems.append(f"{where}: only the gateway proxy Service may be exposed, not {exposed}")
    nps = by_kind.get("NetworkPolicy", {})
    if nps:
        if not any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in nps.values()):
            problems.append(f"{where}: no default-deny NetworkPolicy")
        for p in nps.values():
            comp = p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")
            for rule in p["spec"].get("egress", []):
                for peer in rule.get("to", []):
                    cidr = peer.get("ipBlock", {}).get("cidr")
                    if cidr in ("0.0.0.0/0", "::/0") and comp != "gateway":
                        problems.append(f"{where}: NetworkPolicy {p['metadata']['name']} gives internet egress to {comp or 'every pod'}")
    if not by_kind.get("ServiceMonitor"):
        problems.append(f"{where}: no ServiceMonitor")
    return problems


def intercept_ca_problems(pod: dict, c: dict, configmaps: dict, name: str) -> list[str]:
    """The gateway's TLS interception CA is one file shared by every replica: it must come from
    the Secret (mounted read-only), and gateway.intercept_ca must point at it (the default,
    under data_dir, would be a different CA per pod)."""
    problems = []
    items = {i["key"]: i["path"] for v in pod["volumes"] if v["name"] == "keys" for i in v["secret"]["items"]}
    ca_items = [p for k, p in items.items() if k.startswith("intercept")]
    if len(ca_items) != 1:
        return [f"{name}: the keys volume must hold the interception CA entry once, has {ca_items}"]
    if not all(m.get("readOnly") for m in c.get("volumeMounts", []) if m["name"] == "keys"):
        problems.append(f"{name}: the keys volume (interception CA) must be mounted read-only")
    cms = [cm for cm in configmaps.values() if "caracal.toml" in cm.get("data", {})]
    if len(cms) != 1:
        return problems + [f"{name}: expected one ConfigMap with caracal.toml, found {len(cms)}"]
    want = f"/run/secrets/caracal/{ca_items[0]}"
    have = tomllib.loads(cms[0]["data"]["caracal.toml"]).get("gateway", {}).get("intercept_ca")
    if have != want:
        problems.append(f"{name}: gateway.intercept_ca is {have!r}, expected the mounted Secret entry {want!r}")
    return problems


@check("kubernetes: probes, requests, hardening, key rings, services, HPA/PDB, policies")
def k8s_workloads():
    fail_if(check_workloads(plain_objects(), "deploy/kubernetes"))


@check("kubernetes: caracal.toml in the ConfigMap uses only real configuration keys")
def k8s_config():
    cm = next(o for o in plain_objects() if o["kind"] == "ConfigMap")
    fail_if(config_key_problems(cm["data"]["caracal.toml"], "deploy/kubernetes ConfigMap"))


# ----------------------------------------------------------------------------- Helm (static)


def values_paths(values: dict) -> set[str]:
    out = set()

    def walk(v, prefix):
        if isinstance(v, dict):
            for k, x in v.items():
                p = f"{prefix}.{k}" if prefix else k
                out.add(p)
                walk(x, p)

    walk(values, "")
    return out


@check("helm: Chart.yaml, values.yaml and templates are well-formed")
def helm_structure():
    problems = []
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for f in ("apiVersion", "name", "version", "appVersion", "description", "type"):
        if not chart.get(f):
            problems.append(f"Chart.yaml: {f} missing")
    if chart.get("apiVersion") != "v2":
        problems.append("Chart.yaml: apiVersion must be v2")
    if chart.get("name") != CHART.name:
        problems.append("Chart.yaml: name must match the chart directory")
    if not re.fullmatch(r"\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", str(chart.get("version"))):
        problems.append("Chart.yaml: version must be SemVer 2")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    paths = values_paths(values)
    templates = sorted((CHART / "templates").glob("*"))
    if not templates:
        problems.append("no templates")
    defined = set()
    texts = {}
    for t in templates:
        if t.suffix not in (".yaml", ".tpl", ".txt"):
            problems.append(f"templates/{t.name}: unexpected file")
        texts[t.name] = t.read_text()
        defined |= set(re.findall(r'{{-?\s*define\s+"([^"]+)"', texts[t.name]))
    for name, text in texts.items():
        opens = len(re.findall(r"{{-?\s*(?:if|range|with|define)\b", text))
        ends = len(re.findall(r"{{-?\s*end\s*-?}}", text))
        if opens != ends:
            problems.append(f"templates/{name}: {opens} blocks opened, {ends} closed")
        if text.count("{{") != text.count("}}"):
            problems.append(f"templates/{name}: unbalanced {{{{ }}}}")
        for inc in re.findall(r'(?:include|template)\s+"([^"]+)"', text):
            if inc not in defined:
                problems.append(f"templates/{name}: includes undefined template {inc!r}")
        # .Values.a.b (any receiver: ., $, .root) must exist in values.yaml.
        for ref in re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text):
            if ref[1:] not in paths:
                problems.append(f"templates/{name}: .Values{ref} is not in values.yaml")
        # range $c := list "a" "b" … $v := index $.Values $c … $v.x.y
        for m in re.finditer(r'range\s+\$(\w+)\s*:=\s*list((?:\s+"[^"]+")+)', text):
            var, comps = m.group(1), re.findall(r'"([^"]+)"', m.group(2))
            for alias in re.findall(r"\$(\w+)\s*:=\s*index\s+\$\.Values\s+\$" + var + r"\b", text):
                for ref in set(re.findall(r"\$" + alias + r"((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text)):
                    for comp in comps:
                        if f"{comp}{ref}" not in paths:
                            problems.append(f"templates/{name}: ${alias}{ref} → {comp}{ref} is not in values.yaml")
    fail_if(problems)
    return f"{len(templates)} templates, {len(paths)} value paths"


@check("helm: every value in values.yaml is documented by a comment")
def helm_values_documented():
    """A key needs a comment right above it, unless an ancestor's comment covers it (a key whose
    value is documented as a whole, e.g. a resources block) or it is a section header."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    problems = []
    stack: list[tuple[int, bool]] = []  # (indent, documented)
    for i, line in enumerate(lines):
        s = line.strip()
        if not s or s.startswith("#") or s.startswith("- "):
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_.\-\"/]+):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = i > 0 and lines[i - 1].strip().startswith("#")
        covered = any(d for _, d in stack)
        is_section = rest == "" and i + 1 < len(lines) and not lines[i + 1].strip().startswith("-")
        if not (documented or covered or is_section):
            problems.append(f"values.yaml:{i + 1}: {key} has no comment")
        stack.append((indent, documented))
    fail_if(problems)


# ----------------------------------------------------------------------------- Helm (rendered)


def render(values: dict | None = None, name="caracal", namespace="caracal", revision=1) -> dict[str, str]:
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as c:
        return c.render(values or {}, name=name, namespace=namespace, revision=revision, is_install=True)


def rendered_objects(manifests: dict[str, str]) -> list[dict]:
    out = []
    for path, text in manifests.items():
        if path.endswith(".txt"):
            continue
        out.extend(load_docs(text))
    return out


@check("helm: lint (Helm SDK, strict) reports no warning or error")
def helm_lint():
    import helm_python as helm

    r = helm.lint(str(CHART), strict=True, kube_version=K8S_VERSION)
    bad = [m for m in r.get("messages", []) if m.get("severity", 0) >= 2] + [{"error": e} for e in r.get("errors", [])]
    fail_if([f"{m.get('path', '')}: {m.get('error')}" for m in bad])
    info = [m.get("error") for m in r.get("messages", [])]
    return ("info: " + "; ".join(info)) if info else ""


VARIANTS = {
    "defaults": {},
    "everything-on": {
        "image": {"repository": "registry.example.com/caracal", "tag": "9.9.9"},
        "imagePullSecrets": [{"name": "regcred"}],
        "secrets": {
            "create": True,
            "databaseUrl": "postgres://caracal:pw@db:5432/caracal",
            "redisUrl": "redis://:pw@redis:6379",
            "keyMaterial": {"bus-key": "base64:AAAA", "internal-key": "base64:AAAA", "seal-key": "base64:AAAA",
                            "seal-key-2": "base64:AAAA", "pepper-key": "base64:AAAA", "intercept-ca": "{}"},
        },
        "keys": {"seal": {"active": "seal_2", "keys": {"seal_1": "seal-key", "seal_2": "seal-key-2"}}},
        "gateway": {"autoscaling": {"enabled": False}, "pdb": {"enabled": False},
                    "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["203.0.113.0/24"],
                                "externalTrafficPolicy": "Local", "annotations": {"a": "b"}},
                    "extraEnv": [{"name": "CARACAL__GATEWAY__DNS_TTL", "value": "10s"}],
                    "nodeSelector": {"pool": "edge"}, "tolerations": [{"key": "edge", "operator": "Exists"}]},
        "sts": {"autoscaling": {"enabled": False}},
        "podAnnotations": {"x": "y"},
        "podLabels": {"team": "platform"},
        "serviceMonitor": {"labels": {"release": "kube-prometheus-stack"}},
        "networkPolicy": {"stsExtraEgress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 443, "protocol": "TCP"}]}]},
        "config": {"extraToml": "[[gateway.sidecars]]\nlisten = \"0.0.0.0:7410\"\ntenant = \"demo\"\nresource = \"openai\"\n"},
    },
    "minimal": {"networkPolicy": {"enabled": False}, "migrations": {"enabled": False},
                "serviceMonitor": {"enabled": False}, "serviceAccount": {"create": False, "name": "existing"}},
}


@check("helm: renders with several value sets; every object validates (strict)")
def helm_render_validate():
    problems, count = [], 0
    for vname, values in VARIANTS.items():
        objs = rendered_objects(render(values, name="prod" if vname == "everything-on" else "caracal",
                                       namespace="agents" if vname == "everything-on" else "caracal"))
        count += len(objs)
        problems += validate_objects(objs, f"variant {vname}")
        if vname != "minimal":
            if vname == "everything-on":
                # The extra-egress policy deliberately opens the internet to the STS.
                objs = [o for o in objs if not o["metadata"]["name"].endswith("sts-extra-egress")]
            problems += check_workloads(objs, f"variant {vname}", scaled=vname != "everything-on")
        cm = next(o for o in objs if o["kind"] == "ConfigMap")
        toml_text = cm["data"]["caracal.toml"]
        problems += config_key_problems(toml_text, f"variant {vname} ConfigMap")
    fail_if(problems)
    return f"{len(VARIANTS)} value sets, {count} objects"


def normalise(o: dict) -> dict:
    o = copy.deepcopy(o)
    o.pop("status", None)
    md = o["metadata"]
    for k in ("labels", "annotations"):
        md.pop(k, None)
    if o["kind"] == "Job":
        md["name"] = re.sub(r"-\d+$", "", md["name"])
    spec = o.get("spec", {})
    if o["kind"] in ("Deployment",):
        spec.pop("replicas", None)  # the HPA owns it in the chart
    if o["kind"] in ("Deployment", "Job"):
        spec["template"]["metadata"] = {}
    for k in ("labels", "annotations"):
        md.pop(k, None)
    return o


@check("helm: default render produces the same objects as deploy/kubernetes")
def helm_matches_plain():
    plain = {(o["kind"], o["metadata"]["name"]): normalise(o) for o in plain_objects() if o["kind"] != "Namespace"}
    chart = {}
    for o in rendered_objects(render({})):
        n = normalise(o)
        chart[(n["kind"], n["metadata"]["name"])] = n
    problems = [f"only in deploy/kubernetes: {k}" for k in sorted(set(plain) - set(chart))]
    problems += [f"only in the chart: {k}" for k in sorted(set(chart) - set(plain))]
    for k in sorted(set(plain) & set(chart)):
        a, b = plain[k], chart[k]
        if k[0] == "ConfigMap":
            ta, tb = tomllib.loads(a["data"]["caracal.toml"]), tomllib.loads(b["data"]["caracal.toml"])
            if ta != tb:
                diff = {x for x in set(flatten(ta).items()) ^ set(flatten(tb).items())}
                problems.append(f"{k}: caracal.toml differs: {sorted(diff, key=str)}")
            continue
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            fa, fb = flatten_any(a), flatten_any(b)
            diff = sorted({p for p in set(fa) | set(fb) if fa.get(p) != fb.get(p)})
            problems.append(f"{k}: differs at " + ", ".join(f"{p} ({fa.get(p)!r} vs {fb.get(p)!r})" for p in diff[:6]))
    fail_if(problems)
    return f"{len(chart)} objects"


def flatten_any(v, prefix="") -> dict:
    out = {}
    if isinstance(v, dict):
        for k, x in v.items():
            out.update(flatten_any(x, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out.update(flatten_any(x, f"{prefix}[{i}]"))
    else:
        out[prefix] = v
    return out


# ----------------------------------------------------------------------------- compose


def compose_doc() -> dict:
    return yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())


@check("compose: topology, secrets per service, healthchecks, one published service")
def compose_topology():
    doc = compose_doc()
    svcs = doc["services"]
    problems = []
    toml = tomllib.loads((COMPOSE_DIR / "caracal.toml").read_text())
    for comp in SERVICES:
        s = svcs.get(comp)
        if not s:
            problems.append(f"no service {comp}")
            continue
        if s.get("command", [])[:2] != ["serve", comp]:
            problems.append(f"{comp}: command {s.get('command')}")
        secrets = {x.removeprefix("caracal-").split("-")[0] for x in s.get("secrets", [])}
        if secrets != RINGS[comp]:
            problems.append(f"{comp}: secrets {sorted(secrets)}, expected {sorted(RINGS[comp])}")
        env = {k: str(v) for k, v in s.get("environment", {}).items()}
        problems += env_ring_problems(env, f"compose {comp}")
        port = env.get("CARACAL_HEALTHCHECK_PORT")
        listen = toml["gateway"]["admin_listen"] if comp == "gateway" else toml[comp]["listen"]
        if not port or not listen.endswith(":" + port):
            problems.append(f"{comp}: healthcheck port {port} does not match its listen address {listen}")
        if "/healthz" not in " ".join(s.get("healthcheck", {}).get("test", [])):
            problems.append(f"{comp}: healthcheck must probe /healthz")
        deps = s.get("depends_on", {})
        if deps.get("migrate", {}).get("condition") != "service_completed_successfully":
            problems.append(f"{comp}: must depend on migrate (service_completed_successfully)")
        nets = set(s.get("networks", []))
        if (comp == "gateway") != ("edge" in nets):
            problems.append(f"{comp}: only the gateway may join the internet-facing `edge` network")
    # The interception CA: a compose secret given to the gateway, where gateway.intercept_ca points.
    ca = toml.get("gateway", {}).get("intercept_ca")
    if ca != "/run/secrets/caracal-intercept-ca":
        problems.append(f"caracal.toml: gateway.intercept_ca is {ca!r}, expected /run/secrets/caracal-intercept-ca")
    if "caracal-intercept-ca" not in doc.get("secrets", {}):
        problems.append("no top-level secret caracal-intercept-ca")
    if svcs.get("migrate", {}).get("command", [])[:1] != ["migrate"]:
        problems.append("migrate: must run `caracal migrate`")
    published = sorted(n for n, s in svcs.items() if s.get("ports") and "profiles" not in s)
    if published != ["gateway"]:
        problems.append(f"published services: {published}, expected only gateway")
    for n, s in svcs.items():
        if "profiles" in s:
            for p in s.get("ports", []):
                if not str(p).startswith("127.0.0.1:"):
                    problems.append(f"{n}: optional services publish on loopback only ({p})")
    if not doc["networks"]["backend"].get("internal"):
        problems.append("the backend network must be internal (no route out)")
    for img, want in (("postgres", "postgres:16"), ("redis", "redis:7")):
        if not str(svcs[img]["image"]).startswith(want):
            problems.append(f"{img}: image {svcs[img]['image']}, expected {want}")
    fail_if(problems)


@check("compose: caracal.toml uses only real configuration keys")
def compose_config():
    fail_if(config_key_problems((COMPOSE_DIR / "caracal.toml").read_text(), "deploy/compose/caracal.toml"))


# ----------------------------------------------------------------------------- metrics


def exported_metrics() -> set[str]:
    """Metric names the code registers: `Opts::new("x")` / `HistogramOpts::new("x")` / `mk("x")`
    under the `caracal` namespace, or a full name given to `Opts::new` or a plain
    `IntCounter::new` / `Gauge::new` / … (no namespace: the name already starts with caracal_)."""
    names = {"caracal_build_info"}
    ctor = r'(?:HistogramOpts::new|Opts::new|\bmk|\b(?:Int)?(?:Counter|Gauge)::new)'
    for crate in ("shared", "gateway", "sts", "control", "coordinator", "audit", "cli"):
        for f in (ROOT / crate / "src").rglob("*.rs"):
            text = f.read_text()
            for n in re.findall(ctor + r'\(\s*"([a-z][a-z0-9_]*)"', text):
                names.add(n if n.startswith("caracal_") else f"caracal_{n}")
    return names


def referenced_metrics() -> dict[str, set[str]]:
    refs: dict[str, set[str]] = {}

    def add(expr: str, where: str):
        for n in re.findall(r"\b(caracal_[a-z0-9_]+)", expr):
            n = re.sub(r"_(bucket|sum|count)$", "", n)
            refs.setdefault(n, set()).add(where)

    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for g in alerts["groups"]:
        for r in g["rules"]:
            add(r["expr"], "alerts.yml")
    dash = json.loads((DEPLOY / "grafana" / "caracal-ops.json").read_text())
    for p in dash["panels"]:
        for t in p.get("targets", []):
            add(t["expr"], "caracal-ops.json")
    return refs


@check("metrics: names used by alerts and dashboard exist in the code or are listed as planned")
def metrics_consistency():
    exported, refs = exported_metrics(), referenced_metrics()
    missing = {n for n in refs if n not in exported}
    readme = (DEPLOY / "README.md").read_text()
    m = re.search(r"^## Metrics the rules expect that services do not export yet\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    assert m, 'deploy/README.md has no section "## Metrics the rules expect that services do not export yet"'
    listed = set(re.findall(r"`(caracal_[a-z0-9_]+)`", m.group(1)))
    problems = [f"{n} (used in {', '.join(sorted(refs[n]))}) is not exported and not listed in deploy/README.md" for n in sorted(missing - listed)]
    problems += [f"{n} is listed as not exported in deploy/README.md but the code exports it (or nothing uses it)" for n in sorted(listed - missing)]
    fail_if(problems)
    return f"{len(refs)} metric names used, {len(missing)} planned"


@check("grafana: dashboard structure (schemaVersion, datasource variable, queries, layout)")
def grafana_structure():
    d = json.loads((DEPLOY / "grafana" / "caracal-ops.json").read_text())
    problems = []
    if not 36 <= d.get("schemaVersion", 0) <= 41:
        problems.append(f"schemaVersion {d.get('schemaVersion')}")
    var = [v for v in d["templating"]["list"] if v.get("type") == "datasource" and v.get("query") == "prometheus"]
    if not var:
        problems.append("no Prometheus datasource variable")
    ids = [p["id"] for p in d["panels"]]
    if len(ids) != len(set(ids)):
        problems.append("duplicate panel ids")
    for p in d["panels"]:
        gp = p["gridPos"]
        if gp["x"] + gp["w"] > 24:
            problems.append(f"{p['title']}: wider than the grid")
        if p["type"] == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${" + var[0]["name"] + "}" if var else True:
            problems.append(f"{p['title']}: does not use the datasource variable")
        if not p.get("targets") or not all(t.get("expr") for t in p["targets"]):
            problems.append(f"{p['title']}: no query")
    fail_if(problems)
    return f"{len(d['panels'])} panels"


# ----------------------------------------------------------------------------- docs


# Where each HTTP service declares its routes (`Router::new().get("/v1/…", …)…`).
ROUTE_FILES = {
    "control": ROOT / "control" / "src" / "lib.rs",
    "sts": ROOT / "sts" / "src" / "lib.rs",
    "coordinator": ROOT / "coordinator" / "src" / "api.rs",
    "audit": ROOT / "audit" / "src" / "api.rs",
}


def api_routes() -> set[tuple[str, str]]:
    """Every route of the control, STS, coordinator and audit APIs, plus the health endpoints."""
    routes = set()
    for svc, f in ROUTE_FILES.items():
        found = re.findall(r'\.(get|post|put|patch|delete)\(\s*"(/[^"]*)"', f.read_text())
        assert found, f"no routes found in {f.relative_to(ROOT)} ({svc})"
        routes |= {(m.upper(), p) for m, p in found}
    for method, path in (("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")):
        routes.add((method, path))
    return routes


def cli_commands() -> set[str]:
    text = (ROOT / "cli" / "src" / "cmd" / "mod.rs").read_text()
    enum = re.search(r"pub enum Command \{(.*?)\n\}", text, re.S).group(1)
    names = re.findall(r"^\s{4}([A-Z][A-Za-z]+)\s*[({,]", enum, re.M)
    return {re.sub(r"(?<!^)([A-Z])", r"-\1", n).lower() for n in names}


def path_matches(doc_path: str, route: str) -> bool:
    a, b = doc_path.strip("/").split("/"), route.strip("/").split("/")
    if len(a) != len(b):
        return False
    return all(x == y or "{" in y or re.search(r"[${<]", x) for x, y in zip(a, b))


@check("docs: runbooks reference only endpoints and commands that exist, or say (planned)")
def docs_references():
    ops = (ROOT / "docs" / "operations.md").read_text()
    routes = api_routes()
    assert ("POST", "/oauth/token") in routes and ("POST", "/v1/revocations") in routes, "cannot read the routes"
    cmds = cli_commands()
    problems = []
    for i, line in enumerate(ops.splitlines(), 1):
        if "(planned)" in line:
            continue
        for path in re.findall(r"(/v1/[A-Za-z0-9_./{}<>$-]*[A-Za-z0-9_}>-])", line):
            path = path.split("?")[0]
            if not any(path_matches(path, r) for _, r in routes):
                problems.append(f"docs/operations.md:{i}: {path} is not a route (mark the line (planned))")
        for method, path in re.findall(r"\b(GET|POST|PUT|PATCH|DELETE) (/[A-Za-z0-9_./{}<>$-]*[A-Za-z0-9_}>-])", line):
            if not any(m == method and path_matches(path, r) for m, r in routes):
                problems.append(f"docs/operations.md:{i}: {method} {path} is not a route (mark the line (planned))")
        for sub in re.findall(r"(?:^|\$ |&& |; |-- |\| |`)caracal ([a-z][a-z-]*)", line.strip()):
            if sub not in cmds:
                problems.append(f"docs/operations.md:{i}: `caracal {sub}` is not a command (mark the line (planned))")
    # Every runbook anchor the alerts point at exists.
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-") for h in re.findall(r"^#+ (.+)$", ops, re.M)}
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for g in alerts["groups"]:
        for r in g["rules"]:
            rb = r.get("annotations", {}).get("runbook")
            if rb and rb.split("#", 1)[1] not in anchors:
                problems.append(f"alerts.yml {r['alert']}: runbook anchor #{rb.split('#', 1)[1]} not in docs/operations.md")
    fail_if(problems)
    return f"commands known: {', '.join(sorted(cmds))}"


# ----------------------------------------------------------------------------- the binary


def find_binary() -> Path | None:
    cands = [os.environ.get("CARACAL_BIN")]
    for t in (os.environ.get("CARGO_TARGET_DIR"), str(ROOT / "target"), str(Path.home() / ".cache/caracal-ci/target")):
        if t:
            cands += [f"{t}/release/caracal", f"{t}/debug/caracal"]
    for c in cands:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    return None


@check("config: `caracal check-config` accepts every shipped configuration (when a binary is built)")
def binary_check_config():
    b = find_binary()
    if not b:
        return "SKIPPED: no caracal binary (set CARACAL_BIN or build caracal-cli)"
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for k in ("bus", "internal", "seal", "pepper"):
            (t / f"{k}-key").write_text("base64:" + "A" * 43 + "=\n")
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}

        def run(cfg_text: str, env: dict, where: str):
            f = t / "caracal.toml"
            # Key files live in the temporary directory instead of /run/secrets.
            cfg_text = re.sub(r'file:/run/secrets/(?:caracal/|caracal-)([a-z]+)-key', lambda m: f"file:{t}/{m.group(1)}-key", cfg_text)
            f.write_text(cfg_text)
            env = {k: re.sub(r"file:/run/secrets/(?:caracal/|caracal-)([a-z]+)-key", lambda m: f"file:{t}/{m.group(1)}-key", v) for k, v in env.items()}
            r = subprocess.run([str(b), "check-config", "--config", str(f)], env={**base, **env}, capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                problems.append(f"{where}: {r.stdout}{r.stderr}".strip())

        svcs = compose_doc()["services"]
        for comp in SERVICES + ["migrate"]:
            env = {k: str(v) for k, v in svcs[comp].get("environment", {}).items() if k.startswith("CARACAL__")}
            env = {k: re.sub(r"\$\{[^}]*\}", "x", v) for k, v in env.items()}
            run((COMPOSE_DIR / "caracal.toml").read_text(), env, f"compose {comp}")
        for label, objs in (("deploy/kubernetes", plain_objects()), ("helm", rendered_objects(render({})))):
            toml_text = next(o for o in objs if o["kind"] == "ConfigMap")["data"]["caracal.toml"]
            for o in objs:
                if o["kind"] not in ("Deployment", "Job"):
                    continue
                c = o["spec"]["template"]["spec"]["containers"][0]
                env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e and e["name"].startswith("CARACAL__")}
                env["CARACAL__DATABASE__URL"] = "postgres://caracal:pw@db:5432/caracal"
                env["CARACAL__BUS__REDIS_URL"] = "redis://:pw@redis:6379"
                run(toml_text, env, f"{label} {o['metadata']['name']}")
    fail_if(problems)
    return f"with {b}"


@check("compose: gen-secrets.sh makes the keys and the interception CA; `caracal ca` rotates it (when a binary is built)")
def gen_secrets_and_ca():
    """Runs a copy of gen-secrets.sh (so no .env or secrets land in the repository) with the
    built binary, then the rotation steps of docs/operations.md on the CA file it made."""
    b = find_binary()
    if not b:
        return "SKIPPED: no caracal binary (set CARACAL_BIN or build caracal-cli)"
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for f in ("gen-secrets.sh", ".env.example"):
            (t / f).write_bytes((COMPOSE_DIR / f).read_bytes())
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CARACAL_BIN": str(b), "HOME": tmp}
        for run in (1, 2):
            r = subprocess.run(["bash", str(t / "gen-secrets.sh")], env=env, capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                return fail_if([f"gen-secrets.sh (run {run}) exited {r.returncode}: {r.stdout}{r.stderr}".strip()])
            if run == 2 and "generated" in r.stdout:
                problems.append(f"gen-secrets.sh regenerated existing files on a second run: {r.stdout}")
        sec = t / "secrets"
        declared = {Path(s["file"].split("}/", 1)[-1]).name for s in compose_doc()["secrets"].values()}
        made = {p.name for p in sec.iterdir()}
        if declared - made:
            problems.append(f"gen-secrets.sh does not make {sorted(declared - made)} (compose.yaml secrets)")
        ca = sec / "intercept-ca.json"
        if not ca.is_file():
            return fail_if(problems + ["gen-secrets.sh made no intercept-ca.json"])
        if oct(ca.stat().st_mode & 0o777) != "0o444":
            problems.append(f"intercept-ca.json mode {oct(ca.stat().st_mode & 0o777)}, expected 0444 (read by uid 10001)")
        doc = json.loads(ca.read_text())
        if not {"cert_pem", "key_pem", "previous"} <= set(doc):
            problems.append(f"intercept-ca.json has fields {sorted(doc)}")
        # The runbook: export the bundle, rotate, export again (new + previous certificate).
        ca_env = {**env, "CARACAL__GATEWAY__INTERCEPT_CA": str(ca)}

        def caracal(*args):
            r = subprocess.run([str(b), "ca", *args, "--config", "/dev/null"], env=ca_env, capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                problems.append(f"caracal ca {' '.join(args)}: exit {r.returncode}: {r.stdout}{r.stderr}".strip())
            return r.stdout

        before = caracal("export").count("BEGIN CERTIFICATE")
        caracal("rotate")
        after = caracal("export").count("BEGIN CERTIFICATE")
        if (before, after) != (1, 2):
            problems.append(f"bundle has {before} certificate(s) before rotation and {after} after, expected 1 and 2")
        if json.loads(ca.read_text()).get("cert_pem") == doc["cert_pem"]:
            problems.append("caracal ca rotate did not replace the CA certificate")
    fail_if(problems)
    return f"with {b}"


def main() -> int:
    checks = [
        k8s_schema, k8s_kustomization, k8s_workloads, k8s_config,
        helm_structure, helm_values_documented, helm_lint, helm_render_validate, helm_matches_plain,
        compose_topology, compose_config, gen_secrets_and_ca,
        metrics_consistency, grafana_structure, docs_references,
        binary_check_config,
    ]
    for c in checks:
        c()
    passed = sum(1 for _, ok, _ in RESULTS if ok)
    failed = len(RESULTS) - passed
    print(f"\ndeploy checks: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
