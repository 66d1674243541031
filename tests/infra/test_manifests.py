"""The deployment files under infra/, checked offline against the schemas their tools ship with
and against the rest of the project, so that they cannot drift from it unnoticed:

- infra/aws/ray-cluster.yaml: Ray's own cluster-config schema (ray/autoscaler/ray-schema.json) and
  the checks `ray up` runs before it launches anything; node resources against the instance types;
  the versions its setup commands install against pyproject.toml.
- infra/k8s/*.yaml: every Kubernetes object (and every pod template inside the KubeRay objects)
  against Kubernetes' OpenAPI schemas (kubernetes-validate, strict); the KubeRay objects against the
  ray.io/v1 field names; images, env sources and the RayJob's entrypoint against the rest.
- infra/docker/Dockerfile and infra/mlflow/: pinned base images, pins equal to pyproject.toml.
- both clusters against `conf=ernie_21b`: at full size they can place every stage of the preset.

None of this deploys anything; docs/cluster.md says what has not been tried on a real cloud.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
AWS_CONFIG = INFRA / "aws" / "ray-cluster.yaml"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
MLFLOW = INFRA / "mlflow"
PRESET = "ernie_21b"

# Kubernetes versions the manifests must be valid for: an older release still in providers' support
# and the newest one the pinned kubernetes-validate carries.
K8S_VERSIONS = ("1.32", "1.37")

# (GPUs, vCPUs, memory GiB) of the EC2 instance types used, from AWS's instance-type specifications
# (https://aws.amazon.com/ec2/instance-types/): p5.48xlarge 8x H100 80GB, g6e.2xlarge 1x L40S 48GB.
INSTANCE_TYPES = {
    "p5.48xlarge": (8, 192, 2048),
    "g6e.2xlarge": (1, 8, 64),
    "m7i.4xlarge": (0, 16, 64),
    "r7i.8xlarge": (0, 32, 256),
}
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"  # the well-known node label Kubernetes sets


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------- pyproject pins
@cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@cache
def pinned() -> dict[str, Requirement]:
    """Every `name==version` requirement of pyproject.toml (dependencies and all extras)."""
    project = pyproject()["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in reqs if any(s.operator == "==" for s in r.specifier)}


@cache
def ray_vllm_pin() -> Requirement:
    """The vLLM that Ray's `llm` extra (Ray Serve LLM, what `serve.backend=vllm` deploys through)
    requires, read from the installed Ray, which is pyproject's pin."""
    from importlib.metadata import requires, version

    assert f"=={version('ray')}" == str(pinned()["ray"].specifier)
    for line in requires("ray"):
        req = Requirement(line)
        if canonicalize_name(req.name) == "vllm" and req.marker and req.marker.evaluate({"extra": "llm"}):
            return Requirement(f"vllm{req.specifier}")
    raise AssertionError("the installed Ray has no vllm pin in its llm extra")


PIN = re.compile(r"(?<![\w.\-/])([A-Za-z0-9][\w.\-]*(?:\[[\w,\-]*\])?==\d[\w.+!]*)")


def check_pins(text: str, where: str) -> set[str]:
    """The packages `text` pins; each one pyproject.toml also pins must be pinned the same way (with
    at least its extras); vLLM must be the one of Ray's `llm` extra, built for the project's torch."""
    found = set()
    for match in PIN.findall(text):
        req = Requirement(match)
        name = canonicalize_name(req.name)
        found.add(name)
        want = ray_vllm_pin() if name == "vllm" else pinned().get(name)
        if want is not None:
            assert req.specifier == want.specifier and req.extras >= want.extras, (
                f"{where} installs {match}, {'Ray' if name == 'vllm' else 'pyproject.toml'} pins {want}"
            )
    return found


def test_pin_pattern_reads_pins_the_way_pip_does():
    text = "pip install torch==2.13.0 'ray[data,train,serve]==2.60.0' -e ~/x  boto3==1.43.117; ls a==b"
    assert {str(Requirement(m)) for m in PIN.findall(text)} >= {
        "torch==2.13.0",
        "ray[data,serve,train]==2.60.0",
        "boto3==1.43.117",
    }
    assert check_pins(text, "a file") >= {"torch", "ray", "boto3"}
    with pytest.raises(AssertionError, match="pyproject.toml pins torch=="):
        check_pins("pip install torch==2.12.0", "a bumped file")
    with pytest.raises(AssertionError, match="pyproject.toml pins ray"):
        check_pins("pip install 'ray[data]==2.60.0'", "a file with fewer extras")
    with pytest.raises(AssertionError, match="Ray pins vllm=="):
        check_pins("pip install vllm==0.0.1", "a file with another vLLM")


# ---------------------------------------------------------------------- the preset's stages
@cache
def stage_bundles() -> dict[str, tuple[int, dict[str, float], dict[str, float]]]:
    """stage -> (bundle count, resources of one bundle, resources of the whole stage) for conf=ernie_21b.

    A training stage is `num_workers` Ray Train workers of (cpus_per_worker, resources.num_gpus)
    each; serve is `num_replicas` replicas; any other stage is its own actor. The totals are the
    pipeline's own `requested()`, which it checks against the cluster before it runs anything.
    """
    from pipeline import config, graph
    from pipeline.contract import requested

    cfg = config.load(PRESET, [])
    bundles = {}
    for node in graph.build_graph(list(cfg.posttrain.recipe)):
        section = cfg.section(node.config_path)
        total = requested(section)
        if hasattr(section, "num_workers"):
            count, one = section.num_workers, {"CPU": section.cpus_per_worker, "GPU": section.resources.num_gpus}
        elif hasattr(section, "num_replicas"):
            count, one = section.num_replicas, {"CPU": section.replica_cpus, "GPU": section.replica_gpus}
        else:
            count, one = 1, {"CPU": section.resources.num_cpus, "GPU": section.resources.num_gpus}
        bundles[node.name] = (count, one, {"CPU": total.cpus, "GPU": total.gpus})
    return bundles


def check_capacity(node_types: dict[str, tuple[int, dict[str, float]]], where: str) -> None:
    """At full size (`max nodes x resources` per node type) the cluster holds every stage: its total
    request (the pipeline's check) and its bundles packed whole onto nodes (Ray's placement)."""
    for stage, (count, one, total) in stage_bundles().items():
        for resource, need in total.items():
            have = sum(n * res.get(resource, 0) for n, res in node_types.values())
            assert need <= have, f"{where}: {stage} needs {need:g} {resource}, the cluster has {have:g} at most"
        placed = 0
        for n, res in node_types.values():
            fits = [res.get(r, 0) // v for r, v in one.items() if v > 0]
            placed += n * int(min(fits)) if fits else count
        assert placed >= count, f"{where}: only {placed} of {stage}'s {count} bundles {one} fit on whole nodes"


# ---------------------------------------------------------------------- AWS cluster launcher
@cache
def aws_config() -> dict:
    return load_yaml(AWS_CONFIG)


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_aws_config_matches_rays_cluster_schema():
    jsonschema.validate(aws_config(), ray_schema())


def test_aws_config_passes_the_checks_ray_up_runs_first():
    # `ray up` fills in the provider's defaults, merges the setup commands and validates the result
    # (head_node_type among the node types, min_workers within max_workers) before it calls AWS.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(aws_config())))


def test_aws_schema_check_catches_a_misspelt_field():
    broken = copy.deepcopy(aws_config())
    broken["available_node_types"]["gpu_train"]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(broken, ray_schema())


def test_aws_node_resources_match_their_instance_types():
    for name, node_type in aws_config()["available_node_types"].items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in INSTANCE_TYPES, f"{name}: add {instance} to INSTANCE_TYPES (GPUs, vCPUs, GiB)"
        gpus, vcpus, _ = INSTANCE_TYPES[instance]
        resources = node_type["resources"]
        assert resources.get("GPU", 0) == gpus, f"{name}: {instance} has {gpus} GPU(s), resources say otherwise"
        assert resources.get("CPU", vcpus) <= vcpus, f"{name}: {instance} has {vcpus} vCPUs"


def test_aws_setup_installs_the_versions_pyproject_pins():
    config = aws_config()
    commands = config["setup_commands"] + config["head_setup_commands"] + config["worker_setup_commands"]
    for node_type in config["available_node_types"].values():
        commands += node_type.get("worker_setup_commands", [])
    installed = check_pins("\n".join(commands), "infra/aws/ray-cluster.yaml")
    assert {"torch", "ray", "torchao", "vllm"} <= installed, "the setup commands must pin these (tested)"
    assert any("pip install -e ~/ernie-pipeline" in c for c in commands)


def test_aws_file_mounts_carry_what_the_editable_install_needs():
    mounts = aws_config()["file_mounts"]
    for remote, local in mounts.items():
        assert remote.startswith("~/ernie-pipeline/") and (ROOT / local).exists(), (remote, local)
    packages = {p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    mounted = {Path(local).name for local in mounts.values()}
    assert packages | {"conf", "pyproject.toml"} <= mounted


def test_aws_cluster_can_place_every_stage_of_the_preset():
    config = aws_config()
    nodes = {
        name: (1 if name == config["head_node_type"] else t["max_workers"], t["resources"])
        for name, t in config["available_node_types"].items()
    }
    assert sum(n for name, (n, _) in nodes.items() if name != config["head_node_type"]) <= config["max_workers"]
    check_capacity(nodes, "infra/aws/ray-cluster.yaml")


def test_capacity_check_refuses_a_cluster_too_small_for_pretraining():
    with pytest.raises(AssertionError, match="pretrain needs 64 GPU"):
        check_capacity({"gpu": (7, {"CPU": 192, "GPU": 8})}, "seven p5 nodes")
    # enough GPUs and CPUs in total, but 24 CPUs a node hold three 8-CPU training workers, not eight
    with pytest.raises(AssertionError, match="only 48 of pretrain's 64 bundles"):
        check_capacity({"cpu": (2, {"CPU": 600}), "gpu": (16, {"CPU": 24, "GPU": 8})}, "CPU-starved GPU nodes")


# ---------------------------------------------------------------------- Kubernetes
def k8s(name: str) -> dict:
    return load_yaml(K8S / name)


def pod_templates(obj: dict) -> dict[str, dict]:
    """The PodTemplateSpecs inside a RayCluster or RayJob, by where they are."""
    spec = obj["spec"]
    out = {}
    if obj["kind"] == "RayJob":
        if "submitterPodTemplate" in spec:
            out["submitter"] = spec["submitterPodTemplate"]
        spec = spec["rayClusterSpec"]
    out["head"] = spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        out[group["groupName"]] = group["template"]
    return out


def containers(obj: dict) -> list[dict]:
    return [c for t in pod_templates(obj).values() for c in t["spec"]["containers"]]


KUBERAY = ("raycluster.yaml", "rayjob.yaml")
PLAIN = ("config.yaml", "secret.example.yaml", "serve-service.yaml")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_pod_templates_are_valid_kubernetes(name, version):
    # No CRD schema offline, but every pod template is a core/v1 PodTemplateSpec: validated as the
    # `template` of a PodTemplate object, which is exactly that type.
    for where, template in pod_templates(k8s(name)).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": where}, "template": template}
        kubernetes_validate.validate(wrapped, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", PLAIN)
def test_plain_manifests_are_valid_kubernetes(name, version):
    kubernetes_validate.validate(k8s(name), version, strict=True)


def test_kubernetes_validation_catches_a_misspelt_pod_field():
    template = copy.deepcopy(pod_templates(k8s("raycluster.yaml"))["gpu"])
    template["spec"]["containers"][0]["envFroms"] = template["spec"]["containers"][0].pop("envFrom")
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "gpu"}, "template": template}
    with pytest.raises(kubernetes_validate.ValidationError, match="envFroms"):
        kubernetes_validate.validate(wrapped, K8S_VERSIONS[-1], strict=True)


# The KubeRay v1 API: field names (json tags) as declared in ray-project/kuberay,
# ray-operator/apis/ray/v1/raycluster_types.go (RayClusterSpec, HeadGroupSpec, WorkerGroupSpec,
# AutoscalerOptions) and rayjob_types.go (RayJobSpec); described in Ray's docs at
# https://docs.ray.io/en/latest/cluster/kubernetes/user-guides/config.html and
# https://docs.ray.io/en/latest/cluster/kubernetes/getting-started/rayjob-quick-start.html.
# Only the fields these manifests may use; pod templates are checked above with Kubernetes' schema.
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT = {"type": "object"}
HEAD_GROUP = {
    "type": "object",
    "required": ["template", "rayStartParams"],
    "additionalProperties": False,
    "properties": {
        "template": OBJECT,
        "rayStartParams": STRINGS,  # values are strings: `num-cpus: 0` is rejected by the CRD
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "headService": OBJECT,
        "enableIngress": {"type": "boolean"},
    },
}
WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string"},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 1},
        "idleTimeoutSeconds": {"type": "integer"},
        "rayStartParams": STRINGS,
        "template": OBJECT,
        "numOfHosts": {"type": "integer", "minimum": 1},
    },
}
RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "idleTimeoutSeconds": {"type": "integer"},
                "resources": OBJECT,
                "env": {"type": "array"},
                "envFrom": {"type": "array"},
            },
        },
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
        "headServiceAnnotations": STRINGS,
    },
}
RAY_JOB_SPEC = {
    "type": "object",
    "required": ["entrypoint", "rayClusterSpec"],
    "additionalProperties": False,
    "properties": {
        "entrypoint": {"type": "string"},
        "runtimeEnvYAML": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "submitterPodTemplate": OBJECT,
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "metadata": STRINGS,
    },
}


def kuberay_object(kind: str, spec: dict) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": spec,
        },
    }


KUBERAY_SCHEMAS = {
    "RayCluster": kuberay_object("RayCluster", RAY_CLUSTER_SPEC),
    "RayJob": kuberay_object("RayJob", RAY_JOB_SPEC),
}


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_objects_use_the_v1_field_names(name):
    obj = k8s(name)
    jsonschema.validate(obj, KUBERAY_SCHEMAS[obj["kind"]])


def test_kuberay_field_check_catches_a_misspelt_field_and_a_number_start_param():
    obj = k8s("raycluster.yaml")
    misspelt = copy.deepcopy(obj)
    misspelt["spec"]["workerGroupSpec"] = misspelt["spec"].pop("workerGroupSpecs")
    number = copy.deepcopy(obj)
    number["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    for broken in (misspelt, number):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, KUBERAY_SCHEMAS["RayCluster"])


def test_kuberay_autoscaling_is_on_and_groups_can_scale():
    spec = k8s("raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
        assert group["minReplicas"] < group["maxReplicas"], f"{group['groupName']} cannot scale"


def test_rayjob_runs_the_raycluster_spec_with_the_gpu_group_up():
    job_cluster = copy.deepcopy(k8s("rayjob.yaml")["spec"]["rayClusterSpec"])
    cluster = k8s("raycluster.yaml")["spec"]
    job_gpu, gpu = job_cluster["workerGroupSpecs"][0], cluster["workerGroupSpecs"][0]
    assert job_gpu["groupName"] == gpu["groupName"] == "gpu"
    # the pipeline refuses a stage larger than the cluster it sees at start, and KubeRay submits
    # the job once every pod of the cluster runs: all GPU pods must be asked for from the start
    assert job_gpu["replicas"] == gpu["maxReplicas"]
    job_gpu["replicas"] = gpu["replicas"]
    assert job_cluster == cluster, "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml's spec"


QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?$")
BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
DECIMAL = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def quantity(value) -> float:
    """A Kubernetes resource quantity (`500m`, `1800Gi`, `8`, `1e3`) as a number."""
    text = str(value)
    assert QUANTITY.match(text), f"{text!r} is not a Kubernetes quantity"
    for suffix, scale in (BINARY | DECIMAL).items():
        if text.endswith(suffix) and not re.search(r"[eE][+-]?\d+$", text):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def group_resources(spec: dict) -> dict[str, tuple[int, dict[str, float], str | None]]:
    """group -> (max pods, Ray resources of one pod as KubeRay derives them, instance type)."""
    groups = [("head", 1, spec["headGroupSpec"])] + [
        (g["groupName"], g["maxReplicas"], g) for g in spec["workerGroupSpecs"]
    ]
    out = {}
    for name, count, group in groups:
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        cpus = quantity(group["rayStartParams"].get("num-cpus", limits["cpu"]))
        res = {"CPU": cpus, "GPU": quantity(limits.get("nvidia.com/gpu", 0)), "memory": quantity(limits["memory"])}
        out[name] = (count, res, pod.get("nodeSelector", {}).get(INSTANCE_TYPE_LABEL))
    return out


def test_quantities_parse_and_bad_ones_are_refused():
    assert quantity("500m") == 0.5 and quantity("32Gi") == 32 * 2**30 and quantity(8) == 8
    assert quantity("1e3") == quantity("1k") == 1000 and quantity("1.5M") == 1.5e6
    with pytest.raises(AssertionError):
        quantity("32 GiB")


@pytest.mark.parametrize("name", KUBERAY)
def test_k8s_pods_fit_their_instance_types(name):
    obj = k8s(name)
    spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
    for group, (_, res, instance) in group_resources(spec).items():
        container = next(t for g, t in pod_templates(obj).items() if g == group)["spec"]["containers"][0]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert {k: quantity(v) for k, v in requests.items()} == {k: quantity(v) for k, v in limits.items()}, (
            f"{group}: requests differ from limits (KubeRay sizes Ray from the limits)"
        )
        if instance is None:
            assert res["GPU"] == 0, f"{group} asks for GPUs without choosing a GPU node"
            continue
        gpus, vcpus, gib = INSTANCE_TYPES[instance]
        assert res["GPU"] == gpus, f"{group}: {instance} has {gpus} GPU(s)"
        # the kubelet, the system daemons and the NVIDIA device plugin keep part of every node
        assert quantity(limits["cpu"]) <= vcpus - 1 and res["memory"] <= 0.95 * gib * 2**30, f"{group} on {instance}"


@pytest.mark.parametrize("name", KUBERAY)
def test_k8s_cluster_can_place_every_stage_of_the_preset(name):
    obj = k8s(name)
    spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
    check_capacity({g: (n, res) for g, (n, res, _) in group_resources(spec).items()}, f"infra/k8s/{name}")


def test_k8s_env_comes_from_the_configmap_and_the_secret():
    from pipeline.redact import is_secret_key

    config, secret = k8s("config.yaml"), k8s("secret.example.yaml")
    assert not [key for key in config["data"] if is_secret_key(key)], "a secret in the ConfigMap"
    assert "AWS_SECRET_ACCESS_KEY" in secret["stringData"] and not set(secret["stringData"]) & set(config["data"])
    assert set(secret["stringData"].values()) == {""}, "secret.example.yaml must not carry values"
    for name in KUBERAY:
        for container in containers(k8s(name)):
            sources = {next(iter(s)): s[next(iter(s))]["name"] for s in container["envFrom"]}
            assert sources.get("configMapRef") == config["metadata"]["name"], (name, container["name"])
            if container["name"] != "ray-job-submitter":  # the submitter needs the artifact root only
                assert sources.get("secretRef") == secret["metadata"]["name"], (name, container["name"])
            inline = [e["name"] for e in container.get("env", []) if "value" in e and is_secret_key(e["name"])]
            assert not inline, f"{name}: secrets written inline: {inline}"


@pytest.mark.parametrize("name", KUBERAY)
def test_k8s_runs_the_dockerfile_image_and_pyprojects_ray(name):
    obj = k8s(name)
    images = {c["image"] for c in containers(obj)}
    assert images == {IMAGE}, f"{name} runs {images}, the Dockerfile builds {IMAGE}"
    spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
    assert spec["rayVersion"] == str(pinned()["ray"].specifier).removeprefix("==")


def test_rayjob_runs_the_pipeline_with_the_configured_artifact_root(monkeypatch):
    spec = k8s("rayjob.yaml")["spec"]
    assert spec["entrypoint"].startswith(f"python -m pipeline run conf={PRESET} ")
    assert (ROOT / "conf" / f"{PRESET}.yaml").exists()
    root_var = re.search(r"artifacts\.root=\$\{(\w+)", spec["entrypoint"]).group(1)
    assert k8s("config.yaml")["data"][root_var].startswith("s3://")
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    assert {"configMapRef": {"name": "ernie-pipeline-config"}} in submitter["envFrom"]  # its shell expands it
    assert spec["shutdownAfterJobFinishes"] is True
    # Ray merges the job's runtime env with the one the driver passes to ray.init and refuses the
    # job when both set the same variable: capture the driver's without starting Ray.
    job_env = yaml.safe_load(spec["runtimeEnvYAML"])
    from pipeline import executor

    seen = {}
    monkeypatch.setattr(executor.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(executor.ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(executor.ray, "cluster_resources", lambda: {})
    executor.connect("auto", 1)
    driver_env = seen["runtime_env"].get("env_vars", {})
    assert driver_env and not set(job_env.get("env_vars", {})) & set(driver_env)
    assert not (set(job_env) - {"env_vars"}) & set(seen["runtime_env"])


def test_serve_service_reaches_the_head_serve_port():
    from pipeline import config

    service, cluster = k8s("serve-service.yaml"), k8s("raycluster.yaml")
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    target = service["spec"]["ports"][0]["targetPort"]
    assert ports[target] == service["spec"]["ports"][0]["port"] == config.load(PRESET, []).serve.port


# ---------------------------------------------------------------------- Dockerfile
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        pending = ""
    return out


def image_ref() -> str:
    """registry/name:tag that infra/docker/Dockerfile's build command and version label give."""
    text = DOCKERFILE.read_text()
    built = re.search(r"docker build -f infra/docker/Dockerfile -t (\S+) \.", text).group(1)
    version = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', text).group(1)
    assert built.endswith(f"/ernie-pipeline:{version}"), (built, version)
    return built


IMAGE = image_ref()


def pinned_base(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and bool(re.search(r"\d+\.\d+", tag))


def test_dockerfile_base_image_and_python_are_pinned():
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    bases = [args.split()[0] for word, args in steps if word == "FROM"]
    assert bases and all(pinned_base(b) for b in bases), bases
    assert not pinned_base("nvidia/cuda:latest") and not pinned_base("nvidia/cuda")
    python = re.search(r"python(\d+\.\d+) -m venv /opt/venv", DOCKERFILE.read_text()).group(1)
    assert pyproject()["project"]["requires-python"] == f">={python},<3.{int(python.split('.')[1]) + 1}"


def test_dockerfile_installs_the_versions_pyproject_pins():
    runs = "\n".join(args for word, args in dockerfile_instructions(DOCKERFILE.read_text()) if word == "RUN")
    installed = check_pins(runs, "infra/docker/Dockerfile")
    assert {"torch", "ray", "torchao", "vllm"} <= installed
    assert "pip install -e ." in runs


def test_dockerfile_runs_as_a_user_with_the_cli_as_entrypoint():
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entrypoint = json.loads(next(args for word, args in reversed(steps) if word == "ENTRYPOINT"))
    assert entrypoint[-3:] == ["python", "-m", "pipeline"]
    assert IMAGE.rpartition(":")[2].startswith(pyproject()["project"]["version"])


def test_dockerfile_parser_joins_continuations_and_skips_comments():
    steps = dockerfile_instructions("FROM a:1.0\n# c\nRUN x \\\n  # inside\n  && y\nUSER ray\n")
    assert steps == [("FROM", "a:1.0"), ("RUN", "x && y"), ("USER", "ray")]


# ---------------------------------------------------------------------- MLflow server
def test_mlflow_compose_runs_a_server_on_postgres_with_proxied_s3_artifacts():
    compose = load_yaml(MLFLOW / "docker-compose.yaml")
    assert set(compose["services"]) == {"postgres", "mlflow"}
    server = compose["services"]["mlflow"]
    command = " ".join(server["command"]) if isinstance(server["command"], list) else server["command"]
    assert re.search(r"--backend-store-uri \"?postgresql://", command)
    assert re.search(r"--artifacts-destination \S", command) and "--serve-artifacts" in command
    assert "--no-serve-artifacts" not in command
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert pinned_base(compose["services"]["postgres"]["image"])


def test_mlflow_server_image_pins_pyprojects_mlflow():
    text = (MLFLOW / "Dockerfile").read_text()
    assert "mlflow" in check_pins(text, "infra/mlflow/Dockerfile")
    assert all(pinned_base(args.split()[0]) for word, args in dockerfile_instructions(text) if word == "FROM")


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (MLFLOW / ".env.example").read_text().splitlines():
        line = line.strip().removeprefix("# ")
        if re.match(r"^[A-Z][A-Z0-9_]*=", line):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def test_mlflow_env_example_defines_every_variable_and_holds_no_secret():
    from pipeline.redact import is_secret_key

    example = env_example()
    used = set(re.findall(r"\$\{(\w+)", (MLFLOW / "docker-compose.yaml").read_text()))
    assert used and used <= set(example), f"not in .env.example: {used - set(example)}"
    secrets = {key: value for key, value in example.items() if is_secret_key(key)}
    assert {"POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY"} <= set(secrets)
    assert all(value in ("", "change-me") for value in secrets.values()), secrets
    assert ".env" in (MLFLOW / ".gitignore").read_text().split()


# ---------------------------------------------------------------------- the guide
def test_cluster_guide_names_only_files_that_exist():
    guide = (ROOT / "docs" / "cluster.md").read_text()
    paths = set(re.findall(r"(?<![\w/])infra/[\w./-]+\w", guide))
    assert {"infra/aws/ray-cluster.yaml", "infra/k8s/rayjob.yaml", "infra/mlflow/docker-compose.yaml"} <= paths
    assert not [p for p in paths if not (ROOT / p).exists()]
    assert f"-t {IMAGE} " in guide, "docs/cluster.md builds another image than the manifests run"
