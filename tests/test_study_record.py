"""The study record: stored studies load through it, the writers keep the format, nobody else spells
a stored name, the search's modules import without a circle, and the report's noise-floor banner
compares like with like."""

from __future__ import annotations

import ast
import dataclasses
import html
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import json_to_distribution
from optuna.trial import TrialState, create_trial

from smskd_search.search import record as rec
from smskd_search.search.record import StudyAttrs, TrialAttrs, TrialRecord, confirmations
from smskd_search.space import load_space, make_plan

optuna.logging.set_verbosity(optuna.logging.WARNING)

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
FIXTURE = DATA / "stored_attrs_fc88050.json"


def _study_from_dump(dump: dict, db: Path, name: str = "rec") -> optuna.Study:
    """An SQLite study holding exactly the dumped attributes (names and JSON values as stored)."""
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{db}", direction="maximize")
    for key, value in dump["study_user_attrs"].items():
        study.set_user_attr(key, value)
    for t in dump["trials"]:
        state = TrialState[t["state"]]
        study.add_trial(create_trial(
            state=state, values=t["values"] if state == TrialState.COMPLETE else None, params=t["params"],
            distributions={k: json_to_distribution(v) for k, v in t["distributions"].items()},
            intermediate_values={int(k): v for k, v in t["intermediate_values"].items()}, user_attrs=t["user_attrs"]))
    return study


# --------------------------------------------------------------------------- stored data stays readable
def test_attributes_written_before_the_record_load_through_it(tmp_path):
    dump = json.loads(FIXTURE.read_text())
    study = _study_from_dump(dump, tmp_path / "rec.db")
    loaded = optuna.load_study(study_name="rec", storage=f"sqlite:///{tmp_path / 'rec.db'}")
    frozen = loaded.get_trials(deepcopy=False)
    records = [TrialRecord.from_trial(t) for t in frozen]

    # Every stored name is one the record knows, and reads back without loss.
    for t, r in zip(frozen, records):
        assert r.attrs.stored() == t.user_attrs, f"trial {t.number}"
    # The fixture covers every name the record knows but those added after it, and the record a field for each.
    # Each trial's training images (the summary's images/s), the epochs whose teacher logits it read
    # from the store and the seconds it waited for other trials' parts (the summary's teacher line).
    added_since = {"images_trained", "teacher_epochs_served", "teacher_wait_s"}
    assert {k for t in dump["trials"] for k in t["user_attrs"]} == rec.TRIAL_ATTR_NAMES - added_since
    assert len(rec.TRIAL_ATTR_NAMES) == len(dataclasses.fields(TrialAttrs)) == 33
    assert set(dump["study_user_attrs"]) == rec.STUDY_ATTR_NAMES

    attrs = StudyAttrs.of(study)
    assert attrs.stored() == dump["study_user_attrs"]
    assert (attrs.budget, attrs.seed, attrs.teacher_sha256, attrs.storage_root) == (6, 0, "f" * 64, "/studies")

    base, other_base, pruned, infra, orphan, retry, _, repeat, _, conf_a, conf_b = records
    assert base.state == TrialState.COMPLETE and base.value == 0.71 and base.baseline == "single:kd"
    assert base.plan is not None and base.plan.sequence() == base.sequence and base.total_epochs == base.plan.total_epochs
    assert base.plan_key == base.plan.canonical_hash() and base.n_val == 630
    assert base.stage_values == [(2, 0.71)] and base.attrs.epoch_val_acc == (None, 0.71)
    assert base.attrs.replayed_stages == 1 and base.attrs.node == "node-a" and base.attrs.data_root == "/work/data"
    assert pruned.state == TrialState.PRUNED and pruned.attrs.pruned_reason == "rung 1: 0.1 < 0.5"
    assert pruned.last_value == 0.1 and pruned.value is None and pruned.epochs_trained == 1
    assert infra.infrastructure and not infra.interrupted and not infra.finished_for_good
    assert infra.attrs.fail_traceback == "Traceback ..." and not infra.counts_toward_budget
    assert orphan.interrupted and orphan.attrs.fail_reason.startswith("interrupted")
    assert retry.attrs.retry_of == 3 and retry.attrs.resume_from == (3,) and retry.counts_toward_budget
    assert repeat.is_repeat and repeat.attrs.repeat_of == 5 and not repeat.counts_toward_budget
    assert {conf_a.phase, conf_b.phase} == {"confirm"} and base.phase == "search"
    assert conf_a.plan is not None and conf_a.plan.seed == conf_a.attrs.confirm_seed == 1000
    assert {n: c.by_seed for n, c in confirmations(frozen).items()} == {
        conf_a.attrs.confirm_of: {1000: 0.7}, conf_b.attrs.confirm_of: {1000: 0.7}}
    assert sum(r.counts_toward_budget for r in records) == 6


def test_the_study_commands_read_a_study_written_before_the_record(tmp_path):
    from smskd_search.export import export_plans
    from smskd_search.report import collect
    from smskd_search.search.leaderboard import leaderboard, rank_trials
    from smskd_search.search.storage import study_info

    dump = json.loads(FIXTURE.read_text())
    db = tmp_path / "rec.db"
    study = _study_from_dump(dump, db)
    info = study_info(db)
    ranked = rank_trials(study.get_trials(deepcopy=False))
    assert info.best_trial == ranked[0].number and info.n_confirmation_runs == 2 and info.n_repeats == 1
    assert info.best_confirmed_seeds == 1 and info.budget == 6
    rows = leaderboard(study, study.get_trials(deepcopy=False), multi=False)
    assert [r.number for r in rows] == [r.number for r in ranked] and rows[0].confirmed is not None
    written = export_plans(tmp_path, "rec", top=2, out=tmp_path / "plans")
    prov = yaml.safe_load(written[0].path.read_text())["provenance"]
    assert prov["trial"] == ranked[0].number and prov["n_val"] == 630 and prov["teacher_path"] == "/teachers/t.pt"
    data = collect(study, db)
    assert data.noise.basis == "confirmed" and len(data.rows) == 9  # the two confirmation runs are not rows


@pytest.mark.slow
def test_the_writers_store_what_they_stored_before_the_record(tmp_path):
    """tests/data/write_stored_attrs.py made the fixture at fc88050; on this code it must write the
    same names and values (the stage report times are wall-clock times: their count is compared)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, str(DATA / "write_stored_attrs.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    now, then = json.loads(out.stdout), json.loads(FIXTURE.read_text())
    assert now["study_user_attrs"] == then["study_user_attrs"]
    assert len(now["trials"]) == len(then["trials"])
    for a, b in zip(now["trials"], then["trials"]):
        ta, tb = a.pop("user_attrs"), b.pop("user_attrs")
        assert len(ta.pop("stage_reported_at", [])) == len(tb.pop("stage_reported_at", [])), a["number"]
        assert (a, ta) == (b, tb)


# --------------------------------------------------------------------------- one module spells the names
def test_only_the_record_reads_or_writes_stored_attributes():
    offenders = []
    for path in sorted((ROOT / "smskd_search").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "smskd_search/search/record.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("user_attrs", "system_attrs"):
                offenders.append(f"{rel}:{node.lineno} reads .{node.attr}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("set_user_attr", "set_trial_user_attr"):
                offenders.append(f"{rel}:{node.lineno} calls {node.func.attr}")
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.startswith("ATTR_")
                                                      for t in node.targets):
                offenders.append(f"{rel}:{node.lineno} defines a stored name")
    assert offenders == []


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules ``path`` imports anywhere in it (function-level imports included);
    a package's ``__init__`` is not counted (importing a submodule always runs it)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            names = subs or [node.module]
        out |= {n for n in names if n in modules and modules[n].name != "__init__.py"}
    return out


def test_the_package_imports_without_a_circle():
    modules = {}
    for path in (ROOT / "smskd_search").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    done: set[str] = set()

    def visit(m: str, trail: list[str]) -> None:
        if m in trail:
            raise AssertionError("import circle: " + " -> ".join(trail[trail.index(m):] + [m]))
        if m in done:
            return
        for n in sorted(graph[m]):
            visit(n, trail + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


# --------------------------------------------------------------------------- the noise-floor banner
SPACE = {
    "name": "banner",
    "problem": {"dataset": {"name": "digits"}, "teacher": {"arch": "cnn_small"}, "student": {"arch": "cnn_nano"}},
    "search": {"methods": ["kd", "dkd"], "stages": {"min": 1, "max": 2}, "epochs": {"min": 1, "max": 4}},
}


def _banner_study(tmp_path: Path, single: dict[str, float], confirmed: dict[str, list[float]]) -> tuple[optuna.Study, Path]:
    """A real SQLite study: baseline ``kd`` (#0) and the searched plan ``kd -> dkd`` (#1) with their
    single-seed values, and confirmation runs on seeds 1000.. where ``confirmed`` gives them."""
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    space = load_space(tmp_path / "space.yaml")
    db = tmp_path / "banner.db"
    study = optuna.create_study(study_name="banner", storage=f"sqlite:///{db}", direction="maximize")
    plans = {"kd": make_plan(space.space, [("kd", 4)]), "kd -> dkd": make_plan(space.space, [("kd", 2), ("dkd", 2)])}

    def add(value: float, attrs: TrialAttrs) -> None:
        study.add_trial(create_trial(value=value, user_attrs=attrs.stored(), intermediate_values={4: value}))

    for label, plan in plans.items():
        add(single[label], TrialAttrs(plan_yaml=plan.to_yaml(), sequence=plan.sequence(), total_epochs=4, n_val=630,
                                      stage_cum_epochs=(4,), stage_val_acc=(single[label],),
                                      baseline="single:kd" if label == "kd" else None))
    for number, label in enumerate(plans):
        for i, v in enumerate(confirmed.get(label, [])):
            add(v, TrialAttrs(plan_yaml=plans[label].to_yaml(), sequence=plans[label].sequence(), total_epochs=4,
                              n_val=630, confirm_of=number, confirm_seed=1000 + i))
    return study, db


def test_the_banner_compares_confirmed_means_when_confirmation_ran(tmp_path):
    """The searched plan leads the baseline by 1.39 points on its one seed and trails it by 2.38 on
    the three confirmation seeds: the banner must say it trails (not "is -1.39 points behind")."""
    from smskd_search.report import collect, render_html

    study, db = _banner_study(tmp_path, {"kd": 0.7000, "kd -> dkd": 0.7139},
                              {"kd": [0.7500, 0.7600, 0.7400], "kd -> dkd": [0.7252, 0.7372, 0.7162]})
    data = collect(study, db)
    noise = data.noise
    assert [r.number for r in data.ranked] == [0, 1]  # by confirmed mean: the baseline first
    assert (noise.verdict, noise.basis, noise.seeds) == ("winner-is-baseline", "confirmed", 3)
    text = noise.sentence
    assert "The best plan on the confirmation seeds is the baseline single:kd (#0, confirmed mean 75.00%" in text
    assert "#1 (kd(2) -> dkd(2), confirmed mean 72.62%" in text
    assert "trails it by 2.38 ± 0.06 points (paired over 3 seeds)" in text
    assert "on its one search seed it led by 1.39" in text
    assert "-1.39" not in text and "points behind" not in text
    assert html.escape(text) in render_html(data)


def test_the_banner_with_a_confirmed_winner_gives_the_paired_gap(tmp_path):
    from smskd_search.report import collect

    study, db = _banner_study(tmp_path, {"kd": 0.7139, "kd -> dkd": 0.7000},
                              {"kd": [0.7252, 0.7372, 0.7162], "kd -> dkd": [0.7500, 0.7600, 0.7400]})
    noise = collect(study, db).noise
    assert noise.basis == "confirmed" and noise.winner is not None and noise.winner.number == 1
    assert noise.margin == pytest.approx(0.0238) and noise.se_gap == pytest.approx(0.000577, abs=1e-5)
    assert noise.verdict == "beyond-2se"  # 2.38 points with a paired s.e. of 0.06
    assert "leads the best baseline single:kd (#0, confirmed mean 72.62%" in noise.sentence
    assert "by 2.38 ± 0.06 points (paired over 3 seeds)" in noise.sentence


def test_the_banner_says_when_its_values_are_single_seed(tmp_path):
    from smskd_search.report import collect

    study, db = _banner_study(tmp_path, {"kd": 0.7000, "kd -> dkd": 0.7139}, {})
    noise = collect(study, db).noise
    assert noise.basis == "single-seed" and noise.winner is not None and noise.winner.number == 1
    assert "leads the best baseline single:kd (#0, 70.00%) by 1.39 points" in noise.sentence
    assert "single-seed values: no plan was confirmed on fresh seeds" in noise.sentence
