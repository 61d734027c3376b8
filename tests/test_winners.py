"""Answers that hold up: a diverged plan fails (engine, `train`, search), a repeated plan is answered
from the study instead of being trained again, and is listed once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import make_plan
from optuna.trial import TrialState

from smskd_search.engine import Diverged, run_plan
from smskd_search.plan import RecipeSpec, save_plan
from smskd_search.search import lifecycle as lc
from smskd_search.search import record as rec
from smskd_search.search import run_search
from smskd_search.search import storage as st
from smskd_search.space import load_space

PROBLEM = {
    "dataset": {"name": "digits", "val_fraction": 0.25},
    "teacher": {"arch": "cnn_small", "recipe": {"epochs": 1}},
    "student": {"arch": "cnn_nano"},
}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> Path:
    """PROBLEM's teacher, trained once for the module's searches (each would otherwise train it in a
    Ray task of its own: a worker start and the training, about 10 s). The teacher's own path through
    the search is tested in tests/test_search.py and tests/test_cluster.py."""
    from smskd_search.engine import ensure_teacher
    from smskd_search.plan import ProblemSpec

    folder = tmp_path_factory.mktemp("winners-teachers")
    ensure_teacher(ProblemSpec.model_validate(PROBLEM), cache_root=folder)
    return folder


def _studies(folder: Path, teachers: Path) -> Path:
    """``folder`` as a studies folder whose teacher cache is ``teachers`` (trained teachers to reuse)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "teachers").exists():
        (folder / "teachers").symlink_to(teachers)
    return folder


def test_a_non_finite_loss_fails_the_plan_at_once(tiny_problem, teacher_cache):
    plan = make_plan(tiny_problem, [("kd", 3), ("dkd", 2)], recipe=RecipeSpec(lr=1e4))
    with pytest.raises(Diverged, match=r"^diverged: non-finite loss at stage 1, epoch 1$"):
        run_plan(plan, teacher_cache=teacher_cache)


def test_train_of_a_diverging_plan_exits_non_zero_with_the_reason(tmp_path, tiny_problem, teacher_cache):
    path = save_plan(make_plan(tiny_problem, [("kd", 2)], recipe=RecipeSpec(lr=1e4)), tmp_path / "hot.yaml")
    studies = _studies(tmp_path / "studies", teacher_cache)  # the session's trained teacher
    proc = subprocess.run([sys.executable, "-m", "smskd_search.cli", "train", str(path), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "SMSKD_STUDIES": str(studies)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: diverged: non-finite loss at stage 1, epoch 1"
    assert "Traceback" not in proc.stderr


def _searcher(define, max_trials=None, max_repeats=30):
    from smskd_search.search.searcher import StudySearcher

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    return StudySearcher(study, define, max_trials=max_trials, max_repeats=max_repeats)


def test_the_searcher_answers_a_finished_plan_from_the_study():
    asked = []

    def define(trial):
        asked.append(trial.number)
        return {"plan_key": "same-plan"}

    s = _searcher(define, max_trials=3, max_repeats=2)
    assert s.suggest("a") == {"plan_key": "same-plan"}
    s.on_trial_result("a", {"val_acc": 0.6, "cum_epochs": 1, "n_val": 100, "epoch_val_acc": [0.6]})
    s.on_trial_complete("a", {"val_acc": 0.7, "cum_epochs": 2, "final": True, "total_epochs": 2, "n_val": 100,
                              "epoch_val_acc": [0.7]})
    # The next two asks sample the same plan: told from trial 0, not handed to Tune; two in a row
    # (max_repeats) and the sampler is taken to have run dry, with 2 of the 3 trials still unspent.
    assert not s.exhausted
    assert s.suggest("b") == "FINISHED" and asked == [0, 1, 2] and s.answered == [1, 2] and s.exhausted
    a, b, c = s.study.trials
    assert a.state == b.state == c.state == TrialState.COMPLETE and a.value == b.value == c.value == 0.7
    assert b.user_attrs[rec.ATTR_REPEAT_OF] == 0 and c.user_attrs[rec.ATTR_STAGE_VAL_ACC] == [0.6, 0.7]
    assert b.user_attrs[rec.ATTR_N_VAL] == 100 and b.intermediate_values == {}  # rungs see it once


def test_answered_repeats_do_not_use_the_budget():
    keys = iter(["p1", "p1", "p1", "p2", "p1", "p3"])
    s = _searcher(lambda trial: {"plan_key": next(keys)}, max_trials=3, max_repeats=3)
    assert s.suggest("a")["plan_key"] == "p1"
    s.on_trial_complete("a", {"val_acc": 0.7, "cum_epochs": 2, "final": True, "total_epochs": 2})
    # Two repeats of p1 (answered), then p2 is handed to Tune: the second of the 3 budget trials.
    assert s.suggest("b")["plan_key"] == "p2" and s.answered == [1, 2]
    # A new plan resets the count in a row: one more repeat is not the end.
    assert s.suggest("c")["plan_key"] == "p3" and s.answered == [1, 2, 4] and not s.exhausted
    assert s.suggest("d") == "FINISHED" and not s.exhausted  # three trials handed: the budget is spent
    assert len(s.study.trials) == 6


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_the_ask_after_a_repeat_explores():
    from smskd_search.search.searcher import StudySearcher

    # A sampler settled on x = 0 (TPE after a good plan, in the extreme): alone it would only repeat.
    settled = optuna.samplers.PartialFixedSampler({"x": 0}, optuna.samplers.RandomSampler(seed=0))
    study = optuna.create_study(direction="maximize", sampler=settled)

    def define(trial):
        return {"plan_key": f"x={trial.suggest_int('x', 0, 10**6)}"}

    s = StudySearcher(study, define, max_trials=3, max_repeats=5,
                      explore=optuna.samplers.RandomSampler(seed=1))
    for tid in "abc":
        assert s.suggest(tid) != "FINISHED"
        s.on_trial_complete(tid, {"val_acc": 0.5, "cum_epochs": 1, "final": True, "total_epochs": 1})
    xs = [t.params["x"] for t in study.trials]
    # x = 0 trained once; each later proposal of it is answered, and the next ask is the explorer's.
    assert xs[0] == 0 and xs[1] == 0 and xs[3] == 0 and 0 not in (xs[2], xs[4]) and len(xs) == 5
    assert s.answered == [1, 3] and study.sampler is settled and not s.exhausted


def test_a_running_plan_or_another_plan_is_trained():
    keys = iter(["p1", "p1", "p2"])
    s = _searcher(lambda trial: {"plan_key": next(keys)})
    assert s.suggest("a")["plan_key"] == "p1"
    assert s.suggest("b")["plan_key"] == "p1"  # p1 is still running: nothing to answer from
    s.on_trial_complete("a", {"val_acc": 0.5, "cum_epochs": 1, "final": True, "total_epochs": 1})
    assert s.suggest("c")["plan_key"] == "p2" and s.answered == []


def _one_stage_space(folder: Path, name: str, methods: list[str]) -> Path:
    """A space of one-stage, one-epoch plans of ``methods`` (baselines one epoch too), unpruned."""
    space = folder / f"{name}.yaml"
    space.write_text(yaml.safe_dump({"name": name, "problem": PROBLEM, "search": {
        "methods": methods, "stages": {"min": 1, "max": 1}, "epochs": {"min": 1, "max": 1}, "baseline_epochs": 1,
        "pruning": {"enabled": False}}}))
    return space


@pytest.mark.slow
def test_search_trains_a_repeated_plan_once_and_lists_it_once(tmp_path, local_ray, teachers):
    # One method, one stage of one epoch: every trial is the same plan (the baseline included).
    space = _one_stage_space(tmp_path, "one", ["kd"])
    summary = run_search(load_space(space), budget=4, studies_dir=_studies(tmp_path, teachers), address="local", max_concurrent=1,
                         confirm=None)
    trials = optuna.load_study(study_name="one", storage=summary.storage_url).get_trials()
    # Repeats are off the budget: the one plan is trained, then the sampler proposes it again
    # MAX_REPEATS_IN_A_ROW times and the search stops as exhausted (not as interrupted).
    n = lc.MAX_REPEATS_IN_A_ROW
    assert summary.done == 1 and summary.stop_reason == "exhausted" and not summary.interrupted
    assert [t.state for t in trials] == [TrialState.COMPLETE] * (1 + n)
    trained = [t for t in trials if rec.ATTR_TRIAL_STARTED_AT in t.user_attrs]  # the trainable ran
    assert [t.number for t in trained] == [0]
    assert [t.user_attrs.get(rec.ATTR_REPEAT_OF) for t in trials] == [None] + [0] * n
    assert len({t.value for t in trials}) == 1
    assert [r.number for r in summary.top] == [0]
    from smskd_search.summary_text import format_leaderboard

    text = format_leaderboard(summary)
    assert summary.n_repeats == n and f"1/4 trials: 1 complete, 0 pruned, 0 failed (+{n} repeats" in text
    assert f"proposed only finished plans {n} times in a row: stopped with 1 of the 4 budget trials" in text
    assert "--resume" not in text


@pytest.mark.slow
def test_search_records_a_diverged_plan_as_failed_and_goes_on(tmp_path, local_ray, teachers):
    space = tmp_path / "hot.yaml"
    space.write_text(yaml.safe_dump({"name": "hot", "problem": PROBLEM, "recipe": {"lr": 1e4}, "search": {
        "methods": ["kd", "dkd"], "stages": {"min": 1, "max": 1}, "epochs": {"min": 1, "max": 2},
        "pruning": {"enabled": False}}}))
    summary = run_search(load_space(space), budget=3, studies_dir=_studies(tmp_path, teachers), address="local", max_concurrent=1,
                         baselines=False)
    trials = optuna.load_study(study_name="hot", storage=summary.storage_url).get_trials()
    assert summary.done == 3 and not summary.interrupted and summary.top == []
    assert re.fullmatch(r"#0: diverged: non-finite loss at stage 1, epoch [12]", summary.all_failed or "")
    for t in trials:
        assert t.state == TrialState.FAIL
        assert re.fullmatch(r"diverged: non-finite loss at stage 1, epoch [12]", t.user_attrs[rec.ATTR_FAIL_REASON])
        assert not t.user_attrs.get(rec.ATTR_INTERRUPTED)
    assert Path(summary.db_path).is_file()


@pytest.mark.slow
def test_confirmation_reruns_the_best_on_fresh_seeds_and_one_ranking_holds(tmp_path, local_ray, teachers):
    from smskd_search.export import export_plans
    from smskd_search.search import ConfirmSettings
    from smskd_search.search.confirm import SEED_OFFSET
    from smskd_search.summary_text import format_leaderboard
    from smskd_search.validate import load_plan

    space = tmp_path / "conf.yaml"
    space.write_text(yaml.safe_dump({"name": "conf", "problem": PROBLEM, "search": {
        "methods": ["kd", "dkd", "fitnet"], "stages": {"min": 1, "max": 2}, "total_epochs": 2,
        "weight_modes": ["inverse"], "pruning": {"enabled": False}, "sampler": {"kind": "random"}}}))
    settings = ConfirmSettings(plans=2, baselines=1, seeds=2)
    # 4 baselines (each method alone, a sequence without reference), then 5 sampled plans.
    summary = run_search(load_space(space), budget=9, studies_dir=_studies(tmp_path, teachers), address="local", max_concurrent=2,
                         confirm=settings)
    trials = optuna.load_study(study_name="conf", storage=summary.storage_url).get_trials()
    runs = [t for t in trials if t.user_attrs.get(rec.ATTR_CONFIRM_OF) is not None]
    # 2 plans + 1 baseline, 2 fresh seeds each; they are study trials with their seed, outside the budget.
    assert len(runs) == 6 and summary.done == 9 and summary.n_confirmation_runs == 6
    assert all(t.state == TrialState.COMPLETE for t in runs)
    assert {t.user_attrs[rec.ATTR_CONFIRM_SEED] for t in runs} == {SEED_OFFSET, SEED_OFFSET + 1}
    for t in runs:
        plan = yaml.safe_load(t.user_attrs[rec.ATTR_PLAN])
        assert plan["seed"] == t.user_attrs[rec.ATTR_CONFIRM_SEED]
        original = trials[t.user_attrs[rec.ATTR_CONFIRM_OF]]
        assert yaml.safe_load(original.user_attrs[rec.ATTR_PLAN])["stages"] == plan["stages"]
    # The recommendation is the best mean over the fresh seeds, not the best single run.
    means = {}
    for t in runs:
        means.setdefault(t.user_attrs[rec.ATTR_CONFIRM_OF], []).append(t.value)
    best = max(means, key=lambda n: (sum(means[n]) / 2, -n))
    assert summary.top[0].number == best
    assert summary.top[0].confirmed.mean == pytest.approx(sum(means[best]) / 2)
    # best.yaml, the leaderboard and export rank 1 name the same plan.
    assert load_plan(summary.best_plan_path).provenance["trial"] == best
    (exported,) = export_plans(tmp_path, "conf", top=1, out=tmp_path / "plans")
    assert exported.trial == best
    text = format_leaderboard(summary)
    assert f"recommended: #{best} " in text and "fresh seeds" in text
    # They ran in the budget's Tune run, in its workers (data and teacher loaded), not in a second one.
    assert [p.name.startswith("run-") for p in (summary.db_path.parent / "conf" / "ray").iterdir()] == [True]


def test_a_resumed_search_runs_waiting_confirmation_runs_and_still_its_whole_budget(tmp_path, local_ray, teachers):
    """Confirmation runs enqueued by a search that then stopped are WAITING in the study; a resumed
    search runs them (off the budget, with no confirmation asked) and trains all its budget trials."""
    from types import SimpleNamespace

    from smskd_search.search import ConfirmSettings
    from smskd_search.search import confirm as cf
    from smskd_search.search.leaderboard import rank_by_single_seed

    space = tmp_path / "left.yaml"
    space.write_text(yaml.safe_dump({"name": "left", "problem": PROBLEM, "search": {
        "methods": ["kd", "dkd"], "stages": {"min": 1, "max": 2}, "total_epochs": 2,
        "weight_modes": ["inverse"], "pruning": {"enabled": False}, "sampler": {"kind": "random"}}}))
    studies = _studies(tmp_path, teachers)
    first = run_search(load_space(space), budget=2, studies_dir=studies, address="local", max_concurrent=1,
                       confirm=None, baselines=False)
    study = optuna.load_study(study_name="left", storage=first.storage_url)
    session = SimpleNamespace(study=study, name="left", trials=study.get_trials)
    assert cf.enqueue(session, rank_by_single_seed(study.get_trials()), load_space(space).space.seed,
                      ConfirmSettings(plans=1, baselines=0, seeds=2)) == 2
    summary = run_search(load_space(space), budget=3, studies_dir=studies, address="local", max_concurrent=1,
                         confirm=None, baselines=False, resume=True)
    trials = study.get_trials()
    runs = [t for t in trials if t.user_attrs.get(rec.ATTR_CONFIRM_OF) is not None]
    assert summary.done == 3 and lc.budget_done(trials) == 3
    assert [t.state for t in runs] == [TrialState.COMPLETE] * 2 and summary.n_confirmation_runs == 2


def _trial(value, state=TrialState.COMPLETE, **attrs):
    from optuna.distributions import IntDistribution
    from optuna.trial import create_trial

    return create_trial(state=state, value=value if state == TrialState.COMPLETE else None, params={"x": 0},
                        distributions={"x": IntDistribution(0, 1)}, user_attrs=attrs)


def test_confirmation_starts_with_the_plans_no_unfinished_trial_can_displace():
    from smskd_search.search import ConfirmSettings
    from smskd_search.search.confirm import candidates, settled
    from smskd_search.search.leaderboard import rank_by_single_seed
    from smskd_search.search.record import BASELINE_ATTR

    key = rec.ATTR_PLAN_KEY
    done = [_trial(0.9, **{key: "a"}), _trial(0.8, **{key: "b"}), _trial(0.7, **{key: "c"}),
            _trial(0.6, **{key: "B", BASELINE_ATTR: "single:kd"})]  # 0..3
    settings = ConfirmSettings(plans=2, baselines=1, seeds=2)

    def numbers(extra):
        study = optuna.create_study(direction="maximize")
        for t in [*done, *extra]:
            study.add_trial(t)
        return [t.number for t in settled(study.get_trials(), settings)]

    # Nothing unfinished: what is settled is what the final ranking confirms.
    assert numbers([]) == [0, 1, 3]
    study = optuna.create_study(direction="maximize")
    for t in done:
        study.add_trial(t)
    assert [t.number for t in candidates(rank_by_single_seed(study.get_trials()), settings)] == [0, 1, 3]
    running = _trial(None, TrialState.RUNNING, **{key: "r"})
    # One plan still running may end first or second: only first place is safe; the baseline is.
    assert numbers([running]) == [0, 3]
    # Two plans running may take both places; a running baseline takes the baseline's.
    assert numbers([running, _trial(None, TrialState.RUNNING, **{key: "s"})]) == [3]
    assert numbers([_trial(None, TrialState.RUNNING, **{key: "R", BASELINE_ATTR: "single:dkd"})]) == [0, 1]
    # A running trial of plan a could become a's best trial (the one confirmation names): a waits
    # (b too, as behind any running plan).
    assert numbers([_trial(None, TrialState.RUNNING, **{key: "a"})]) == [3]
    assert numbers([_trial(None, TrialState.RUNNING, **{key: "a"}), _trial(0.95, **{key: "d"})]) == [5, 3]
    # A waiting trial whose plan is not known yet could be any plan.
    assert numbers([_trial(None, TrialState.WAITING)]) == [3]
    # An infrastructure failure or an interrupted trial is run again: a contender until its rerun is.
    infra = dict(state=TrialState.FAIL, **{key: "f", rec.ATTR_INFRA: True})
    assert numbers([_trial(None, **infra)]) == [0, 3]
    assert numbers([_trial(None, TrialState.FAIL, **{key: "i", rec.ATTR_INTERRUPTED: True})]) == [0, 3]
    # ... (its rerun, number 5 here, finished: nothing unfinished is left)
    assert numbers([_trial(None, **infra), _trial(0.1, **{key: "f", rec.ATTR_RETRY_OF: 4})]) == [0, 1, 3]
    # A plan that failed for good, a pruned one, a repeat and a confirmation run contend for nothing.
    assert numbers([_trial(None, TrialState.FAIL, **{key: "x", rec.ATTR_FAIL_REASON: "diverged"}),
                    _trial(None, TrialState.PRUNED, **{key: "y"}),
                    _trial(None, TrialState.RUNNING, **{key: "z", rec.ATTR_CONFIRM_OF: 0, rec.ATTR_CONFIRM_SEED: 1})]) \
        == [0, 1, 3]


def test_the_searcher_hands_out_follow_ups_as_the_budget_settles_them():
    from smskd_search.search.searcher import StudySearcher

    from ray.tune.search import Searcher

    study = optuna.create_study(direction="maximize")
    for x in (1, 2):  # the budget's two plans, fixed: a sampled 7 or 8 would make a follow-up a repeat
        study.enqueue_trial({"x": x})
    queue: list[list[int]] = []  # what follow_up enqueues at each call (values of x)
    calls = []

    def follow_up() -> int:
        calls.append(sorted(t.state.name for t in study.trials))
        more = queue.pop(0) if queue else []
        for x in more:
            study.enqueue_trial({"x": x})
        return len(more)

    def define(t: optuna.Trial) -> dict:
        x = t.suggest_int("x", 0, 9)
        return {"x": x, "plan_key": f"k{x}"}

    done = {"val_acc": 0.5, "cum_epochs": 2, "final": True, "total_epochs": 2}
    s = StudySearcher(study, define, pruning=False, max_trials=2, follow_up=follow_up)
    assert "x" in s.suggest("b1") and "x" in s.suggest("b2") and calls == []
    # The budget is handed out and both trials run: follow_up finds nothing settled; wait.
    assert s.suggest("t") is None and len(calls) == 1
    assert s.suggest("t") is None and len(calls) == 1  # nothing told since: not asked again
    queue.append([7, 8])  # b2 still runs, yet two runs are settled once b1 is told
    s.on_trial_complete("b1", done)
    # Enqueued as b1 is told (before Tune's callbacks hear of it), not at the next ask.
    assert calls[-1] == ["COMPLETE", "RUNNING"] and s.followed == 2
    assert s.suggest("f1") == {"x": 7, "plan_key": "k7"}
    assert s.suggest("f2") == {"x": 8, "plan_key": "k8"} and len(calls) == 2
    assert s.suggest("t") is None and len(calls) == 2  # b2 still runs; nothing told since
    s.on_trial_complete("f1", done)
    # The last follow-up repeats a finished plan: answered from the study, and none is sampled in its place.
    queue.append([7])
    s.on_trial_complete("b2", done)
    assert s.followed == 3
    # (FINISHED while f2 runs: Tune waits for the trials it has.)
    assert s.suggest("t") == Searcher.FINISHED
    assert len(study.trials) == 5 and study.trials[-1].user_attrs[rec.ATTR_REPEAT_OF] == 2
    s.on_trial_complete("f2", done)
    assert s.suggest("t") == Searcher.FINISHED


def test_a_confirmation_run_left_waiting_runs_off_the_budget_of_a_resumed_search():
    """A search stopped after it enqueued confirmation runs leaves them WAITING, and Optuna asks
    enqueued trials first: the next budget round hands such a run out without counting it, so the
    budget still gets its own trials; a round of confirmation runs alone counts its runs."""
    from smskd_search.search.searcher import StudySearcher

    from ray.tune.search import Searcher

    def define(t: optuna.Trial) -> dict:
        x = t.suggest_int("x", 0, 9)
        return {"x": x, "plan_key": f"k{x}-{t.user_attrs.get('confirm_seed')}",
                "confirmation": t.user_attrs.get("confirm_of") is not None}

    done = {"val_acc": 0.5, "cum_epochs": 2, "final": True, "total_epochs": 2}
    for off_budget, handed in ((True, 3), (False, 2)):
        study = optuna.create_study(direction="maximize")
        study.enqueue_trial({"x": 3}, user_attrs={"confirm_of": 0, "confirm_seed": 7})
        s = StudySearcher(study, define, pruning=False, max_trials=2, confirmations_off_budget=off_budget)
        configs = []
        while isinstance(c := s.suggest(f"t{len(configs)}"), dict):
            configs.append(c)
        assert [c["confirmation"] for c in configs] == [True] + [False] * (handed - 1)
        assert s.suggest("t") in (None, Searcher.FINISHED)  # the budget is handed out
        for i in range(handed):
            s.on_trial_complete(f"t{i}", done)
        assert s.suggest("t") == Searcher.FINISHED and s.followed == (1 if off_budget else 0)


def _fingerprint(db: Path, name: str) -> list[tuple]:
    trials = optuna.load_study(study_name=name, storage=st.storage_url(db)).get_trials()
    # Everything but timings and names (the plan's name carries the study's).
    return [(t.number, t.state, t.params, t.values, t.intermediate_values, t.user_attrs.get(rec.ATTR_PLAN_KEY),
             t.user_attrs.get(rec.ATTR_PRUNED_REASON), t.user_attrs.get(rec.ATTR_CONFIRM_SEED)) for t in trials]


@pytest.mark.slow
def test_two_deterministic_runs_give_the_same_study(tmp_path, local_ray, teachers):
    from smskd_search.search import ConfirmSettings

    space = tmp_path / "det.yaml"
    space.write_text(yaml.safe_dump({"name": "det", "problem": PROBLEM, "search": {
        "methods": ["kd", "dkd", "fitnet"], "stages": {"min": 1, "max": 2}, "total_epochs": 3,
        "weight_modes": ["inverse", "none"], "baseline_epochs": 3,
        "pruning": {"grace_period": 1, "reduction_factor": 2, "noise_margin": 0.0},
        "sampler": {"kind": "tpe", "n_startup_trials": 2}}}))
    runs = []
    for name in ("det-a", "det-b"):
        summary = run_search(load_space(space), budget=8, study=name, studies_dir=_studies(tmp_path, teachers), address="local",
                             seed=3, deterministic=True, confirm=ConfirmSettings(plans=1, baselines=1, seeds=1))
        assert summary.max_concurrent == 1
        # A finished study is one file: the write-ahead log is folded back in.
        assert not Path(f"{summary.db_path}-wal").exists() and not Path(f"{summary.db_path}-shm").exists()
        # ... and reading it (the studies listing) leaves it so.
        (info,) = [i for i in st.list_studies(tmp_path) if i.name == name]
        # The budget's 8 trials, beside them the repeats answered from the study and the confirmation runs.
        assert info.n_trials == 8 and info.n_repeats == summary.n_repeats
        assert info.n_confirmation_runs == len(_fingerprint(summary.db_path, name)) - 8 - info.n_repeats
        assert not Path(f"{summary.db_path}-wal").exists()
        runs.append(_fingerprint(summary.db_path, name))
    assert len(runs[0]) > 8 and runs[0] == runs[1]  # the budget and the confirmation runs
    assert any(t[1] == TrialState.PRUNED for t in runs[0])  # the rungs decided something, the same way twice


def test_deterministic_refuses_concurrency_before_anything_is_written(tmp_path):
    from smskd_search.errors import UserError

    space = tmp_path / "d.yaml"
    space.write_text(yaml.safe_dump({"name": "d", "problem": PROBLEM,
                                     "search": {"methods": ["kd"], "stages": {"min": 1, "max": 1}}}))
    with pytest.raises(UserError, match="--max-concurrent 2: --deterministic runs one trial at a time"):
        run_search(load_space(space), studies_dir=tmp_path / "studies", deterministic=True, max_concurrent=2)
    assert not (tmp_path / "studies").exists()


def test_confirmation_knows_what_it_still_lacks():
    from optuna.distributions import IntDistribution
    from optuna.trial import create_trial

    from smskd_search.search import ConfirmSettings
    from smskd_search.search.confirm import SEED_OFFSET, candidates, confirmations, missing
    from smskd_search.search.leaderboard import rank_by_single_seed, rank_trials
    from smskd_search.search.record import BASELINE_ATTR

    def trial(value, state=TrialState.COMPLETE, **attrs):
        return create_trial(state=state, value=value if state == TrialState.COMPLETE else None, params={"x": 0},
                            distributions={"x": IntDistribution(0, 1)},
                            user_attrs={rec.ATTR_PLAN_KEY: f"k{value}-{attrs}", **attrs})

    study = optuna.create_study(direction="maximize")
    study.add_trial(trial(0.80, **{BASELINE_ATTR: "single:kd"}))  # 0
    study.add_trial(trial(0.90))  # 1: best on one seed
    study.add_trial(trial(0.85))  # 2
    s0, s1 = SEED_OFFSET, SEED_OFFSET + 1
    for of, seed, value in ((1, s0, 0.70), (1, s1, 0.72), (2, s0, 0.84), (0, s0, 0.82), (0, s1, 0.80)):
        study.add_trial(trial(value, **{rec.ATTR_CONFIRM_OF: of, rec.ATTR_CONFIRM_SEED: seed}))
    # Trial 2's second seed was cut short by a stop.
    study.add_trial(trial(None, state=TrialState.FAIL, **{rec.ATTR_CONFIRM_OF: 2, rec.ATTR_CONFIRM_SEED: s1,
                                                          rec.ATTR_INTERRUPTED: True}))
    trials = study.get_trials()
    settings = ConfirmSettings(plans=2, baselines=1, seeds=2)
    ranked = rank_by_single_seed(trials)
    assert [t.number for t in candidates(ranked, settings)] == [1, 2, 0]
    assert missing(trials, ranked, 0, settings) == 1
    conf = confirmations(trials)
    assert conf[1].mean == pytest.approx(0.71) and conf[2].n == 1 and conf[0].paired_difference(conf[1])[0] == \
        pytest.approx(0.10)
    # The one ranking: confirmed means first (2: 0.84 on one seed, 0: 0.81, 1: 0.71), not the single-seed 0.90.
    assert [t.number for t in rank_trials(trials)] == [2, 0, 1]


@pytest.mark.parametrize("flags, line", [
    (["--gpus-per-trial", "-1"], "error: --gpus-per-trial must be >= 0 (got -1)"),
    (["--max-concurrent", "0"], "error: --max-concurrent must be >= 1 (got 0)"),
    (["--cpus-per-trial", "0"], "error: --cpus-per-trial must be > 0 (got 0)"),
    (["--confirm-seeds", "-1"], "error: --confirm/--confirm-seeds must be >= 0 (got 3 plans, -1 seeds)"),
    (["--deterministic", "--max-concurrent", "2"], "error: --max-concurrent 2: --deterministic runs one trial at a time"),
])
def test_bad_search_flags_are_refused_before_anything_is_written(tmp_path, flags, line):
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "keep.txt").write_text("untouched")
    before = sorted((p.name, p.read_bytes()) for p in studies.iterdir())
    proc = subprocess.run([sys.executable, "-m", "smskd_search.cli", "--budget", "2", *flags],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "SMSKD_STUDIES": str(studies)})
    assert proc.returncode == 2 and proc.stderr.strip() == line and "Traceback" not in proc.stderr
    assert sorted((p.name, p.read_bytes()) for p in studies.iterdir()) == before  # studies/ byte-identical


@pytest.mark.slow
def test_a_search_whose_trials_all_fail_exits_non_zero_with_the_first_reason(tmp_path, teachers):
    space = tmp_path / "hot.yaml"
    space.write_text(yaml.safe_dump({"name": "hot", "problem": PROBLEM, "recipe": {"lr": 1e4}, "search": {
        "methods": ["kd"], "stages": {"min": 1, "max": 1}, "epochs": {"min": 1, "max": 1},
        "pruning": {"enabled": False}}}))
    proc = subprocess.run([sys.executable, "-m", "smskd_search.cli", "--space", str(space), "--budget", "2",
                           "--max-concurrent", "1", "--no-baselines", "--no-confirm"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SMSKD_STUDIES": str(_studies(tmp_path / "studies", teachers))})
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: all 2 trial(s) of study hot failed; the first, #0: diverged: non-finite loss at stage 1, "
                      "epoch 1"]
    assert "Traceback" not in proc.stderr


def test_infrastructure_errors_are_told_apart_from_plan_failures():
    from smskd_search.engine import UnsafeCheckpoint
    from smskd_search.search.trainable import is_infrastructure_error

    assert is_infrastructure_error(OSError(28, "No space left on device"))
    assert is_infrastructure_error(PermissionError(13, "Permission denied"))
    assert is_infrastructure_error(MemoryError())
    assert is_infrastructure_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    # The plan's own failures are not retried: a divergence, a bad setting, a refused checkpoint.
    assert not is_infrastructure_error(Diverged("diverged: non-finite loss at stage 1, epoch 1"))
    assert not is_infrastructure_error(UnsafeCheckpoint("stage checkpoint x does not load"))
    assert not is_infrastructure_error(ValueError("crd needs the labels"))
    assert not is_infrastructure_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


@pytest.mark.slow
def test_an_infrastructure_failure_is_retried_off_the_budget(tmp_path, local_ray, teachers):
    # The first trial's folder cannot be made (a file is in the way: what a full or read-only disk
    # looks like to the trial). It fails through no fault of its plan: retried, and the budget of 2
    # still gets 2 trials that ran.
    space = _one_stage_space(tmp_path, "infra", ["kd", "dkd"])
    (tmp_path / "infra" / "trials").mkdir(parents=True)
    (tmp_path / "infra" / "trials" / "00000").write_text("in the way")
    summary = run_search(load_space(space), budget=2, studies_dir=_studies(tmp_path, teachers), address="local", max_concurrent=1,
                         confirm=None)
    trials = optuna.load_study(study_name="infra", storage=summary.storage_url).get_trials()
    first = trials[0]
    assert first.state == TrialState.FAIL and first.user_attrs.get(rec.ATTR_INFRA) is True
    assert not st.counts_toward_budget(first)
    retry = [t for t in trials if t.user_attrs.get(rec.ATTR_RETRY_OF) == 0]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].user_attrs[rec.ATTR_PLAN_KEY] == first.user_attrs[rec.ATTR_PLAN_KEY]  # the same plan again
    assert summary.done == 2 and summary.n_infrastructure == 1 and summary.all_failed is None
    assert sum(1 for t in trials if st.counts_toward_budget(t)) == 2
    from smskd_search.summary_text import format_leaderboard

    text = format_leaderboard(summary)
    assert "2/2 trials: 2 complete, 0 pruned, 0 failed" in text and "(+1 failed by the infrastructure" in text


@pytest.mark.slow
def test_a_search_the_infrastructure_keeps_failing_stops_with_that_reason(tmp_path, local_ray, teachers):
    # No trial folder can be made at all (a file where the trials' folder goes): the plan is tried
    # 3 times in all, then the search stops short of its budget, saying why, instead of looping.
    space = _one_stage_space(tmp_path, "broken", ["kd"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "trials").write_text("in the way")
    summary = run_search(load_space(space), budget=1, studies_dir=_studies(tmp_path, teachers), address="local", max_concurrent=1,
                         confirm=None)
    trials = optuna.load_study(study_name="broken", storage=summary.storage_url).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert all(t.user_attrs.get(rec.ATTR_INFRA) for t in trials)
    # The trial says what the machine refused (reported by the trial, not a raise Tune retries first).
    assert all(t.user_attrs[rec.ATTR_FAIL_REASON] == f"infrastructure: NotADirectoryError: [Errno 20] Not a directory: "
               f"'{tmp_path / 'broken' / 'trials' / f'{t.number:05d}'}'" for t in trials), [t.user_attrs for t in trials]
    assert [t.user_attrs.get(rec.ATTR_RETRY_OF) for t in trials] == [None, 0, 1]
    assert summary.done == 0 and summary.stop_reason == "infrastructure" and summary.n_infrastructure == 3
    from smskd_search.summary_text import format_leaderboard

    assert "stopped:   infrastructure failures (retried, still failing) before the budget" in format_leaderboard(summary)


def test_the_progress_line_counts_confirmation_runs_apart_until_the_budget_ends():
    from types import SimpleNamespace

    from smskd_search.search.progress import progress_callback
    from smskd_search.summary_text import progress_line

    seen, enqueued = [], [0]
    cb = progress_callback(seen.append, "s", budget=2, before=[], start=0.0, confirm_runs=lambda: enqueued[0])

    def trial(tid, status, confirmation=False, result=None):
        return SimpleNamespace(trial_id=tid, status=status, config={"confirmation": confirmation, "sequence": "kd(2)"},
                               last_result=result)

    final = {"val_acc": 0.5, "cum_epochs": 2, "final": True}
    b1, b2 = trial("b1", "RUNNING", result=final), trial("b2", "RUNNING")
    cb.on_trial_complete(0, [b1, b2], b1)
    b1.status, enqueued[0] = "TERMINATED", 2
    c1 = trial("c1", "RUNNING", True, final)
    cb.on_step_end(0, [b1, b2, c1])
    # b2 still runs: the budget's line, with the confirmation run beside it.
    p = seen[-1]
    assert (p.phase, p.done, p.running, p.confirm_running) == ("search", 1, 1, 1)
    assert progress_line(p).endswith("best 50.00%  confirming 1 (0 done)")
    cb.on_trial_complete(0, [b1, b2, c1], c1)
    c1.status, b2.last_result = "TERMINATED", final
    cb.on_trial_complete(0, [b1, b2, c1], b2)
    # The budget is done: the confirmation's line, its runs counted apart from the budget's.
    p = seen[-1]
    assert (p.phase, p.budget, p.done, p.complete, p.running) == ("confirm", 2, 1, 1, 0)
    assert "confirming on fresh seeds: 1/2 runs" in progress_line(p)
