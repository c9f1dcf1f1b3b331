"""The Dockerfile and deploy/k8s manifests: parsed, and checked against the CLI and each other.

No Docker engine or cluster here: these checks are what stands between the files and drift. ``problems()``
returns every inconsistency; the tests assert it finds none in the committed files and that it does find
each kind of breakage in mutated copies (so the checks can fail).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from specdec.cli import DEFAULT_METRICS_PORT, DEFAULT_PORT, build_parser  # noqa: E402
from specdec.serving.metrics import METRIC_NAMES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PersistentVolumeClaim"}


def load_manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append(doc)
    return docs


def parse_dockerfile(text: str) -> dict:
    """Instructions of the final stage (and the count of stages), continuation lines joined."""
    text = re.sub(r"\\\n", " ", text)
    stages, out = 0, {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            stages += 1
            out = {"FROM": rest}
        out.setdefault(op, []).append(rest.strip()) if op != "FROM" else None
    out["stages"] = stages
    return out


def _exec_form(value: str) -> list[str]:
    value = value.strip()
    return json.loads(value) if value.startswith("[") else shlex.split(value)


def serve_args(argv: list[str]):
    """Parse ``specdec serve ARGV`` with the real parser; None (and the error) when a flag does not exist."""
    try:
        return build_parser("serve").parse_args(["serve", *argv])
    except SystemExit:
        return None


def problems(docs: list[dict], dockerfile: str) -> list[str]:
    p: list[str] = []
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        for key in ("apiVersion", "kind", "metadata"):
            if key not in d:
                p.append(f"a manifest lacks {key}: {str(d)[:80]}")
        by_kind.setdefault(d.get("kind"), []).append(d)
    for kind in KINDS:
        if len(by_kind.get(kind, [])) != 1:
            p.append(f"want exactly one {kind}, got {len(by_kind.get(kind, []))}")
    if p:
        return p
    dep, svc = by_kind["Deployment"][0], by_kind["Service"][0]
    hpa, pdb, pvc = by_kind["HorizontalPodAutoscaler"][0], by_kind["PodDisruptionBudget"][0], by_kind["PersistentVolumeClaim"][0]
    df = parse_dockerfile(dockerfile)

    # the image: entrypoint + default command parse as `specdec serve`
    entry = _exec_form(df.get("ENTRYPOINT", ["[]"])[-1])
    if entry[:2] != ["specdec", "serve"]:
        p.append(f"Dockerfile ENTRYPOINT must be specdec serve, got {entry}")
    cmd = _exec_form(df.get("CMD", ["[]"])[-1])
    image_args = serve_args(cmd)
    if image_args is None:
        p.append(f"Dockerfile CMD has a flag `specdec serve` does not know: {cmd}")
    if df["stages"] < 2:
        p.append("Dockerfile must be multi-stage")
    user = (df.get("USER") or ["root"])[-1].split(":")[0]
    if user in ("root", "0"):
        p.append("Dockerfile must switch to a non-root USER")
    health = _exec_form(df.get("HEALTHCHECK", ["CMD []"])[-1].split("CMD", 1)[-1])
    if health[:2] != ["specdec", "health"] or build_parser("health").parse_known_args(health[1:])[1]:
        p.append(f"Dockerfile HEALTHCHECK must run a valid `specdec health`, got {health}")
    exposed = {int(x.split("/")[0]) for e in df.get("EXPOSE", []) for x in e.split()}
    env = " ".join(df.get("ENV", []))
    cache = re.search(r"SPECDEC_CACHE=(\S+)", env)
    volumes = " ".join(df.get("VOLUME", []))

    # the pod
    spec = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    if dep["spec"]["selector"]["matchLabels"].items() - labels.items():
        p.append("Deployment selector does not match its pod labels")
    c = spec["containers"][0]
    args = serve_args(c.get("args", []))
    if args is None:
        p.append(f"Deployment args have a flag `specdec serve` does not know: {c.get('args')}")
        return p
    ports = {x["name"]: x["containerPort"] for x in c["ports"]}
    grpc_port = args.port if "--port" in c.get("args", []) else (image_args.port if image_args else DEFAULT_PORT)
    if ports.get("grpc") != grpc_port:
        p.append(f"container port grpc {ports.get('grpc')} != the server's --port {grpc_port}")
    if ports.get("metrics") != args.metrics_port:
        p.append(f"container port metrics {ports.get('metrics')} != --metrics-port {args.metrics_port}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        pr = c.get(probe)
        if not pr or "grpc" not in pr:
            p.append(f"{probe} must be a native gRPC probe")
        elif pr["grpc"].get("port") != grpc_port:
            p.append(f"{probe} port {pr['grpc'].get('port')} != the server's port {grpc_port}")
        elif pr["grpc"].get("service", "") not in ("", "specdec.v1.SpecDecode"):
            p.append(f"{probe} checks an unknown health service {pr['grpc']['service']!r}")
    if grpc_port not in exposed or args.metrics_port not in exposed:
        p.append(f"Dockerfile EXPOSE {sorted(exposed)} lacks {grpc_port} or {args.metrics_port}")
    if image_args and (image_args.port, image_args.metrics_port) != (args.port, args.metrics_port):
        p.append("Dockerfile CMD and Deployment args disagree on the ports")
    hc_addr = health[health.index("--address") + 1] if "--address" in health else f"127.0.0.1:{DEFAULT_PORT}"
    if image_args and int(hc_addr.rsplit(":", 1)[1]) != image_args.port:
        p.append(f"HEALTHCHECK address {hc_addr} != the image's --port {image_args.port}")
    sc = spec.get("securityContext", {})
    if not sc.get("runAsNonRoot") or str(sc.get("runAsUser")) != user:
        p.append(f"pod runAsUser {sc.get('runAsUser')} != Dockerfile USER {user} (or runAsNonRoot unset)")
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    pod_env = {e["name"]: e.get("value") for e in c.get("env", [])}
    if not cache or cache.group(1) not in volumes or pod_env.get("SPECDEC_CACHE") != cache.group(1):
        p.append("SPECDEC_CACHE must be the Dockerfile's VOLUME and the same in the Deployment")
    elif cache.group(1) not in mounts:
        p.append(f"the model volume {cache.group(1)} is not mounted in the Deployment")
    else:
        vol = next((v for v in spec.get("volumes", []) if v["name"] == mounts[cache.group(1)]), {})
        if vol.get("persistentVolumeClaim", {}).get("claimName") != pvc["metadata"]["name"]:
            p.append("the model volume is not the PersistentVolumeClaim")
    res = c.get("resources", {})
    req, lim = _bytes(res.get("requests", {}).get("memory")), _bytes(res.get("limits", {}).get("memory"))
    if not req or not lim or req > lim or req < 3_159_757 * 1024:  # measured RSS of the default pair under load
        p.append(f"memory request {req} must be >= the measured 3.0 GiB RSS and <= the limit {lim}")
    if spec.get("terminationGracePeriodSeconds", 30) <= args.grace:
        p.append("terminationGracePeriodSeconds must exceed --grace so draining can finish")

    # the Service, HPA and PDB
    if svc["spec"].get("clusterIP") != "None":
        p.append("the Service must be headless (clusterIP: None) for client-side load balancing")
    if svc["spec"]["selector"].items() - labels.items():
        p.append("Service selector does not match the pod labels")
    for sp in svc["spec"]["ports"]:
        target = sp.get("targetPort")
        if target not in ports and target not in ports.values():
            p.append(f"Service targetPort {target} names no container port")
    if svc["spec"]["ports"][0].get("port") != grpc_port:
        p.append("the Service's first port must be the gRPC port")
    ref = hpa["spec"]["scaleTargetRef"]
    if (ref["kind"], ref["name"]) != ("Deployment", dep["metadata"]["name"]):
        p.append("the HPA does not target the Deployment")
    for m in hpa["spec"]["metrics"]:
        name = m.get("pods", {}).get("metric", {}).get("name")
        if name not in METRIC_NAMES or not METRIC_NAMES[name].startswith("gauge"):
            p.append(f"the HPA metric {name!r} is not a gauge the server exports")
    if pdb["spec"]["selector"]["matchLabels"].items() - labels.items():
        p.append("the PDB selector does not match the pod labels")
    return p


def _bytes(q) -> int | None:
    if q is None:
        return None
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G)?", str(q))
    if not m:
        return None
    mult = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}
    return int(m.group(1)) * mult[m.group(2)]


@pytest.fixture(scope="module")
def committed():
    return load_manifests(), (REPO / "Dockerfile").read_text()


def test_every_manifest_parses_and_the_set_is_consistent(committed):
    docs, dockerfile = committed
    assert {d["kind"] for d in docs} == KINDS
    assert problems(docs, dockerfile) == []


def test_defaults_in_the_image_match_the_cli(committed):
    _, dockerfile = committed
    cmd = _exec_form(parse_dockerfile(dockerfile)["CMD"][-1])
    a = serve_args(cmd)
    assert (a.port, a.metrics_port, a.host) == (DEFAULT_PORT, DEFAULT_METRICS_PORT, "0.0.0.0")


def _dep(docs):
    return next(d for d in docs if d["kind"] == "Deployment")


def _mutations():
    def probe_port(docs, df):
        _dep(docs)["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = 50052
        return docs, df

    def server_port(docs, df):
        c = _dep(docs)["spec"]["template"]["spec"]["containers"][0]
        c["args"][c["args"].index("--port") + 1] = "6000"
        return docs, df

    def unknown_flag(docs, df):
        _dep(docs)["spec"]["template"]["spec"]["containers"][0]["args"].append("--max-batch")
        return docs, df

    def entry_flag(docs, df):
        return docs, df.replace('"--log-format", "json"]', '"--log-fmt", "json"]')

    def root_user(docs, df):
        return docs, df.replace("USER 10001:10001", "USER root")

    def expose(docs, df):
        return docs, df.replace("EXPOSE 50051 9090", "EXPOSE 8080 9090")

    def not_headless(docs, df):
        next(d for d in docs if d["kind"] == "Service")["spec"]["clusterIP"] = "10.0.0.1"
        return docs, df

    def hpa_metric(docs, df):
        h = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
        h["spec"]["metrics"][0]["pods"]["metric"]["name"] = "specdec_queue_length"
        return docs, df

    def small_memory(docs, df):
        _dep(docs)["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] = "2Gi"
        return docs, df

    def cache_path(docs, df):
        return docs, df.replace("SPECDEC_CACHE=/models", "SPECDEC_CACHE=/data")

    def pdb_labels(docs, df):
        next(d for d in docs if d["kind"] == "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] = {"app": "x"}
        return docs, df

    def healthcheck(docs, df):
        return docs, df.replace('"127.0.0.1:50051", "--timeout"', '"127.0.0.1:50052", "--timeout"')

    def missing_pdb(docs, df):
        return [d for d in docs if d["kind"] != "PodDisruptionBudget"], df

    return [probe_port, server_port, unknown_flag, entry_flag, root_user, expose, not_headless, hpa_metric,
            small_memory, cache_path, pdb_labels, healthcheck, missing_pdb]  # fmt: skip


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_each_kind_of_drift_is_caught(committed, mutate):
    docs, dockerfile = committed
    docs, dockerfile = mutate(copy.deepcopy(docs), dockerfile)
    assert problems(docs, dockerfile), f"{mutate.__name__} went unnoticed"
