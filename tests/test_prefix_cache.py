"""The stage-prefix cache and the teacher-output memo (engine level, no Ray): keys, eviction, and
runs started from a cached prefix that equal runs from scratch bit for bit on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import make_plan

from smskd_search.engine import (
    FrozenOutputsMemo,
    PrefixCache,
    Runtime,
    partial_stage_key,
    pick_precision,
    run_plan,
    stage_prefix_key,
)
from smskd_search.engine import frozen as frozen_mod
from smskd_search.engine.prefix_cache import schedule_prefix, shared_across_lengths
from smskd_search.plan import RecipeSpec, ScheduleSpec

REF = {"weight_mode": "inverse", "lambda_ref": 1.5}


def _curve(result):
    return [(m.cum_epochs, m.val_acc, m.val_loss, m.train_loss) for s in result.stages for m in s.epoch_metrics]


def _student(result):
    return {k: v.detach().clone() for k, v in result.student.state_dict().items()}


@pytest.mark.parametrize("shared", [1, 2])
def test_a_run_from_a_cached_prefix_equals_a_run_from_scratch(tiny_problem, teacher_cache, tmp_path, shared):
    target = make_plan(tiny_problem, [("kd", 2), ("dkd", 1), ("kd", 1)], reference=REF)
    # Another plan that shares the first `shared` stages (with the same reference settings).
    other = [("kd", 2), ("dkd", 1), ("fitnet", 1)] if shared == 2 else [("kd", 2), ("fitnet", 2)]
    scratch = run_plan(target, teacher_cache=teacher_cache)
    assert scratch.epochs_trained == 4 and scratch.epochs_reused == 0

    cache = PrefixCache(tmp_path / "stages")
    filler = run_plan(make_plan(tiny_problem, other, reference=REF), teacher_cache=teacher_cache, stage_cache=cache)
    assert filler.epochs_reused == 0 and len(cache.entries()) == len(other)
    seen = []
    cached = run_plan(target, teacher_cache=teacher_cache, stage_cache=cache, out_dir=tmp_path / "run",
                      on_stage_end=lambda k, cum, res, ckpt: seen.append((k, cum, res.reused, ckpt is not None)))
    reused = {1: 2, 2: 3}[shared]
    assert (cached.epochs_reused, cached.epochs_trained) == (reused, 4 - reused)
    assert [s.reused for s in cached.stages] == [k < shared for k in range(3)]
    # Every stage is passed on, the last reused one with its checkpoint (a resume starts there).
    assert seen == [(k, cum, k < shared, k + 1 >= shared) for k, cum in enumerate([2, 3, 4])]
    assert _curve(cached) == _curve(scratch)
    a, b = _student(scratch), _student(cached)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The run put its own new stages: the same plan again trains nothing.
    again = run_plan(target, teacher_cache=teacher_cache, stage_cache=cache)
    assert (again.epochs_reused, again.epochs_trained) == (4, 0) and _curve(again) == _curve(scratch)
    assert all(torch.equal(v, _student(again)[k]) for k, v in a.items())


def test_plans_that_carry_the_optimizer_are_not_cached(tiny_problem, teacher_cache, tmp_path):
    plan = make_plan(tiny_problem, [("kd", 1), ("dkd", 1)], reference=REF, restart_optimizer=False)
    cache = PrefixCache(tmp_path / "stages")
    r = run_plan(plan, teacher_cache=teacher_cache, stage_cache=cache)
    assert r.cache_skipped and "restart_optimizer" in r.cache_skipped
    assert cache.entries() == [] and r.epochs_trained == 2


def test_the_key_says_everything_that_determines_a_prefix(tiny_problem):
    rt = Runtime(threads=1, device="cpu", precision="fp32")
    base = make_plan(tiny_problem, [("kd", 2), ("dkd", 2), ("fitnet", 1)], reference=REF)

    def keys(plan, runtime=rt, sha="a" * 64):
        return [stage_prefix_key(plan, k, teacher_sha256=sha, runtime=runtime) for k in range(len(plan.stages))]

    def with_stage(i, **update):
        stages = [s.model_copy(update=update) if j == i else s for j, s in enumerate(base.stages)]
        return base.model_copy(update={"stages": stages})

    k0 = keys(base)
    assert len(set(k0)) == 3
    # Everything changes every prefix...
    assert all(a != b for a, b in zip(k0, keys(base.model_copy(update={"seed": 1}))))
    assert all(a != b for a, b in zip(k0, keys(base, sha="b" * 64)))
    assert all(a != b for a, b in zip(k0, keys(base, Runtime(threads=2, device="cpu", precision="fp32"))))
    assert all(a != b for a, b in zip(k0, keys(base, Runtime(threads=1, device="cuda", precision="fp32"))))
    assert all(a != b for a, b in zip(k0, keys(base.model_copy(
        update={"recipe": base.recipe.model_copy(update={"lr": 0.01})}))))
    # ... a stage's params or epochs change its prefix and the longer ones, never the shorter ones.
    for changed in (with_stage(1, params={"temperature": 2.0}), with_stage(1, epochs=3)):
        k = keys(changed)
        assert k[0] == k0[0] and k[1] != k0[1] and k[2] != k0[2]
    later = keys(with_stage(2, method="kd", params={}))
    assert later[:2] == k0[:2] and later[2] != k0[2]
    # The reference settings count from a two-stage prefix on, canonicalised (mode none).
    for ref in ({"lambda_ref": 2.0}, {"normalize": "batch_mean"}, {"weight_mode": "uniform"}):
        k = keys(base.model_copy(update={"reference": base.reference.model_copy(update=ref)}))
        assert k[0] == k0[0] and k[1] != k0[1] and k[2] != k0[2]
    none1 = keys(base.model_copy(update={"reference": base.reference.model_copy(update={"weight_mode": "none"})}))
    none2 = keys(base.model_copy(update={"reference": base.reference.model_copy(
        update={"weight_mode": "none", "lambda_ref": 7.0, "normalize": "batch_mean"})}))
    assert none1 == none2 and none1[0] == k0[0] and none1[1] != k0[1]
    # The restart flag, and the plan's name does not count.
    assert keys(base.model_copy(update={"restart_optimizer": False}))[0] != k0[0]
    assert keys(base.model_copy(update={"name": "other"})) == k0


def _entry(n: int) -> dict:
    return {"student": {"w": torch.full((n,), 1.0)}, "results": []}


def test_eviction_keeps_the_most_recently_used(tmp_path):
    probe = PrefixCache(tmp_path / "probe")
    written = probe.put("probe", _entry(4000))
    assert written is not None
    size = written.stat().st_size
    cache = PrefixCache(tmp_path / "c", max_bytes=int(1.5 * size))  # room for one entry, not two
    cache.put("a", _entry(4000))
    cache.put("b", _entry(4000))
    assert cache.get("a") is None and cache.get("b") is not None
    lru = PrefixCache(tmp_path / "lru", max_bytes=int(2.5 * size))  # room for two
    lru.put("a", _entry(4000))
    lru.put("b", _entry(4000))
    assert lru.get("a") is not None  # a is used: b is now the least recently used
    lru.put("c", _entry(4000))
    assert [p.stem for p, _, _ in lru.entries()] == ["a", "c"] and lru.size_bytes() <= lru.max_bytes
    # A damaged entry is a miss (and goes), never an error.
    lru.path("a").write_bytes(b"not a checkpoint")
    assert lru.get("a") is None and not lru.path("a").exists()


def test_the_teacher_outputs_are_computed_once_and_give_the_same_values(tiny_problem, teacher_cache, tmp_path,
                                                                         monkeypatch):
    plan = make_plan(tiny_problem, [("kd", 1)])  # one stage: the only frozen outputs are the teacher's
    plain = run_plan(plan, teacher_cache=teacher_cache)
    calls = []
    original = frozen_mod.FrozenForward._precompute

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(frozen_mod.FrozenForward, "_precompute", counting)
    memo = FrozenOutputsMemo(store=PrefixCache(tmp_path / "teacher_outputs"))
    first = run_plan(plan, teacher_cache=teacher_cache, frozen_memo=memo)
    second = run_plan(plan, teacher_cache=teacher_cache, frozen_memo=memo)
    assert len(calls) == 1 and memo.computed == 1
    # Another process (a fresh memo on the same folder) loads them instead.
    other = FrozenOutputsMemo(store=PrefixCache(tmp_path / "teacher_outputs"))
    third = run_plan(plan, teacher_cache=teacher_cache, frozen_memo=other)
    assert len(calls) == 1 and other.loaded == 1 and other.computed == 0
    assert _curve(plain) == _curve(first) == _curve(second) == _curve(third)
    assert all(torch.equal(v, _student(third)[k]) for k, v in _student(plain).items())


class _Stop(Exception):
    """What a search's report does to a pruned trial: the run ends inside the epoch callback."""


def _stop_at(cum: int):
    def on_epoch_end(k, em):
        if em.cum_epochs == cum:
            raise _Stop
    return on_epoch_end


@pytest.mark.parametrize(("cut_plan", "target", "cut"), [
    # Cut 2 epochs into a 3-epoch first stage; CRD draws negatives from torch's global stream and
    # updates memory banks that are buffers, so the entry must carry both.
    ([("crd", 3), ("kd", 1)], [("crd", 3), ("dkd", 2)], 2),
    # Cut inside the second stage, whose reference is the first stage's student.
    ([("kd", 2), ("dkd", 3), ("kd", 1)], [("kd", 2), ("dkd", 3), ("fitnet", 1)], 4),
])
def test_a_stage_cut_at_a_rung_goes_on_from_where_it_stopped(tiny_problem, teacher_cache, tmp_path, cut_plan,
                                                             target, cut):
    rungs = {1, cut, 6}
    target_plan = make_plan(tiny_problem, target, reference=REF)
    scratch = run_plan(target_plan, teacher_cache=teacher_cache)

    cache = PrefixCache(tmp_path / "stages")
    with pytest.raises(_Stop):
        run_plan(make_plan(tiny_problem, cut_plan, reference=REF), teacher_cache=teacher_cache, stage_cache=cache,
                 partial_at=rungs, on_epoch_end=_stop_at(cut))
    reported = []
    cached = run_plan(target_plan, teacher_cache=teacher_cache, stage_cache=cache, partial_at=rungs,
                      on_epochs_reused=lambda k, ems: reported.append((k, [m.cum_epochs for m in ems])))
    total = target_plan.total_epochs
    # The finished stages before the cut and the cut stage's first epochs come from the cache.
    assert (cached.epochs_reused, cached.epochs_trained) == (cut, total - cut)
    stage_of_cut = 0 if cut < target[0][1] else 1
    assert reported == [(stage_of_cut, list(range(target[0][1] + 1 if stage_of_cut else 1, cut + 1)))]
    assert _curve(cached) == _curve(scratch)
    a, b = _student(scratch), _student(cached)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The finished stages replaced their partial entries: one entry per stage of the two plans,
    # less the shared ones, and nothing partial left where the stage finished.
    names = {p.name for p, _, _ in cache.entries()}
    cpu = torch.device("cpu")
    rt = Runtime.current(cpu, pick_precision(cpu, "auto"))
    sha = scratch.teacher.sha256
    full = [stage_prefix_key(target_plan, k, teacher_sha256=sha, runtime=rt) for k in range(len(target))]
    assert {f"{k}.pt" for k in full} <= names
    done = cut - (target[0][1] if stage_of_cut else 0)
    partial = partial_stage_key(target_plan, stage_of_cut, done, teacher_sha256=sha, runtime=rt)
    assert f"{partial}.pt" not in names


STEP = RecipeSpec(lr=0.05, schedule=ScheduleSpec(kind="step", milestones=[0.5, 0.75], gamma=0.1))


def test_partial_keys_are_shared_by_stage_lengths_whose_schedules_agree(tiny_problem):
    rt = Runtime(threads=1, device="cpu", precision="none")

    def key(stages, k, done, recipe=STEP, **kw):
        plan = make_plan(tiny_problem, stages, recipe=recipe, reference=REF, **kw)
        return partial_stage_key(plan, k, done, teacher_sha256="t", runtime=rt)

    # A step schedule with its first milestone at half the stage: kd(4) and kd(6) run their first
    # 2 epochs at the base lr, kd(6)'s third epoch too, kd(4)'s third one at a tenth of it.
    assert key([("kd", 4)], 0, 2) == key([("kd", 6), ("dkd", 1)], 0, 2) == key([("kd", 5)], 0, 2)
    assert key([("kd", 4)], 0, 3) != key([("kd", 6)], 0, 3)
    assert schedule_prefix(STEP.schedule, 4, 3) == ["step", [1.0, 1.0, pytest.approx(0.1)]]
    assert shared_across_lengths(STEP.schedule, 4, 2) and shared_across_lengths(STEP.schedule, 8, 5)
    # What the stage is, and what came before it, still count.
    assert key([("kd", 4)], 0, 2) != key([("dkd", 4)], 0, 2)
    assert key([("kd", 4)], 0, 2) != key([("kd", 4)], 0, 1)
    assert key([("kd", 4)], 0, 2) != key([("kd", 4)], 0, 2, seed=1)
    assert key([("kd", 2), ("dkd", 4)], 1, 2) == key([("kd", 2), ("dkd", 6)], 1, 2)
    assert key([("kd", 2), ("dkd", 4)], 1, 2) != key([("kd", 3), ("dkd", 4)], 1, 2)
    # A cosine schedule moves every step with the stage's length: only the same length shares.
    cos = RecipeSpec(lr=0.05)
    assert key([("kd", 4)], 0, 2, recipe=cos) != key([("kd", 6)], 0, 2, recipe=cos)
    assert key([("kd", 4)], 0, 2, recipe=cos) == key([("kd", 4), ("dkd", 1)], 0, 2, recipe=cos)
    assert not shared_across_lengths(cos.schedule, 4, 2)
    # wsd: the base lr until the decay starts (half the stage here), then a cosine to zero.
    wsd = RecipeSpec(lr=0.05, schedule=ScheduleSpec(kind="wsd", milestones=[0.5]))
    assert key([("kd", 4)], 0, 2, recipe=wsd) == key([("kd", 8)], 0, 2, recipe=wsd)
    assert key([("kd", 4)], 0, 3, recipe=wsd) != key([("kd", 8)], 0, 3, recipe=wsd)
    assert key([("kd", 4)], 0, 2, recipe=wsd) != key([("kd", 4)], 0, 2)
    with pytest.raises(ValueError):
        key([("kd", 4)], 0, 4)


def test_a_longer_stage_goes_on_from_a_shorter_ones_cut_under_a_step_schedule(tiny_problem, teacher_cache, tmp_path):
    target = make_plan(tiny_problem, [("kd", 6), ("dkd", 1)], recipe=STEP, reference=REF)
    scratch = run_plan(target, teacher_cache=teacher_cache)
    cache = PrefixCache(tmp_path / "stages")
    # A 4-epoch kd stage that finishes, past the rung at 2: its partial entry stays for other lengths.
    short = run_plan(make_plan(tiny_problem, [("kd", 4)], recipe=STEP, reference=REF), teacher_cache=teacher_cache,
                     stage_cache=cache, partial_at={2})
    assert short.epochs_trained == 4 and len(cache.entries()) == 2
    cached = run_plan(target, teacher_cache=teacher_cache, stage_cache=cache, partial_at={2})
    assert (cached.epochs_reused, cached.epochs_trained) == (2, 5)
    assert cached.stages[0].epochs == 6
    assert _curve(cached) == _curve(scratch)
    a, b = _student(scratch), _student(cached)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Under cosine the same two plans share nothing, and the finished stage leaves no partial entry.
    cos_cache = PrefixCache(tmp_path / "cosine")
    run_plan(make_plan(tiny_problem, [("kd", 4)], reference=REF), teacher_cache=teacher_cache, stage_cache=cos_cache,
             partial_at={2})
    assert len(cos_cache.entries()) == 1
    again = run_plan(make_plan(tiny_problem, [("kd", 6), ("dkd", 1)], reference=REF), teacher_cache=teacher_cache,
                     stage_cache=cos_cache, partial_at={2})
    assert (again.epochs_reused, again.epochs_trained) == (0, 7)


def test_a_partial_entry_that_does_not_fit_is_ignored(tiny_problem, teacher_cache, tmp_path):
    plan = make_plan(tiny_problem, [("kd", 3)])
    scratch = run_plan(plan, teacher_cache=teacher_cache)
    cache = PrefixCache(tmp_path / "stages")
    with pytest.raises(_Stop):
        run_plan(plan, teacher_cache=teacher_cache, stage_cache=cache, partial_at={2}, on_epoch_end=_stop_at(2))
    [(path, _, _)] = cache.entries()
    entry = torch.load(path, weights_only=True)
    entry["student"] = {k: v.flatten()[:1] for k, v in entry["student"].items()}  # the wrong shapes
    torch.save(entry, path)
    again = run_plan(plan, teacher_cache=teacher_cache, stage_cache=cache, partial_at={2})
    assert (again.epochs_reused, again.epochs_trained) == (0, 3)
    assert _curve(again) == _curve(scratch)


# Keys computed before the engine was split into a stage store, workbench and events (issue 27):
# an existing study's caches must keep hitting, so these never change without ENGINE_VERSION/FORMAT.
_PINNED_KEYS = {
    "cpu": ["a1fdde47935d8e30ec7ae68ecf0ac05d", "77bc95f7c53242c41089d71bb2eea5e7", "b4a12ba7e702b6f27fba8b839c458adf",
            "2e34ed634c37f959c28c6def5771d3fe", "4523ea499430085bd853b4ae57c1a79a", "1f24a7ef3719bb2146e2ef8c4a70193d"],
    "cuda": ["4ee9051ff5a4e83de707bc98f28b2b50", "a85dcbb9fb90d177b52c4fb56114a871", "861063f79477f54cf14839f92ca0b55b",
             "a7c0809a0bfba192a737748525216058", "aff13f2e0edaf5e386773fb2d5f06b41", "6c2d3c1f4e185d9e2884d3925da3451f"],
}


@pytest.mark.parametrize("machine", ["cpu", "cuda"])
def test_cache_keys_are_those_existing_caches_hold(tiny_problem, machine):
    from smskd_search.engine import teacher_logits_key
    from smskd_search.engine.frozen import frozen_outputs_key

    plan = make_plan(tiny_problem, [("kd", 2), ("dkd", 3)], reference=REF)
    rt = (Runtime(1, "cpu", "None/scaling=False/channels_last=False", torch_version="2.5.1", engine_version=1)
          if machine == "cpu" else
          Runtime(1, "cuda:H200", "torch.bfloat16/scaling=False/channels_last=True", torch_version="2.5.1",
                  engine_version=1, numerics="tf32=0"))
    sha = "ab" * 32
    keys = [stage_prefix_key(plan, 0, teacher_sha256=sha, runtime=rt),
            stage_prefix_key(plan, 1, teacher_sha256=sha, runtime=rt),
            stage_prefix_key(plan, 1, teacher_sha256=sha, runtime=rt, teacher_logits="float16"),
            partial_stage_key(plan, 1, 2, teacher_sha256=sha, runtime=rt),
            teacher_logits_key(plan, 1, 0, loader_seed=1_000_003 * plan.seed + 1, train_shape=(100, 1, 8, 8),
                               teacher_sha256=sha, runtime=rt),
            frozen_outputs_key(teacher_sha256=sha, data_identity=["d", [100, 1, 8, 8], "torch.float32"],
                               need_features=True, batch_size=256, runtime=rt)]
    assert keys == _PINNED_KEYS[machine]


def test_the_stage_store_keeps_checkpoints_prefixes_and_partial_stages_under_one_lookup(tiny_problem, tmp_path):
    from smskd_search.engine.stage_store import Slot, StageStore

    cpu = torch.device("cpu")
    prec = pick_precision(cpu, "auto")
    rt = Runtime.current(cpu, prec)
    plan = make_plan(tiny_problem, [("kd", 2), ("dkd", 3)], reference=REF)
    store = StageStore.for_run(plan, runtime=rt, precision=prec, teacher_sha256="ab" * 32, logits_tag="exact",
                               cache=PrefixCache(tmp_path / "stages"), out_dir=tmp_path / "run",
                               partial_at=frozenset({1, 3, 4, 9}))
    own = {"plan_hash": plan.content_hash(), "stage_index": 1, "x": torch.ones(2)}
    assert store.put(Slot(1, own=True), own) == tmp_path / "run" / "stage2.pt"
    assert store.get(Slot(1, own=True))["stage_index"] == 1 and store.resume_point()["stage_index"] == 1
    assert store.get(Slot(0, own=True)) is None  # not the last checkpoint
    # The cache's slots are named by the keys a cache of an earlier engine holds.
    finished = store.put(Slot(1), {"x": torch.zeros(1)})
    assert finished.stem == stage_prefix_key(plan, 1, teacher_sha256="ab" * 32, runtime=rt)
    partial = store.put(Slot(1, 2), {"x": torch.zeros(1)})
    assert partial.stem == partial_stage_key(plan, 1, 2, teacher_sha256="ab" * 32, runtime=rt)
    assert torch.equal(store.get(Slot(1, 2))["x"], torch.zeros(1))
    # Rungs inside stage 2 (epochs 2..5): 3 and 4, as epochs done in the stage.
    assert store.partials(1, cum_before=2) == [Slot(1, 1), Slot(1, 2)]
    assert store.prefixes(after=0) == [Slot(1), Slot(0)] and store.prefixes(after=1) == [Slot(1)]
    # A finished stage answers for its partial entries (a cosine schedule shares them with no other length).
    store.finish(1, {"x": torch.zeros(1)}, [Slot(1, 2)])
    assert store.get(Slot(1, 2)) is None and store.get(Slot(1)) is not None
    # A plan the cache cannot serve: no cache slots, and why.
    carried = StageStore.for_run(plan.model_copy(update={"restart_optimizer": False}), runtime=rt, precision=prec,
                                 teacher_sha256="ab" * 32, logits_tag="exact", cache=PrefixCache(tmp_path / "stages"),
                                 out_dir=None, partial_at=frozenset({1}))
    assert carried.skipped and "restart_optimizer" in carried.skipped
    assert carried.prefixes(after=0) == [] and carried.partials(0, 0) == [] and carried.get(Slot(1)) is None
