"""Run the search's writers on a small study and print what they stored (names and JSON values).

``tests/data/stored_attrs_fc88050.json`` is this script's output at commit fc88050, before the study
record existed: tests/test_study_record.py loads it through the record, and runs this script on the
current code to check that the writers still store the same names and values. Only public entry
points: the study lifecycle, the define-by-run function and Tune's Searcher hooks of the searcher.
"""
import json
import sys
import tempfile
from pathlib import Path

import optuna
import yaml

from smskd_search.search import confirm as cf
from smskd_search.search import lifecycle as lc
from smskd_search.search import storage as st
from smskd_search.search.confirm import ConfirmSettings
from smskd_search.search.leaderboard import rank_by_single_seed
from smskd_search.search.searcher import StudySearcher
from smskd_search.search.trial_report import TrialReport
from smskd_search.search.tune_run import PlanConfigs
from smskd_search.space import load_space

SPACE = {
    "name": "record", "problem": {"dataset": {"name": "digits", "root": "/work/data", "val_fraction": 0.35},
    "teacher": {"arch": "cnn_small", "recipe": {"epochs": 2, "lr": 0.05}}, "student": {"arch": "cnn_nano"}},
    "recipe": {"lr": 0.1},
    "search": {"methods": ["kd", "dkd"], "stages": {"min": 1, "max": 2}, "epochs": {"min": 1, "max": 2},
               "weight_modes": ["inverse"], "lambda_ref": {"low": 0.1, "high": 10.0},
               "sampler": {"kind": "random"}, "baseline_epochs": 2},
}
tmp = Path(tempfile.mkdtemp())
(tmp / "space.yaml").write_text(yaml.safe_dump(SPACE, sort_keys=False))
space = load_space(tmp / "space.yaml")
session = lc.open_session(space, tmp, "rec", resume=False, seed=0, budget=6, storage_root=tmp)
lc.bind_storage_root(session)
session.study.sampler = optuna.samplers.RandomSampler(seed=0)
st.bind_teacher(session.study, teacher_path="/teachers/t.pt", teacher_sha256="f" * 64)
lc.enqueue_baselines(session, space, "f" * 64, 6)
define = PlanConfigs(space.space, "f" * 64, 1, tmp / "runs", "rec", rung_epochs=[1])
s = StudySearcher(session.study, define, pruning=True, stop_reason=lambda tid: "rung 1: 0.1 < 0.5")
clock = [1000.0]
def report(tid, cum, acc, *, final=False, stage_end=True, total=2, replayed=False):
    clock[0] += 1
    s.on_trial_result(tid, TrialReport(val_acc=acc, cum_epochs=cum, stage=1, n_stages=1, final=final, n_val=630,
                                       stage_end=stage_end, total_epochs=total, method="kd", val_loss=0.5,
                                       replayed=replayed, epochs_reused=0, epochs_trained=cum, trial_seconds=clock[0],
                                       trial_started_at=clock[0], node="node-a", epoch_val_acc=[acc]).to_dict())
def complete(tid, cum, acc):
    s.on_trial_complete(tid, TrialReport(val_acc=acc, cum_epochs=cum, final=True, n_val=630, total_epochs=cum,
                                         epochs_trained=cum, trial_seconds=3.0, node="node-a").to_dict())
configs = {}
for i in range(4):
    configs[f"t{i}"] = s.suggest(f"t{i}")
# t0, t1: baselines complete; t2 pruned; t3 fails through the machinery
for tid, acc in (("t0", 0.71), ("t1", 0.69)):
    total = yaml.safe_load(configs[tid]["plan_yaml"])
    cum = sum(x["epochs"] for x in total["stages"])
    report(tid, cum, acc, final=True, total=cum, replayed=True)
    complete(tid, cum, acc)
report("t2", 1, 0.1, stage_end=False)
s.on_trial_complete("t2", TrialReport(val_acc=0.1, cum_epochs=1, stage_end=False, n_val=630).to_dict())
s.on_trial_complete("t3", TrialReport.failure("infrastructure: OSError: disk", total_epochs=2,
                                              traceback="Traceback ...", infrastructure=True).to_dict())
t4 = s.suggest("t4")  # left RUNNING: the orphan of a killed process
st.fail_orphans(session.storage, session.study, "interrupted: the search process ended while this trial ran")
lc.enqueue_retries(session)
for tid in ("t5", "t6"):
    s.suggest(tid)
    s.on_trial_complete(tid, TrialReport(val_acc=0.6, cum_epochs=2, final=True, n_val=630, total_epochs=2).to_dict())
# The plan of trial 5 proposed again: answered from the study (repeat_of), then a new plan is handed out.
session.study.enqueue_trial(session.study.trials[5].params)
s.suggest("t7")
s.on_trial_complete("t7", TrialReport(val_acc=0.65, cum_epochs=2, final=True, n_val=630, total_epochs=2).to_dict())
cf.enqueue(session, rank_by_single_seed(session.trials()), 0, ConfirmSettings(plans=1, baselines=1, seeds=1))
for tid in ("c0", "c1"):
    s.suggest(tid)
    complete(tid, 2, 0.7)
trials = session.study.get_trials(deepcopy=False)
out = {
    "study_user_attrs": session.study.user_attrs,
    "trials": [{"number": t.number, "state": t.state.name, "values": t.values, "params": t.params,
                "distributions": {k: optuna.distributions.distribution_to_json(d) for k, d in t.distributions.items()},
                "intermediate_values": {str(k): v for k, v in t.intermediate_values.items()},
                "user_attrs": t.user_attrs} for t in trials],
}
# Stable across runs: the temporary folder named as one fixed path.
sys.stdout.write(json.dumps(out, indent=1, sort_keys=True).replace(str(tmp), "/studies") + "\n")
