"""The stage-prefix cache: a finished stage is trained once, whichever plan asks for it again.

With a fresh optimizer and a restarted lr schedule at every stage (``restart_optimizer: true``, the
default), stage ``k`` of a plan is fully determined by the problem (data split, teacher weights,
student arch), the recipe, the seed, the stages ``0..k`` with their parameters, the reference
settings (from the second stage on) and the numerics of the machine (torch's thread count, the
device, the precision, torch's version, this engine's version). :func:`stage_prefix_key` hashes
exactly those; plans that share a prefix (``kd(8) -> crd(8)`` and ``kd(8) -> rkd(4) -> pkt(6)``)
share its key, and :func:`smskd_search.engine.run_plan` starts such a plan from the longest prefix
found in a :class:`PrefixCache` and trains only the rest, with the same numbers as from scratch.

A stage cut short at a rung (a pruned trial) is reusable too: the state after its first ``e`` epochs
is the same for every plan with that prefix whose stage ran those epochs at the same learning rates,
so :func:`partial_stage_key` names it by the prefix less the stage's length plus what those epochs
saw of the schedule (:func:`schedule_prefix`), and the engine puts the student, the method's
modules, the optimizer and the random streams there at the epochs it is asked to (the search's
rungs); a later plan with that prefix goes on from there. Under a step schedule (the CIFAR benchmark
recipe) stages of different lengths share these entries up to their first milestone, under ``wsd``
until their decay starts; under a
cosine one only a stage of the same length does, and a finished stage's entry replaces its partial
ones.

Not cached (:func:`cacheable` says why): plans with ``restart_optimizer: false`` (one lr schedule
spans all stages, so a prefix depends on the plan's total epochs, i.e. on the later stages too),
and fp16 runs with grad scaling (the scaler's state carries across stages and is not checkpointed).

:class:`PrefixCache` is a folder of ``<key>.pt`` files (tensors and plain data, loaded with
``weights_only=True``): a put writes a temporary file of its own and moves it into place, so two
writers of one key (two trials wanting the same prefix at once both train it) never leave half a
file, and the second write is harmless; a get touches the file's mtime, and a put evicts the least
recently used files beyond ``max_bytes``. The folder is a :class:`LocalFolder` or any other
:class:`EntryFolder` (the search layer keeps one in an object store). (A frozen teacher's outputs
over the training split are kept across runs by :class:`~smskd_search.engine.frozen.FrozenOutputsMemo`,
optionally in such a cache.)

Neither Ray nor Optuna is imported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import torch

from smskd_search.data.folder_split import data_identity
from smskd_search.engine.device import Precision, current_numerics, device_name
from smskd_search.engine.optim import lr_at, step_progress
from smskd_search.plan import Plan, ScheduleSpec

# Bump when a change to the engine changes what a stage computes: older cache entries then miss.
ENGINE_VERSION = 1
DEFAULT_MAX_BYTES = 2 * 2**30
FORMAT = 1
# Partial entries are keyed by the schedule their epochs saw, not the stage's length (format 2).
PARTIAL_FORMAT = 2


@dataclass(frozen=True)
class Runtime:
    """What of the machine changes a run's numbers (CPU runs are bit-reproducible given these)."""

    threads: int
    device: str
    precision: str
    torch_version: str = torch.__version__
    engine_version: int = ENGINE_VERSION
    # A GPU's TF32, cuDNN and determinism settings (:meth:`Numerics.key`); empty on a CPU, where they
    # change nothing (so CPU keys are what they were before the field existed).
    numerics: str = ""

    @classmethod
    def current(cls, device: torch.device, precision: Precision, cuda_graphs: bool = False) -> Runtime:
        dev = device.type
        if device.type == "cuda":
            dev += ":" + device_name(device)
        prec = (f"{precision.autocast_dtype}/scaling={precision.grad_scaling}/"
                f"channels_last={precision.channels_last}")
        numerics = current_numerics(device).key() if device.type == "cuda" else ""
        if cuda_graphs:
            numerics += "/cuda_graphs"  # only then: the keys of eager runs stay as they were
        return cls(torch.get_num_threads(), dev, prec, numerics=numerics)

    def key_data(self) -> dict[str, Any]:
        """What of the runtime goes into a cache key."""
        data: dict[str, Any] = {"threads": self.threads, "device": self.device, "precision": self.precision,
                                "torch": self.torch_version, "engine": self.engine_version}
        if self.numerics:
            data["numerics"] = self.numerics
        return data


def _digest(data: Any, n: int = 32) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:n]


def cacheable(plan: Plan, precision: Precision) -> str | None:
    """None if the plan's stages can be cached, else why not (one line)."""
    if not plan.restart_optimizer:
        return "restart_optimizer is false: one lr schedule spans the whole plan, so a prefix depends on its later stages"
    if precision.grad_scaling:
        return "fp16 with grad scaling: the scaler's state carries across stages and is not checkpointed"
    return None


def _prefix_data(plan: Plan, k: int, runtime: Runtime, teacher_sha256: str, teacher_logits: str) -> dict[str, Any]:
    if not 0 <= k < len(plan.stages):
        raise IndexError(f"stage {k} of a {len(plan.stages)}-stage plan")
    reference: dict[str, Any] | None = None
    if k >= 1:
        reference = ({"weight_mode": "none"} if plan.reference.weight_mode == "none"
                     else plan.reference.model_dump(mode="json"))
    data = {
        "format": FORMAT,
        "dataset": data_identity(plan.problem.dataset),
        "teacher": {"arch": plan.problem.teacher.arch, "sha256": teacher_sha256},
        "student": plan.problem.student.arch,
        "recipe": plan.recipe.model_dump(mode="json"),
        "seed": plan.seed,
        "stages": [s.model_dump(mode="json") for s in plan.stages[: k + 1]],
        "reference": reference,
        "restart_optimizer": plan.restart_optimizer,
        "runtime": runtime.key_data(),
    }
    if teacher_logits != "exact":
        data["teacher_logits"] = teacher_logits  # only then: the keys of exact runs stay as they were
    return data


def stage_prefix_key(plan: Plan, k: int, *, teacher_sha256: str, runtime: Runtime,
                     teacher_logits: str = "exact") -> str:
    """The cache key of the plan's stages ``0..k`` (0-based ``k``): everything that determines the
    student at the end of stage ``k``.

    The reference settings count only from a prefix of two stages on, canonicalised as in
    :meth:`Plan.canonical_hash` (weight mode ``none`` zeroes the term whatever the rest says).

    Args:
        plan: The plan.
        k: The last stage of the prefix (0-based).
        teacher_sha256: The teacher's weights.
        runtime: The machine's numerics.
        teacher_logits: ``"exact"``, or the lossy dtype of a teacher-logit store the run reads
            (:mod:`~smskd_search.engine.logit_store`): such stages have other numbers, so other keys.
    """
    return _digest(_prefix_data(plan, k, runtime, teacher_sha256, teacher_logits))


def schedule_prefix(schedule: ScheduleSpec, stage_epochs: int, epochs_done: int) -> list[Any]:
    """What the first ``epochs_done`` epochs of a ``stage_epochs``-epoch stage see of its lr schedule
    (as multiples of the base lr), in a form that is equal for two stage lengths exactly when those
    epochs ran at the same learning rates.

    A step schedule (the CIFAR benchmark recipe: milestones at fractions of the stage) keeps the base
    lr until its first milestone, so ``kd(160)`` and ``kd(200)`` run their first 100 epochs alike, and
    so does ``wsd`` until its decay starts; a cosine schedule moves every step by the stage's length,
    so its epochs are the stage's own.

    Example:
        >>> from smskd_search.plan import ScheduleSpec
        >>> step = ScheduleSpec(kind="step", milestones=[0.5], gamma=0.1)
        >>> schedule_prefix(step, 4, 2) == schedule_prefix(step, 6, 2)
        True
        >>> schedule_prefix(ScheduleSpec(kind="cosine"), 4, 2) == schedule_prefix(ScheduleSpec(kind="cosine"), 6, 2)
        False
    """
    if schedule.kind == "constant":
        return ["constant"]
    if schedule.kind == "step":
        # The engine's own rule (lr_at at the epoch's progress): decays happen at epoch boundaries.
        return ["step", [lr_at(1.0, schedule, step_progress(e, 0, 1, stage_epochs, "step")) for e in range(epochs_done)]]
    if schedule.kind == "wsd" and epochs_done <= schedule.milestones[0] * stage_epochs:
        # Every step of those epochs is before the decay (its progress is below done / stage_epochs).
        return ["wsd", "stable", epochs_done]
    return [schedule.kind, stage_epochs]


def shared_across_lengths(schedule: ScheduleSpec, stage_epochs: int, epochs_done: int) -> bool:
    """Whether a stage of another length runs its first ``epochs_done`` epochs as this one does (so
    that a partial entry there serves it)."""
    mine = schedule_prefix(schedule, stage_epochs, epochs_done)
    return any(schedule_prefix(schedule, other, epochs_done) == mine
               for other in range(epochs_done + 1, 2 * stage_epochs + 2) if other != stage_epochs)


def partial_stage_key(plan: Plan, k: int, epochs_done: int, *, teacher_sha256: str, runtime: Runtime,
                      teacher_logits: str = "exact") -> str:
    """The cache key of stage ``k`` cut after ``epochs_done`` of its epochs.

    It holds what :func:`stage_prefix_key` holds, except the stage's own length: in its place, what
    its first ``epochs_done`` epochs saw of the lr schedule (:func:`schedule_prefix`). Nothing else
    that a stage computes reads its length (the loader is seeded by the plan's seed and the stage's
    index, warm-ups count from the stage's start), so stages of different lengths whose schedules
    agree that far share the entry: under a step schedule a 160-epoch and a 200-epoch first stage
    share their first 100 epochs. Under a cosine schedule the key holds the length (no sharing).

    Args:
        plan: The plan.
        k: The cut stage (0-based).
        epochs_done: Epochs of stage ``k`` trained at the cut (at least 1, less than the stage's).
        teacher_sha256: The teacher's weights.
        runtime: The machine's numerics.
        teacher_logits: As for :func:`stage_prefix_key`.
    """
    data = _prefix_data(plan, k, runtime, teacher_sha256, teacher_logits)
    epochs = plan.stages[k].epochs
    if not 1 <= epochs_done < epochs:
        raise ValueError(f"epochs_done must be at least 1 and less than the stage's {epochs} epochs, not {epochs_done}")
    del data["stages"][k]["epochs"]
    schedule = schedule_prefix(plan.recipe.schedule, epochs, epochs_done)
    return _digest({"format": PARTIAL_FORMAT, "prefix": data, "epochs_done": int(epochs_done), "schedule": schedule})


class EntryFolder(Protocol):
    """Where a :class:`PrefixCache` keeps its files: a flat folder of named files.

    :class:`LocalFolder` is a folder on this machine; the search layer has one in an object store
    (:class:`smskd_search.search.storage_fs.ArrowFolder`).
    """

    def where(self, name: str) -> Any:
        """The file's full name (a Path for a local folder), for messages and tests."""

    def open(self, name: str) -> AbstractContextManager[IO[bytes]]:
        """A readable, seekable file; FileNotFoundError if there is none."""

    def write(self, name: str, fill: Callable[[IO[bytes]], None]) -> None:
        """Write the file through ``fill``, atomically (never half a file under ``name``); OSError on failure."""

    def remove(self, name: str) -> None:
        """Remove the file; nothing if it is not there."""

    def touch(self, name: str) -> None:
        """Record a use now (for the least-recently-used order); FileNotFoundError if it is gone."""

    def entries(self) -> list[tuple[str, int, int]]:
        """(name, size, last use in ns) of every ``*.pt`` file."""


class LocalFolder:
    """A folder on this machine (made on the first write)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._last_stamp = 0

    def where(self, name: str) -> Path:
        return self.root / name

    def open(self, name: str) -> AbstractContextManager[IO[bytes]]:
        return open(self.root / name, "rb")

    def write(self, name: str, fill: Callable[[IO[bytes]], None]) -> None:
        # A temporary file of its own, then os.replace: two writers of one name never leave half a
        # file, and the second write is harmless.
        tmp = self.root / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                fill(f)
            os.replace(tmp, self.root / name)
        finally:
            tmp.unlink(missing_ok=True)

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def touch(self, name: str) -> None:
        # Set explicitly, in ns and strictly increasing in this process: the file system's own
        # clock is coarse (milliseconds), too coarse to order two quick uses.
        with self._lock:
            self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
            stamp = self._last_stamp
        os.utime(self.root / name, ns=(stamp, stamp))

    def entries(self) -> list[tuple[str, int, int]]:
        out = []
        for p in self.root.glob("*.pt") if self.root.is_dir() else []:
            try:
                s = p.stat()
            except FileNotFoundError:
                continue
            out.append((p.name, s.st_size, s.st_mtime_ns))
        return out


class PrefixCache:
    """A folder of cache entries ``<key>.pt`` capped at ``max_bytes`` (least recently used go first).

    Args:
        root: The folder (made on the first put), or an :class:`EntryFolder` (another storage).
        max_bytes: The cap on the entries' total size; a put evicts the least recently used entries
            beyond it (the entry just written always stays).
    """

    def __init__(self, root: str | Path | EntryFolder, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder: EntryFolder = LocalFolder(root) if isinstance(root, (str, Path)) else root
        self.max_bytes = int(max_bytes)

    def path(self, key: str) -> Any:
        """The entry's file (a Path in a local folder)."""
        return self.folder.where(f"{key}.pt")

    def get(self, key: str) -> dict | None:
        """The entry stored under ``key`` (tensors and plain data), or None; a hit counts as a use."""
        name = f"{key}.pt"
        try:
            with self.folder.open(name) as f:
                payload = torch.load(f, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - a truncated or foreign file is a miss, and goes
            self._remove(name)
            return None
        if not isinstance(payload, dict) or payload.get("cache_key") != key:
            self._remove(name)
            return None
        try:
            self.folder.touch(name)
        except OSError:  # evicted by another process just now: we have it anyway
            pass
        return payload

    def has(self, key: str) -> bool:
        """Whether an entry is stored under ``key`` (without loading it; not a use)."""
        try:
            with self.folder.open(f"{key}.pt"):
                return True
        except OSError:  # FileNotFoundError among them
            return False

    def discard(self, key: str) -> None:
        """Remove the entry under ``key``, if any."""
        self._remove(f"{key}.pt")

    def _remove(self, name: str) -> None:
        try:
            self.folder.remove(name)
        except OSError:
            pass

    def put(self, key: str, payload: dict) -> Any:
        """Store ``payload`` under ``key`` (atomically), then evict beyond the cap.

        Returns the entry's file (:meth:`path`), or None where it could not be written (a full disk,
        a folder this node may not write): the cache only saves work, so a failed put fails nothing.
        """
        name = f"{key}.pt"
        try:
            self.folder.write(name, lambda f: torch.save({**payload, "cache_key": key}, f))
            self.folder.touch(name)
            self.evict(keep=name)
        except (OSError, RuntimeError):  # RuntimeError: torch.save on a full disk (its zip writer)
            return None
        return self.path(key)

    def entries(self) -> list[tuple[Any, int, int]]:
        """(file, size, last use in ns) of every entry, least recently used first."""
        listed = sorted(self.folder.entries(), key=lambda e: (e[2], e[0]))
        return [(self.folder.where(n), size, stamp) for n, size, stamp in listed]

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self.folder.entries())

    def evict(self, keep: str | None = None) -> list[Any]:
        """Remove the least recently used entries until the total is within the cap; ``keep``: a name
        that stays."""
        entries = sorted(self.folder.entries(), key=lambda e: (e[2], e[0]))
        total = sum(size for _, size, _ in entries)
        dropped = []
        for name, size, _ in entries:
            if total <= self.max_bytes:
                break
            if name == keep:
                continue
            self._remove(name)
            dropped.append(self.folder.where(name))
            total -= size
        return dropped


__all__ = [
    "DEFAULT_MAX_BYTES",
    "ENGINE_VERSION",
    "EntryFolder",
    "LocalFolder",
    "PrefixCache",
    "Runtime",
    "cacheable",
    "partial_stage_key",
    "schedule_prefix",
    "shared_across_lengths",
    "stage_prefix_key",
]
