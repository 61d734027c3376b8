"""Streamed image folders through the engine and a search, on a generated JPEG tree: the dataset
fields, the automatic choice, class subsets, the test split from val/, the same numbers for the same
plan and seed, resumes (a stage checkpoint, a partial entry) that give an uninterrupted run's numbers,
and a real search whose trials stream and never read the test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_plan

from smskd_search.data import DataSplits, StreamingSplit, TensorSplit, load_data, load_test_split
from smskd_search.data.folder_index import choose_classes
from smskd_search.engine import EpochTrained, PrefixCache, RunOptions, StageTrained, Workbench, run_plan
from smskd_search.engine.logit_store import LogitStore
from smskd_search.errors import UserError
from smskd_search.plan import AugmentSpec, DatasetSpec, ProblemSpec, RecipeSpec, StudentSpec, TeacherRecipe, TeacherSpec

CLASSES = ("ant", "bee", "cat", "dog")


def write_folder(root: Path, per_class: dict[str, int]) -> None:
    """``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``, small images of varied sizes,
    each class with a colour cast of its own (something to learn)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
                arr = rng.integers(0, 200, (h, w, 3), dtype=np.uint8)
                arr[..., c % 3] += 55
                Image.fromarray(arr).save(root / split / cls / f"{i:03d}.jpg", quality=90)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    write_folder(root, {"train": 20, "val": 5})
    return root


@pytest.fixture(autouse=True)
def _data_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SMSKD_CACHE", str(tmp_path / "data-cache"))
    monkeypatch.setenv("SMSKD_STREAM_WORKERS", "0")
    monkeypatch.delenv("SMSKD_STREAM_ABOVE_BYTES", raising=False)


def _dataset(folder: Path, **kw) -> DatasetSpec:
    return DatasetSpec(name="imagefolder", root=str(folder), val_fraction=0.25, **kw)


def _problem(folder: Path, **kw) -> ProblemSpec:
    return ProblemSpec(dataset=_dataset(folder, **{"stream": True, "image_size": 32, **kw}),
                       teacher=TeacherSpec(arch="cnn_small", recipe=TeacherRecipe(epochs=1, lr=0.05, batch_size=16)),
                       student=StudentSpec(arch="cnn_nano"))


AUGMENTED = RecipeSpec(lr=0.05, batch_size=16, eval_batch_size=32, augment=AugmentSpec(flip=True))


def _numbers(result) -> list:
    return [[(m.train_loss, m.train_acc, m.val_acc, m.val_loss) for m in s.epoch_metrics] for s in result.stages]


# ---------------------------------------------------------------------------------------------
# The dataset's fields


def test_unset_fields_leave_hashes_and_saved_plans_as_they_were(folder):
    spec = _dataset(folder)
    assert set(spec.hashed()) == {"name", "val_fraction", "test_fraction", "split_seed"}
    assert _dataset(folder, stream=True, classes=2, image_size=64).hashed() == {
        **spec.hashed(), "stream": True, "classes": 2, "image_size": 64}
    plan = make_plan(_problem(folder, stream=None, image_size=None), [("kd", 1)])
    assert "stream" not in plan.to_yaml() and "image_size" not in plan.to_yaml()
    assert yaml.safe_load(make_plan(_problem(folder), [("kd", 1)]).to_yaml())["problem"]["dataset"]["stream"] is True


@pytest.mark.parametrize("fields, line", [
    ({"name": "digits", "stream": True}, "stream: only for an imagefolder dataset, not digits"),
    ({"name": "cifar10", "classes": 3}, "classes: only for an imagefolder dataset, not cifar10"),
    ({"name": "imagefolder", "stream": False, "image_size": 64}, "image_size: the crop size of a streamed folder"),
    ({"name": "imagefolder", "classes": 1}, "classes: at least 2, not 1"),
    ({"name": "imagefolder", "classes": ["ant", "ant"]}, "classes: a list of at least 2 distinct"),
    ({"name": "imagefolder", "image_size": 4}, "image_size"),
])
def test_bad_dataset_fields_are_one_line_naming_the_field(fields, line):
    from smskd_search.plan import parse_plan

    data = yaml.safe_load(make_plan(_problem(Path("/x")), [("kd", 1)]).to_yaml())
    data["problem"]["dataset"] = {"root": "/x", **fields}
    with pytest.raises(UserError) as err:
        parse_plan(data)
    assert line in str(err.value) and "dataset" in str(err.value) and "\n" not in str(err.value).strip()


def test_streamed_splits_say_so_and_see_the_crop(folder):
    data = load_data(_dataset(folder, stream=True, image_size=32))
    assert isinstance(data.train, StreamingSplit) and isinstance(data.val, StreamingSplit)
    info = data.info
    assert (info.streamed, info.num_classes, info.in_channels, info.image_size) == (True, 4, 3, 32)
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    assert (info.num_train, info.num_val) == (60, 20) and data.train.resident_images is None
    # The validation split is stratified and seeded: 5 of each class's 20, the same files again.
    assert torch.bincount(data.val.labels).tolist() == [5] * 4
    assert load_data(_dataset(folder, stream=True, image_size=32)).val.index.files == data.val.index.files
    x, y, idx = next(iter(data.train.loader(8, shuffle=True, augment=AugmentSpec(flip=True), seed=1)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == idx.shape == (8,)
    assert data.train.shape == (60, 3, 32, 32)
    # Default crop: ImageNet's 224.
    assert load_data(_dataset(folder, stream=True)).info.image_size == 224


def test_the_automatic_choice_streams_above_the_threshold(folder, tmp_path, monkeypatch):
    spec = _dataset(folder)
    held = load_data(spec)  # the default threshold (8 GiB) holds a small folder in memory
    assert isinstance(held.train, TensorSplit) and not held.info.streamed
    assert list((tmp_path / "data-cache").glob("imagefolder-*.npz"))  # the in-memory path's decoded copy
    monkeypatch.setenv("SMSKD_STREAM_ABOVE_BYTES", "100000")  # 60 images at their size: more than that
    streamed = load_data(spec)
    assert isinstance(streamed.train, StreamingSplit) and streamed.info.streamed
    assert streamed.info.image_size == 224 and streamed.info.num_classes == held.info.num_classes == 4
    monkeypatch.setenv("SMSKD_STREAM_ABOVE_BYTES", "lots")
    with pytest.raises(UserError, match=r"^SMSKD_STREAM_ABOVE_BYTES: a number of bytes"):
        load_data(spec)


def test_the_automatic_choice_reaches_every_cache_key(folder, monkeypatch):
    from smskd_search.engine import stage_prefix_key
    from smskd_search.engine.logit_store import teacher_logits_key
    from smskd_search.engine.prefix_cache import Runtime
    from smskd_search.engine.teacher import teacher_key

    runtime = Runtime(device="cpu", threads=1, precision="fp32")

    def keys(**fields) -> tuple[str, str, str]:
        plan = make_plan(_problem(folder, **{"stream": None, "image_size": None, **fields}), [("kd", 1)])
        return (teacher_key(plan.problem), stage_prefix_key(plan, 0, teacher_sha256="t" * 64, runtime=runtime),
                teacher_logits_key(plan, 0, 0, loader_seed=1, train_shape=(60, 3, 32, 32), teacher_sha256="t" * 64,
                                   runtime=runtime))

    held = keys()
    monkeypatch.setenv("SMSKD_STREAM_ABOVE_BYTES", "100000")
    automatic = keys()
    # Streamed batches are other batches: no key of a held run may serve a streamed one, and an
    # automatic choice to stream names the same entries as writing stream: true.
    assert all(a != h for a, h in zip(automatic, held))
    assert automatic == keys(stream=True)
    monkeypatch.setenv("SMSKD_STREAM_ABOVE_BYTES", str(1 << 40))
    assert keys() == held
    # Without the folder (a cluster's driver), the spec as written (the root is not hashed).
    monkeypatch.setenv("SMSKD_STREAM_ABOVE_BYTES", "100000")
    gone = make_plan(_problem(folder.parent / "absent", stream=None, image_size=None), [("kd", 1)])
    assert stage_prefix_key(gone, 0, teacher_sha256="t" * 64, runtime=runtime) == held[1]


def test_a_class_subset_is_seeded_and_the_same_streamed_or_held(folder):
    picked = choose_classes(list(CLASSES), 2, 0)
    streamed = load_data(_dataset(folder, stream=True, image_size=32, classes=2))
    assert streamed.train.index.classes == tuple(picked) and streamed.info.num_classes == 2
    assert set(streamed.train.labels.tolist()) == {0, 1} and streamed.info.num_train + streamed.info.num_val == 40
    assert {f.split("/")[0] for f in streamed.train.index.files} == set(picked)
    held = load_data(_dataset(folder, stream=False, classes=2))
    assert held.info.num_classes == 2 and held.info.num_train == streamed.info.num_train
    other = [choose_classes(list(CLASSES), 2, s) for s in range(1, 8)]
    assert any(o != picked for o in other)  # another split_seed may draw others
    named = load_data(_dataset(folder, stream=True, classes=["dog", "ant"]))
    assert named.train.index.classes == ("ant", "dog")
    assert _dataset(folder, classes=["dog", "ant"]).hashed() == _dataset(folder, classes=["ant", "dog"]).hashed()
    with pytest.raises(UserError, match=r"^dataset\.classes: 'eel' is not a class folder"):
        load_data(_dataset(folder, stream=True, classes=["eel", "ant"]))


def test_the_test_split_is_the_folders_val_and_its_access_is_logged(folder, tmp_path, monkeypatch):
    log = tmp_path / "access.log"
    monkeypatch.setenv("SMSKD_TEST_ACCESS_LOG", str(log))
    for stream in (True, False):
        spec = _dataset(folder, stream=stream, **({"image_size": 32} if stream else {}))
        data = load_data(spec)
        assert not log.exists() or len(log.read_text().splitlines()) == (0 if stream else 1)
        test = load_test_split(spec, data.info)
        assert len(test) == 20 and torch.bincount(test.labels).tolist() == [5] * 4
        assert isinstance(test, StreamingSplit if stream else TensorSplit)
        if stream:
            assert test.index.root == folder / "val"
    assert len(log.read_text().splitlines()) == 2


def test_a_folder_too_small_to_split_is_one_line(tmp_path):
    write_folder(tmp_path, {"train": 3})
    with pytest.raises(UserError, match=r"^dataset\.val_fraction: 0\.25 of 12 images cannot be split by class: "):
        load_data(_dataset(tmp_path, stream=True))


# ---------------------------------------------------------------------------------------------
# Runs


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


def _bench(problem: ProblemSpec, teachers: Path, **kw) -> Workbench:
    return Workbench.open(problem, device="cpu", teacher_cache=teachers, **kw)


def test_a_streamed_run_repeats_bit_for_bit(folder, teachers, monkeypatch):
    problem = _problem(folder)
    plan = make_plan(problem, [("kd", 2), ("dkd", 1)], recipe=AUGMENTED, reference={"lambda_ref": 1.0})
    first = run_plan(plan, _bench(problem, teachers, logit_store=LogitStore(None)))
    monkeypatch.setenv("SMSKD_STREAM_WORKERS", "2")  # decoded in worker processes this time
    second_bench = _bench(problem, teachers)
    assert second_bench.data.train.num_workers == 2
    second = run_plan(plan, second_bench)
    assert _numbers(first) == _numbers(second)
    monkeypatch.setenv("SMSKD_STREAM_WORKERS", "0")
    assert first.data_info.streamed and first.data_info.image_size == 32
    assert first.teacher_epochs_served == 0 and any("teacher-logit store is not used" in n for n in first.notes)
    # Another seed, other batches.
    assert _numbers(run_plan(plan.model_copy(update={"seed": plan.seed + 1}), _bench(problem, teachers))) != _numbers(first)
    # Unaugmented batches would precompute the frozen outputs in memory: streamed, they are computed per batch.
    plain = make_plan(problem, [("kd", 1)], recipe=RecipeSpec(lr=0.05, batch_size=16))
    result = run_plan(plain, _bench(problem, teachers))
    assert any("computed per batch" in n for n in result.notes)


class _Stopped(Exception):
    pass


def test_resumes_give_an_uninterrupted_runs_numbers(folder, teachers, tmp_path):
    problem = _problem(folder)
    plan = make_plan(problem, [("kd", 1), ("dkd", 3)], recipe=AUGMENTED, reference={"lambda_ref": 1.0})
    whole = run_plan(plan, _bench(problem, teachers))
    # From a stage checkpoint: stopped after stage 1, resumed.
    cut = run_plan(plan, _bench(problem, teachers), RunOptions(out_dir=tmp_path / "run"),
                   lambda e: isinstance(e, StageTrained))
    assert cut.stopped_early and len(cut.stages) == 1
    resumed = run_plan(plan, _bench(problem, teachers), RunOptions(out_dir=tmp_path / "run", resume=True))
    assert resumed.epochs_resumed == 1 and _numbers(resumed) == _numbers(whole)
    # From a partial entry in the stage cache (the loader's epoch restored): killed after 2 epochs of stage 2.
    bench = _bench(problem, teachers, stage_cache=PrefixCache(tmp_path / "stages"))

    def kill_at_3(event):
        if isinstance(event, EpochTrained) and event.metrics.cum_epochs == 3:
            raise _Stopped
        return False

    with pytest.raises(_Stopped):
        run_plan(plan, bench, RunOptions(partial_at=frozenset({3})), kill_at_3)
    went_on = run_plan(plan, bench, RunOptions(partial_at=frozenset({3})))
    assert (went_on.epochs_reused, went_on.epochs_trained) == (3, 1)
    assert _numbers(went_on) == _numbers(whole)


def test_in_memory_splits_still_hand_out_tensor_loaders(tmp_path):
    from smskd_search.data import TensorLoader

    data: DataSplits = load_data(DatasetSpec(name="digits", train_subset=100))
    loader = data.train.loader(16, shuffle=True, augment=AugmentSpec(crop_padding=1), seed=5)
    assert isinstance(loader, TensorLoader) and data.train.resident_images is data.train.images
    state = loader.random_state()
    first = [x for x, _, _ in loader]
    loader.set_random_state(state)
    assert all(torch.equal(a, b) for a, b in zip(first, [x for x, _, _ in loader], strict=True))


# ---------------------------------------------------------------------------------------------
# A search


@pytest.mark.slow
def test_a_search_streams_its_trials_and_never_reads_the_test_split(folder, tmp_path, monkeypatch):
    """The CLI's search (its own local Ray, Optuna's SQLite study) on a streamed folder: every trial
    completes; nothing decoded the folder into memory (the in-memory path writes its .npz into
    SMSKD_CACHE, which trials inherit); the test split was never opened; the best plan's test
    accuracy, asked for afterwards, is measured on val/."""
    import os
    import subprocess
    import sys

    import optuna

    from smskd_search.engine import evaluate_test
    from smskd_search.plan import parse_plan
    from smskd_search.search import storage as st

    problem = _problem(folder, classes=3).model_dump(mode="json")
    space = {"name": "streamed", "problem": problem,
             "recipe": {"lr": 0.05, "batch_size": 16, "eval_batch_size": 32, "augment": {"flip": True}},
             "search": {"methods": ["kd", "dkd"], "stages": {"min": 1, "max": 2}, "epochs": {"min": 1, "max": 1},
                        "pruning": {"enabled": False}, "sampler": {"kind": "random"}}}
    path = tmp_path / "streamed.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    cache, log, studies = tmp_path / "data-cache", tmp_path / "test-access.log", tmp_path / "studies"
    env = {**os.environ, "SMSKD_STUDIES": str(studies), "SMSKD_CACHE": str(cache), "SMSKD_TEST_ACCESS_LOG": str(log),
           "SMSKD_STREAM_WORKERS": "1", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "smskd_search.cli", "--space", str(path), "--budget", "3",
                           "--max-concurrent", "1", "--no-baselines", "--no-confirm", "--seed", "0"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = optuna.load_study(study_name="streamed", storage=st.storage_url(studies / "streamed.db")).get_trials()
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert not list(cache.glob("imagefolder-*.npz"))  # no trial (nor the teacher) held the folder in memory
    assert not log.exists(), log.read_text()
    # The explicit evaluation afterwards: the best plan again, its test accuracy on val/ (3 classes x 5).
    best = max(trials, key=lambda t: t.value)
    plan = parse_plan(yaml.safe_load(best.user_attrs[st.ATTR_PLAN]))
    monkeypatch.setenv("SMSKD_TEST_ACCESS_LOG", str(log))  # SMSKD_CACHE is already the search's
    result = run_plan(plan, Workbench.open(plan.problem, device="cpu", teacher_cache=studies / "teachers"))
    assert result.stages[-1].val_acc == pytest.approx(best.value)
    test = evaluate_test(plan, result)
    assert test.n == 15 and len(log.read_text().splitlines()) == 1
    assert result.data_info.streamed and not list(cache.glob("imagefolder-*.npz"))
