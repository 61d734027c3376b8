"""The search: sampling (plain Optuna), the searcher's study states (no cluster), and real searches
with Ray started by the code (address "local") on real SQLite studies.

The Ray searches are module fixtures shared by several tests: each Ray start costs seconds here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from smskd_search.errors import UserError
from smskd_search.search import list_studies, run_search
from smskd_search.search import storage as st
from smskd_search.search.sampling import baseline_plans, plan_from_params, split_epochs, suggest_plan
from smskd_search.space import load_space, make_plan
from smskd_search.summary_text import format_leaderboard
from smskd_search.validate import load_plan

optuna.logging.set_verbosity(optuna.logging.WARNING)

PROBLEM = {
    "dataset": {"name": "digits", "val_fraction": 0.25},
    "teacher": {"arch": "cnn_large", "recipe": {"epochs": 2}},
    "student": {"arch": "cnn_micro"},
}


def write_space(folder: Path, name: str, search: dict, **extra) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "problem": PROBLEM, "search": search, **extra}, sort_keys=False))
    return path


MAIN_SEARCH = {
    "methods": ["kd", "dkd", "fitnet"],
    "stages": {"min": 1, "max": 2},
    "epochs": {"min": 1, "max": 2},
    "weight_modes": ["inverse", "none"],
    "normalizations": ["none", "batch_mean"],
    "lambda_ref": {"low": 0.1, "high": 10.0},
    # Decisions at stage ends only: the tests below check that reports come at stage ends.
    "pruning": {"grace_period": 2, "reduction_factor": 2, "decide_at": "stage_ends"},
    "sampler": {"kind": "tpe", "n_startup_trials": 4},
    "baseline_epochs": 2,
}


# ---------------------------------------------------------------------------------------------
# Sampling: plain Optuna, no Ray


def _sample_all(space, sampler, n: int):
    plans = []

    def objective(trial):
        plan = suggest_plan(trial, space, "t" * 64)
        plans.append(plan)
        return sum(len(s.method) * s.epochs for s in plan.stages) % 7 / 7.0

    study = optuna.create_study(direction="maximize", sampler=sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Optuna raises if one name is suggested with two distributions: running is the check.
        study.optimize(objective, n_trials=n)
    return study, plans


@pytest.mark.parametrize("sampler_kind", ["random", "tpe"])
def test_orderings_without_repeats_never_repeat_and_plans_validate(tmp_path, sampler_kind):
    space = load_space(write_space(tmp_path, "norepeat", {
        "methods": ["kd", "dkd", "fitnet", "at"],
        "method_params": {"kd": {"T": 2.0}},
        "stages": {"min": 1, "max": 4},
        "epochs": {"min": 1, "max": 5},
        "weight_modes": ["inverse", "direct", "uniform", "none"],
        "normalizations": ["none", "batch_mean"],
    }))
    if sampler_kind == "random":
        sampler = optuna.samplers.RandomSampler(seed=1)
        n = 300
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=1, n_startup_trials=10, multivariate=True, group=True)
        n = 80
    study, plans = _sample_all(space, sampler, n)
    seen_orders = set()
    for trial, plan in zip(study.trials, plans):
        methods = [s.method for s in plan.stages]
        assert len(set(methods)) == len(methods), methods
        assert 1 <= len(methods) <= 4
        assert all(1 <= s.epochs <= 5 for s in plan.stages)
        assert all(s.params == ({"T": 2.0} if s.method == "kd" else {}) for s in plan.stages)
        type(plan).model_validate(plan.model_dump())
        assert plan_from_params(trial.params, space, "t" * 64).content_hash() == plan.content_hash()
        seen_orders.add(tuple(methods))
    if sampler_kind == "random":
        assert len(seen_orders) > 30  # the encoding reaches many orderings, not a corner of them


def test_total_epochs_split_and_repeats_allowed(tmp_path):
    space = load_space(write_space(tmp_path, "total", {
        "methods": ["kd", "dkd"],
        "allow_repeat": True,
        "stages": {"min": 1, "max": 4},
        "total_epochs": 9,
        "weight_modes": ["inverse"],
    }))
    study, plans = _sample_all(space, optuna.samplers.RandomSampler(seed=3), 200)
    assert all(p.total_epochs == 9 for p in plans)
    assert any(len({s.method for s in p.stages}) < len(p.stages) for p in plans)  # repeats happen
    # One weight mode allowed: never suggested, always set.
    assert all("weight_mode" not in t.params for t in study.trials)
    assert all(p.reference.weight_mode == "inverse" for p in plans)


def test_split_epochs():
    assert split_epochs(10, [1.0, 1.0]) == [5, 5]
    assert split_epochs(7, [1.0, 1.0]) == [4, 3]
    assert split_epochs(3, [0.1, 1.0, 0.5]) == [1, 1, 1]
    assert split_epochs(12, [0.1, 1.0]) == [2, 10]
    for total in range(3, 20):
        assert sum(split_epochs(total, [0.3, 0.9, 0.5])) == total


def test_baselines_map_to_their_plans(tmp_path):
    expressible = load_space(write_space(tmp_path, "main", MAIN_SEARCH))
    bs = baseline_plans(expressible, "t" * 64)
    assert [b.label for b in bs] == ["single:kd", "single:dkd", "single:fitnet", "no-reference"]
    for b in bs:
        assert b.params is not None  # this space can say every baseline with parameters
        assert plan_from_params(b.params, expressible, "t" * 64).content_hash() == b.plan.content_hash()
    assert [s.epochs for s in bs[0].plan.stages] == [2]
    noref = bs[-1].plan
    assert noref.reference.weight_mode == "none" and len(noref.stages) == 2 and noref.total_epochs == 2

    # Single methods for 4 epochs do not fit a stage of at most 2: carried as fixed plans.
    wide = load_space(write_space(tmp_path, "wide", {**MAIN_SEARCH, "baseline_epochs": None}))
    bs = baseline_plans(wide, "t" * 64)
    single = bs[0]
    assert single.params is None and single.plan.sequence() == "kd(4)"
    assert plan_from_params({}, wide, "t" * 64, user_attrs=single.user_attrs).content_hash() == single.plan.content_hash()


def test_space_without_search_part_is_a_user_error(tmp_path):
    path = tmp_path / "nosearch.yaml"
    path.write_text(yaml.safe_dump({"name": "nosearch", "problem": PROBLEM}))
    with pytest.raises(UserError, match="no 'search' part"):
        run_search(load_space(path), studies_dir=tmp_path)


def test_a_failed_start_leaves_no_study_behind(tmp_path):
    path = tmp_path / "badteacher.yaml"
    problem = {**PROBLEM, "teacher": {"arch": "cnn_large", "checkpoint": str(tmp_path / "missing.pt")}}
    path.write_text(yaml.safe_dump({"name": "badteacher", "problem": problem, "search": MAIN_SEARCH}))
    with pytest.raises(UserError, match="teacher.checkpoint"):
        run_search(load_space(path), studies_dir=tmp_path)
    assert not (tmp_path / "badteacher.db").exists() and not (tmp_path / "badteacher.lock").exists()
    # Nor SQLite's write-ahead log beside it (the connection is closed before the file goes).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["badteacher.yaml"]
    with pytest.raises(UserError, match="no study badteacher to resume"):
        run_search(load_space(path), studies_dir=tmp_path, resume=True)


@pytest.mark.parametrize("fields, line", [
    ({"budget": 0}, "--budget must be >= 1 (got 0)"),
    ({"timeout": 0.0}, "--timeout must be > 0 seconds (got 0)"),
    ({"timeout": math.nan}, "--timeout must be > 0 seconds (got nan)"),
    ({"gpus_per_trial": math.nan}, "--gpus-per-trial must be >= 0 (got nan)"),
    ({"cpus_per_trial": 0.0}, "--cpus-per-trial must be > 0 (got 0)"),
    ({"gpus_per_trial": -0.5}, "--gpus-per-trial must be >= 0 (got -0.5)"),
    ({"max_concurrent": 0}, "--max-concurrent must be >= 1 (got 0)"),
    ({"cache_max_bytes": 0}, "--cache-max-gb must be > 0 (got 0)"),
    ({"deterministic": True, "max_concurrent": 2}, "--max-concurrent 2: --deterministic runs one trial at a time"),
])
def test_search_settings_are_checked_when_made_and_run_search_takes_them(tmp_path, fields, line):
    from smskd_search.search import ConfirmSettings, SearchSettings

    with pytest.raises(UserError) as err:
        SearchSettings(studies_dir=tmp_path / "studies", **fields)
    assert str(err.value) == line
    # A notebook's keywords are the same fields, checked the same way, before anything is written.
    space = load_space(write_space(tmp_path, "kw", MAIN_SEARCH))
    with pytest.raises(UserError) as err:
        run_search(space, studies_dir=tmp_path / "studies", **fields)
    assert str(err.value) == line
    assert not (tmp_path / "studies").exists()
    settings = SearchSettings(studies_dir=str(tmp_path / "studies"), deterministic=True, confirm=ConfirmSettings(seeds=1))
    assert settings.studies_dir == tmp_path / "studies" and settings.trials_at_once == 1
    with pytest.raises(TypeError, match="not both"):
        run_search(space, settings, budget=3)


def test_the_settings_cache_cap_is_the_engines():
    from smskd_search.engine.prefix_cache import DEFAULT_MAX_BYTES
    from smskd_search.search import SearchSettings

    assert SearchSettings().cache_max_bytes == DEFAULT_MAX_BYTES


def test_resume_checks_the_space_and_the_lock_guards_a_live_study(tmp_path):
    import socket

    space = load_space(write_space(tmp_path, "s1", MAIN_SEARCH))
    st.create_study(space, tmp_path, "s1", seed=0, budget=5, teacher_path="t.pt", teacher_sha256="a" * 64)
    # Comments and resources may change between a search and its resume; the ranges may not.
    space.path.write_text("# a comment\n" + space.path.read_text() + "runtime: {cpus_per_trial: 2}\n")
    study = st.load_study_for_resume(load_space(space.path), tmp_path, "s1", budget=9)
    assert study.user_attrs["budget"] == 9
    with pytest.raises(UserError, match="searched with teacher aaaaaaaaaaaa"):
        st.bind_teacher(study, teacher_path="u.pt", teacher_sha256="b" * 64)
    changed = write_space(tmp_path, "s1", {**MAIN_SEARCH, "methods": ["kd", "dkd"]})
    with pytest.raises(UserError, match="made with another space"):
        st.load_study_for_resume(load_space(changed), tmp_path, "s1", budget=9)

    lock = tmp_path / "s1.lock"
    lock.write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process holds it
    with pytest.raises(UserError, match="in use by process"):
        st.StudyLock(tmp_path, "s1").acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    lock.write_text(f"{socket.gethostname()} {dead.pid}")  # left by a killed search: taken over
    st.StudyLock(tmp_path, "s1").acquire().release()
    assert not lock.exists()


# ---------------------------------------------------------------------------------------------
# The searcher's study states, driven directly (Tune's calls, no cluster)


def _searcher(storage, multi: bool = False):
    from smskd_search.search.searcher import StudySearcher

    def space_fn(trial):
        trial.suggest_int("x", 0, 3)
        return {}

    study = optuna.create_study(storage=storage, study_name="s", sampler=optuna.samplers.RandomSampler(seed=0),
                                directions=["maximize", "minimize"] if multi else ["maximize"])
    return StudySearcher(study, space_fn)


def _result(cum, acc, final=False, **kw):
    return {"val_acc": acc, "cum_epochs": cum, "final": final, "total_epochs": 6, "n_val": 100, **kw}


def test_searcher_prunes_completes_and_fails():
    storage = optuna.storages.InMemoryStorage()
    s = _searcher(storage)
    for tid in "abcde":
        s.suggest(tid)
    # a: completes; b: stopped by the scheduler at its second report, which only
    # on_trial_complete sees; c: its plan raised; d: its worker died; e: never told (a Ctrl-C).
    s.on_trial_result("a", _result(2, 0.5))
    s.on_trial_result("a", _result(6, 0.7, final=True))
    s.on_trial_complete("a", _result(6, 0.7, final=True))
    s.on_trial_result("b", _result(2, 0.4))
    s.on_trial_complete("b", _result(4, 0.45))
    s.on_trial_complete("c", {"val_acc": math.nan, "cum_epochs": 0, "error": "ValueError: boom"})
    s.on_trial_complete("d", None, error=True)
    assert s.fail_unfinished("interrupted: test") == [4]
    s.on_trial_complete("b", _result(4, 0.45))  # repeated calls are ignored
    trials = optuna.load_study(study_name="s", storage=storage).trials
    a, b, c, d, e = trials
    assert a.state == TrialState.COMPLETE and a.value == 0.7 and a.intermediate_values == {2: 0.5, 6: 0.7}
    assert b.state == TrialState.PRUNED and b.intermediate_values == {2: 0.4, 4: 0.45} and b.value == 0.45
    assert b.user_attrs[st.ATTR_STAGE_CUM_EPOCHS] == [2, 4] and b.user_attrs[st.ATTR_STAGE_VAL_ACC] == [0.4, 0.45]
    assert c.state == TrialState.FAIL and c.user_attrs[st.ATTR_FAIL_REASON] == "ValueError: boom"
    assert d.state == TrialState.FAIL and "worker failed" in d.user_attrs[st.ATTR_FAIL_REASON]
    assert e.state == TrialState.FAIL and e.user_attrs[st.ATTR_INTERRUPTED] is True


def test_searcher_multi_objective_and_finished_trials():
    storage = optuna.storages.InMemoryStorage()
    s = _searcher(storage, multi=True)
    s.suggest("a")
    s.suggest("b")
    s.on_trial_result("a", _result(2, 0.5))
    s.on_trial_complete("a", _result(6, 0.7, final=True))
    # No pruning in a Pareto search: a trial ending before its last stage was cut short.
    s.on_trial_complete("b", _result(2, 0.6))
    a, b = optuna.load_study(study_name="s", storage=storage).trials
    assert a.state == TrialState.COMPLETE and a.values == [0.7, 6.0] and a.intermediate_values == {}
    assert a.user_attrs[st.ATTR_STAGE_VAL_ACC] == [0.5, 0.7]
    assert b.state == TrialState.FAIL and b.user_attrs[st.ATTR_INTERRUPTED] is True

    # A stale Tune snapshot (resume after a hard kill) tells a trial the study already finished.
    s2 = _searcher(optuna.storages.InMemoryStorage())
    s2.suggest("x")
    s2.study.tell(s2.trial_number("x"), 0.3)
    s2.on_trial_result("x", _result(2, 0.5))
    s2.on_trial_complete("x", _result(6, 0.9, final=True))  # no UpdateFinishedTrialError
    assert s2.study.trials[0].value == 0.3


# ---------------------------------------------------------------------------------------------
# The trainable's logic with a stand-in for Tune's session (no cluster)


class _FakeTune:
    """Records ``report`` calls; ``stop_after`` reports, raises like a process dying there."""

    class Checkpoint:
        @staticmethod
        def from_directory(path):
            return sorted(os.listdir(path))

    def __init__(self, stop_after: int | None = None):
        self.reports: list[tuple[dict, list | None]] = []
        self.stop_after = stop_after

    def report(self, metrics, checkpoint=None):
        self.reports.append((dict(metrics), checkpoint))
        if self.stop_after is not None and len(self.reports) >= self.stop_after:
            raise SystemExit(0)

    def get_checkpoint(self):
        return None


def test_trainable_reports_resumes_and_fails_cleanly(tmp_path, monkeypatch):
    from dataclasses import asdict

    from smskd_search.engine import ensure_teacher
    from smskd_search.plan import ProblemSpec
    from smskd_search.search import trainable as tr
    from smskd_search.search.teacher_transport import TeacherPayload, pack

    problem = {**PROBLEM, "teacher": {"arch": "cnn_small", "recipe": {"epochs": 1}}}
    space = load_space(write_space(tmp_path, "trainable", {**MAIN_SEARCH, "methods": ["kd", "dkd"]}))
    space.space.problem = ProblemSpec.model_validate(problem)
    record = ensure_teacher(space.space.problem, cache_root=tmp_path / "teachers")
    # The weights travel with the context; the record's path is not there for the trial to open.
    shipped = pack(record)
    context = tr.TrialContext(teacher=TeacherPayload({**asdict(record), "path": str(tmp_path / "not-here.pt")},
                                                     shipped.weights))
    plan = make_plan(space, [("kd", 1), ("dkd", 2)], weight_mode="inverse", teacher_sha256=record.sha256)

    def run(fake, run_dir, resume_dirs=(), the_plan=plan, **extra):
        monkeypatch.setattr(tr, "tune", fake)
        config = {"plan_yaml": the_plan.to_yaml(), "run_dir": str(run_dir),
                  "resume_dirs": [str(d) for d in resume_dirs], "threads": 1, **extra}
        try:
            tr.train_trial(config, context)
        except SystemExit:
            pass
        return fake.reports

    whole = run(_FakeTune(), tmp_path / "a")
    assert [(m["stage"], m["cum_epochs"], m["final"], m["replayed"]) for m, _ in whole] == [(1, 1, False, False), (2, 3, True, False)]
    assert [c for _, c in whole] == [["stage1.pt"], ["stage2.pt"]]
    assert all(m["n_val"] > 0 and m["total_epochs"] == 3 for m, _ in whole)
    assert not (tmp_path / "a").exists()  # finished: nothing kept for a resume

    # Stopped inside its first report (a kill or Ctrl-C there): the stage checkpoint stays.
    cut = run(_FakeTune(stop_after=1), tmp_path / "b")
    assert len(cut) == 1 and (tmp_path / "b" / "stage1.pt").exists()
    # Its rerun replays stage 1 from the checkpoint, trains stage 2, and lands on the same values.
    rerun = run(_FakeTune(), tmp_path / "c", resume_dirs=[tmp_path / "b"])
    assert [(m["stage"], m["replayed"]) for m, _ in rerun] == [(1, True), (2, False)]
    assert [m["val_acc"] for m, _ in rerun] == [m["val_acc"] for m, _ in whole]
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()

    # Pruning at the rungs (1 and 2 epochs): 1 is a stage end (reported once, as such), 2 falls
    # inside stage 2 and is reported there without a checkpoint, with the value of that epoch.
    at_rungs = run(_FakeTune(), tmp_path / "e", rung_epochs=[1, 2])
    assert [(m["cum_epochs"], m["stage_end"], m["final"]) for m, _ in at_rungs] == \
        [(1, True, False), (2, False, False), (3, True, True)]
    assert at_rungs[1][1] is None and at_rungs[1][0]["epoch_val_acc"] == [at_rungs[2][0]["epoch_val_acc"][0]]
    assert [m["val_acc"] for m, _ in at_rungs if m["stage_end"]] == [m["val_acc"] for m, _ in whole]
    # A rerun from the stage-1 checkpoint reports the same points, the replayed one first.
    run(_FakeTune(stop_after=1), tmp_path / "b2")
    rerun = run(_FakeTune(), tmp_path / "f", resume_dirs=[tmp_path / "b2"], rung_epochs=[1, 2])
    assert [(m["cum_epochs"], m["replayed"]) for m, _ in rerun] == [(1, True), (2, False), (3, False)]
    assert [m["val_acc"] for m, _ in rerun] == [m["val_acc"] for m, _ in at_rungs]

    # A plan that raises: one result that carries the error, nothing raised to Tune.
    bad = plan.model_copy(update={"teacher_sha256": "0" * 64})
    (failed, _), = run(_FakeTune(), tmp_path / "d", the_plan=bad)
    assert failed["error"].startswith("UserError: teacher_sha256") and math.isnan(failed["val_acc"])
    assert failed["cum_epochs"] == 0 and not failed["final"]

    # With the stage cache: a trial pruned inside its first stage (stopped in its rung report at 2
    # epochs) leaves that stage's state there; a later plan with that first stage goes on from the
    # rung, reports the rung as reused, and lands on the values of the plan trained in full.
    uncached = context
    context = dataclasses.replace(context, cache_dir=str(tmp_path / "cache"))
    first = make_plan(space, [("kd", 3)], teacher_sha256=record.sha256)
    later = make_plan(space, [("kd", 3), ("dkd", 1)], weight_mode="inverse", teacher_sha256=record.sha256)
    pruned = run(_FakeTune(stop_after=1), tmp_path / "g", the_plan=first, rung_epochs=[2])
    assert [(m["cum_epochs"], m["stage_end"]) for m, _ in pruned] == [(2, False)]
    went_on = run(_FakeTune(), tmp_path / "h", the_plan=later, rung_epochs=[2])
    assert [(m["cum_epochs"], m["stage_end"], m["reused"], m["epochs_reused"], m["epochs_trained"])
            for m, _ in went_on] == [(2, False, True, 2, 0), (3, True, False, 2, 1), (4, True, False, 2, 2)]
    context = uncached
    in_full = run(_FakeTune(), tmp_path / "i", the_plan=later, rung_epochs=[2])
    assert [m["val_acc"] for m, _ in went_on] == [m["val_acc"] for m, _ in in_full]
    assert [m["epochs_reused"] for m, _ in in_full] == [0, 0, 0]


def test_trainable_starts_from_the_stage_cache_and_reports_every_rung(tmp_path, monkeypatch):
    from dataclasses import asdict

    from smskd_search.engine import ensure_teacher
    from smskd_search.plan import ProblemSpec
    from smskd_search.search import trainable as tr
    from smskd_search.search.teacher_transport import TeacherPayload, pack

    problem = {**PROBLEM, "teacher": {"arch": "cnn_small", "recipe": {"epochs": 1}}}
    space = load_space(write_space(tmp_path, "cached", {**MAIN_SEARCH, "methods": ["kd", "dkd", "fitnet"]}))
    space.space.problem = ProblemSpec.model_validate(problem)
    record = ensure_teacher(space.space.problem, cache_root=tmp_path / "teachers")
    shipped = pack(record)
    payload = TeacherPayload({**asdict(record), "path": str(tmp_path / "not-here.pt")}, shipped.weights)
    first = make_plan(space, [("kd", 2), ("dkd", 1)], weight_mode="inverse", teacher_sha256=record.sha256)
    second = make_plan(space, [("kd", 2), ("fitnet", 1)], weight_mode="inverse", teacher_sha256=record.sha256)

    def run(plan, run_dir, cache_dir):
        fake = _FakeTune()
        monkeypatch.setattr(tr, "tune", fake)
        context = tr.TrialContext(teacher=payload, cache_dir=str(cache_dir) if cache_dir else None)
        tr.train_trial({"plan_yaml": plan.to_yaml(), "run_dir": str(run_dir), "threads": 1,
                        "rung_epochs": [1, 2, 3]}, context)
        return [m for m, _ in fake.reports]

    plain = run(second, tmp_path / "a", None)
    run(first, tmp_path / "b", tmp_path / "cache")
    cached = run(second, tmp_path / "c", tmp_path / "cache")
    keys = ("cum_epochs", "stage_end", "val_acc", "val_loss", "epoch_val_acc", "final")
    # The reused stage reports its rung (1, inside stage 1) and its end, with the trained run's values.
    assert [tuple(m[k] for k in keys) for m in cached] == [tuple(m[k] for k in keys) for m in plain]
    assert [(m["cum_epochs"], m["reused"], m["epochs_reused"], m["epochs_trained"]) for m in cached] == \
        [(1, True, 1, 0), (2, True, 2, 0), (3, False, 2, 1)]
    assert [(m["epochs_reused"], m["epochs_trained"]) for m in plain] == [(0, 1), (0, 2), (0, 3)]
    assert (tmp_path / "cache" / "stages").is_dir() and (tmp_path / "cache" / "teacher_outputs").is_dir()


# ---------------------------------------------------------------------------------------------
# Real searches (Ray started by the code)


@pytest.fixture(scope="module")
def studies_root(tmp_path_factory) -> Path:
    # One folder for every search of this file: they share the teacher cache (<root>/teachers),
    # trained in this process with a fixed thread count so that its numbers do not vary by machine.
    torch.set_num_threads(1)
    return tmp_path_factory.mktemp("studies")


@pytest.fixture(scope="module", autouse=True)
def access_log(tmp_path_factory):
    """Every test-split access during this module's searches would land in this file."""
    log = tmp_path_factory.mktemp("access") / "test-split-access.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMSKD_TEST_ACCESS_LOG", str(log))
        yield log


def _trials(db: Path, name: str):
    return optuna.load_study(study_name=name, storage=st.storage_url(db)).get_trials(deepcopy=False)


def _trained(trials) -> list:
    """The trials that trained: a repeat of a finished plan is answered from the study, off the budget."""
    return [t for t in trials if not st.is_repeat(t)]


@pytest.fixture(scope="module")
def main_search(studies_root, local_ray):
    space = load_space(write_space(studies_root, "main", MAIN_SEARCH))
    progress = []
    # The budget phase only (confirmation runs are tested in test_winners.py).
    summary = run_search(space, budget=7, studies_dir=studies_root, address="local", max_concurrent=2,
                         seed=0, on_progress=progress.append, confirm=None)
    return space, summary, progress


@pytest.mark.slow
def test_search_records_the_expected_study(main_search, studies_root):
    space, summary, progress = main_search
    assert summary.study == "main" and summary.db_path == studies_root / "main.db"
    assert not summary.interrupted and summary.stop_reason == "budget"
    assert summary.resources_per_trial == {"cpu": 1.0} and summary.max_concurrent == 2
    trials = _trials(summary.db_path, "main")
    assert len(_trained(trials)) == 7 and summary.done == 7
    assert len(trials) == 7 + summary.n_repeats
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    teacher_sha = optuna.load_study(study_name="main", storage=summary.storage_url).user_attrs["teacher_sha256"]
    trials = _trained(trials)
    for t in trials:
        # Parameters map to the plan the trial ran, and every plan validates.
        plan = plan_from_params(t.params, space, teacher_sha, user_attrs=t.user_attrs)
        stored = load_plan_text(t.user_attrs[st.ATTR_PLAN])
        assert plan.content_hash() == stored.content_hash()
        assert t.user_attrs[st.ATTR_SEQUENCE] == stored.sequence()
        assert t.user_attrs[st.ATTR_THREADS] == 1
        assert t.user_attrs[st.ATTR_N_VAL] > 0
        # Intermediate values: every reported stage, keyed by cumulative epochs.
        cum = t.user_attrs[st.ATTR_STAGE_CUM_EPOCHS]
        assert sorted(t.intermediate_values) == cum
        assert [t.intermediate_values[c] for c in cum] == t.user_attrs[st.ATTR_STAGE_VAL_ACC]
        if t.state == TrialState.COMPLETE:
            assert cum == list(_cumsum(s.epochs for s in stored.stages))
            assert t.value == t.intermediate_values[cum[-1]]
    labels = sorted(t.user_attrs["baseline"] for t in trials if "baseline" in t.user_attrs)
    assert labels == ["no-reference", "single:dkd", "single:fitnet", "single:kd"]
    # Baselines ran first, as ordinary parameterised trials.
    assert all("baseline" in t.user_attrs for t in trials[:4])
    assert all("fixed_plan" not in t.user_attrs for t in trials)
    assert progress and progress[-1].done == 7 and progress[-1].running == 0
    # A trial that just ended is no longer counted as running, and at most max_concurrent run.
    assert all(p.running == 0 for p in progress if p.done == 7)
    assert all(p.done + p.running <= 7 and p.running <= 2 for p in progress)


def load_plan_text(text: str):
    from smskd_search.validate import parse_plan

    return parse_plan(yaml.safe_load(text))


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total


@pytest.mark.slow
def test_best_plan_loads_and_reproduces_bit_for_bit(main_search, studies_root):
    from smskd_search.engine import run_plan

    space, summary, _ = main_search
    assert summary.best_plan_path == studies_root / "main" / "best.yaml"
    plan = load_plan(summary.best_plan_path)
    best = summary.top[0]
    assert plan.sequence() == best.sequence
    trial = next(t for t in _trials(summary.db_path, "main") if t.number == best.number)
    assert best.val_acc == trial.value == max(t.value for t in _trials(summary.db_path, "main")
                                              if t.state == TrialState.COMPLETE)
    # Same plan, same thread count: the same stage values, bit for bit.
    torch.set_num_threads(trial.user_attrs[st.ATTR_THREADS])
    result = run_plan(plan, device="cpu", teacher_cache=studies_root / "teachers", keep_student=False)
    assert [s.val_acc for s in result.stages] == trial.user_attrs[st.ATTR_STAGE_VAL_ACC]

    text = format_leaderboard(summary, top=5)
    assert f"optuna-dashboard sqlite:///{summary.db_path.resolve()}" in text
    assert str(summary.best_plan_path) in text and "[baseline " in text and "(n=" in text
    assert " -> " in text or all(r.sequence.count("(") == 1 for r in summary.top)


@pytest.mark.slow
def test_reusing_a_study_name_without_resume_is_an_error(main_search, studies_root):
    space, summary, _ = main_search
    before = hashlib.sha256(summary.db_path.read_bytes()).hexdigest()
    with pytest.raises(UserError, match=r"study main already exists in .*main\.db; use --resume or another --study"):
        run_search(space, budget=3, study="main", studies_dir=studies_root, address="local")
    assert hashlib.sha256(summary.db_path.read_bytes()).hexdigest() == before
    assert not (studies_root / "main.lock").exists()
    infos = {i.name: i for i in list_studies(studies_root)}
    assert infos["main"].counts["COMPLETE"] + infos["main"].counts["PRUNED"] == 7
    assert infos["main"].best_value == summary.top[0].val_acc


PRUNE_SEARCH = {
    # Two-epoch stages: cumulative epochs 2, 4, 6 are not the report counts 1, 2, 3.
    "methods": ["kd", "at", "dkd", "fitnet"],
    "stages": {"min": 2, "max": 3},
    "epochs": {"min": 2, "max": 2},
    "weight_modes": ["inverse"],
    "pruning": {"grace_period": 2, "reduction_factor": 2, "decide_at": "stage_ends"},
    "sampler": {"kind": "random"},
}


def _one_at_a_time(studies_root, name: str, search: dict, budget: int, seed: int):
    space = load_space(write_space(studies_root, name, search))
    # One trial at a time: the order trials reach a rung, hence the scheduler's decisions, is fixed.
    return run_search(space, budget=budget, studies_dir=studies_root, address="local", max_concurrent=1,
                      seed=seed, baselines=False, confirm=None)


@pytest.fixture(scope="module")
def pruned_search(studies_root, local_ray):
    return _one_at_a_time(studies_root, "prune", PRUNE_SEARCH, budget=8, seed=0)


@pytest.mark.slow
def test_pruned_trials_are_pruned_with_stage_values(pruned_search):
    trials = _trained(_trials(pruned_search.db_path, pruned_search.study))
    assert len(trials) == 8
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned, [(t.user_attrs[st.ATTR_SEQUENCE], t.intermediate_values) for t in trials]
    assert len(pruned) + len(complete) == 8
    for t in pruned:
        n_stages = len(load_plan_text(t.user_attrs[st.ATTR_PLAN]).stages)
        iv = t.intermediate_values
        # Every stage it ran, including the one ASHA stopped it at (rungs at 2 and 4 epochs).
        assert iv and sorted(iv) == [2, 4][: len(iv)] and len(iv) < n_stages
        assert max(iv) in (2, 4)
        assert t.value == iv[max(iv)]
        assert t.user_attrs[st.ATTR_STAGE_VAL_ACC] == [iv[k] for k in sorted(iv)]
        # The scheduler's reason names the rung it was stopped at and the value it fell short with.
        assert t.user_attrs[st.ATTR_PRUNED_REASON].startswith(f"stopped at rung {max(iv)} (epoch {max(iv)}): "
                                                              f"val acc {t.value:.4f} < ")
    for t in complete:
        n_stages = len(load_plan_text(t.user_attrs[st.ATTR_PLAN]).stages)
        assert sorted(t.intermediate_values) == [2 * (k + 1) for k in range(n_stages)]
    assert pruned_search.counts["PRUNED"] == len(pruned)


RUNG_SEARCH = {
    # Three-epoch stages with rungs at 2 and 4 epochs: every trial is judged inside its stages.
    "methods": ["kd", "at", "dkd", "fitnet"],
    "stages": {"min": 2, "max": 2},
    "epochs": {"min": 3, "max": 3},
    "weight_modes": ["inverse"],
    "pruning": {"grace_period": 2, "reduction_factor": 2, "decide_at": "rungs"},
    "sampler": {"kind": "random"},
}


@pytest.fixture(scope="module")
def rung_search(studies_root, local_ray):
    return _one_at_a_time(studies_root, "rungs", RUNG_SEARCH, budget=6, seed=1)


@pytest.mark.slow
def test_pruning_at_the_rungs_judges_trials_mid_stage(rung_search):
    trials = _trained(_trials(rung_search.db_path, rung_search.study))
    assert len(trials) == 6 and {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.user_attrs[st.ATTR_SEQUENCE], t.intermediate_values) for t in trials]
    for t in trials:
        iv = t.intermediate_values
        if t.state == TrialState.COMPLETE:
            # The rungs (2, 4: mid-stage) and the stage ends (3, 6), each an intermediate value.
            assert sorted(iv) == [2, 3, 4, 6] and t.value == iv[6]
            assert t.user_attrs[st.ATTR_STAGE_CUM_EPOCHS] == [3, 6]
        else:
            # Stopped at a rung, mid-stage: its last value is the rung's; only whole stages are stages.
            assert sorted(iv) in ([2], [2, 3, 4]) and t.value == iv[max(iv)]
            assert t.user_attrs[st.ATTR_STAGE_CUM_EPOCHS] == [3][: len(iv) // 2]
            assert t.user_attrs[st.ATTR_PRUNED_REASON].startswith(f"stopped at rung {max(iv)} (epoch {max(iv)})")
        # The learning curve has a value for every epoch trained.
        curve = t.user_attrs[st.ATTR_EPOCH_VAL_ACC]
        assert len(curve) == max(iv) and all(curve[e - 1] == v for e, v in iv.items())
    assert st.epochs_trained(pruned[0]) == max(pruned[0].intermediate_values)


RESUME_SEARCH = {**MAIN_SEARCH, "methods": ["kd", "dkd"], "baseline_epochs": None}

_SEARCH_PROCESS = textwrap.dedent("""
    import sys
    from pathlib import Path
    from smskd_search.space import load_space
    from smskd_search.search import run_search
    summary = run_search(load_space(sys.argv[1]), budget=int(sys.argv[2]), studies_dir=Path(sys.argv[3]),
                         address="local", max_concurrent=2, seed=0, resume=sys.argv[4] == "resume", confirm=None)
    print("stop_reason", summary.stop_reason, "interrupted", summary.interrupted)
""")


def _finished(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _running_with_a_stage(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute(
                "SELECT COUNT(DISTINCT t.trial_id) FROM trials t JOIN trial_intermediate_values v"
                " ON v.trial_id = t.trial_id WHERE t.state = 'RUNNING'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _search_until(args: list[str], db: Path, stop_when, sig: int) -> tuple[int, str]:
    """Run a search in its own process group and send ``sig`` to the group once ``stop_when()``.

    SIGINT to the group is what a terminal's Ctrl-C does; SIGKILL ends the driver and the Ray
    processes of its group with no cleanup of any kind.
    """
    proc = subprocess.Popen([sys.executable, "-c", _SEARCH_PROCESS, *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None and not stop_when():
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        out, _ = proc.communicate(timeout=120)
    return proc.returncode, out.decode()


def _checkpointed_running(db: Path, runs: Path) -> list[int]:
    """The RUNNING trials that reported a stage and have a stage checkpoint in their run folder."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            numbers = [n for (n,) in con.execute(
                "SELECT DISTINCT t.number FROM trials t JOIN trial_intermediate_values v"
                " ON v.trial_id = t.trial_id WHERE t.state = 'RUNNING'")]
        finally:
            con.close()
    except sqlite3.Error:
        return []
    return sorted(n for n in numbers if list((runs / f"{n:05d}").glob("stage*.pt")))


def _kill_mid_trial(args: list[str], db: Path, runs: Path) -> tuple[int, str, list[int]]:
    """Run a search in its own process group and SIGKILL it (driver and Ray, no cleanup of any
    kind) while a trial has a stage checkpoint and no result: frozen first, checked, then killed.

    Returns the exit code, the output and the trials the kill cut short after a stage.
    """
    from _freeze import kill_in_state

    orphans: list[int] = []

    def mid_trial() -> bool:
        orphans[:] = _checkpointed_running(db, runs)
        return bool(orphans)

    proc = subprocess.Popen([sys.executable, "-c", _SEARCH_PROCESS, *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        killed = kill_in_state(proc.pid, lambda: _running_with_a_stage(db) > 0, mid_trial,
                               lambda: proc.poll() is not None, timeout=240, poll=0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    return proc.returncode, out.decode(), orphans if killed else []


def _snapshot(t):
    return (t.number, t.state, t.values, t.params, t.intermediate_values,
            {k: v for k, v in t.user_attrs.items()})


@pytest.fixture(scope="module")
def resumed_search(studies_root, local_ray):
    """Ctrl-C a search, resume it and kill that hard, then resume it to its budget."""
    space_path = write_space(studies_root, "resume", RESUME_SEARCH)
    db = studies_root / "resume.db"
    budget = 7
    args = [str(space_path), str(budget), str(studies_root)]
    rc, out = _search_until([*args, "new"], db, lambda: _finished(db) >= 1, signal.SIGINT)
    after_ctrl_c = _trials(db, "resume")
    # Killed while a trial is between two stages: its rerun must go on from there.
    rc2, out2, killed_mid_trial = _kill_mid_trial([*args, "resume"], db, studies_root / "resume" / "trials")
    assert rc2 == -signal.SIGKILL and killed_mid_trial, out2[-3000:]
    before = _trials(db, "resume")
    summary = run_search(load_space(space_path), budget=budget, studies_dir=studies_root, address="local",
                         max_concurrent=2, seed=0, resume=True, confirm=None)
    return (rc, out, after_ctrl_c), before, summary, killed_mid_trial


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_keeping_what_finished(resumed_search, studies_root):
    (rc, out, trials), _, _, _ = resumed_search
    assert rc == 0, out[-3000:]
    assert "stop_reason interrupted interrupted True" in out
    assert "Traceback" not in out
    assert any(t.state == TrialState.COMPLETE for t in trials)
    # Nothing left RUNNING: the trials the stop cut short are FAIL (interrupted), with a reason.
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for t in trials:
        if t.state == TrialState.FAIL:
            assert t.user_attrs[st.ATTR_INTERRUPTED] is True and "interrupted" in t.user_attrs[st.ATTR_FAIL_REASON]


@pytest.mark.slow
def test_resume_after_a_hard_kill_finishes_the_budget(resumed_search, studies_root):
    from smskd_search.engine import run_plan

    (_, _, after_ctrl_c), before, summary, killed_mid_trial = resumed_search
    after = _trials(summary.db_path, "resume")
    assert not summary.interrupted and summary.done == 7
    assert sum(st.counts_toward_budget(t) for t in after) == 7
    assert not [t for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # Finished trials are untouched, through both interruptions.
    by_number = {t.number: t for t in after}
    for earlier in (after_ctrl_c, before):
        finished = [t for t in earlier if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert [_snapshot(t) for t in finished] == [_snapshot(by_number[t.number]) for t in finished]
    # Trials left RUNNING (the hard kill) or cut short (the Ctrl-C) are FAIL (interrupted) with a
    # reason, and their plans ran again.
    cut_short = [t for t in before if t.state == TrialState.RUNNING]
    cut_short += [t for t in after_ctrl_c if t.state == TrialState.FAIL]
    assert cut_short
    for o in cut_short:
        now = by_number[o.number]
        assert now.state == TrialState.FAIL and now.user_attrs[st.ATTR_INTERRUPTED] is True
        assert "interrupted" in now.user_attrs[st.ATTR_FAIL_REASON]
        # The rerun that finished (a rerun may have been interrupted too, and rerun in turn).
        (rerun,) = [t for t in after if o.number in t.user_attrs.get(st.ATTR_RESUME_FROM, [])
                    and st.counts_toward_budget(t)]
        if st.ATTR_PLAN in o.user_attrs:
            assert rerun.user_attrs[st.ATTR_PLAN] == o.user_attrs[st.ATTR_PLAN].replace(
                f"trial{o.number}", f"trial{rerun.number}")
        else:
            # Killed while its plan was being sampled (before the plan attribute was written): the
            # rerun keeps every parameter already drawn and samples the rest.
            assert all(rerun.params[k] == v for k, v in o.params.items())
        if st.is_repeat(rerun):
            # Its plan had finished in another trial meanwhile (a small space repeats plans): the rerun
            # took that trial's result instead of training at all.
            original = by_number[rerun.user_attrs[st.ATTR_REPEAT_OF]]
            assert original.user_attrs[st.ATTR_PLAN_KEY] == rerun.user_attrs[st.ATTR_PLAN_KEY]
            assert rerun.value == original.value and st.ATTR_TRIAL_STARTED_AT not in rerun.user_attrs
        elif o.intermediate_values:
            # It did not train again the epochs the orphan had reported: it replayed the orphan's stage
            # checkpoints or, where the orphan's stages came from the stage cache (a reused stage
            # before the last one keeps no checkpoint of its own), took them from the cache again.
            done, reached = max(o.intermediate_values), max(rerun.intermediate_values)
            assert rerun.user_attrs[st.ATTR_EPOCHS_TRAINED] <= reached - done
            if st.ATTR_REPLAYED_STAGES in rerun.user_attrs:
                assert rerun.user_attrs[st.ATTR_REPLAYED_STAGES] >= len(o.intermediate_values)
            else:
                assert rerun.user_attrs[st.ATTR_EPOCHS_REUSED] >= done
            assert all(rerun.intermediate_values[k] == v for k, v in o.intermediate_values.items())
        if rerun.state == TrialState.COMPLETE:
            # Continued from a stage checkpoint or not, the values are the plan's, bit for bit.
            plan = load_plan_text(rerun.user_attrs[st.ATTR_PLAN])
            torch.set_num_threads(rerun.user_attrs[st.ATTR_THREADS])
            result = run_plan(plan, device="cpu", teacher_cache=studies_root / "teachers", keep_student=False)
            assert [s.val_acc for s in result.stages] == rerun.user_attrs[st.ATTR_STAGE_VAL_ACC]
    # The trials the kill cut short with a stage checkpoint (seen with the search frozen): each
    # rerun went on from that checkpoint, or took the result of its plan finished meanwhile.
    for n in killed_mid_trial:
        assert by_number[n].state == TrialState.FAIL and by_number[n].intermediate_values
        (rerun,) = [t for t in after if n in t.user_attrs.get(st.ATTR_RESUME_FROM, []) and st.counts_toward_budget(t)]
        assert st.is_repeat(rerun) or rerun.user_attrs[st.ATTR_REPLAYED_STAGES] >= 1, rerun.user_attrs
    # Stage checkpoints are only kept while a resume may need them.
    runs = studies_root / "resume" / "trials"
    assert not runs.exists() or not any(runs.iterdir())
    assert not (studies_root / "resume.lock").exists()


@pytest.mark.slow
def test_the_test_split_is_never_touched(main_search, pruned_search, rung_search, resumed_search, access_log, tmp_path, monkeypatch):
    assert not access_log.exists(), access_log.read_text()
    # The instrument works: an explicit test-split access is logged.
    from smskd_search.data import load_data, load_test_split
    from smskd_search.plan import DatasetSpec

    probe = tmp_path / "probe.log"
    monkeypatch.setenv("SMSKD_TEST_ACCESS_LOG", str(probe))
    spec = DatasetSpec(name="digits", val_fraction=0.25)
    load_test_split(spec, load_data(spec).info)
    assert probe.exists()


CACHE_SEARCH = {
    "methods": ["kd", "dkd"],
    # Two orderings of two 1-epoch stages: of three trials, two share their first stage.
    "stages": {"min": 2, "max": 2},
    "epochs": {"min": 1, "max": 1},
    "pruning": {"enabled": False},
    "sampler": {"kind": "random"},
}


@pytest.mark.slow
def test_the_stage_cache_reuses_shared_prefixes_with_the_same_values(studies_root, local_ray):
    runs = {}
    for name, cache in (("cached", True), ("uncached", False)):
        space = load_space(write_space(studies_root, name, CACHE_SEARCH))
        summary = run_search(space, budget=3, studies_dir=studies_root, address="local", seed=0, baselines=False,
                             confirm=None, deterministic=True, cache=cache)
        runs[name] = (summary, sorted(_trials(summary.db_path, name), key=lambda t: t.number))
    (on, with_cache), (off, without) = runs["cached"], runs["uncached"]
    assert [t.state for t in with_cache] == [TrialState.COMPLETE] * 3
    reused = [t.user_attrs[st.ATTR_EPOCHS_REUSED] for t in with_cache]
    assert any(r == 1 for r in reused)  # a trial that shares the first stage of an earlier one
    assert all(t.user_attrs[st.ATTR_EPOCHS_REUSED] + t.user_attrs[st.ATTR_EPOCHS_TRAINED] == 2 for t in with_cache)
    assert [(t.user_attrs[st.ATTR_EPOCHS_REUSED], t.user_attrs[st.ATTR_EPOCHS_TRAINED]) for t in without] == [(0, 2)] * 3
    # The same plans, with the same values: the shared-prefix trials equal their plans trained in full.
    assert [t.user_attrs[st.ATTR_PLAN_KEY] for t in with_cache] == [t.user_attrs[st.ATTR_PLAN_KEY] for t in without]
    assert [t.value for t in with_cache] == [t.value for t in without]
    assert [t.intermediate_values for t in with_cache] == [t.intermediate_values for t in without]
    assert [t.user_attrs[st.ATTR_EPOCH_VAL_ACC] for t in with_cache] == \
        [t.user_attrs[st.ATTR_EPOCH_VAL_ACC] for t in without]
    assert on.epochs_reused == sum(reused) > 0 and off.epochs_reused == 0 and off.epochs_trained == 6
    assert f"{on.epochs_trained} trained, {on.epochs_reused} reused from the stage cache" in format_leaderboard(on)
    assert "6 trained (stage cache off)" in format_leaderboard(off)
    # The training rate: the images the trials trained (epochs trained x the training split: the
    # cached stages not counted) over the span from the first trial's start to the last one's end.
    from smskd_search.data import load_data
    from smskd_search.plan import DatasetSpec
    from smskd_search.search import record as rec

    n_train = load_data(DatasetSpec.model_validate(PROBLEM["dataset"])).info.num_train
    for summary, trials in (runs["cached"], runs["uncached"]):
        images = [t.user_attrs[rec.ATTR_IMAGES_TRAINED] for t in trials]
        assert images == [t.user_attrs[st.ATTR_EPOCHS_TRAINED] * n_train for t in trials]
        starts = [t.user_attrs[rec.ATTR_TRIAL_STARTED_AT] for t in trials]
        ends = [t.user_attrs[rec.ATTR_TRIAL_STARTED_AT] + t.user_attrs[rec.ATTR_TRIAL_SECONDS] for t in trials]
        assert summary.images_per_s == pytest.approx(sum(images) / (max(ends) - min(starts)))
        cpus = int(summary.resources_per_trial["cpu"])  # one trial at a time (deterministic)
        assert f"; {summary.images_per_s:,.0f} training images/s on {cpus} CPU" in format_leaderboard(summary)
    assert any((studies_root / "cache" / "stages").glob("*.pt"))
    from smskd_search.report import write_report

    page = write_report(studies_root, "cached").read_text()
    assert f"Epochs: {on.epochs_trained} trained, {on.epochs_reused} reused from the stage cache." in page


LOGIT_SPACE = {
    "name": "logits",
    "problem": {"dataset": {"name": "digits", "val_fraction": 0.25},
                "teacher": {"arch": "cnn_small", "recipe": {"epochs": 1}}, "student": {"arch": "cnn_nano"}},
    # Augmented batches: the teacher cannot be precomputed over the split, so KD and DKD epochs read
    # its logits from the store (one entry per epoch of the stage's batch stream).
    "recipe": {"augment": {"crop_padding": 1, "flip": True}},
    "search": {"methods": ["kd", "dkd"], "stages": {"min": 1, "max": 1}, "epochs": {"min": 2, "max": 2},
               "pruning": {"enabled": False}},
}


def _logit_search(space, studies: Path, name: str):
    summary = run_search(space, budget=1, study=name, studies_dir=studies, address="local", seed=0, baselines=False,
                         confirm=None, deterministic=True, cpus_per_trial=1)
    (trial,) = _trials(summary.db_path, name)
    assert trial.state == TrialState.COMPLETE and trial.user_attrs[st.ATTR_EPOCHS_TRAINED] == 2, trial.user_attrs
    return summary, trial


def _replay(trial, studies: Path, **kw):
    """The trial's plan run here (its thread count), as run_plan gives it."""
    from smskd_search.engine import run_plan

    torch.set_num_threads(trial.user_attrs[st.ATTR_THREADS])
    result = run_plan(load_plan_text(trial.user_attrs[st.ATTR_PLAN]), device="cpu", teacher_cache=studies / "teachers",
                      keep_student=False, **kw)
    return [m.val_acc for s in result.stages for m in s.epoch_metrics]


@pytest.mark.slow
def test_real_trials_put_and_serve_the_teacher_logit_store(tmp_path, local_ray):
    """Two searches of one trial each, with augmentation, on one studies folder: the first trial's
    teacher logits land in the store with the numbers of a run without it; the second trial trains
    from the store (altered in between, so that only a trial that read it gets its numbers)."""
    from smskd_search.engine import LogitStore

    studies = tmp_path / "studies"
    path = tmp_path / "logits.yaml"
    path.write_text(yaml.safe_dump(LOGIT_SPACE))
    space = load_space(path)
    store = studies / "cache" / "teacher_logits"

    first_summary, first = _logit_search(space, studies, "logits-a")
    entries = sorted(store.glob("*.pt"))
    assert len(entries) == 2, entries  # one per epoch of the stage: the trial put them
    # The store's contract: the values are those of a run without it, bit for bit.
    assert first.user_attrs[st.ATTR_EPOCH_VAL_ACC] == _replay(first, studies)

    # The teacher now says the next class (the batch order and checks kept: the entries still match
    # their streams); the stage cache goes, so that the second trial trains its stage.
    for entry in entries:
        payload = torch.load(entry, map_location="cpu", weights_only=True)
        payload["logits"] = payload["logits"].roll(1, dims=1)
        torch.save(payload, entry)
    import shutil

    shutil.rmtree(studies / "cache" / "stages")
    second_summary, second = _logit_search(space, studies, "logits-b")
    served = _replay(second, studies, logit_store=LogitStore(store))
    assert second.user_attrs[st.ATTR_EPOCH_VAL_ACC] == served != _replay(second, studies)
    assert sorted(store.glob("*.pt")) == entries  # served, nothing new put
    # The study and the summary say how many trained epochs read the teacher from the store.
    from smskd_search.search import record as rec

    assert rec.ATTR_TEACHER_EPOCHS_SERVED not in first.user_attrs and "teacher:" not in format_leaderboard(first_summary)
    assert second.user_attrs[rec.ATTR_TEACHER_EPOCHS_SERVED] == 2 == second_summary.teacher_epochs_served
    assert "teacher:   logits read from the store in 2 of the trained epochs" in format_leaderboard(second_summary)
    from smskd_search.report import write_report

    page = write_report(studies, "logits-b").read_text()
    assert "Teacher logits read from the store in 2 of the trained epochs" in page
    assert "Teacher logits" not in write_report(studies, "logits-a").read_text()


@pytest.mark.slow
def test_concurrent_trials_on_one_stream_run_the_teacher_once_per_epoch(tmp_path, local_ray):
    """The two baselines (KD and DKD, one 2-epoch stage each, the study's seed) run at once, one CPU
    each: between them, each epoch of the stage's batch stream goes through the teacher once (the
    trial that claims it computes it, the other reads it), and both get the numbers of a run alone."""
    studies = tmp_path / "studies"
    path = tmp_path / "logits.yaml"
    path.write_text(yaml.safe_dump(LOGIT_SPACE))
    summary = run_search(load_space(path), budget=2, study="pair", studies_dir=studies, address="local", seed=0,
                         baselines=True, confirm=None, cpus_per_trial=1)
    trials = _trials(summary.db_path, "pair")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 and summary.max_concurrent == 2
    from smskd_search.search import record as rec

    assert len(list((studies / "cache" / "teacher_logits").glob("*.pt"))) == 2  # one entry per epoch
    assert sum(t.user_attrs.get(rec.ATTR_TEACHER_EPOCHS_SERVED, 0) for t in trials) == 2 == summary.teacher_epochs_served
    for t in trials:
        assert t.user_attrs[st.ATTR_EPOCH_VAL_ACC] == _replay(t, studies)


def test_search_cli_turns_the_cache_off():
    from smskd_search.cli import _search_parser

    assert _search_parser("x").parse_args(["--no-cache"]).no_cache
    args = _search_parser("x").parse_args([])
    assert not args.no_cache and args.cache_max_gb == 2.0


def test_the_search_flags_become_one_settings_object():
    from smskd_search.cli import STUDIES_DIR, _search_parser, settings_from_flags
    from smskd_search.search import ConfirmSettings, SearchSettings

    flags = ["--budget", "7", "--no-cache", "--no-prune", "--confirm", "2", "--confirm-seeds", "4", "--cache-max-gb", "0.5",
             "--seed", "3", "--deterministic", "--storage", "/mnt/shared", "--mps"]
    assert settings_from_flags(_search_parser("x").parse_args(flags)) == SearchSettings(
        budget=7, studies_dir=STUDIES_DIR, seed=3, prune=False, confirm=ConfirmSettings(plans=2, seeds=4),
        deterministic=True, cache=False, cache_max_bytes=2**29, storage="/mnt/shared", mps=True)
    assert settings_from_flags(_search_parser("x").parse_args(["--no-confirm"])).confirm is None


def test_a_non_finite_cache_cap_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "smskd_search.cli", "--cache-max-gb", "nan"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "SMSKD_STUDIES": str(tmp_path / "studies")})
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --cache-max-gb must be a finite number > 0 (got nan)"
    assert not (tmp_path / "studies").exists()


def test_the_training_rate_is_per_gpu_where_the_trials_had_gpus():
    from optuna.trial import create_trial

    from smskd_search.search.cluster import TrialResources
    from smskd_search.search.phases import _throughput
    from smskd_search.search.record import records

    def trial(start, seconds, images):
        return create_trial(value=0.5, user_attrs={"trial_started_at": start, "trial_seconds": seconds,
                                                   "images_trained": images})

    # Two trials over 100 s (the first starts at 1000, the last ends at 1100); one from an earlier run.
    recs = records([trial(1000.0, 60.0, 30_000), trial(1040.0, 60.0, 50_000), trial(10.0, 5.0, 99_999)])
    packed = TrialResources({"cpu": 2.0, "gpu": 0.25}, "cuda", concurrent=8)  # 8 trials on 2 GPUs
    assert _throughput(recs, 900.0, packed) == {"images_per_s": 400.0, "throughput_on": "per GPU (2 GPUs)"}
    cpu = TrialResources({"cpu": 1.0}, "cpu", concurrent=2)
    assert _throughput(recs, 900.0, cpu) == {"images_per_s": 800.0, "throughput_on": "on 2 CPUs"}
    assert _throughput(recs, 2000.0, cpu) == {}  # no trial of this run
