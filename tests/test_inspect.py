"""After a search: dashboard, export -> train round trip, verify, report, studies.

One tiny real search (Ray started by the code) is shared by the module; the cases a tiny search
cannot promise (no completed trial, pruned and failed trials) use studies written directly with
Optuna under the same conventions (file = study name, the search's user attributes).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from smskd_search.errors import UserError
from smskd_search.export import export_plans, open_study
from smskd_search.search import rank_trials, run_search
from smskd_search.search import record as rec
from smskd_search.search import storage as st
from smskd_search.search.record import BASELINE_ATTR
from smskd_search.space import load_space, make_plan
from smskd_search.validate import load_plan

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "name": "inspect",
    "problem": {
        "dataset": {"name": "digits", "val_fraction": 0.35},
        "teacher": {"arch": "cnn_small", "recipe": {"epochs": 2, "lr": 0.05}},
        "student": {"arch": "cnn_nano"},
    },
    "recipe": {"lr": 0.1},
    "search": {
        "methods": ["kd", "dkd"],
        "stages": {"min": 1, "max": 2},
        "epochs": {"min": 1, "max": 2},
        "weight_modes": ["inverse"],
        "lambda_ref": {"low": 0.1, "high": 10.0},
        # Grace 2: the 2-stage no-reference baseline reaches its last stage at the first rung, so it
        # completes, and the round trip covers a stage switch.
        "pruning": {"grace_period": 2, "reduction_factor": 2},
        "sampler": {"kind": "tpe", "n_startup_trials": 2},
        "baseline_epochs": 2,
    },
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(*args: str, studies: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "SMSKD_STUDIES": str(studies), "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "smskd_search.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def studies_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("studies")


@pytest.fixture(scope="module")
def space_path(studies_root) -> Path:
    path = studies_root.parent / "inspect-space.yaml"
    path.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_study(studies_root, space_path, local_ray):
    """A real search: 3 enqueued baselines (single:kd, single:dkd, no-reference) and 2 sampled trials."""
    summary = run_search(load_space(space_path), budget=5, study="tiny", studies_dir=studies_root,
                         address="local", max_concurrent=2, seed=0, confirm=None)
    assert summary.counts["COMPLETE"] >= 1
    return summary


def _synthetic_study(studies_dir: Path, name: str, space_path: Path, trials: list[dict]) -> Path:
    """A study file as the search writes it, with hand-made trials (states the test needs for sure)."""
    space = load_space(space_path)
    db = st.db_path(studies_dir, name)
    study = optuna.create_study(study_name=name, storage=st.open_storage(db), direction="maximize")
    for key, value in {"space_path": str(space_path), "space_sha256": space.sha256, "budget": len(trials),
                       "teacher_sha256": "f" * 64}.items():
        study.set_user_attr(key, value)
    dists = {"n_stages": IntDistribution(1, 2), "stage1.method_idx": CategoricalDistribution([0, 1])}
    for i, spec in enumerate(trials):
        plan = make_plan(space.space, spec["stages"], name=f"{name}-trial{i}")
        values = spec.get("stage_values", [])
        cum = [sum(e for _, e in spec["stages"][: k + 1]) for k in range(len(values))]
        attrs = {rec.ATTR_PLAN: plan.to_yaml(), rec.ATTR_SEQUENCE: plan.sequence(), rec.ATTR_TOTAL_EPOCHS: plan.total_epochs,
                 rec.ATTR_THREADS: 1, rec.ATTR_N_VAL: 500, rec.ATTR_STAGE_CUM_EPOCHS: cum, rec.ATTR_STAGE_VAL_ACC: values,
                 **spec.get("attrs", {})}
        state = spec["state"]
        study.add_trial(create_trial(
            state=state, value=values[-1] if state == TrialState.COMPLETE else None,
            params={"n_stages": len(spec["stages"]), "stage1.method_idx": i % 2}, distributions=dists,
            user_attrs=attrs, intermediate_values=dict(zip(cum, values)),
        ))
    return db


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory, space_path) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    _synthetic_study(root, "nocomplete", space_path, [
        {"state": TrialState.PRUNED, "stages": [("kd", 2), ("dkd", 2)], "stage_values": [0.41]},
        {"state": TrialState.FAIL, "stages": [("dkd", 1)], "attrs": {rec.ATTR_FAIL_REASON: "RuntimeError: boom"}},
    ])
    _synthetic_study(root, "mixed", space_path, [
        {"state": TrialState.COMPLETE, "stages": [("kd", 4)], "stage_values": [0.70],
         "attrs": {BASELINE_ATTR: "single:kd"}},
        {"state": TrialState.COMPLETE, "stages": [("dkd", 4)], "stage_values": [0.66],
         "attrs": {BASELINE_ATTR: "single:dkd"}},
        {"state": TrialState.PRUNED, "stages": [("dkd", 2), ("kd", 2)], "stage_values": [0.40],
         "attrs": {BASELINE_ATTR: "no-reference"}},
        {"state": TrialState.COMPLETE, "stages": [("kd", 2), ("dkd", 2)], "stage_values": [0.62, 0.72]},
        {"state": TrialState.PRUNED, "stages": [("dkd", 1), ("kd", 3)], "stage_values": [0.30]},
        {"state": TrialState.FAIL, "stages": [("kd", 1), ("dkd", 1)], "attrs": {rec.ATTR_FAIL_REASON: "ValueError: nan loss"}},
    ])
    return root


# ------------------------------------------------------------------------------------ dashboard
@pytest.mark.slow
def test_dashboard_serves_the_study_and_its_trials(tiny_study, studies_root):
    from _ports import PortTaken, bindable, start_on_a_free_port

    from smskd_search.dashboard import start_dashboard

    db = tiny_study.db_path
    before = sha256(db)

    def start(port: int):
        # A port found free may be taken before the dashboard binds it: then again on another one.
        # Whatever answers is checked below to serve this folder's study, so it is ours.
        try:
            dash = start_dashboard(studies_root, "tiny", host="127.0.0.1", port=port, quiet=True)
        except UserError as exc:
            raise PortTaken(str(exc)) from None
        if dash.wait_ready(timeout=90):
            return dash
        dash.stop()
        if not bindable(port):
            raise PortTaken(f"port {port}")
        raise AssertionError("optuna-dashboard did not answer /api/meta within 90 s")

    dash, _ = start_on_a_free_port(start)
    try:
        assert dash.url == f"http://127.0.0.1:{dash.port}/dashboard/"
        meta = dash.get_json("meta")
        assert isinstance(meta, dict)
        summaries = dash.get_json("studies")["study_summaries"]
        mine = [s for s in summaries if s["study_name"] == "tiny"]
        assert len(mine) == 1 and mine[0]["directions"] == ["maximize"]
        detail = dash.get_json(f"studies/{mine[0]['study_id']}")
        assert detail["name"] == "tiny"
        stored = open_study(db).get_trials(deepcopy=False)
        assert len(detail["trials"]) == len(stored)
        # A budget of 5 trains 5 plans; repeats of finished plans are answered from the study on top.
        assert sum(not st.is_repeat(t) for t in stored) == 5
        for api_trial, t in zip(sorted(detail["trials"], key=lambda x: x["number"]), stored):
            attrs = {a["key"]: a["value"] for a in api_trial["user_attrs"]}
            assert attrs[rec.ATTR_SEQUENCE] == t.user_attrs[rec.ATTR_SEQUENCE]
            assert yaml.safe_load(attrs[rec.ATTR_PLAN])["stages"], "the plan YAML is readable in the dashboard"
            assert api_trial["state"].upper() == t.state.name
            steps = {iv["step"]: iv["value"] for iv in api_trial["intermediate_values"]}
            assert steps == {int(k): v for k, v in t.intermediate_values.items()}
            # A trial answered from the study (its plan had finished already) has no curve of its own.
            assert steps or st.is_repeat(t)
        assert {a["key"]: a["value"] for a in detail["trials"][0]["user_attrs"]}.get(BASELINE_ATTR)
    finally:
        code = dash.stop()
    assert code is not None and dash.process.poll() is not None
    assert sha256(db) == before


def test_dashboard_picks_the_latest_study_and_names_missing_ones(synthetic_root):
    from smskd_search.dashboard import dashboard_command, resolve_db

    old, new = synthetic_root / "nocomplete.db", synthetic_root / "mixed.db"
    os.utime(old, (time.time() - 100, time.time() - 100))
    os.utime(new, None)
    assert resolve_db(synthetic_root, None) == new.resolve()
    with pytest.raises(UserError, match=r"no study 'nope'.*mixed, nocomplete"):
        resolve_db(synthetic_root, "nope")
    cmd = dashboard_command(new, "127.0.0.1", 9999)
    assert Path(cmd[0]).name == "optuna-dashboard" and Path(cmd[0]).parent == Path(sys.executable).parent
    assert cmd[1:] == [f"sqlite:///{new.resolve()}", "--host", "127.0.0.1", "--port", "9999"]


# --------------------------------------------------------------------------- export -> train
def _stage_values_of(results_json: Path) -> list[float]:
    return [s["val_acc"] for s in json.loads(results_json.read_text())["stages"]]


@pytest.mark.slow
def test_export_then_train_reproduces_the_stage_values_bit_for_bit(tiny_study, studies_root, space_path, tmp_path):
    db = tiny_study.db_path
    before = sha256(db)
    r = cli("export", "tiny", "--top", "3", studies=studies_root)
    assert r.returncode == 0, r.stderr
    plans_dir = studies_root / "tiny" / "plans"
    study = open_study(db)
    done = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: (-t.value, t.number))
    files = sorted(plans_dir.glob("rank*.yaml"))
    assert [p.name for p in files] == [f"rank{i}.yaml" for i in range(1, min(3, len(done)) + 1)]
    assert "(n=" in r.stdout and "rank 1: trial #" in r.stdout

    rank1 = load_plan(plans_dir / "rank1.yaml")
    best = done[0]
    prov = rank1.provenance
    assert prov["study"] == "tiny" and prov["trial"] == best.number and prov["rank"] == 1
    assert prov["val_acc"] == best.value and prov["n_val"] == best.user_attrs[rec.ATTR_N_VAL]
    assert [s["val_acc"] for s in prov["stages"]] == best.user_attrs[rec.ATTR_STAGE_VAL_ACC]
    assert [s["cum_epochs"] for s in prov["stages"]] == best.user_attrs[rec.ATTR_STAGE_CUM_EPOCHS]
    assert prov["space_sha256"] == load_space(space_path).sha256 and prov["space_path"] == str(space_path.resolve())
    assert prov["teacher_sha256"] == study.user_attrs["teacher_sha256"] == rank1.teacher_sha256
    assert prov["threads"] == best.user_attrs[rec.ATTR_THREADS] == 1
    assert prov.get("baseline") == best.user_attrs.get(BASELINE_ATTR)
    assert rank1.content_hash() == load_plan_text(best.user_attrs[rec.ATTR_PLAN]).content_hash()

    # The best trial, and the best multi-stage one when the best has a single stage (the reference
    # model and the stage switch are then part of what must reproduce).
    chosen = [(plans_dir / "rank1.yaml", best)]
    multi = sorted((t for t in done if len(t.user_attrs[rec.ATTR_STAGE_VAL_ACC]) > 1),
                   key=lambda t: BASELINE_ATTR in t.user_attrs)  # a reference-active plan first, if any
    assert multi, "the no-reference baseline (2 stages) completes in this space"
    if multi[0].number != best.number:
        r = cli("export", "tiny", "--trial", str(multi[0].number), studies=studies_root)
        assert r.returncode == 0, r.stderr
        chosen.append((plans_dir / f"trial{multi[0].number}.yaml", multi[0]))
    for path, trial in chosen:
        out = tmp_path / path.stem
        r = cli("train", str(path), "--out", str(out), studies=studies_root)
        assert r.returncode == 0, r.stderr
        assert "threads 1)" in r.stdout  # the recorded thread count, not the machine's
        assert _stage_values_of(out / "results.json") == trial.user_attrs[rec.ATTR_STAGE_VAL_ACC]
        results = json.loads((out / "results.json").read_text())
        assert 0.0 <= results["test_acc"] <= 1.0 and results["n_test"] > 0
        assert re.search(r"test acc \d+\.\d+% \(n=\d+, s\.e\. ", r.stdout)
    assert sha256(db) == before, "export must not write to the study"


def load_plan_text(text: str):
    from smskd_search.validate import parse_plan

    return parse_plan(yaml.safe_load(text))


def test_export_refuses_a_study_without_completed_trials(synthetic_root, tmp_path):
    before = sha256(synthetic_root / "nocomplete.db")
    r = cli("export", "nocomplete", studies=synthetic_root)
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: study nocomplete has no completed trial to export (1 pruned, 1 fail); "
                                "pruned and failed trials are never exported")
    assert not (synthetic_root / "nocomplete" / "plans").exists()
    assert sha256(synthetic_root / "nocomplete.db") == before


def test_study_file_is_wal_and_a_reader_sees_what_the_open_writer_committed(tmp_path):
    import sqlite3

    db = tmp_path / "live.db"
    writer = optuna.create_study(study_name="live", storage=st.open_storage(db), direction="maximize")
    writer.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5))
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # The writer's connection stays open, as during a search; its commits sit in the WAL log.
    assert [t.value for t in open_study(db).get_trials(deepcopy=False)] == [0.5]
    writer.add_trial(create_trial(state=TrialState.COMPLETE, value=0.75))
    assert [t.value for t in open_study(db).get_trials(deepcopy=False)] == [0.5, 0.75]


def test_export_ranks_completed_trials_only_and_refuses_other_states(synthetic_root, tmp_path):
    out = tmp_path / "plans"
    written = export_plans(synthetic_root, "mixed", top=10, out=out)
    # Three completed trials, best first; the pruned no-reference baseline (0.40) and the failed
    # trial are never ranked, even with room for ten.
    assert [(e.rank, e.trial, e.val_acc) for e in written] == [(1, 3, 0.72), (2, 0, 0.70), (3, 1, 0.66)]
    assert sorted(p.name for p in out.iterdir()) == ["rank1.yaml", "rank2.yaml", "rank3.yaml"]
    assert load_plan(out / "rank2.yaml").provenance["baseline"] == "single:kd"
    written = export_plans(synthetic_root, "mixed", top=1, out=out)
    assert sorted(p.name for p in out.iterdir()) == ["rank1.yaml"], "stale ranks of the same study are removed"
    with pytest.raises(UserError, match=r"--trial 4: trial 4 of study mixed is PRUNED \(stopped after 1 epoch at val acc 0.3000\)"):
        export_plans(synthetic_root, "mixed", trial=4, out=out)
    with pytest.raises(UserError, match=r"--trial 5: .* is FAIL \(ValueError: nan loss\); only completed trials"):
        export_plans(synthetic_root, "mixed", trial=5, out=out)
    with pytest.raises(UserError, match=r"--trial 9: study mixed has no trial 9"):
        export_plans(synthetic_root, "mixed", trial=9, out=out)
    (e,) = export_plans(synthetic_root, "mixed", trial=1, out=out)
    assert e.path == out / "trial1.yaml" and load_plan(e.path).provenance["rank"] is None
    r = cli("export", "absent", studies=synthetic_root)
    assert r.returncode == 2 and "no study 'absent'" in r.stderr and "mixed, nocomplete" in r.stderr


# ---------------------------------------------------------------------------------------- verify
def test_verify_compares_every_method_and_both_twins_paired_by_seed(space_path):
    from smskd_search.verify import VerifyRow, comparison_plans, judge, paired

    space = load_space(space_path).space
    plan = make_plan(space, [("kd", 2), ("dkd", 1)], lambda_ref=2.0)
    labels = [label for label, _ in comparison_plans(plan)]
    assert labels == ["plan", "single:kd", "single:dkd", "no-reference", "uniform"]
    rows_of = dict(comparison_plans(plan, ["kd", "dkd", "fitnet"], {"fitnet": {"weight": 10.0}}))
    assert list(rows_of) == ["plan", "single:kd", "single:dkd", "single:fitnet", "no-reference", "uniform"]
    assert rows_of["single:kd"].sequence() == "kd(3)" and rows_of["single:fitnet"].stages[0].params == {"weight": 10.0}
    assert rows_of["no-reference"].reference.weight_mode == "none" and rows_of["uniform"].reference.weight_mode == "uniform"
    assert [label for label, _ in comparison_plans(make_plan(space, [("kd", 3)]))] == ["plan"]

    def row(label, accs, seeds=(0, 1, 2)):
        return VerifyRow(label, plan, list(seeds), list(accs), n_test=360)

    # Paired by seed: plan - kd = +1, +2, +3 points: mean 2, s.e. 1/sqrt(3) = 0.577 -> beyond 2 s.e.
    p = paired(row("plan", [0.81, 0.82, 0.83]), row("single:kd", [0.80, 0.80, 0.80]))
    assert p.mean == pytest.approx(0.02) and p.se == pytest.approx(0.01 / 3 ** 0.5) and p.verdict == "better"
    # The same means, unpaired noise: +3, -1, +4 -> s.e. 1.53 points: inside.
    assert paired(row("plan", [0.83, 0.79, 0.84]), row("single:kd", [0.80] * 3)).verdict == "no difference shown"
    assert paired(row("plan", [0.70, 0.71, 0.72]), row("single:kd", [0.80, 0.80, 0.81])).verdict == "worse"
    v = judge([row("plan", [0.81, 0.82, 0.83]), row("single:kd", [0.80] * 3), row("single:dkd", [0.70] * 3)])
    assert v.claim and v.rival.label == "single:kd" and "beats every single method" in v.sentence
    v = judge([row("plan", [0.81, 0.82, 0.83]), row("single:kd", [0.80] * 3), row("single:dkd", [0.83, 0.84, 0.85])])
    assert not v.claim and "WORSE than single:dkd" in v.sentence
    one_seed = judge([row("plan", [0.9], [0]), row("single:kd", [0.5], [0])])
    assert not one_seed.claim and "one seed" in one_seed.sentence
    diverged = row("single:kd", [])
    diverged.diverged = "diverged: non-finite loss at stage 1, epoch 1"
    v = judge([row("plan", [0.81, 0.82, 0.83]), diverged, row("single:dkd", [0.70] * 3)])
    assert v.paired["single:kd"].verdict == "diverged" and v.rival.label == "single:dkd"


@pytest.mark.slow
def test_verify_cli_prints_a_table_per_row(tiny_study, studies_root, space_path, tmp_path):
    from smskd_search.verify import SEED_OFFSET

    space = load_space(space_path).space
    plan = make_plan(space, [("kd", 1), ("dkd", 1)], lambda_ref=1.0,
                     teacher_sha256=open_study(tiny_study.db_path).user_attrs["teacher_sha256"])
    plan = plan.model_copy(update={"provenance": {"threads": 1}})
    path = tmp_path / "plan.yaml"
    path.write_text(plan.to_yaml())
    bad = cli("verify", str(path), "--cache-max-gb", "0", studies=studies_root)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --cache-max-gb must be > 0 (got 0)", bad.stderr
    # Two worker processes: a run gives the same numbers in a worker as here (checked below).
    r = cli("verify", str(path), "--seeds", "2", "--space", str(space_path), "--out", str(tmp_path / "verify.json"),
            "--jobs", "2", studies=studies_root)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "verify.json").read_text())
    from smskd_search.engine import evaluate_test, run_plan

    here = plan.model_copy(update={"seed": plan.seed + SEED_OFFSET + 1, "stages": [plan.stages[0].model_copy(
        update={"epochs": 2})]})
    result = run_plan(here, teacher_cache=studies_root / "teachers")
    single_kd = next(row for row in data["rows"] if row["label"] == "single:kd")
    assert single_kd["test_acc"][1] == evaluate_test(here, result).acc
    assert single_kd["val_acc"][1] == result.final_val_acc
    labels = ["plan", *(f"single:{m}" for m in space.search.methods), "no-reference", "uniform"]
    assert [row["label"] for row in data["rows"]] == labels
    for row in data["rows"]:
        assert row["seeds"] == [plan.seed + SEED_OFFSET, plan.seed + SEED_OFFSET + 1] and len(row["test_acc"]) == 2
        assert row["total_epochs"] == 2 and row["n_test"] > 0
        if row["label"] != "plan":
            d = row["plan_minus_row"]
            mine = data["rows"][0]["test_acc"]
            assert d["mean"] == pytest.approx(sum(a - b for a, b in zip(mine, row["test_acc"])) / 2)
            assert d["verdict"] in ("better", "worse", "no difference shown")
    for label in labels:
        assert re.search(rf"^{re.escape(label)}\s", r.stdout, re.M), r.stdout
    assert "n_test" in r.stdout and "plan vs best single method" in r.stdout and "paired" in r.stdout
    # The twins took the plan's first stage on each seed from the stage cache; the rest was trained.
    by_label = {row["label"]: row for row in data["rows"]}
    assert [(by_label[t]["epochs_reused"], by_label[t]["epochs_trained"]) for t in ("no-reference", "uniform")] == \
        [(2, 2), (2, 2)]
    assert sum(row["epochs_reused"] for row in data["rows"]) == 4
    trained = sum(row["epochs_trained"] for row in data["rows"])
    assert f"epochs: {trained} trained, 4 reused from the stage cache" in r.stdout
    # A second verify of the plan trains nothing, in this process, and gives the same numbers
    # (--cuda-graphs, as train and search take it, changes nothing on a CPU: the same cache keys).
    again = cli("verify", str(path), "--seeds", "2", "--space", str(space_path), "--out", str(tmp_path / "again.json"),
                "--jobs", "1", "--cuda-graphs", studies=studies_root)
    assert again.returncode == 0, again.stderr
    assert f"epochs: 0 trained, {trained + 4} reused from the stage cache" in again.stdout
    second = json.loads((tmp_path / "again.json").read_text())
    assert [(row["label"], row["test_acc"], row["val_acc"]) for row in second["rows"]] == \
        [(row["label"], row["test_acc"], row["val_acc"]) for row in data["rows"]]


# ---------------------------------------------------------------------------------------- report
def _figures(html_text: str) -> dict:
    from smskd_search.report import figures_in

    return figures_in(html_text)


@pytest.mark.slow
def test_report_of_a_real_study_is_self_contained_and_holds_every_figure(tiny_study, studies_root):
    from smskd_search.report import FIGURE_IDS

    db = tiny_study.db_path
    before = sha256(db)
    r = cli("report", "tiny", studies=studies_root)
    assert r.returncode == 0, r.stderr
    page = studies_root / "tiny" / "report.html"
    assert page.is_file() and str(page) in r.stdout
    text = page.read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.I), "the page must load no script"
    assert 'src="http' not in text and "cdn.plot.ly" not in text.split("</head>")[-1]
    assert text.count("<script type=\"text/javascript\">") == 2  # plotly.js once, the drawing code once
    figs = _figures(text)
    assert set(FIGURE_IDS) <= set(figs)
    for fid in FIGURE_IDS:
        assert f'<div id="{fid}" class="figure' in text
        assert figs[fid]["data"], f"{fid} has no trace"
        assert figs[fid]["layout"]["meta"]["id"] == fid and figs[fid]["layout"]["title"]["text"]

    study = open_study(db)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(t.value for t in done)
    hist = {t["name"]: t for t in figs["fig-history"]["data"]}
    assert hist["best so far"]["y"][-1] == best
    assert all(a <= b for a, b in zip(hist["best so far"]["y"], hist["best so far"]["y"][1:]))
    stage_points = sorted((x, y) for tr in figs["fig-stages"]["data"] for x, y in zip(tr["x"], tr["y"]))
    expected = sorted((c, v) for t in trials for c, v in zip(t.user_attrs.get(rec.ATTR_STAGE_CUM_EPOCHS, []),
                                                             t.user_attrs.get(rec.ATTR_STAGE_VAL_ACC, [])))
    assert stage_points == expected
    heat = figs["fig-method-stage"]["data"][0]
    # Every distinct completed plan has a stage 1 (a repeated plan counts once).
    assert heat["type"] == "heatmap" and sum(heat["z"][0]) == len(rank_trials(trials))
    assert 'id="noise-floor"' in text and 'id="top-plans"' in text and 'id="baselines"' in text
    for label in ("single:kd", "single:dkd"):
        assert label in text
    assert "(n=" in text and "standard error" in text
    # A trial's own training rate, from the images and seconds each trial recorded.
    timed = [t.user_attrs for t in trials if t.user_attrs.get(rec.ATTR_IMAGES_TRAINED)]
    images = sum(a[rec.ATTR_IMAGES_TRAINED] for a in timed)
    rate = images / sum(a[rec.ATTR_TRIAL_SECONDS] for a in timed)
    assert images > 0 and f"Training images: {images:,}, {rate:,.0f} a second in a trial on average." in text
    assert sha256(db) == before, "report must not write to the study"


def test_report_marks_pruned_trials_and_says_whether_the_margin_is_noise(synthetic_root, tmp_path):
    from smskd_search.report import write_report

    page = write_report(synthetic_root, "mixed", out=tmp_path / "mixed.html")
    text = page.read_text()
    figs = _figures(text)
    stages = figs["fig-stages"]["data"]
    pruned = [t for t in stages if t["legendgroup"] == "pruned"]
    assert len(pruned) == 2 and all(t["line"]["dash"] == "dash" and t["line"]["color"] == "#9a9a9a" for t in pruned)
    assert sum(1 for t in stages if t["legendgroup"] == "pruned" and t["showlegend"]) == 1
    completed = [t for t in stages if t["legendgroup"] == "completed"]
    assert [list(t["y"]) for t in completed] == [[0.62, 0.72]]
    hist = {t["name"]: t for t in figs["fig-history"]["data"]}
    assert list(hist["pruned (last stage value)"]["x"]) == [2, 4]
    # Winner 0.72 vs best baseline single:kd 0.70 on n=500: gap s.e. ~2.9 points, so 2 points is noise.
    assert re.search(r"leads the best baseline single:kd \(#0, 70\.00%\) by 2\.00 points", text)
    assert "INSIDE the noise floor" in text and 'class="callout inside"' in text
    assert "baseline no-reference (trial #2) was pruned, so it is not compared" in text
    assert "ValueError: nan loss" in text  # the failure reason is on the page
    assert "Parameter importances need at least 4 completed trials" in json.dumps(figs["fig-importance"])
    trans = figs["fig-transitions"]["data"][0]
    assert trans["x"] == trans["y"] and sum(map(sum, trans["z"])) == 1  # kd -> dkd once among completed


def test_noise_floor_sentences():
    from smskd_search.report import TrialRow, noise_floor

    def row(n, value, baseline=None, state="COMPLETE", n_val=500):
        return TrialRow(n, state, value, n_val, "kd(2)", ["kd"], [2], 2, None, None, None, baseline, [(2, value)])

    far = noise_floor([row(1, 0.90), row(0, 0.70, "single:kd")], [row(0, 0.70, "single:kd")])
    assert far.verdict == "beyond-2se" and "beyond two standard errors" in far.sentence and "verify" in far.sentence
    assert "train equally long" not in far.sentence
    longer = row(1, 0.90)
    longer.total_epochs = 6
    unequal = noise_floor([longer, row(0, 0.70, "single:kd")], [row(0, 0.70, "single:kd")])
    assert "did not train equally long (6 against 2 epochs)" in unequal.sentence
    mid = noise_floor([row(1, 0.75), row(0, 0.70, "single:kd")], [row(0, 0.70, "single:kd")])
    assert mid.verdict == "within-2se"  # 5 points, s.e. of the gap ~2.9
    base = noise_floor([row(0, 0.70, "single:kd"), row(1, 0.69)], [row(0, 0.70, "single:kd")])
    assert base.verdict == "winner-is-baseline" and "is 1.00 points behind" in base.sentence
    # Nothing confirmed: the banner says its values are one seed each.
    assert all(n.basis == "single-seed" and "single-seed values" in n.sentence for n in (far, mid, base))
    none = noise_floor([row(1, 0.7)], [])
    assert none.verdict == "no-baseline" and "n_val=500" in none.sentence
    assert noise_floor([], []).verdict == "no-trials"


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.slow
@pytest.mark.real_component("chromium")
def test_report_renders_in_headless_chromium(tiny_study, studies_root, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the report was not rendered")
    from smskd_search.report import write_report

    page = write_report(studies_root, "tiny", out=tmp_path / "report.html")
    png = tmp_path / "report.png"
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={png}",
                        "--window-size=1400,3000", page.resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"no screenshot; chromium said: {r.stderr[-2000:]}"
    assert _png_size(png) == (1400, 3000)
    # A blank page compresses to a few kB; eight drawn figures with text do not.
    assert png.stat().st_size > 60_000
    keep = os.environ.get("SMSKD_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(png, keep)


# --------------------------------------------------------------------------------------- studies
def test_studies_lists_counts_and_best_value(synthetic_root):
    r = cli("studies", studies=synthetic_root)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert "3 complete, 2 pruned, 1 failed" in lines["mixed"] and "best 72.00% (n=500) #3 kd(2) -> dkd(2)" in lines["mixed"]
    assert "0 complete, 1 pruned, 1 failed" in lines["nocomplete"] and "best -" in lines["nocomplete"]


def test_the_report_table_shows_each_confirmed_mean():
    from smskd_search.report import NoiseFloor, TrialRow, _top_table
    from smskd_search.search.confirm import Confirmed

    def row(number: int, value: float) -> TrialRow:
        return TrialRow(number, "COMPLETE", value, 500, "kd(10)", ["kd"], [10], 10, None, None, None, None, [(10, value)])

    html_text = _top_table([row(3, 0.93), row(7, 0.95)], NoiseFloor("no-baseline", ""), 5,
                           {3: Confirmed(3, {1000: 0.90, 1001: 0.80})})
    cells = re.findall(r"<tr><td>(\d)</td><td>#(\d)</td>.*?</tr>", html_text)
    assert cells == [("1", "3"), ("2", "7")]
    assert "<th>confirmed mean ± s.e.</th>" in html_text
    assert "<td>85.00% ± 5.00 (2 seeds)</td>" in html_text  # mean 0.85, s.e. 0.05 over the 2 seeds
    assert html_text.count("<td>-</td>") >= 1  # trial 7 was not confirmed
