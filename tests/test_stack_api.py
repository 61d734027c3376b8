"""What we rely on from Ray and Optuna: public names only, and the versions the suite ran on.

A static check reads every module of the project: no attribute with a leading underscore is read
from anything but ``self``/``cls`` or a module of ours, and nothing is imported from a private module
of Ray or Optuna. A second test checks the public API we call (names and parameters), and fails
naming the installed version where one changed.
"""

from __future__ import annotations

import ast
import inspect
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "smskd_search"
# The one private-looking module of ours that other modules import: Ray with its environment set.
OUR_PRIVATE_MODULES = {"smskd_search.search._ray"}


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr} of {ast.unparse(owner)}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] in ("ray", "optuna") and any(p.startswith("_") for p in parts):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import ...")
            if parts[0] in ("ray", "optuna"):
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: import of private {a.name} from {node.module}"
                          for a in node.names if a.name.startswith("_")]
    return found


def test_no_private_attribute_of_ray_or_optuna_is_used():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 40  # the whole package was read
    found = [u for f in files for u in _private_uses(f)]
    assert found == [], "private attributes or modules used:\n" + "\n".join(found)


def test_the_static_check_finds_what_it_is_for():
    probe = ROOT / "tests" / "_probe_private.py"
    probe.write_text("from optuna.storages._rdb import models\n"
                     "def f(study, trial, self):\n"
                     "    return study._storage, trial._trial_id, self._ok\n")
    try:
        found = _private_uses(probe)
    finally:
        probe.unlink()
    assert [f.split(": ", 1)[1] for f in found] == [
        "from optuna.storages._rdb import ...", "._storage of study", "._trial_id of trial"]


def _params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _require(what: str, have: set[str], need: set[str], package: str) -> None:
    missing = need - have
    if missing:
        pytest.fail(f"{package} {version(package)}: {what} lost {sorted(missing)}; "
                    f"smskd-search was tested with the versions pinned in pyproject.toml")


def test_the_ray_api_we_call_is_there():
    from smskd_search.search._ray import tune

    from ray.tune.schedulers import FIFOScheduler, TrialScheduler
    from ray.tune.search import ConcurrencyLimiter, Searcher

    pkg = "ray"
    for name in ("suggest", "on_trial_result", "on_trial_complete", "set_search_properties", "save", "restore"):
        _require(f"Searcher.{name}", set(dir(Searcher)), {name}, pkg)
    _require("Searcher.on_trial_complete", _params(Searcher.on_trial_complete), {"trial_id", "result", "error"}, pkg)
    _require("Searcher.set_search_properties", _params(Searcher.set_search_properties), {"metric", "mode", "config"}, pkg)
    _require("FIFOScheduler.on_trial_result", _params(FIFOScheduler.on_trial_result),
             {"tune_controller", "trial", "result"}, pkg)
    _require("TrialScheduler", set(dir(TrialScheduler)), {"CONTINUE", "STOP"}, pkg)
    _require("ConcurrencyLimiter", _params(ConcurrencyLimiter.__init__), {"searcher", "max_concurrent"}, pkg)
    _require("tune", set(dir(tune)), {"report", "get_checkpoint", "Checkpoint", "with_parameters", "with_resources",
                                      "Tuner", "TuneConfig", "RunConfig", "CheckpointConfig", "FailureConfig",
                                      "Callback"}, pkg)
    _require("tune.report", _params(tune.report), {"metrics", "checkpoint"}, pkg)
    _require("TuneConfig", _params(tune.TuneConfig), {"search_alg", "scheduler", "num_samples", "max_concurrent_trials",
                                                      "reuse_actors", "time_budget_s", "trial_dirname_creator"}, pkg)
    _require("RunConfig", _params(tune.RunConfig), {"name", "storage_path", "storage_filesystem", "verbose", "callbacks",
                                                    "failure_config", "checkpoint_config"}, pkg)
    _require("Callback", set(dir(tune.Callback)), {"on_trial_complete", "on_trial_error", "on_step_end"}, pkg)


def test_the_pyarrow_fs_api_we_call_is_there():
    import pyarrow.fs as pafs

    pkg = "pyarrow"
    _require("pyarrow.fs", set(dir(pafs)), {"FileSystem", "FileSelector", "FileType", "copy_files", "S3FileSystem"}, pkg)
    _require("FileSystem", set(dir(pafs.FileSystem)), {"from_uri", "get_file_info", "open_input_file", "open_output_stream",
                                                       "move", "delete_file", "delete_dir"}, pkg)
    # (a compiled class: no signature to read; constructing one with the keywords is the check)
    selector = pafs.FileSelector("x", allow_not_found=True, recursive=True)
    assert selector.allow_not_found and selector.recursive
    _require("copy_files", _params(pafs.copy_files), {"source", "destination", "source_filesystem",
                                                      "destination_filesystem"}, pkg)


def test_the_optuna_api_we_call_is_there():
    import optuna

    pkg = "optuna"
    _require("Study.tell", _params(optuna.Study.tell), {"trial", "values", "state", "skip_if_finished"}, pkg)
    _require("Study.enqueue_trial", _params(optuna.Study.enqueue_trial), {"params", "user_attrs"}, pkg)
    _require("Study", set(dir(optuna.create_study())), {"sampler", "ask", "get_trials", "best_trials", "set_user_attr", "user_attrs",
                                               "directions", "study_name"}, pkg)
    _require("Trial", set(dir(optuna.Trial)), {"report", "set_user_attr", "user_attrs", "number", "suggest_int",
                                               "suggest_float", "suggest_categorical"}, pkg)
    _require("BaseStorage", set(dir(optuna.storages.BaseStorage)),
             {"get_study_id_from_name", "get_trial_id_from_study_id_trial_number", "set_trial_user_attr",
              "set_trial_state_values"}, pkg)
    _require("TPESampler", _params(optuna.samplers.TPESampler),
             {"seed", "n_startup_trials", "multivariate", "group", "constant_liar"}, pkg)
    _require("exceptions", set(dir(optuna.exceptions)), {"UpdateFinishedTrialError", "ExperimentalWarning"}, pkg)


def test_pins_admit_the_versions_under_test():
    """The upper bounds in pyproject.toml are the versions this suite ran on: raise them only after
    the suite passes on the newer release."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    deps = {r.name: r for r in map(Requirement, requires("smskd-search") or []) if not r.marker}
    for name in ("ray", "optuna"):
        spec = deps[name].specifier
        assert any(s.operator in ("<", "<=") for s in spec), f"{name} has no upper bound in pyproject.toml"
        assert spec.contains(version(name)), f"{name} {version(name)} is outside the pinned range {spec}"
