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

Trials that want an epoch at the same time compute it once between them, in parts, through claims
(:mod:`~smskd_search.engine.logit_claims`, :meth:`LogitStore.shared`, :class:`TeacherPass`).

Each entry also holds the batch order and two sums of every batch's first row and column (a crop or
flip moves them): :class:`EpochTeacher` compares them once at the epoch's end (no host-device
synchronisation per batch) and raises :class:`StoreMismatch` when they differ, i.e. when the key
missed something that changes the stream; it never lets such an epoch pass silently.

Neither Ray nor Optuna is imported here.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

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
# An epoch is computed in at most this many parts by the trials that want it at once (16 trials
# packed on one GPU each take one).
DEFAULT_PARTS = 16
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

    @classmethod
    def join(cls, parts: list[EpochLogits]) -> EpochLogits:
        """The parts of one epoch, in order, as one entry (on the CPU: a process's own parts are on
        its device, the others' were read from the folder)."""
        return cls(torch.cat([p.logits.cpu() for p in parts]), torch.cat([p.indices.cpu() for p in parts]),
                   torch.cat([p.checks.cpu() for p in parts]), parts[0].dtype)

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
            once between them (:mod:`~smskd_search.engine.logit_claims`, :meth:`shared`); only where
            ``root`` is a local folder.
        parts: The spans an epoch is cut into for that (at most): as many as the trials that can
            share one, and few enough that each is worth a file.
    """

    def __init__(self, root: str | Path | EntryFolder | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 memory_max_bytes: int = DEFAULT_MEMORY_BYTES, dtype: torch.dtype | None = None,
                 claims: bool = True, parts: int = DEFAULT_PARTS):
        if dtype not in (None, torch.float16):
            raise ValueError(f"dtype: None (exact) or torch.float16, not {dtype}")
        self.disk = PrefixCache(root, max_bytes) if root is not None else None
        # An object store has no exclusive create: there every trial computes what it lacks.
        folder = self.disk.folder if self.disk is not None else None
        self.claims = EpochClaims(folder.root) if claims and isinstance(folder, LocalFolder) else None
        self.parts = int(parts)
        self.memory_max_bytes = int(memory_max_bytes)
        self.dtype = dtype
        self._memory: OrderedDict[str, EpochLogits] = OrderedDict()
        self._lock = threading.Lock()
        # Epochs served from the store (a fraction where other processes computed some of its parts),
        # and put into it, by this store object; epochs this process waited for while others held
        # claims on their parts, and the seconds it waited.
        self.served = 0.0
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
        entry = self._from_disk(key)
        if entry is not None:
            self._remember(key, entry)
        return entry

    def put(self, key: str, entry: EpochLogits, room: int = 0) -> bool:
        """Keep ``entry`` (converted to the store's dtype) in memory and, where it fits, in the folder.

        A full folder keeps what it has: a stage's epochs are put in order and read in order, so
        evicting the least recently used entry to make room would drop the first epochs of the very
        stream being put (a 240-epoch CIFAR-100 stage is about 4 GB of logits), and no later trial
        would get a hit. Returns whether the folder took it. ``room``: bytes in the folder the entry
        replaces (an epoch's parts), not counted against it.
        """
        entry = self._compact(entry)
        self._remember(key, entry)
        self.stored += 1
        return self._to_disk(key, entry, room)

    def shared(self, key: str, n_batches: int, fill: Callable[[int, int, Claim | None], EpochLogits | None]
               ) -> tuple[EpochLogits | None, float]:
        """The entry under ``key``, computed once, in parts, by the trials that want it at the same time.

        Served where stored. Else, where this store has claims, the epoch's batches are cut into at
        most ``parts`` spans: each trial claims the spans nobody holds, computes them through ``fill``
        and puts them; then it waits for the others' spans, joins them and puts the whole epoch
        (its parts then go). N trials in step thus each run the teacher over 1/N of the epoch. A
        span whose holder gave up or died is computed by whoever waits for it.

        Returns the entry (None without claims: compute it while training) and the share of the
        epoch this process ran the teacher over (0.0: served whole).

        Args:
            key: The epoch's key (:func:`teacher_logits_key`).
            n_batches: The epoch's batches.
            fill: ``fill(lo, hi, claim)``: the logits over batches ``lo`` to ``hi`` (exclusive) of the
                epoch (:class:`TeacherPass`), keeping ``claim`` fresh where given; None: it could not.
        """
        entry = self.get(key)
        if entry is not None or self.claims is None or self.disk is None or n_batches < 1:
            return entry, 0.0
        spans = part_spans(n_batches, self.parts)
        names = [f"{key}.part{i}of{len(spans)}" for i in range(len(spans))]
        got: list[EpochLogits | None] = [None] * len(spans)
        mine = self._claim_parts(key, spans, names, fill, got)
        if mine is None:
            return None, 0.0
        waited_s = 0.0
        for i, (lo, hi) in enumerate(spans):
            if got[i] is not None:
                continue
            waited_s += self._wait(names[i], functools.partial(self._whole_or_part, key, names[i]))
            part = self._from_disk(names[i])
            if part is None:
                whole = self.get(key)  # joined by another (its parts then went)
                if whole is not None:
                    self._count_wait(waited_s)
                    return whole, mine / n_batches
                part = fill(lo, hi, None)  # its holder gave up or died: computed here
                if part is None:
                    return None, 0.0
                part, mine = self._compact(part), mine + hi - lo
            got[i] = part
        whole = EpochLogits.join([g for g in got if g is not None])
        self._count_wait(waited_s + self._join(key, names, whole))
        entry = self.get(key)
        return (entry if entry is not None else whole), mine / n_batches

    def _claim_parts(self, key: str, spans: list[tuple[int, int]], names: list[str],
                     fill: Callable[[int, int, Claim | None], EpochLogits | None],
                     got: list[EpochLogits | None]) -> int | None:
        """Compute and put the parts nobody holds (into ``got``); the batches computed, None if ``fill`` could not."""
        assert self.disk is not None and self.claims is not None
        disk, mine = self.disk, 0
        for i, (lo, hi) in enumerate(spans):
            if self.has(key):
                break
            held = self.claims.claim(names[i]) if not disk.has(names[i]) else None
            if held is None:
                continue
            try:
                if self.has(key):  # joined by another between the look and the claim
                    break
                if not disk.has(names[i]):  # put by another between the look and the claim
                    part = fill(lo, hi, held)
                    if part is None:
                        return None
                    part = self._compact(part)  # as the whole will be kept (the store's dtype, the CPU)
                    got[i], mine = part, mine + hi - lo
                    self._to_disk(names[i], part)  # where it fits; else the others compute it
            finally:
                held.release()
        return mine

    def _join(self, key: str, names: list[str], whole: EpochLogits) -> float:
        """Put the whole epoch (one process does; the others wait for it); the seconds waited."""
        assert self.disk is not None and self.claims is not None
        joiner = self.claims.claim(key)
        if joiner is None:
            return self._wait(key, lambda: self.has(key))
        try:
            if not self.has(key):
                # The parts make room for the whole that replaces them.
                parts_bytes = sum(size for name, size, _ in self.disk.folder.entries() if name[:-3] in names)
                if self.put(key, whole, room=parts_bytes):
                    for name in names:  # the whole epoch is there: a late reader takes it instead
                        self.disk.discard(name)
        finally:
            joiner.release()
        return 0.0

    def _wait(self, name: str, ready: Callable[[], bool]) -> float:
        assert self.claims is not None
        start = time.monotonic()
        self.claims.wait(name, ready)
        return time.monotonic() - start

    def _whole_or_part(self, key: str, name: str) -> bool:
        assert self.disk is not None
        return self.has(key) or self.disk.has(name)

    def _from_disk(self, name: str) -> EpochLogits | None:
        """The folder's entry (or part) under ``name``, or None."""
        if self.disk is None:
            return None
        payload = self.disk.get(name)
        if payload is None:
            return None
        try:
            return EpochLogits.from_payload(payload)
        except (KeyError, TypeError, ValueError, AttributeError):
            self.disk.discard(name)  # not an entry this engine wrote
            return None

    def _to_disk(self, name: str, entry: EpochLogits, room: int = 0) -> bool:
        """Write ``entry`` where the folder has room (``room``: bytes it replaces); whether it did."""
        if self.disk is None or self.disk.size_bytes() - room + entry.nbytes > self.disk.max_bytes:
            return False
        # A failed write fails nothing: the store only saves work.
        return self.disk.put(name, entry.to_payload()) is not None

    def _count_wait(self, seconds: float) -> None:
        # An epoch counts as waited for where a wait slept at least once (not a look that found it there).
        if self.claims is not None and seconds >= self.claims.poll_s:
            self.waited += 1
            self.wait_s += seconds

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
        # The share of a served epoch this process computed ahead of it (that share is not served).
        self.computed_share = 0.0

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


@runtime_checkable
class PartLoader(Protocol):
    """A loader whose epoch can be started at any batch (:meth:`TensorLoader.batches`)."""

    def random_state(self) -> Any: ...

    def set_random_state(self, state: Any) -> None: ...

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...


class TeacherPass:
    """The teacher's logits over parts of the loader's next epoch, computed ahead of training it.

    Parts taken in order continue one pass over the epoch; a part further on starts a pass at its
    first batch (the batches before it drawn, not made). :meth:`close` puts the loader's generator
    back where it was, so that the epoch that trains next sees the very batches the parts saw
    (their fingerprints check it) and the run's numbers do not change.

    Args:
        forward: The teacher's frozen forward, or its recorded CUDA graph
            (:class:`~smskd_search.engine.step_graph.ForwardGraph`, where the run records its steps).
        loader: The stage's training loader, before the epoch.
        device: Where the batches are.
        round_to: A lossy store's dtype (as for :class:`EpochTeacher`).
    """

    def __init__(self, forward: Any, loader: PartLoader, *, device: torch.device,
                 round_to: torch.dtype | None = None):
        self.forward, self.loader, self.device, self.round_to = forward, loader, device, round_to
        self._start_state = loader.random_state()
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._at = 0

    def __call__(self, lo: int, hi: int, claim: Claim | None = None) -> EpochLogits | None:
        """The logits over batches ``lo`` to ``hi`` (exclusive); ``claim`` is kept fresh meanwhile."""
        if self._batches is None or self._at != lo:
            self.loader.set_random_state(self._start_state)
            self._batches, self._at = self.loader.batches(lo), lo
        recorder = EpochTeacher(self.forward, None, need_features=False, device=self.device, round_to=self.round_to)
        for _, (x, _, idx) in zip(range(lo, hi), self._batches):
            recorder(x, idx)
            self._at += 1
            if claim is not None:
                claim.beat()
        return recorder.finish()

    def close(self) -> None:
        self._batches = None
        self.loader.set_random_state(self._start_state)


def part_spans(n_batches: int, parts: int) -> list[tuple[int, int]]:
    """``n_batches`` cut into at most ``parts`` spans of whole batches, in order.

    Example:

        >>> part_spans(10, 4)
        [(0, 3), (3, 6), (6, 9), (9, 10)]
    """
    size = max(1, -(-n_batches // max(1, parts)))
    return [(lo, min(lo + size, n_batches)) for lo in range(0, n_batches, size)]


__all__ = [
    "DEFAULT_MEMORY_BYTES",
    "EpochLogits",
    "EpochTeacher",
    "LogitStore",
    "NO_TEACHER_FEATURES",
    "StoreMismatch",
    "PartLoader",
    "TeacherPass",
    "part_spans",
    "teacher_logits_key",
]
