"""The teacher-logit store: with augmented batches, the teacher's logits of each epoch once per study.

With augmentation on, the teacher cannot be precomputed over the split (every epoch crops and flips
anew), but batch ``b`` of epoch ``e`` of stage ``k`` holds the same images in every trial of a
study: the stage's loader is seeded by the plan's seed and the stage index alone, and nothing else
draws from its generator. So the teacher's logits of one such epoch are the same numbers in every
trial that trains that epoch, whatever its method, lr or epoch count. :func:`teacher_logits_key`
hashes what determines them (the data split and its shape, the batch size, the augmentation, the
seed, the stage and its loader seed, the epoch, the teacher's sha256, the machine's numerics, this
engine's version); :class:`LogitStore` keeps them, one entry per (stream, epoch), in a
:class:`~smskd_search.engine.prefix_cache.PrefixCache` folder (atomic puts; a full folder takes no
more, see :meth:`LogitStore.put`) and in a bounded in-process LRU.

Only methods that read nothing of the teacher but its logits (``Method.teacher_features`` False:
KD, DKD, CE) are served from the store; the TCP weights of the reference term read the logits only
too. A method that reads the teacher's features (FitNets, CRD, RKD, ...) runs the teacher forward
as before, and an epoch that ran the forward puts its logits when the store has none yet.

Exactness: by default an entry keeps the logits in the dtype the forward produced (float32 in fp32
runs, bfloat16 under bf16 autocast), so a stage served from the store trains bit for bit as one that
ran the forward on the CPU (the teacher in eval mode gives a batch the same output every time, and
the key includes the batch size and the thread count). ``LogitStore(dtype=torch.float16)`` halves an
fp32 run's entries at the price of that exactness; it is opt-in, its entries have their own keys,
and a run with it gives the stage-prefix cache other keys too (see :func:`run_plan`).

Each entry also holds the batch order and two sums of every batch's first row and column (a crop or
flip moves them): :class:`EpochTeacher` compares them once at the epoch's end (no host-device
synchronisation per batch) and raises :class:`StoreMismatch` when they differ, i.e. when the key
missed something that changes the stream; it never lets such an epoch pass silently.

Neither Ray nor Optuna is imported here.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smskd_search.data.batches import BatchLoader
from smskd_search.data.folder_split import data_identity
from smskd_search.engine.frozen import FrozenForward
from smskd_search.engine.logit_claims import Claim, EpochClaims
from smskd_search.engine.prefix_cache import (
    DEFAULT_MAX_BYTES,
    EntryFolder,
    LocalFolder,
    PrefixCache,
    Runtime,
    _digest,
)
from smskd_search.models.base import Features
from smskd_search.plan import Plan

FORMAT = 1
DEFAULT_MEMORY_BYTES = 256 * 2**20
# Relative tolerance of the batch fingerprints: identical batches give identical sums on the CPU;
# the slack is for GPU reductions. A crop shifted by one pixel changes them by far more.
_CHECK_RTOL = 1e-6


class StoreMismatch(RuntimeError):
    """A stored epoch does not match the batches the loader gave (its key missed something)."""


def teacher_logits_key(plan: Plan, k: int, epoch: int, *, loader_seed: int, train_shape: tuple[int, ...],
                       teacher_sha256: str, runtime: Runtime, stored: str = "exact") -> str:
    """The store key of the teacher's logits over epoch ``epoch`` (0-based) of stage ``k`` (0-based).

    Args:
        plan: The plan (its dataset, recipe batch size and augmentation, seed, teacher arch count).
        k: The stage index: with ``loader_seed``, which stream of batches.
        epoch: The epoch within the stage: how far along that stream.
        loader_seed: The seed of the stage's loader generator.
        train_shape: The training split's images' shape (the data a search was handed may differ
            from what the dataset spec alone says).
        teacher_sha256: The teacher's weights.
        runtime: The machine's numerics (threads, device, precision, torch and engine versions).
        stored: ``"exact"`` or the lossy dtype the store keeps (``"float16"``).
    """
    data = {
        "format": FORMAT,
        "dataset": data_identity(plan.problem.dataset),
        "train_shape": list(train_shape),
        "teacher": {"arch": plan.problem.teacher.arch, "sha256": teacher_sha256},
        # Only what the loader reads: the lr, the optimizer, the stages' methods do not change a batch.
        "batch_size": plan.recipe.batch_size,
        "augment": plan.recipe.augment.model_dump(mode="json"),
        "seed": plan.seed,
        "stage": k,
        "loader_seed": loader_seed,
        "epoch": epoch,
        "stored": stored,
        "runtime": runtime.key_data(),
    }
    return _digest(data)


@dataclass(frozen=True)
class EpochLogits:
    """The teacher's logits over one epoch's batches, in batch order, with what checks the stream.

    Args:
        logits: ``(n, classes)``, row ``i`` for the ``i``-th sample the epoch's batches held.
        indices: ``(n,)``: the samples' positions in the training split (the shuffle).
        checks: ``(batches, 2)`` float64: each batch's sums over its first pixel column and row.
        dtype: The dtype the forward produced (the logits are handed back in it).
    """

    logits: torch.Tensor
    indices: torch.Tensor
    checks: torch.Tensor
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.logits, self.indices, self.checks))

    def to_payload(self) -> dict[str, Any]:
        return {"format": FORMAT, "logits": self.logits, "indices": self.indices.to(torch.int32),
                "checks": self.checks, "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> EpochLogits:
        dtype = getattr(torch, str(payload["dtype"]))
        if payload.get("format") != FORMAT or not isinstance(dtype, torch.dtype):
            raise ValueError("not a teacher-logit entry of this format")
        return cls(payload["logits"], payload["indices"].long(), payload["checks"], dtype)


class LogitStore:
    """Teacher logits per (batch stream, epoch): an in-process LRU over an optional folder.

    Args:
        root: The folder (a :class:`PrefixCache`: atomic puts); None: this process only.
        max_bytes: The folder's cap: once full, it takes no more entries (:meth:`put` says why).
        memory_max_bytes: The cap of the entries kept in this process (least recently used go
            first; an entry larger than the cap is not kept in memory).
        dtype: None keeps the logits as the forward produced them (exact); ``torch.float16`` halves
            fp32 entries, with other numbers (opt-in, see the module docstring).
        claims: Trials that reach an epoch the store lacks at the same time run the teacher over it
            once (:mod:`~smskd_search.engine.logit_claims`); only where ``root`` is a local folder.
    """

    def __init__(self, root: str | Path | EntryFolder | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 memory_max_bytes: int = DEFAULT_MEMORY_BYTES, dtype: torch.dtype | None = None,
                 claims: bool = True):
        if dtype not in (None, torch.float16):
            raise ValueError(f"dtype: None (exact) or torch.float16, not {dtype}")
        self.disk = PrefixCache(root, max_bytes) if root is not None else None
        # An object store has no exclusive create: there every trial computes what it lacks.
        folder = self.disk.folder if self.disk is not None else None
        self.claims = EpochClaims(folder.root) if claims and isinstance(folder, LocalFolder) else None
        self.memory_max_bytes = int(memory_max_bytes)
        self.dtype = dtype
        self._memory: OrderedDict[str, EpochLogits] = OrderedDict()
        self._lock = threading.Lock()
        # Epochs served from the store, and put into it, by this store object; epochs this process
        # waited for while another held their claim, and the seconds it waited.
        self.served = 0
        self.stored = 0
        self.waited = 0
        self.wait_s = 0.0

    @property
    def tag(self) -> str:
        """What the store keeps: ``"exact"``, or the lossy dtype (it goes into the keys)."""
        return "exact" if self.dtype is None else str(self.dtype).removeprefix("torch.")

    def memory_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._memory.values())

    def _remember(self, key: str, entry: EpochLogits) -> None:
        with self._lock:
            self._memory.pop(key, None)
            if entry.nbytes > self.memory_max_bytes:
                return
            self._memory[key] = entry
            total = sum(e.nbytes for e in self._memory.values())
            while total > self.memory_max_bytes:
                _, dropped = self._memory.popitem(last=False)
                total -= dropped.nbytes

    def has(self, key: str) -> bool:
        """Whether an entry is stored under ``key`` (without loading it; not a use)."""
        with self._lock:
            if key in self._memory:
                return True
        return self.disk is not None and self.disk.has(key)

    def get(self, key: str) -> EpochLogits | None:
        """The entry under ``key`` (on the CPU), or None; a hit counts as a use in the tier that
        served it (a hit in memory leaves the folder's order alone)."""
        with self._lock:
            entry = self._memory.get(key)
            if entry is not None:
                self._memory.move_to_end(key)
                return entry
        if self.disk is None:
            return None
        payload = self.disk.get(key)
        if payload is None:
            return None
        try:
            entry = EpochLogits.from_payload(payload)
        except (KeyError, TypeError, ValueError, AttributeError):
            self.disk.discard(key)  # not an entry this engine wrote
            return None
        self._remember(key, entry)
        return entry

    def put(self, key: str, entry: EpochLogits) -> bool:
        """Keep ``entry`` (converted to the store's dtype) in memory and, where it fits, in the folder.

        A full folder keeps what it has: a stage's epochs are put in order and read in order, so
        evicting the least recently used entry to make room would drop the first epochs of the very
        stream being put (a 240-epoch CIFAR-100 stage is about 4 GB of logits), and no later trial
        would get a hit. Returns whether the folder took it.
        """
        entry = self._compact(entry)
        self._remember(key, entry)
        taken = False
        if self.disk is not None and self.disk.size_bytes() + entry.nbytes <= self.disk.max_bytes:
            # A failed write fails nothing: the store only saves work.
            taken = self.disk.put(key, entry.to_payload()) is not None
        self.stored += 1
        return taken

    def shared(self, key: str, fill: Callable[[Claim], EpochLogits | None]) -> tuple[EpochLogits | None, bool]:
        """The entry under ``key``, computed once for the trials that want it at the same time.

        Served where stored; else, where this store has claims, the first to claim ``key`` computes
        it through ``fill`` (given the claim, to keep it fresh) and puts it, and the others wait for
        that entry. Returns the entry (None: compute it while training, as without claims; so when
        a claim's holder gave up or died) and whether ``fill`` computed it here.

        Args:
            key: The epoch's key (:func:`teacher_logits_key`).
            fill: Computes the epoch's entry (:func:`teacher_pass`); None: it could not.
        """
        entry = self.get(key)
        if entry is not None or self.claims is None:
            return entry, False
        held = self.claims.claim(key)
        if held is None:
            start = time.monotonic()
            found = self.claims.wait(key, lambda: self.has(key))
            self.waited += 1
            self.wait_s += time.monotonic() - start
            return (self.get(key) if found else None), False
        try:
            entry = self.get(key)  # put by another between this get and the claim
            if entry is not None:
                return entry, False
            computed = fill(held)
            if computed is None:
                return None, False
            self.put(key, computed)
        finally:
            held.release()
        entry = self.get(key)
        return (entry if entry is not None else self._compact(computed)), True

    def discard(self, key: str) -> None:
        with self._lock:
            self._memory.pop(key, None)
        if self.disk is not None:
            self.disk.discard(key)

    def _compact(self, entry: EpochLogits) -> EpochLogits:
        logits = entry.logits.detach().cpu()
        if self.dtype is not None and logits.dtype.itemsize > self.dtype.itemsize:
            logits = logits.to(self.dtype)
        return EpochLogits(logits, entry.indices.detach().cpu(), entry.checks.detach().cpu(), entry.dtype)


def _fingerprint(x: torch.Tensor) -> torch.Tensor:
    # The first column moves with a horizontal crop offset or a flip, the first row with a vertical
    # offset; the shuffle is checked through the indices.
    return torch.stack([x[..., 0].double().sum(), x[..., 0, :].double().sum()])


class _NoTeacherFeatures:
    """What a logits-only method gets for ``t_feats`` when served from the store: reading it is a
    bug in the method's ``teacher_features`` declaration, said at once."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"t_feats.{name}: this method declares teacher_features = False, so its "
                             "teacher features are not computed (set it True to read them)")


NO_TEACHER_FEATURES: Features = _NoTeacherFeatures()  # type: ignore[assignment]


class EpochTeacher:
    """The teacher's forward for one epoch of a stage, served from a stored epoch where it can be.

    Called as a :class:`FrozenForward` is, batch by batch in the loader's order. With ``stored``
    and ``need_features`` False, it hands back the stored logits (no forward); otherwise it runs
    ``forward`` and, where ``record``, records the logits for :meth:`finish`.

    Args:
        forward: The teacher's frozen forward.
        stored: The epoch's stored logits, or None.
        need_features: Whether the stage's method reads the teacher's features.
        device: Where the training batches are.
        record: Record the logits where they are not served (False: the store has them already).
        round_to: A lossy store's dtype: the logits the forward gives are rounded to it before the
            epoch trains on them, so that a run's numbers do not depend on whether an earlier run
            had put the epoch (served and computed epochs see the same values).
    """

    def __init__(self, forward: FrozenForward, stored: EpochLogits | None, *, need_features: bool,
                 device: torch.device, record: bool = True, round_to: torch.dtype | None = None):
        self.forward = forward
        self.round_to = round_to
        self.serving = stored is not None and not need_features
        self.recording = record and stored is None
        self._stored = stored
        self._pos = 0
        self._batch = 0
        if self.serving:
            assert stored is not None
            self._logits = stored.logits.to(device).to(stored.dtype)
            self._indices = stored.indices.to(device)
            self._checks = stored.checks.to(device)
            self._mismatch = torch.zeros((), dtype=torch.bool, device=device)
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # Served from an entry this process computed ahead of the epoch (not counted as served).
        self.filled_here = False

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, Features | None]:
        if self.serving:
            b = idx.shape[0]
            if self._pos + b > self._logits.shape[0] or self._batch >= self._checks.shape[0]:
                raise StoreMismatch("teacher-logit store: the epoch has more samples than its stored entry")
            want = self._checks[self._batch]
            bad = (idx != self._indices[self._pos : self._pos + b]).any()
            bad |= ((_fingerprint(x) - want).abs() > _CHECK_RTOL * (1.0 + want.abs())).any()
            self._mismatch |= bad
            out = self._logits[self._pos : self._pos + b]
            self._pos += b
            self._batch += 1
            return out, NO_TEACHER_FEATURES
        logits, feats = self.forward(x, idx)
        if self.round_to is not None and logits.dtype.itemsize > self.round_to.itemsize:
            logits = logits.to(self.round_to).to(logits.dtype)
        if self.recording:
            self._parts.append((logits.detach(), idx, _fingerprint(x)))
        return logits, feats

    def finish(self) -> EpochLogits | None:
        """After the epoch: the recorded logits to put (None when none were recorded).

        Raises:
            StoreMismatch: The stored epoch served did not match the batches (checked here, once).
        """
        if self.serving:
            if bool(self._mismatch) or self._pos != self._logits.shape[0]:
                raise StoreMismatch("teacher-logit store: a stored epoch does not match the batches the loader "
                                    "gave (the key misses something that changes them); delete its cache/"
                                    "teacher_logits folder or search with --no-cache")
            return None
        if not self.recording or not self._parts:
            return None
        logits, idx, checks = zip(*self._parts)
        return EpochLogits(torch.cat(logits), torch.cat(idx), torch.stack(checks), logits[0].dtype)


def teacher_pass(forward: FrozenForward, loader: BatchLoader, *, device: torch.device,
                 round_to: torch.dtype | None = None, beat: Callable[[], None] | None = None) -> EpochLogits | None:
    """The teacher's logits over the loader's next epoch, computed ahead of training it.

    The loader's generator is put back where it was, so the epoch that trains next sees the very
    batches this pass saw (the entry's fingerprints check it) and the run's numbers do not change.

    Args:
        forward: The teacher's frozen forward.
        loader: The stage's training loader, before the epoch.
        device: Where the batches are.
        round_to: A lossy store's dtype (as for :class:`EpochTeacher`).
        beat: Called per batch (a claim's heartbeat).
    """
    state = loader.random_state()
    recorder = EpochTeacher(forward, None, need_features=False, device=device, round_to=round_to)
    try:
        for x, _, idx in loader:
            recorder(x, idx)
            if beat is not None:
                beat()
    finally:
        loader.set_random_state(state)
    return recorder.finish()


__all__ = [
    "DEFAULT_MEMORY_BYTES",
    "EpochLogits",
    "EpochTeacher",
    "LogitStore",
    "NO_TEACHER_FEATURES",
    "StoreMismatch",
    "teacher_logits_key",
    "teacher_pass",
]
