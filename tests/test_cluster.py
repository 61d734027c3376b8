"""A search on a real cluster: what a trial receives from the driver (the teacher's weights, the
dataset's root, the environment), and a cluster address that answers nobody, refused at once.

Trials run here in this process with a stand-in for ``tune`` (no Ray): what they are sent is what
a Ray worker on another node would get.
"""

from __future__ import annotations

import ast
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from _ports import PortTaken, bindable, listens, refused_port, start_on_a_free_port
from PIL import Image

from smskd_search.errors import UserError
from smskd_search.search import cluster
from smskd_search.search import storage as st
from smskd_search.search.teacher_transport import TeacherTransportError, pack, unpack

ROOT = Path(__file__).resolve().parent.parent


class _FakeTune:
    """Records ``report`` calls (the trainable's only use of Tune besides checkpoints)."""

    class Checkpoint:
        @staticmethod
        def from_directory(path):
            return sorted(os.listdir(path))

    def __init__(self):
        self.reports: list[dict] = []

    def report(self, metrics, checkpoint=None):
        self.reports.append(dict(metrics))

    def get_checkpoint(self):
        return None


def _imagefolder(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture
def relative_space(tmp_path, monkeypatch):
    """A space whose imagefolder dataset has the relative root ``data``, loaded from its project folder."""
    from smskd_search.space import load_space

    project = tmp_path / "project"
    _imagefolder(project / "data")
    monkeypatch.setenv("SMSKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(project)
    (project / "space.yaml").write_text(yaml.safe_dump({
        "name": "rel", "problem": {"dataset": {"name": "imagefolder", "root": "data", "val_fraction": 0.25},
                                   "teacher": {"arch": "cnn_small", "recipe": {"epochs": 1}},
                                   "student": {"arch": "cnn_nano"}},
        "search": {"methods": ["kd"], "stages": {"min": 1, "max": 1}, "epochs": {"min": 1, "max": 1}}}))
    return load_space(project / "space.yaml"), project


def _trial_config(space, teacher_sha: str, runs: Path) -> tuple[dict, optuna.trial.FrozenTrial]:
    from smskd_search.search.tune_run import PlanConfigs

    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    config = PlanConfigs(space.space, teacher_sha, 1, runs, "rel")(trial)
    study.tell(trial, 0.0)
    return config, study.trials[0]


def _run_trial(config: dict, context, monkeypatch) -> list[dict]:
    from smskd_search.search import trainable as tr

    fake = _FakeTune()
    monkeypatch.setattr(tr, "tune", fake)
    tr._DATA_CACHE.clear()
    tr._TEACHER_CACHE.clear()
    tr.train_trial(config, context)
    return fake.reports


def test_a_relative_root_reaches_the_trial_absolute_and_the_teacher_travels_as_bytes(relative_space, tmp_path,
                                                                                     monkeypatch):
    from smskd_search.engine import ensure_teacher
    from smskd_search.search.teacher_transport import TeacherPayload
    from smskd_search.search.trainable import TrialContext

    space, project = relative_space
    record = ensure_teacher(space.space.problem, cache_root=tmp_path / "teachers")
    config, trial = _trial_config(space, record.sha256, tmp_path / "runs")
    assert config["data_root"] == str(project / "data")
    assert trial.user_attrs[st.ATTR_DATA_ROOT] == str(project / "data")
    # The stored plan keeps the space's root: a `train` of it means what the space meant.
    assert yaml.safe_load(config["plan_yaml"])["problem"]["dataset"]["root"] == "data"
    assert yaml.safe_load(trial.user_attrs[st.ATTR_PLAN])["problem"]["dataset"]["root"] == "data"

    # The trial runs elsewhere (another node's working directory), and the driver's teacher file is
    # gone: it gets both from what the driver sent.
    payload = pack(record)
    Path(record.path).unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    reports = _run_trial(config, TrialContext(teacher=payload), monkeypatch)
    assert [r["error"] for r in reports] == [None] and reports[-1]["final"] and reports[-1]["val_acc"] > 0

    # A corrupted payload is refused with the reason, before anything trains.
    bad = bytearray(payload.weights)
    bad[len(bad) // 2] ^= 0xFF
    corrupted = TeacherPayload(payload.record, bytes(bad))
    with pytest.raises(TeacherTransportError, match=r"^teacher weights: the \d+ bytes this trial received hash to "
                                                    r"sha256 [0-9a-f]{12}, the driver sent [0-9a-f]{12}: refused"):
        unpack(corrupted)
    (failed,) = _run_trial(config, TrialContext(teacher=corrupted), monkeypatch)
    assert failed["error"].startswith("TeacherTransportError: teacher weights: ") and math.isnan(failed["val_acc"])

    # The dataset missing on the trial's node: one line naming the node, the field and the path.
    missing = {**config, "data_root": str(tmp_path / "nowhere")}
    (failed,) = _run_trial(missing, TrialContext(teacher=payload), monkeypatch)
    assert failed["error"] == (f"UserError: dataset.root: {tmp_path / 'nowhere'} not found on node "
                               f"{socket.gethostname()} (the space says 'data')")


def test_the_driver_refuses_a_teacher_file_that_changed(tmp_path):
    from smskd_search.engine import TeacherRecord

    f = tmp_path / "teacher.pt"
    f.write_bytes(b"weights")
    record = TeacherRecord("cnn_small", str(f), "0" * 64, 0.5, 10, None, None, 1, "trained", "k")
    with pytest.raises(UserError, match=r"teacher: .*teacher\.pt changed on the driver"):
        pack(record)
    import hashlib

    ok = replace(record, sha256=hashlib.sha256(b"weights").hexdigest())
    assert unpack(pack(ok)) == (ok, b"weights")


def _env_names_read(package: Path) -> set[str]:
    """Every SMSKD_* name that code in ``package`` reads (string constants, the way the modules name them)."""
    names = set()
    for f in package.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("SMSKD_"):
                names.add(node.value)
    return names


def test_the_propagated_environment_is_what_the_data_layer_reads(tmp_path, monkeypatch):
    from smskd_search import data

    read = _env_names_read(ROOT / "smskd_search" / "data")
    assert read == set(data.ENV_VARS) == {"SMSKD_DATA", "SMSKD_CACHE", "SMSKD_TEST_ACCESS_LOG", "SMSKD_CIFAR_URL",
                                          "SMSKD_CIFAR_MD5", "SMSKD_STREAM_ABOVE_BYTES", "SMSKD_STREAM_WORKERS"}
    assert set(cluster.PATH_ENV) == {"SMSKD_DATA", "SMSKD_CACHE", "SMSKD_TEST_ACCESS_LOG"}  # not the mirror URL or md5
    assert set(data.ENV_VARS) <= set(cluster.PROPAGATED_ENV)
    assert not {n for n in cluster.PROPAGATED_ENV if n.startswith("SMSKD_")} - read  # nothing nobody reads
    # Paths travel absolute: a trial elsewhere would resolve a relative one against its own folder.
    monkeypatch.chdir(tmp_path)
    env = {"SMSKD_DATA": "data", "SMSKD_CACHE": "/abs/cache", "RAY_CHDIR_TO_TRIAL_DIR": "0", "OTHER": "x",
           "SMSKD_CIFAR_URL": "http://mirror/c.tar.gz"}
    assert cluster.propagated_env(env, cluster.PROPAGATED_ENV) == {
        "SMSKD_DATA": str(tmp_path / "data"), "SMSKD_CACHE": "/abs/cache", "RAY_CHDIR_TO_TRIAL_DIR": "0",
        "SMSKD_CIFAR_URL": "http://mirror/c.tar.gz"}


def test_check_address(monkeypatch, tmp_path):
    cluster.check_address(None)
    cluster.check_address("local")
    with refused_port() as port, pytest.raises(UserError, match=rf"^--address 127\.0\.0\.1:{port}: no Ray cluster "
                                                                rf"answers at 127\.0\.0\.1:{port} \(connection refused\)$"):
        cluster.check_address(f"127.0.0.1:{port}")
    with pytest.raises(UserError, match="is not 'auto', host:port or ray://host:port"):
        cluster.check_address("nonsense")
    with socket.socket() as listening:  # something answers: Ray's own connection is tried next
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        cluster.check_address(f"127.0.0.1:{port}")
        cluster.check_address(f"ray://127.0.0.1:{port}")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UserError, match="^--address auto: no running Ray cluster found"):
        cluster.check_address("auto")
    with refused_port() as port:
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        with pytest.raises(UserError, match=rf"no Ray cluster answers at 127\.0\.0\.1:{port} \(found in RAY_ADDRESS\)"):
            cluster.check_address("auto")


def test_a_bad_address_fails_fast_and_writes_nothing(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "keep.txt").write_text("untouched")
    before = sorted((p.name, p.read_bytes()) for p in studies.iterdir())
    ray_tmp = tmp_path / "ray"  # where a Ray this command started would keep its session
    proc = subprocess.run([sys.executable, "-m", "smskd_search.cli", "--budget", "2", "--address", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SMSKD_STUDIES": str(studies), "RAY_TMPDIR": str(ray_tmp)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: --address 127.0.0.1:1: no Ray cluster answers at 127.0.0.1:1 (connection refused)"
    # Refused before anything started: no Ray, no teacher, no study; studies/ byte-identical.
    assert proc.stdout == "" and not ray_tmp.exists()
    assert sorted((p.name, p.read_bytes()) for p in studies.iterdir()) == before



def _namespace_prefix() -> list[str] | None:
    """The command that runs the worker node in a mount namespace of its own, or None where this
    machine does not allow one: ``unshare -m`` as root, else a user namespace (``unshare -rm``)."""
    for prefix in (["unshare", "-m"], ["unshare", "-r", "-m"]):
        try:
            probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if probe.returncode == 0:
            return prefix
    return None


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _wait_for_nodes(address: str, n: int, env: dict, timeout: float = 120) -> dict[str, float]:
    """{node id: CPUs} of the cluster's alive nodes, once there are ``n`` of them."""
    probe = ("import json, ray, time, sys\n"
             f"ray.init(address={address!r}, logging_level='ERROR')\n"
             f"deadline = time.monotonic() + {timeout}\n"
             "while True:\n"
             "    alive = {x['NodeID']: x['Resources'].get('CPU', 0.0) for x in ray.nodes() if x['Alive']}\n"
             f"    if len(alive) >= {n} or time.monotonic() > deadline: break\n"
             "    time.sleep(0.5)\n"
             "print(json.dumps(alive))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=timeout + 60, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a ``ray start --block`` and every process of its session (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)  # (`ray start --block` often outlives its SIGTERM)
    except subprocess.TimeoutExpired:
        pass
    # Always, after the wait: the raylet and workers of the group may outlive `ray start`.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _start_head(cmd: Callable[[int], list[str]], env: dict, log: Path) -> Callable[[int], subprocess.Popen]:
    """Starts the head on a port, once its GCS listens there (a port taken meanwhile: PortTaken)."""

    def start(port: int) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd(port), env=env, start_new_session=True, stdout=out, stderr=out)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if listens(proc.pid, port):
                return proc
            time.sleep(0.5)
        _stop_group(proc)
        if not bindable(port):
            raise PortTaken(port)
        pytest.fail(f"the head node did not start on port {port}: {log.read_text(errors='replace')[-2000:]}")

    return start


@pytest.fixture(scope="module")
def namespaced_cluster(tmp_path_factory):
    """The README's cluster (section "On a Ray cluster", its commands as typed) on this machine: a head
    with no CPUs (so every trial runs on the other node), and a worker node with 2 CPUs in its own
    mount namespace where the checkout's ``studies/``, the test's studies folder and ``~/.cache`` are
    empty tmpfs mounts: what the driver keeps there does not exist for the worker's trials. The nodes
    start without the AWS variables: a trial has them only where the driver sends them.

    Yields the address, the worker's node id, the studies folder, the environment and the README's
    search command (split, ``HEAD:6379`` and ``/mnt/shared/smskd`` replaced). Only the processes
    started here are stopped (each ``ray start --block`` in its own process group, the group
    killed; never a ``ray stop``, which stops every Ray on the machine).
    """
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("this machine allows no mount namespace (unshare -m / unshare -rm): no isolated worker node")
    import shlex
    import shutil
    import tempfile

    from conftest import readme_block

    head_cmd, worker_cmd, search_cmd = readme_block("# On a Ray cluster", page="docs/cluster.md")
    tmp_path = tmp_path_factory.mktemp("two-nodes")
    # A short folder of its own (Ray's socket paths must stay under 108 characters).
    temp = Path(tempfile.mkdtemp(prefix="ray2n-", dir="/tmp"))
    studies = tmp_path / "studies"
    studies.mkdir()
    home_cache = Path.home() / ".cache"
    home_cache.mkdir(exist_ok=True)

    def typed(cmd: str, port: int) -> list[str]:
        words = shlex.split(cmd.replace("HEAD:6379", f"127.0.0.1:{port}").replace("--port 6379", f"--port {port}")
                            .replace("/mnt/shared/smskd", str(tmp_path / "shared")))
        return ([_ray_cli()] if words[0] == "ray" else [sys.executable, "-m", "smskd_search.cli"]) + words[1:]

    # Only what this test needs besides the README's words: its own folders, no dashboard, and a
    # foreground process to stop.
    def own(node: str) -> list[str]:
        return ["--temp-dir", str(temp / node), "--disable-usage-stats", "--block"]

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["RAY_AUTH_MODE"] = "disabled"
    procs: list[subprocess.Popen] = []
    try:
        head, port = start_on_a_free_port(_start_head(
            lambda p: [*typed(head_cmd, p), *own("head"), "--include-dashboard", "false"], env, tmp_path / "head.log"))
        procs.append(head)
        address = f"127.0.0.1:{port}"
        # The checkout's studies/ exists only once something ran the tool here (an order the suite does
        # not fix); a mount point must exist, or the worker node never starts.
        (ROOT / "studies").mkdir(exist_ok=True)
        hidden = " && ".join(f"mount -t tmpfs tmpfs {d}" for d in (ROOT / "studies", studies, home_cache))
        worker_line = shlex.join([*typed(worker_cmd, port), *own("worker")])
        procs.append(subprocess.Popen([*prefix, "sh", "-c", f"{hidden} && exec {worker_line}"], env=env,
                                      start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        nodes = _wait_for_nodes(address, 2, env)
        assert len(nodes) == 2 and sorted(nodes.values()) == [0.0, 2.0], nodes
        worker = next(n for n, cpus in nodes.items() if cpus)
        yield address, worker, studies, env, typed(search_cmd, port)
    finally:
        for proc in reversed(procs):
            _stop_group(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _two_space(folder: Path) -> Path:
    space = folder / "two.yaml"
    space.write_text(yaml.safe_dump({"name": "two", "problem": {
        "dataset": {"name": "digits", "val_fraction": 0.25},
        "teacher": {"arch": "cnn_small", "recipe": {"epochs": 1}}, "student": {"arch": "cnn_nano"}},
        # Four one-epoch plans, the four baselines: the README's --budget 4 trains each once.
        "search": {"methods": ["kd", "dkd", "pkt", "rkd"], "stages": {"min": 1, "max": 1},
                   "epochs": {"min": 1, "max": 1}, "baseline_epochs": 1, "pruning": {"enabled": False}}}))
    return space


@pytest.mark.slow
@pytest.mark.real_component("cluster")
def test_a_cluster_of_two_nodes_needs_storage_every_node_reaches(namespaced_cluster, tmp_path):
    address, worker, studies, env, search = namespaced_cluster
    space = _two_space(tmp_path)
    (studies / "keep.txt").write_text("untouched")
    before = sorted((p.name, p.read_bytes()) for p in studies.iterdir())
    env = {**env, "SMSKD_STUDIES": str(studies)}
    at = search.index("--storage")
    shared = Path(search[at + 1])  # the README's shared folder: outside the worker's tmpfs mounts
    assert "--budget" in search and search[search.index("--address") + 1] == address
    cmd = [*search[:at], *search[at + 2:], "--space", str(space), "--no-confirm"]  # without --storage
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: --storage: the cluster has 2 nodes, and trials on the others cannot reach {studies} on this machine; "
        "pass --storage with a folder every node mounts at the same path, or an s3:// URI")
    # A folder only the driver sees (the worker's view of studies/ is an empty tmpfs): refused by
    # the marker check, before the study or the teacher exists.
    local = studies / "local"
    refused = subprocess.run([*cmd, "--storage", str(local)], capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert re.fullmatch(rf"error: --storage {re.escape(str(local))}: node \S+ \([^)]+\) does not see this "
                        r"folder; pass a folder every node mounts at the same path",
                        refused.stderr.strip().splitlines()[-1]), refused.stderr[-2000:]
    local.rmdir()  # (made by the folder check; empty: the marker went)
    assert sorted((p.name, p.read_bytes()) for p in studies.iterdir()) == before  # refused before anything

    ran = subprocess.run([*cmd, "--storage", str(shared)], capture_output=True, text=True, timeout=600, env=env)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    # The teacher trained as a Ray task, on the worker node (the head has no CPUs), its progress
    # shown on the driver and its checkpoint cached there; the worker never saw that file.
    assert f"note:      the teacher trained as a Ray task on node {worker}" in ran.stdout, ran.stdout[-3000:]
    assert "training the teacher cnn_small" in ran.stdout and "epoch 1/1" in ran.stdout
    assert len(list((studies / "teachers").glob("*/teacher.pt"))) == 1
    trials = optuna.load_study(study_name="two", storage=st.storage_url(st.db_path(studies, "two"))).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    # Every trial that trained ran on the worker node (a plan that repeats a finished one is answered
    # from it, on the driver, without running).
    trained = [t for t in trials if not st.is_repeat(t)]
    assert len(trained) >= 2 and {t.user_attrs[st.ATTR_NODE] for t in trained} == {worker}
    # Everything trials wrote is under --storage (Tune's files, the stage cache); the study file
    # stays with the driver.
    assert (shared / "two" / "ray").is_dir() and list((shared / "cache" / "stages").glob("*.pt"))
    assert not (studies / "two" / "ray").exists() and (studies / "two.db").is_file()
    assert not [p for p in shared.rglob(".smskd-storage-check-*")]  # the reachability marker is gone


@pytest.mark.slow
@pytest.mark.real_component("cluster")
@pytest.mark.real_component("s3")
def test_a_search_on_two_nodes_with_s3_storage_sends_the_workers_the_aws_variables(namespaced_cluster, s3_server,
                                                                                  tmp_path):
    from conftest import S3_CREDENTIALS, s3_bucket, s3_keys

    address, worker, studies, env, search = namespaced_cluster
    client = s3_bucket(s3_server, "twonodes")
    at = search.index("--storage")
    # The endpoint in AWS_ENDPOINT_URL, not in the URI: a trial without the driver's variables would
    # try AWS itself (unreachable here) and fail.
    cmd = [*search[:at], "--storage", "s3://twonodes/smskd", *search[at + 2:], "--space", str(_two_space(tmp_path)),
           "--no-confirm", "--study", "two-s3"]
    ran = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={
        **env, **S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{s3_server}", "SMSKD_STUDIES": str(studies)})
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    trials = optuna.load_study(study_name="two-s3", storage=st.storage_url(st.db_path(studies, "two-s3"))).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    trained = [t for t in trials if not st.is_repeat(t)]
    assert len(trained) >= 2 and {t.user_attrs[st.ATTR_NODE] for t in trained} == {worker}
    keys = s3_keys(client, "twonodes")
    assert [k for k in keys if k.startswith("smskd/two-s3/ray/run-")], keys
    assert [k for k in keys if re.match(r"^smskd/cache/stages/[0-9a-f]+\.pt$", k)], keys
    assert not [k for k in keys if ".smskd-storage-check" in k]  # the marker every node saw is gone
    assert not (studies / "two-s3" / "ray").exists() and not (studies / "two-s3" / "trials").exists()


def test_storage_must_be_a_writable_folder(tmp_path):
    assert cluster.check_storage(tmp_path / "new" / "folder") == str((tmp_path / "new" / "folder").absolute())
    assert (tmp_path / "new" / "folder").is_dir()
    with pytest.raises(UserError, match=r"^--storage gs://bucket/x: the scheme gs:// is not supported \(supported: s3://"):
        cluster.check_storage("gs://bucket/x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^--storage .*/file/sub: cannot make the folder"):
        cluster.check_storage(tmp_path / "file" / "sub")


def test_a_study_resumes_only_with_the_storage_it_was_made_with(tmp_path):
    from smskd_search.search import lifecycle as lc
    from smskd_search.space import load_space

    studies, shared = tmp_path / "studies", tmp_path / "shared"
    first = lc.open_session(load_space("default"), studies, "s", resume=False, seed=0, budget=2, storage_root=shared)
    lc.bind_storage_root(first)
    lc.close(first)
    lc.check_resume_storage(studies, "s", shared)  # the same folder: fine
    before = sorted((p.name, p.read_bytes()) for p in studies.iterdir())
    with pytest.raises(UserError, match=rf"^--storage: study s keeps its trials' files in {shared}; "
                                        rf"resume it with --storage {shared} \(not {studies}\)$"):
        lc.check_resume_storage(studies, "s", studies)
    assert sorted((p.name, p.read_bytes()) for p in studies.iterdir()) == before  # read-only
