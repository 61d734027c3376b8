"""The stage store: one place to look up and put a stage's state, wherever it is kept.

A stage's state is kept in three kinds of :class:`Slot`: the run's own checkpoint of a finished
stage (``stage{k}.pt`` in its folder, for ``resume``), a finished prefix in the stage-prefix cache
(:func:`~smskd_search.engine.prefix_cache.stage_prefix_key`, shared by every plan with that prefix),
and a stage cut part-way at a rung in that cache
(:func:`~smskd_search.engine.prefix_cache.partial_stage_key`). :meth:`StageStore.get` and
:meth:`StageStore.put` take any of them, and :meth:`StageStore.logits_key` names a stage epoch's
teacher logits (:mod:`~smskd_search.engine.logit_store`): the keys that say a stage's numbers (the
run's :class:`~smskd_search.engine.prefix_cache.Runtime`, the teacher, the teacher-logit store's
dtype) are made here only, so that a change to what a stage computes is made in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from smskd_search.engine.checkpoints import checkpoint_path, latest_checkpoint, save_checkpoint
from smskd_search.engine.device import Precision
from smskd_search.engine.logit_store import teacher_logits_key
from smskd_search.engine.prefix_cache import (
    PrefixCache,
    Runtime,
    cacheable,
    partial_stage_key,
    shared_across_lengths,
    stage_prefix_key,
)
from smskd_search.plan import Plan


@dataclass(frozen=True)
class Slot:
    """Where one state of a stage is kept.

    Args:
        stage: The stage (0-based).
        epochs_done: None: the stage finished; else the epochs of it trained (a partial entry).
        own: The run's own checkpoint (its folder) rather than the shared stage-prefix cache.
    """

    stage: int
    epochs_done: int | None = None
    own: bool = False


@dataclass
class StageStore:
    """A run's view of its checkpoints folder and of the stage-prefix cache.

    Args:
        plan: The plan run.
        runtime: The machine's numerics (in every cache key).
        teacher_sha256: The teacher's weights (in every cache key).
        logits_tag: ``"exact"``, or the lossy dtype of the teacher-logit store the run reads.
        cache: The stage-prefix cache, where the plan can use it (else None).
        out_dir: The run's checkpoints folder, or None (no checkpoints).
        partial_at: Cumulative epochs at which a stage under way is put in the cache.
        skipped: Why a cache that was given is not used (None: used, or none given).
    """

    plan: Plan
    runtime: Runtime
    teacher_sha256: str
    logits_tag: str
    cache: PrefixCache | None
    out_dir: Path | None
    partial_at: frozenset[int] = frozenset()
    skipped: str | None = None

    @classmethod
    def for_run(cls, plan: Plan, *, runtime: Runtime, precision: Precision, teacher_sha256: str, logits_tag: str,
                cache: PrefixCache | None, out_dir: Path | None, partial_at: frozenset[int]) -> StageStore:
        """The store of one run; the cache is left out where the plan's stages cannot be cached."""
        skipped = cacheable(plan, precision) if cache is not None else None
        return cls(plan, runtime, teacher_sha256, logits_tag, cache if skipped is None else None, out_dir,
                   partial_at, skipped)

    def _key(self, slot: Slot) -> str:
        if slot.epochs_done is None:
            return stage_prefix_key(self.plan, slot.stage, teacher_sha256=self.teacher_sha256, runtime=self.runtime,
                                    teacher_logits=self.logits_tag)
        return partial_stage_key(self.plan, slot.stage, slot.epochs_done, teacher_sha256=self.teacher_sha256,
                                 runtime=self.runtime, teacher_logits=self.logits_tag)

    def logits_key(self, stage: int, epoch: int, *, loader_seed: int, train_shape: tuple[int, ...]) -> str:
        """The teacher-logit store's key of epoch ``epoch`` (0-based) of stage ``stage``'s batches."""
        return teacher_logits_key(self.plan, stage, epoch, loader_seed=loader_seed, train_shape=train_shape,
                                  teacher_sha256=self.teacher_sha256, runtime=self.runtime, stored=self.logits_tag)

    def get(self, slot: Slot) -> dict | None:
        """The payload kept in ``slot``, or None (nothing there, or no place for it in this run).

        Raises:
            UnsafeCheckpoint: The run's own checkpoint does not load with ``weights_only=True``.
        """
        if slot.own:
            if self.out_dir is None:
                return None
            ckpt = latest_checkpoint(self.out_dir, self.plan.content_hash())
            return ckpt if ckpt is not None and ckpt["stage_index"] == slot.stage else None
        return self.cache.get(self._key(slot)) if self.cache is not None else None

    def put(self, slot: Slot, payload: dict) -> Path | None:
        """Keep ``payload`` in ``slot``; returns its file, or None (no place for it, or a cache put
        that failed: the cache only saves work)."""
        if slot.own:
            if self.out_dir is None:
                return None
            path = checkpoint_path(self.out_dir, slot.stage)
            save_checkpoint(path, payload)
            return path
        return self.cache.put(self._key(slot), payload) if self.cache is not None else None

    def discard(self, slot: Slot) -> None:
        """Remove a cache entry (one that failed to load as this engine's, or one made redundant)."""
        if self.cache is not None and not slot.own:
            self.cache.discard(self._key(slot))

    def resume_point(self) -> dict | None:
        """The run's own last checkpoint of this plan (any stage), or None."""
        return latest_checkpoint(self.out_dir, self.plan.content_hash()) if self.out_dir is not None else None

    def prefixes(self, after: int) -> list[Slot]:
        """The cached finished prefixes that go further than stage ``after - 1``, longest first."""
        if self.cache is None:
            return []
        return [Slot(k) for k in range(len(self.plan.stages) - 1, after - 1, -1)]

    def partials(self, stage: int, cum_before: int) -> list[Slot]:
        """Stage ``stage``'s partial slots, at the cumulative epochs of ``partial_at`` inside it (in order)."""
        if self.cache is None:
            return []
        epochs = self.plan.stages[stage].epochs
        return [Slot(stage, c - cum_before) for c in sorted(self.partial_at) if cum_before < c < cum_before + epochs]

    def finish(self, stage: int, payload: dict, partials: list[Slot]) -> None:
        """Put a finished stage in the cache; it answers for its partial entries from then on, unless
        a stage of another length can go on from them (a step or wsd schedule before its decay)."""
        if self.put(Slot(stage), payload) is None:
            return
        for slot in partials:
            assert slot.epochs_done is not None
            if not shared_across_lengths(self.plan.recipe.schedule, self.plan.stages[stage].epochs, slot.epochs_done):
                self.discard(slot)
