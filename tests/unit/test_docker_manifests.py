"""docker/: the image's Dockerfile and the Kubernetes example, checked without a Docker engine or a
cluster: every file parses, the Dockerfile copies what exists and starts a command the CLI
accepts, and the manifests agree with each other and with meshcore's defaults (names, ports,
paths, uids)."""
from __future__ import annotations

import fnmatch
import glob
import json
import os
import shlex
import subprocess
import sys

import pytest
import yaml

from meshcore.admin import READY_PATH
from meshcore.cli import SIDECAR_HEALTH, SIDECAR_INBOUND, SIDECAR_OUTBOUND, build_parser
from meshcore.config.compile import compile_sources
from meshcore.config.load import read_sources
from meshcore.config.sidecar import KIND_HTTP, http_route, outbound_target

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKER = os.path.join(REPO, "docker")
K8S = os.path.join(DOCKER, "kubernetes")
EXTENSIONS = sorted(os.path.splitext(os.path.basename(p))[0]
                    for p in glob.glob(os.path.join(REPO, "ext", "*.pyx")))


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    with open(os.path.join(DOCKER, "Dockerfile")) as f:
        for line in f:
            stripped = line.strip()
            if not current and (not stripped or stripped.startswith("#")):
                continue
            if stripped.endswith("\\"):
                current += stripped[:-1] + " "
                continue
            current += stripped
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    assert not current, "a dangling line continuation"
    return out


def instructions(name: str) -> list[str]:
    return [rest for word, rest in dockerfile() if word == name]


def dockerignored(path: str) -> bool:
    with open(os.path.join(REPO, ".dockerignore")) as f:
        patterns = [p.strip() for p in f if p.strip() and not p.startswith("#")]
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


def test_dockerfile_copies_sources_that_exist_and_are_sent():
    copies = instructions("COPY")
    assert copies
    for rest in copies:
        args = rest.split()
        if args[0].startswith("--from="):
            continue  # from the build stage
        *sources, _dest = args
        for src in sources:
            assert os.path.exists(os.path.join(REPO, src)), src
            assert not dockerignored(src), f"{src} is excluded by .dockerignore"
    assert dockerignored(".venv") and dockerignored("meshcore/_ext/loop.cpython-311-x86_64-linux-gnu.so")


def test_dockerfile_fails_the_build_without_every_extension():
    checks = [r for r in instructions("RUN") if "importlib.import_module('meshcore._ext.'" in r]
    assert len(checks) == 1
    listed = checks[0].split("for m in (", 1)[1].split(")", 1)[0]
    modules = sorted(m.strip().strip("'\"") for m in listed.split(",") if m.strip())
    assert modules == EXTENSIONS == ["h1conn", "h1parse", "loop", "pool", "ring", "shmatomic"]
    # the check itself runs here: the same statement loads every extension of this build
    code = checks[0].split('python -c "', 1)[1].split('"', 1)[0]
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "MESHCORE_NO_EXTENSIONS"})
    assert done.returncode == 0, done.stderr


def image_command() -> list[str]:
    entrypoint = json.loads(instructions("ENTRYPOINT")[-1])
    cmd = json.loads(instructions("CMD")[-1])
    return entrypoint + cmd


def test_dockerfile_starts_the_sidecar_as_1337():
    argv = image_command()
    assert argv[:3] == ["python", "-m", "meshcore"]
    args = build_parser().parse_args(argv[3:])
    assert args.command == "run" and args.sidecar
    assert args.config == ["/etc/meshcore"]
    assert instructions("USER")[-1].split(":")[0] == "1337"
    exposed = {int(p) for p in instructions("EXPOSE")[-1].split()}
    assert exposed == {SIDECAR_OUTBOUND[1], SIDECAR_INBOUND[1], SIDECAR_HEALTH[1], 15090}
    assert any("useradd" in r and "--uid 1337" in r for r in instructions("RUN"))
    assert any("install" in r and "iptables" in r for r in instructions("RUN"))


def load(name: str) -> list[dict]:
    with open(os.path.join(K8S, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def manifests() -> dict[str, list[dict]]:
    return {os.path.basename(p): load(os.path.basename(p))
            for p in sorted(glob.glob(os.path.join(K8S, "*.yaml")))}


def test_every_manifest_parses_with_kind_and_name():
    found = manifests()
    assert set(found) >= {"client-with-sidecar.yaml", "seed-configmaps.yaml", "seed-services.yaml",
                          "seed-pod-endpoints.yaml"}
    for name, docs in found.items():
        for d in docs:
            assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), name


@pytest.fixture(scope="module")
def pod():
    (deploy,) = load("client-with-sidecar.yaml")
    assert deploy["kind"] == "Deployment"
    labels = deploy["spec"]["selector"]["matchLabels"]
    template = deploy["spec"]["template"]
    assert labels.items() <= template["metadata"]["labels"].items()
    return template["spec"]


def container(spec, name):
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def test_init_container_installs_the_capture_for_the_sidecars_uid(pod):
    (init,) = pod["initContainers"]
    sidecar = container(pod, "meshcore")
    assert init["image"] == sidecar["image"]
    args = build_parser().parse_args(init["args"])
    assert args.command == "iptables" and not args.dry_run and not args.clean
    sec = init["securityContext"]
    assert sec["runAsUser"] == 0 and sec["runAsNonRoot"] is False
    assert set(sec["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    assert args.proxy_uid == sidecar["securityContext"]["runAsUser"] == 1337
    run = build_parser().parse_args(sidecar["args"])
    assert args.outbound_port == (run.listen or SIDECAR_OUTBOUND)[1]
    assert args.inbound_port == (run.inbound_listen or SIDECAR_INBOUND)[1]


def test_sidecar_container_matches_the_image_and_the_config_volume(pod):
    sidecar = container(pod, "meshcore")
    assert sidecar["args"] == image_command()[3:]  # the image's own command, spelled out
    run = build_parser().parse_args(sidecar["args"])
    assert run.sidecar
    sec = sidecar["securityContext"]
    assert (sec["runAsUser"], sec["runAsGroup"], sec["runAsNonRoot"]) == (1337, 1337, True)
    assert "NET_ADMIN" not in sec.get("capabilities", {}).get("add", [])
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    (config_dir,) = run.config
    mount = next(m for m in mounts.values() if m["mountPath"] == config_dir)
    assert "subPath" not in mount  # a subPath mount never sees ConfigMap updates
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmaps = {d["metadata"]["name"] for d in load("seed-configmaps.yaml")}
    assert volume["configMap"]["name"] in configmaps
    env = {e["name"] for e in sidecar["env"]}
    assert "POD_NAMESPACE" in env  # --namespace's default, for short-name expansion


def test_readiness_probe_is_the_health_port(pod):
    sidecar = container(pod, "meshcore")
    probe = sidecar["readinessProbe"]["httpGet"]
    assert probe["path"].encode() == READY_PATH
    assert probe["port"] == SIDECAR_HEALTH[1]
    ports = {p["containerPort"]: p for p in sidecar["ports"]}
    assert SIDECAR_HEALTH[1] in ports and 15090 in ports
    run = build_parser().parse_args(sidecar["args"])
    assert run.prometheus == ("0.0.0.0", 15090)


def test_there_is_an_application_container_besides_the_sidecar(pod):
    apps = [c for c in pod["containers"] if c["name"] != "meshcore"]
    assert apps and all(c["image"] != container(pod, "meshcore")["image"] for c in apps)


def test_configmaps_are_the_seed_scenarios_and_are_up_to_date():
    done = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "k8s_configmaps.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    maps = {d["metadata"]["name"]: d["data"] for d in load("seed-configmaps.yaml")}
    seed = os.path.join(REPO, "examples", "seed")
    assert set(maps) == {f"meshcore-seed-{f}" for f in os.listdir(seed)}
    with open(os.path.join(K8S, "seed-services.yaml")) as f:
        services = f.read()
    for folder in os.listdir(seed):
        data = maps[f"meshcore-seed-{folder}"]
        assert data["services.yaml"] == services
        for path in glob.glob(os.path.join(seed, folder, "*.yaml")):
            name = os.path.basename(path)
            if name != "services.yaml":
                with open(path) as f:
                    assert data[name] == f.read(), (folder, name)


def fake_dns(name, port):
    return {"retry-pods": ["10.1.0.1", "10.1.0.2", "10.1.0.3"], "myweb-v1-pods": ["10.1.1.1"],
            "myweb-v2-pods": ["10.1.2.1"], "sniffer-pods": ["10.1.3.1"]}[name]


@pytest.mark.parametrize("folder", sorted(os.listdir(os.path.join(REPO, "examples", "seed"))))
def test_each_configmap_compiles_to_the_seeds_routes(folder):
    data = {d["metadata"]["name"]: d["data"] for d in load("seed-configmaps.yaml")}[
        f"meshcore-seed-{folder}"]
    cluster = compile_sources({k: v.encode() for k, v in data.items()}, resolver=fake_dns,
                              sidecar=True, namespace="default")
    local = compile_sources(read_sources([os.path.join(REPO, "examples", "seed", folder)]),
                            sidecar=True)
    assert cluster.vhosts.keys() == local.vhosts.keys()
    assert cluster.clusters.keys() == local.clusters.keys()
    # the same warnings (the seed's own), named by file rather than by path
    assert [w.replace(os.path.join(REPO, "examples", "seed", folder) + "/", "")
            for w in local.warnings] == list(cluster.warnings)
    # the ServiceEntries' labels give the DestinationRules' subsets their pods
    for name, policy in cluster.clusters.items():
        assert {e.labels for e in policy.endpoints} == {e.labels for e in local.clusters[name].endpoints}, name
    # a captured request to port 80 (any ClusterIP) is routed by its Host
    target = outbound_target(cluster, "10.96.0.10", 80)
    assert target.kind == KIND_HTTP

    class Head:
        method, path = b"GET", b"/"

        def get(self, name):
            return None
    for host in (b"retry-service", b"myweb-service.default.svc.cluster.local"):
        assert http_route(target, host, Head()).name != "allow_any"


def test_dns_names_of_the_services_are_the_headless_services():
    headless = {d["metadata"]["name"]: d for d in load("seed-pod-endpoints.yaml")}
    for se in load("seed-services.yaml"):
        assert se["spec"]["resolution"] == "DNS"
        for ep in se["spec"]["endpoints"]:
            svc = headless[ep["address"]]
            assert svc["spec"]["clusterIP"] == "None"
            # the pods it selects carry the labels the endpoint claims
            assert svc["spec"]["selector"].items() <= ep["labels"].items()
            assert ep["ports"]["http"] in {p["targetPort"] for p in svc["spec"]["ports"]}


def test_readme_commands_for_the_image_name_the_files():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert "docker build -f docker/Dockerfile" in readme
    for name in ("client-with-sidecar.yaml", "seed-configmaps.yaml", "seed-pod-endpoints.yaml"):
        assert f"docker/kubernetes/{name}" in readme
    assert shlex.split("docker build -f docker/Dockerfile -t meshcore:dev .")[-1] == "."
