"""Kubernetes manifests validated offline against the API's own JSON schemas (strict: an unknown or
misspelled field fails), which the `kubernetes-validate` wheel ships: the platform (infra/k8s/platform,
as kustomize assembles it), the training Job and the PyTorchJob's pod templates rendered by the
launcher, and the Dask cluster's pods (infra/dask/kubernetes.yaml). Custom resources (PyTorchJob,
DaskCluster) have no schema there: their pods are checked as PodTemplates, their own fields by hand.
What no cluster-less check can see is listed in infra/README.md."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from model.run_dir import RunDir
from tasks import launchers as la

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "infra" / "k8s" / "platform"
DASK_K8S = REPO / "infra" / "dask" / "kubernetes.yaml"
# The oldest Kubernetes still commonly run, and the newest the wheel knows.
VERSIONS = ["1.30", kubernetes_validate.utils.latest_version()]
RUN = la.TrainJob(run_dir=RunDir(Path("/mnt/pretrain/runs/web-1b")), total_steps=1000)
K8S = la.KubernetesLauncher(image="registry.example/pretrain-factory:1.0", volume_claim="pretrain-data")


def validate(doc: dict, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def as_pod_template(name: str, template: dict) -> dict:
    """A custom resource's pod template as a core/v1 PodTemplate, which the schemas know."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def kustomize_platform() -> list[dict]:
    """What `kubectl apply -k infra/k8s/platform` sends: kubectl's own kustomize when there is one,
    else the listed resources with the kustomization's namespace."""
    if shutil.which("kubectl"):
        built = subprocess.run(
            ["kubectl", "kustomize", str(PLATFORM)], capture_output=True, text=True, check=True
        ).stdout
        return [d for d in yaml.safe_load_all(built) if d]
    kustomization = yaml.safe_load((PLATFORM / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((PLATFORM / resource).read_text()):
            if doc:
                doc["metadata"].setdefault("namespace", kustomization["namespace"])
                docs.append(doc)
    return docs


@pytest.mark.parametrize("version", VERSIONS)
def test_the_platform_manifests_are_valid(version):
    docs = kustomize_platform()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {
        ("Deployment", "prefect-server"),
        ("Deployment", "prefect-worker"),
        ("Deployment", "mlflow"),
    } <= kinds
    for doc in docs:
        validate(doc, version)
        assert doc["metadata"]["namespace"] == "pretrain"


def test_every_platform_manifest_is_in_the_kustomization():
    listed = set(yaml.safe_load((PLATFORM / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in PLATFORM.glob("*.yaml")} - {"kustomization.yaml"}
    assert present == listed


@pytest.mark.parametrize("version", VERSIONS)
def test_the_training_job_is_valid(version):
    (doc,) = [d for d in yaml.safe_load_all(la.render_k8s(RUN, K8S)) if d]
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "Job")
    validate(doc, version)
    container = doc["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == K8S.image
    assert container["command"][-4:] == ["-m", "model.trainer", "--config", str(RUN.run_dir.config_path)]


@pytest.mark.parametrize("version", VERSIONS)
def test_the_pytorchjob_has_valid_pods_and_replica_specs(version):
    (doc,) = [d for d in yaml.safe_load_all(la.render_k8s(RUN, K8S.model_copy(update={"nodes": 4}))) if d]
    assert (doc["apiVersion"], doc["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert set(doc["spec"]) == {"nprocPerNode", "runPolicy", "pytorchReplicaSpecs"}
    assert set(doc["spec"]["runPolicy"]) <= {"backoffLimit", "cleanPodPolicy", "ttlSecondsAfterFinished"}
    assert doc["spec"]["runPolicy"]["cleanPodPolicy"] in ("None", "Running", "All")
    replicas = doc["spec"]["pytorchReplicaSpecs"]
    assert {role: spec["replicas"] for role, spec in replicas.items()} == {"Master": 1, "Worker": 3}
    for role, spec in replicas.items():
        assert set(spec) == {"replicas", "restartPolicy", "template"}
        assert spec["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
        validate(as_pod_template(f"{doc['metadata']['name']}-{role.lower()}", spec["template"]), version)
        # The operator finds the training container by this name.
        assert spec["template"]["spec"]["containers"][0]["name"] == "pytorch"


def platform_images() -> set[str]:
    return {
        c["image"]
        for d in kustomize_platform()
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "prefect-worker"
        for c in d["spec"]["template"]["spec"]["containers"]
    }


def dask_cluster_doc() -> dict:
    (doc,) = [d for d in yaml.safe_load_all(DASK_K8S.read_text()) if d]
    return doc


@pytest.mark.parametrize("version", VERSIONS)
def test_the_dask_cluster_pods_are_valid_and_run_the_project_image(version):
    doc = dask_cluster_doc()
    assert (doc["apiVersion"], doc["kind"]) == ("kubernetes.dask.org/v1", "DaskCluster")
    scheduler, worker = doc["spec"]["scheduler"], doc["spec"]["worker"]
    validate(as_pod_template("scheduler", {"spec": scheduler["spec"]}), version)
    validate(as_pod_template("worker", {"spec": worker["spec"]}), version)
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": scheduler["service"]}
    validate(service, version)
    assert worker["replicas"] >= 1
    images = {c["image"] for part in (scheduler, worker) for c in part["spec"]["containers"]}
    assert images == platform_images()  # the platform's image: the same code and dependencies
    (scheduler_container,) = scheduler["spec"]["containers"]
    (worker_container,) = worker["spec"]["containers"]
    assert scheduler_container["args"][:2] == ["dask", "scheduler"]
    assert worker_container["args"][:2] == ["dask", "worker"]
    # The operator names the scheduler's Service <cluster>-scheduler; workers reach it there.
    assert f"tcp://{doc['metadata']['name']}-scheduler:8786" in worker_container["args"]
    ports = {p["name"]: p["port"] for p in scheduler["service"]["ports"]}
    assert ports["tcp-comm"] == 8786


def test_a_misspelled_field_fails_validation():
    """The check is strict, so it can fail: one wrong field name in a valid Job is caught."""
    (doc,) = [d for d in yaml.safe_load_all(la.render_k8s(RUN, K8S)) if d]
    broken = copy.deepcopy(doc)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        validate(broken, VERSIONS[-1])
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["backoffLimit"] = "none"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong_type, VERSIONS[-1])
