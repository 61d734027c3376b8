"""The stage-level pruning rule, with cutoffs and margins computed by hand, and its Tune scheduler."""

from __future__ import annotations

import math
from types import SimpleNamespace

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial

from smskd_search.search import storage as st
from smskd_search.search.pruning import StageRungs


def test_milestones_match_ray_asha():
    # Ray: int(log(max_t / grace) / log(rf) + 1) rungs at grace * rf**k.
    assert StageRungs(4, 2, 24).milestones == [4, 8, 16]
    assert StageRungs(2, 3, 18).milestones == [2, 6, 18]
    assert StageRungs(3, 2, 5).milestones == [3]
    with pytest.raises(ValueError):
        StageRungs(0, 2, 10)
    with pytest.raises(ValueError):
        StageRungs(4, 1, 10)


def test_first_trial_passes_and_the_cutoff_is_the_quantile():
    r = StageRungs(2, 3, 18)
    assert r.report("a", 2, 0.5) is None  # nothing recorded at rung 2 yet: nothing to compare with
    d = r.report("b", 2, 0.4)  # judged against a alone
    assert d is not None and d.rung == 2 and d.cutoff == pytest.approx(0.5) and d.stop
    r.report("c", 2, 0.7)
    # Values 0.5, 0.4, 0.7 recorded; rf 3 keeps the top third: the 2/3 quantile with linear
    # interpolation over the sorted 0.4, 0.5, 0.7 is at rank 4/3: 0.5 + (1/3)(0.7 - 0.5).
    d = r.report("e", 2, 0.55)
    assert d.cutoff == pytest.approx(0.5 + (0.7 - 0.5) / 3) and d.stop and d.n_recorded == 3
    d = r.report("f", 2, 0.6)
    assert not d.stop  # 0.6 >= 0.5667


def test_values_count_only_at_exactly_a_rungs_epochs_and_once():
    r = StageRungs(4, 2, 24)
    r.report("a", 4, 0.6)
    r.report("a", 8, 0.7)
    assert r.report("b", 2, 0.1) is None  # before the grace period
    # A stage ending past a rung is not compared with values taken at the rung (equal compute only),
    # nor recorded there.
    assert r.report("b", 9, 0.65) is None and r.report("b", 5, 0.1) is None
    assert "b" not in r.recorded(4) and "b" not in r.recorded(8)
    d = r.report("c", 8, 0.65)
    assert d.rung == 8 and d.cutoff == pytest.approx(0.7) and d.stop
    assert r.report("c", 8, 0.1) is None  # judged once per rung
    # A single-stage plan reporting at the rungs mid-stage is judged there; its final value at 24
    # epochs, past the last rung (16), sets no rung's cutoff.
    r.report("single", 16, 0.95)
    r.report("single", 24, 0.99, final=True)
    assert r.recorded(16) == {"single": 0.95} and all(0.99 not in r.recorded(m).values() for m in r.milestones)


def test_noise_margin_is_z_standard_errors_of_the_difference():
    r = StageRungs(4, 2, 24, noise_margin=1.0)
    r.report("a", 4, 0.75, n=500)
    # 0.70 vs cutoff 0.75 on n=500: s.e. of the difference sqrt(.7*.3/500 + .75*.25/500) = 0.028196.
    d = r.report("b", 4, 0.70, n=500)
    assert d.margin == pytest.approx(math.sqrt(0.7 * 0.3 / 500 + 0.75 * 0.25 / 500))
    assert d.margin == pytest.approx(0.028196, abs=1e-6) and d.stop  # 0.70 < 0.7218
    # 0.73 against 0.75 alone: margin sqrt(.73*.27/500 + .75*.25/500) = 0.027735, and 0.73 >= 0.7223:
    # kept, where the stock rule (margin 0) stops it.
    r = StageRungs(4, 2, 24, noise_margin=1.0)
    r.report("a", 4, 0.75, n=500)
    d = r.report("c", 4, 0.73, n=500)
    assert d.margin == pytest.approx(0.027735, abs=1e-6) and not d.stop
    stock = StageRungs(4, 2, 24)
    stock.report("a", 4, 0.75, n=500)
    assert stock.report("c", 4, 0.73, n=500).stop
    # Without the validation size there is no noise estimate: the plain rule.
    r2 = StageRungs(4, 2, 24, noise_margin=1.0)
    r2.report("a", 4, 0.75)
    assert r2.report("b", 4, 0.74).stop


def test_a_last_stage_is_recorded_but_never_stopped():
    r = StageRungs(4, 2, 24)
    r.report("a", 4, 0.8)
    d = r.report("b", 4, 0.5, final=True)
    assert d.cutoff == pytest.approx(0.8) and not d.stop
    assert r.recorded(4) == {"a": 0.8, "b": 0.5}


def test_replay_records_without_deciding():
    r = StageRungs(4, 2, 24)
    r.replay([("x", [(4, 0.6), (8, 0.8)]), ("y", [(2, 0.3), (4, 0.7), (6, 0.75)])])
    assert r.recorded(4) == {"x": 0.6, "y": 0.7} and r.recorded(8) == {"x": 0.8}
    d = r.report("z", 4, 0.62)
    assert d.cutoff == pytest.approx(0.65) and d.stop  # median of 0.6 and 0.7


def test_rungs_of_a_resumed_search_start_from_the_study():
    from smskd_search.search.tune_run import rungs_for
    from smskd_search.space import SearchSpec

    search = SearchSpec.model_validate({"methods": ["kd", "dkd"], "stages": {"min": 1, "max": 2},
                                        "epochs": {"min": 2, "max": 4},
                                        "pruning": {"grace_period": 2, "reduction_factor": 2}})

    def trial(number, state, cum, acc):
        return create_trial(state=state, value=acc[-1] if state == TrialState.COMPLETE else None,
                            params={"x": 1}, distributions={"x": IntDistribution(0, 2)},
                            intermediate_values=dict(zip(cum, acc)) if state != TrialState.FAIL else {},
                            user_attrs={st.ATTR_STAGE_CUM_EPOCHS: cum, st.ATTR_STAGE_VAL_ACC: acc})

    study = optuna.create_study(direction="maximize")
    study.add_trial(trial(0, TrialState.COMPLETE, [2, 4, 5], [0.5, 0.8, 0.85]))
    study.add_trial(trial(1, TrialState.PRUNED, [2, 3], [0.4, 0.45]))
    study.add_trial(trial(2, TrialState.FAIL, [4], [0.99]))  # failed trials do not set the standard
    rungs = rungs_for(search, study.get_trials())
    assert rungs.milestones == [2, 4, 8]
    # Values off the rungs (3 and 5 epochs) are not recorded anywhere: equal compute only.
    assert sorted(rungs.recorded(2).values()) == [0.4, 0.5] and list(rungs.recorded(4).values()) == [0.8]


def test_scheduler_answers_stop_and_says_why():
    from smskd_search.search.scheduler import StageASHAScheduler

    from ray.tune.schedulers import TrialScheduler

    s = StageASHAScheduler(StageRungs(2, 2, 8, noise_margin=1.0))
    a, b, c = (SimpleNamespace(trial_id=x) for x in "abc")
    res = lambda cum, acc, final=False: {"cum_epochs": cum, "val_acc": acc, "n_val": 400, "final": final}  # noqa: E731
    assert s.on_trial_result(None, a, res(2, 0.80)) == TrialScheduler.CONTINUE
    assert s.on_trial_result(None, b, res(2, 0.60)) == TrialScheduler.STOP
    assert s.on_trial_result(None, c, res(2, 0.78)) == TrialScheduler.CONTINUE  # within the margin
    # An error report or a NaN is not a stage value.
    assert s.on_trial_result(None, c, {"cum_epochs": 4, "val_acc": math.nan}) == TrialScheduler.CONTINUE
    assert s.stop_reason("a") is None and s.stop_reason("c") is None
    why = s.stop_reason("b")
    assert why.startswith("stopped at rung 2 (epoch 2): val acc 0.6000 < 0.8000 - margin 0.")
    assert s.set_search_properties("val_acc", "max") and not s.set_search_properties("loss", "min")
    # A baseline is measured in full: below the cutoff, recorded, not stopped.
    d = SimpleNamespace(trial_id="d")
    assert s.on_trial_result(None, d, {**res(2, 0.10), "baseline": True}) == TrialScheduler.CONTINUE
    assert s.rungs.recorded(2)["d"] == 0.10 and s.stop_reason("d") is None
    # A confirmation run (another seed of a plan the rungs have seen, in the budget's Tune run) is
    # neither stopped nor recorded: its value would lift the bar the budget's last trials meet.
    e = SimpleNamespace(trial_id="e")
    assert s.on_trial_result(None, e, {**res(2, 0.05), "confirmation": True}) == TrialScheduler.CONTINUE
    assert s.on_trial_result(None, e, {**res(4, 0.99), "confirmation": True}) == TrialScheduler.CONTINUE
    assert "e" not in s.rungs.recorded(2) and "e" not in s.rungs.recorded(4) and s.stop_reason("e") is None
