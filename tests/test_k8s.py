"""KubeRay manifests (k8s/) and the deploy files (deploy/) agree with KubeRay's CRDs, with each
other and with the code.

The CRD schemas come from ../shared/kuberay-crds/ (see its README). Kubernetes rejects unknown
fields (kubectl's default strict field validation) while a plain Draft 7 check of the CRD schema
lets them through, so the validator here also forbids properties a schema does not list: a typo
such as `rayClusterConfg` must fail, not be silently pruned by the API server.
"""
from __future__ import annotations

import copy
import importlib
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
K8S = ROOT / "k8s"
DEPLOY = ROOT / "deploy"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
MANIFESTS = sorted(K8S.glob("*.yaml"))

needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(),
    reason=f"KubeRay CRDs not found at {CRD_DIR} (a clone outside the project setup; CI has them)")


# ---------------------------------------------------------------------------------- helpers


def _strict(schema: dict) -> dict:
    """The schema with additionalProperties: false wherever it lists properties and does not
    say otherwise, recursively (what the API server's strict field validation does)."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: _strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _strict(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = _strict(s["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [_strict(x) for x in s[key]]
    return s


_VALIDATORS: dict[str, jsonschema.Draft7Validator] = {}


def validator(kind: str) -> jsonschema.Draft7Validator:
    if kind not in _VALIDATORS:
        # the C loader where PyYAML has it: these files are ~20k lines each
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
        assert crd["spec"]["names"]["kind"] == kind
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _strict(v1["schema"]["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        _VALIDATORS[kind] = jsonschema.Draft7Validator(schema)
    return _VALIDATORS[kind]


def errors(manifest: dict) -> list[str]:
    kind = manifest.get("kind")
    assert kind in CRD_FILES, f"{kind!r} is not a KubeRay kind ({sorted(CRD_FILES)})"
    assert manifest.get("apiVersion") == "ray.io/v1", manifest.get("apiVersion")
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator(kind).iter_errors(manifest)]


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest(kind: str) -> dict:
    found = [d for p in MANIFESTS for d in load(p) if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in k8s/, found {len(found)}"
    return found[0]


def cluster_spec(m: dict) -> dict:
    return {"RayCluster": lambda: m["spec"], "RayJob": lambda: m["spec"]["rayClusterSpec"],
            "RayService": lambda: m["spec"]["rayClusterConfig"]}[m["kind"]]()


def pod_specs(spec: dict):
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for g in spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]["spec"]


def gpus(container: dict) -> int:
    res = container.get("resources", {})
    lim, req = res.get("limits", {}), res.get("requests", {})
    if "nvidia.com/gpu" in req and "nvidia.com/gpu" in lim:
        # Kubernetes requires GPU requests to equal limits (extended resources can't overcommit)
        assert str(req["nvidia.com/gpu"]) == str(lim["nvidia.com/gpu"]), res
    return int(lim.get("nvidia.com/gpu", req.get("nvidia.com/gpu", 0)))


def serve_config_file() -> dict:
    return yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())


def dockerfile_ray_version() -> str:
    text = (DEPLOY / "Dockerfile").read_text()
    m = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M)
    assert m, "deploy/Dockerfile must declare ARG RAY_VERSION=<x.y.z>"
    return m.group(1)


# ------------------------------------------------------------------------- CRD validation


def test_k8s_has_the_three_manifests():
    kinds = sorted(d["kind"] for p in MANIFESTS for d in load(p))
    assert kinds == ["RayCluster", "RayJob", "RayService"], kinds


@needs_crds
@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_validates_against_kuberay_crd(path):
    docs = load(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert errors(doc) == [], f"{path.name} ({doc['kind']})"


def _set(obj, path, value):
    *head, last = path
    for key in head:
        obj = obj[key]
    if value is _DELETE:
        del obj[last]
    else:
        obj[last] = value


_DELETE = object()
_BREAKAGES = {
    # (kind, path inside the manifest, new value, what the schema must say)
    "typo-in-field-name": ("RayService", ["spec", "rayClusterConfg"], {}, "rayClusterConfg"),
    "replicas-not-int": ("RayCluster", ["spec", "workerGroupSpecs", 0, "replicas"], "one",
                         "is not of type 'integer'"),
    "bad-auth-mode": ("RayJob", ["spec", "rayClusterSpec", "authOptions", "mode"], "tokens",
                      "is not one of"),
    "no-head-containers": ("RayService", ["spec", "rayClusterConfig", "headGroupSpec",
                                          "template", "spec", "containers"], _DELETE,
                           "'containers' is a required property"),
    "rayStartParams-not-string": ("RayJob", ["spec", "rayClusterSpec", "headGroupSpec",
                                             "rayStartParams", "num-cpus"], 0,
                                  "is not of type 'string'"),
    "typo-in-pod-spec": ("RayCluster", ["spec", "workerGroupSpecs", 0, "template", "spec",
                                        "tolerations", 0, "efect"], "NoSchedule", "efect"),
}


@needs_crds
@pytest.mark.parametrize("name", sorted(_BREAKAGES))
def test_broken_manifest_fails_validation(name):
    kind, path, value, expect = _BREAKAGES[name]
    good = manifest(kind)
    assert errors(good) == []
    bad = copy.deepcopy(good)
    _set(bad, path, value)
    found = errors(bad)
    assert found, f"{name}: the broken {kind} validated"
    assert any(expect in e for e in found), found


# ----------------------------------------------------------------- cluster shape and content


def _args_parallel(m: dict) -> tuple:
    """(context_parallel_size, tensor_parallel_size) the manifest's app or job asks for."""
    from ringserve.parallel.tp import parallel_sizes

    if m["kind"] == "RayJob":
        argv = shlex.split(m["spec"]["entrypoint"])
        get = {k: int(argv[argv.index(f"--{k.replace('_', '-')}") + 1])
               for k in ("world_size", "context_parallel_size", "tensor_parallel_size")
               if f"--{k.replace('_', '-')}" in argv}
    else:
        cfg = (yaml.safe_load(m["spec"]["serveConfigV2"]) if m["kind"] == "RayService"
               else serve_config_file())
        (app,) = cfg["applications"]
        get = app["args"]
    return parallel_sizes(get.get("world_size"), get.get("context_parallel_size"),
                          get.get("tensor_parallel_size"))


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_cluster_layout(kind):
    m = manifest(kind)
    spec = cluster_spec(m)
    c, t = _args_parallel(m)
    head = spec["headGroupSpec"]["template"]["spec"]
    assert all(gpus(c) == 0 for c in head["containers"]), "the head group must not ask for GPUs"
    assert len(spec["workerGroupSpecs"]) == 1
    group = spec["workerGroupSpecs"][0]
    pod = group["template"]["spec"]
    per_pod = sum(gpus(c) for c in pod["containers"])
    # without TP the actor group is placed STRICT_PACK: one pod holds all its GPUs; with TP
    # a pod holds one shard's TP group
    assert per_pod == (c if t == 1 else t), (per_pod, c, t)
    if kind != "RayCluster":  # RayService / RayJob: sized for exactly one actor group
        assert group["replicas"] * per_pod == c * t
        assert group["minReplicas"] == group["maxReplicas"] == group["replicas"]

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {vm["mountPath"]: vm for c in pod["containers"] for vm in c["volumeMounts"]}
    # shared memory for NCCL: an in-memory emptyDir on /dev/shm
    shm = volumes[mounts["/dev/shm"]["name"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    # the model: a PVC mounted read-only, on every pod that may load it
    for where, ps in pod_specs(spec):
        vols = {v["name"]: v for v in ps["volumes"]}
        (mount,) = [vm for c in ps["containers"] for vm in c.get("volumeMounts", [])
                    if vm["mountPath"] == "/models"]
        assert mount.get("readOnly") is True, where
        pvc = vols[mount["name"]]["persistentVolumeClaim"]
        assert pvc["claimName"] == "ringserve-models" and pvc.get("readOnly") is True, where
    # every Ray container runs the project image
    images = {c["image"] for _, ps in pod_specs(spec) for c in ps["containers"]}
    assert len(images) == 1, images
    # token authentication on, with a stable Secret
    assert spec["authOptions"]["mode"] == "token"
    assert spec["authOptions"].get("secretName")


def test_model_path_is_on_the_model_volume():
    (app,) = serve_config_file()["applications"]
    assert app["args"]["model"].startswith("/models/")
    argv = shlex.split(manifest("RayJob")["spec"]["entrypoint"])
    assert argv[argv.index("--model") + 1] == app["args"]["model"]


# --------------------------------------------------------------------------- serve config


def test_serve_config_is_valid_for_ray_serve():
    from ray.serve.schema import ServeDeploySchema

    for cfg in (serve_config_file(), yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"])):
        parsed = ServeDeploySchema.model_validate(cfg)
        assert [a.name for a in parsed.applications] == ["ringserve"]
        assert parsed.applications[0].route_prefix == "/"


def test_rayservice_serve_config_equals_deploy_serve_config():
    # the same file, model path included (/models/model is the PVC mount in both places)
    inside = yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"])
    assert inside == serve_config_file()


def test_serve_import_path_names_a_callable():
    (app,) = serve_config_file()["applications"]
    module_name, _, attr = app["import_path"].partition(":")
    assert attr, app["import_path"]
    module = importlib.import_module(module_name)
    builder = getattr(module, attr)
    assert callable(builder), f"{app['import_path']} is {builder!r}"
    # an application builder: args in, a Serve Application out (nothing is started by this)
    from ray import serve

    assert isinstance(builder(app["args"]), serve.Application)
    with pytest.raises(ValueError):
        builder({**app["args"], "world_size": 0})


# ------------------------------------------------------------------------------- versions


def test_ray_and_image_versions_agree():
    ray_version = dockerfile_ray_version()
    docker = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-gpu$", docker, re.M)
    python_tag = re.search(r"^ARG PYTHON_TAG=(py3\d+)$", docker, re.M).group(1)
    assert f'"ray[serve]==${{RAY_VERSION}}"' in docker, "the Dockerfile must pin ray to RAY_VERSION"
    for path in MANIFESTS:
        for doc in load(path):
            spec = cluster_spec(doc)
            assert spec["rayVersion"] == ray_version, path.name
            for _, ps in pod_specs(spec):
                for c in ps["containers"]:
                    tag = c["image"].rsplit(":", 1)[1]
                    assert f"ray{ray_version}-" in tag and tag.endswith(f"-{python_tag}-gpu"), (
                        f"{path.name}: image {c['image']} does not name ray {ray_version} / "
                        f"{python_tag}")
    # the installed Ray (what tests and the CPU path run) is the same release line
    assert ray.__version__.split(".")[:2] == ray_version.split(".")[:2], (
        ray.__version__, ray_version)


def test_serve_args_are_accepted_by_the_app():
    # the app checks its args (unknown keys, ranges) with ServeArgs; the deploy config must pass
    from ringserve.serve.config import ServeArgs

    (app,) = serve_config_file()["applications"]
    args = ServeArgs.from_dict(app["args"])
    assert (args.world_size, args.layout, args.device) == (2, "striped", "cuda")
    with pytest.raises(ValueError, match="unknown argument"):
        ServeArgs.from_dict({**app["args"], "wrld_size": 2})
