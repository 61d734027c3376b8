"""``--storage s3://...``: a search whose trials write everything to an S3-compatible server.

The server is moto's, run as a real server process on a free port (no mock of the storage layer):
pyarrow, Ray Tune and the trials talk HTTP to it as they would to any S3 endpoint.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from _freeze import kill_in_state
from _ports import refused_port
from conftest import S3_CREDENTIALS as CREDENTIALS
from conftest import s3_bucket as _bucket
from conftest import s3_keys as _keys
from optuna.trial import TrialState

from smskd_search.errors import UserError
from smskd_search.search import storage as st

pytestmark = pytest.mark.real_component("s3")


def test_a_storage_uri_is_checked_before_anything_is_written(s3_server, tmp_path, monkeypatch):
    from smskd_search.search.cluster import check_storage

    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    _bucket(s3_server, "present")
    uri = f"s3://present/x?endpoint_override={s3_server}&scheme=http"
    assert check_storage(uri) == uri
    with pytest.raises(UserError, match=r"^--storage s3://absent/x\?\S+: bucket 'absent' not found \(create it first\)$"):
        check_storage(f"s3://absent/x?endpoint_override={s3_server}&scheme=http")
    with pytest.raises(UserError, match=r"^--storage gs://present/x: the scheme gs:// is not supported"):
        check_storage("gs://present/x")
    with pytest.raises(UserError, match=r"^--storage s3://present/x\?bogus=1: .*bogus"):
        check_storage("s3://present/x?bogus=1")
    # The endpoint from the standard variable, as pyarrow reads it.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{s3_server}")
    assert check_storage("s3://present/y") == "s3://present/y"

    # Through the command line: a dead endpoint is one line, exit 2, before anything started (no
    # Ray, no teacher, no study file).
    studies, ray_tmp = tmp_path / "studies", tmp_path / "ray"
    with refused_port() as port:
        dead = f"s3://present/x?endpoint_override=127.0.0.1:{port}&scheme=http"
        proc = subprocess.run([sys.executable, "-m", "smskd_search.cli", "--budget", "2", "--storage", dead],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, **CREDENTIALS, "SMSKD_STUDIES": str(studies), "RAY_TMPDIR": str(ray_tmp)})
    assert proc.returncode == 2, proc.stderr
    assert re.fullmatch(rf"error: --storage {re.escape(dead)}: no storage server answers at 127\.0\.0\.1:{port} "
                        r"\(connection refused\)\n", proc.stderr), proc.stderr
    assert proc.stdout == "" and not ray_tmp.exists()
    assert not studies.exists() or not list(studies.rglob("*"))


def test_the_stage_cache_in_a_bucket_stores_evicts_and_drops_damaged_entries(s3_server, monkeypatch):
    from smskd_search.engine import PrefixCache
    from smskd_search.search.storage_fs import ArrowFolder

    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    client = _bucket(s3_server, "cache")
    folder = ArrowFolder(f"s3://cache/c?endpoint_override={s3_server}&scheme=http")
    entry = {"student": {"w": torch.full((4000,), 1.0)}, "results": []}
    probe = PrefixCache(folder)
    assert probe.put("probe", entry) is not None and probe.get("probe")["student"]["w"].equal(entry["student"]["w"])
    (size,) = [s for _, s, _ in probe.entries()]
    probe.folder.remove("probe.pt")
    cache = PrefixCache(folder, max_bytes=int(2.5 * size))  # room for two
    for i, key in enumerate(("a", "b", "c")):
        if i:
            time.sleep(1.1)  # (an object's time is in whole seconds: the order of writes must show)
        cache.put(key, entry)
    # The oldest write went; nothing but the entries was written (no temporary key).
    assert sorted(k.rsplit("/", 1)[1] for k in _keys(client, "cache") if k.endswith(".pt")) == ["b.pt", "c.pt"]
    assert cache.get("a") is None and cache.get("b") is not None and cache.size_bytes() <= cache.max_bytes
    assert sorted(k for k in _keys(client, "cache") if not k.endswith("/")) == ["c/b.pt", "c/c.pt"]

    # A write that fails half-way stores nothing under its name.
    def half(f):
        f.write(b"x" * 100)
        raise OSError("the disk went away")

    with pytest.raises(OSError, match="went away"):
        folder.write("half.pt", half)
    assert "c/half.pt" not in _keys(client, "cache")
    # A damaged entry is a miss, and goes.
    client.put_object(Bucket="cache", Key="c/b.pt", Body=b"not a checkpoint")
    assert cache.get("b") is None and "c/b.pt" not in _keys(client, "cache")


def test_a_trial_on_s3_uploads_its_stages_and_a_rerun_adopts_them(s3_server, tmp_path, monkeypatch):
    """The trainable alone (Tune stood in for, as in tests/test_cluster.py): it trains in a scratch
    folder, keeps each stage checkpoint in the bucket, removes the scratch folder, and a rerun
    given that run folder replays the stages from the bucket instead of training them."""
    from test_cluster import _run_trial, _trial_config

    from smskd_search.engine import ensure_teacher
    from smskd_search.search import storage_fs as sfs
    from smskd_search.search.teacher_transport import pack
    from smskd_search.search.trainable import TrialContext
    from smskd_search.space import load_space

    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    client = _bucket(s3_server, "trial")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    space_file = tmp_path / "t.yaml"
    space_file.write_text(yaml.safe_dump({**SPACE, "search": {**SPACE["search"],
                                                             "epochs": {"min": 1, "max": 1}}}))
    space = load_space(space_file)
    record = ensure_teacher(space.space.problem, cache_root=tmp_path / "teachers")
    runs = f"s3://trial/runs?endpoint_override={s3_server}&scheme=http"
    config, _ = _trial_config(space, record.sha256, runs)
    assert config["run_dir"] == sfs.join(runs, "00000")
    first = _run_trial(config, TrialContext(teacher=pack(record), keep_run_dirs=True), monkeypatch)
    assert [r["error"] for r in first] == [None, None] and not any(r["replayed"] for r in first)
    # (pyarrow may leave an empty folder marker, a key ending in "/", beside the files)
    assert sorted(k for k in _keys(client, "trial") if not k.endswith("/")) == ["runs/00000/stage1.pt",
                                                                               "runs/00000/stage2.pt"]
    assert not list((tmp_path / "scratch").glob("smskd-trial-*"))  # the scratch folder went
    # A rerun (another run folder, this one to continue from) replays both stages from the bucket,
    # with the same values, and then drops both run folders.
    rerun = {**config, "run_dir": sfs.join(runs, "00001"), "resume_dirs": [config["run_dir"]]}
    second = _run_trial(rerun, TrialContext(teacher=pack(record)), monkeypatch)
    assert [r["replayed"] for r in second] == [True, True]
    assert [r["val_acc"] for r in second] == [r["val_acc"] for r in first]
    assert [k for k in _keys(client, "trial") if not k.endswith("/")] == []
    assert not list((tmp_path / "scratch").glob("smskd-trial-*"))


SPACE = {"name": "s3s", "problem": {
    "dataset": {"name": "digits", "val_fraction": 0.25},
    "teacher": {"arch": "cnn_small", "recipe": {"epochs": 1}}, "student": {"arch": "cnn_nano"}},
    # Two stages of 8 epochs: the search is frozen, checked and killed while the second trains.
    "search": {"methods": ["kd", "dkd"], "stages": {"min": 2, "max": 2}, "epochs": {"min": 8, "max": 8},
               "pruning": {"enabled": False}}}
STAGE_KEY = re.compile(r"^smskd/s3s/trials/(\d+)/stage\d+\.pt$")


def _checkpointed(client) -> set[int]:
    """The trials with a stage checkpoint in the bucket."""
    return {int(m.group(1)) for m in map(STAGE_KEY.match, _keys(client, "smskd")) if m}


def _trial_state(db: Path, number: int) -> str | None:
    """Trial ``number``'s state in the study file, read-only (None: not readable now)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT state FROM trials WHERE number = ?", (number,)).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def _readme_uri(endpoint: str, bucket: str) -> str:
    """The --storage URI of the README's S3 command, for this server and bucket."""
    import shlex

    from conftest import readme_block

    exports, search = readme_block("# On a Ray cluster", nth=1, page="docs/cluster.md")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= {
        w.split("=")[0] for w in shlex.split(exports)[1:]}
    words = shlex.split(search)
    return words[words.index("--storage") + 1].replace("BUCKET", bucket).replace("HOST:9000", endpoint)


@pytest.mark.slow
def test_a_search_on_s3_writes_only_there_and_resumes_from_its_checkpoints(s3_server, tmp_path):
    from smskd_search.engine import run_plan
    from smskd_search.search import lifecycle as lc
    from smskd_search.validate import parse_plan

    client = _bucket(s3_server, "smskd")
    uri = _readme_uri(s3_server, "smskd")
    assert uri == f"s3://smskd/smskd?endpoint_override={s3_server}&scheme=http"
    space = tmp_path / "s3s.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    studies = tmp_path / "studies"
    env = {**os.environ, **CREDENTIALS, "SMSKD_STUDIES": str(studies), "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "smskd_search.cli", "--space", str(space), "--budget", "1", "--no-confirm",
           "--no-baselines", "--deterministic", "--storage", uri]

    # Killed hard (driver and the Ray it started) while a trial has a stage checkpoint in the bucket
    # and no result in the study: the search is frozen once a checkpoint shows, and killed only if
    # both still hold (else let go on).
    db = st.db_path(studies, "s3s")
    orphans: list[int] = []

    def mid_trial() -> bool:
        orphans[:] = [n for n in _checkpointed(client) if _trial_state(db, n) == "RUNNING"]
        return bool(orphans)

    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # (moto and boto3 polling faster than 0.2 s compete with the search for the cores)
        killed = kill_in_state(proc.pid, lambda: bool(_checkpointed(client)), mid_trial, lambda: proc.poll() is not None)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate(timeout=120)[0].decode()
    assert killed and proc.returncode == -signal.SIGKILL, out[-3000:]
    (orphan,) = orphans
    assert orphan in _checkpointed(client)  # what the kill left: the trial's checkpoint, in the bucket

    resumed = subprocess.run([*cmd, "--resume", "--study", "s3s"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    study = optuna.load_study(study_name="s3s", storage=st.storage_url(st.db_path(studies, "s3s")))
    assert study.user_attrs[st.ATTR_STORAGE_ROOT] == uri
    trials = study.get_trials()
    assert trials[orphan].state == TrialState.FAIL and trials[orphan].user_attrs[st.ATTR_INTERRUPTED]
    (rerun,) = [t for t in trials if orphan in t.user_attrs.get(st.ATTR_RESUME_FROM, [])]
    assert rerun.state == TrialState.COMPLETE
    # It went on from the stage checkpoint it downloaded from the bucket, with the values of an
    # uninterrupted run of its plan, bit for bit.
    assert rerun.user_attrs[st.ATTR_REPLAYED_STAGES] >= 1
    torch.set_num_threads(rerun.user_attrs[st.ATTR_THREADS])
    fresh = run_plan(parse_plan(yaml.safe_load(rerun.user_attrs[st.ATTR_PLAN])), device="cpu",
                     teacher_cache=studies / "teachers", keep_student=False)
    assert [s.val_acc for s in fresh.stages] == rerun.user_attrs[st.ATTR_STAGE_VAL_ACC]
    assert sum(st.counts_toward_budget(t) for t in trials) == 1

    keys = _keys(client, "smskd")
    # Tune's files and the stage cache are in the bucket; the stage checkpoints were too, and went
    # once their trials finished for good.
    assert any(re.match(r"^smskd/s3s/ray/run-[^/]+/", k) for k in keys), keys
    assert [k for k in keys if re.match(r"^smskd/cache/stages/[0-9a-f]+\.pt$", k)], keys
    assert not [k for k in keys if k.startswith("smskd/s3s/trials/") and not k.endswith("/")], keys  # (a folder marker may stay)
    assert not [k for k in keys if k.endswith((".tmp", ".part"))], keys
    assert not [k for k in keys if ".smskd-storage-check" in k]
    # Nothing trials write is on the driver's disk: the study file and the teacher only.
    assert not (studies / "s3s" / "trials").exists() and not (studies / "s3s" / "ray").exists()
    assert not (studies / "cache").exists()
    # A resume with another storage is refused (the checkpoints and Tune's files are in this one).
    with pytest.raises(UserError, match=r"^--storage: study s3s keeps its trials' files in s3://smskd/smskd\?"):
        lc.check_resume_storage(studies, "s3s", f"s3://smskd/other?endpoint_override={s3_server}&scheme=http")


def test_the_aws_variables_reach_the_workers_only_for_a_storage_uri():
    from smskd_search.search.cluster import PROPAGATED_ENV, worker_env
    from smskd_search.search.storage_fs import AWS_ENV

    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(AWS_ENV)
    assert not set(AWS_ENV) & set(PROPAGATED_ENV)
    # Paths and profiles of the driver's own credential setup stay home: they would override a node's.
    assert not {"AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"} & set(AWS_ENV)
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "k", "AWS_PROFILE": "me",
           "HOME": str(Path.home())}
    assert worker_env(env, "s3://b/p") == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "k"}
    assert worker_env(env, "/mnt/shared") == worker_env(env, None) == {}


def test_a_uri_with_credentials_in_it_is_refused_without_repeating_them():
    from smskd_search.search.storage_fs import check_uri

    with pytest.raises(UserError) as err:
        check_uri("s3://AKIAEXAMPLE:s3cr3t@bucket/prefix")
    assert "s3cr3t" not in str(err.value) and "AKIAEXAMPLE" not in str(err.value)
    assert str(err.value).startswith("--storage: a URI with credentials in it")
