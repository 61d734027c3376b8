"""Stage checkpoints: ``stage{k}.pt`` in a run's folder, written atomically, read back as tensors and
plain data only (``weights_only=True``), recording where their numbers were made (``made_on``)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from smskd_search.engine.device import Precision, device_name
from smskd_search.engine.prefix_cache import Runtime
from smskd_search.engine.results import StageResult
from smskd_search.errors import UserError

CHECKPOINT_VERSION = 1


class UnsafeCheckpoint(UserError):
    """A stage checkpoint that does not load as tensors and plain data (``weights_only=True``)."""


def checkpoint_path(out_dir: Path, stage_index: int) -> Path:
    return out_dir / f"stage{stage_index + 1}.pt"


def _stage_checkpoints(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("stage*.pt"), key=lambda p: int(p.stem[5:]) if p.stem[5:].isdigit() else -1)


def load_checkpoint(path: Path) -> dict:
    """A stage checkpoint, unpickled with ``weights_only=True``: tensors and plain data only, so a
    file that would need to run code to load is refused, never executed.

    Raises:
        UnsafeCheckpoint: The file holds anything else (an older format, a foreign file).
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unpickling error, a truncated or foreign file: one answer
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpoint(f"stage checkpoint {path} does not load as tensors and plain data "
                               f"(weights_only=True): {why[:200]}; delete it to train that stage again") from None
    if not isinstance(ckpt, dict) or "plan_hash" not in ckpt:
        raise UnsafeCheckpoint(f"stage checkpoint {path} is not a stage checkpoint of smskd-search; delete it")
    return ckpt


def discard_unsafe_checkpoints(out_dir: Path) -> list[Path]:
    """Remove the stage checkpoints in ``out_dir`` that :func:`load_checkpoint` refuses; returns them.

    A search's trial calls this before resuming from its folder: the stages are trained again.
    """
    dropped = []
    for p in _stage_checkpoints(out_dir):
        try:
            load_checkpoint(p)
        except UnsafeCheckpoint:
            p.unlink(missing_ok=True)
            dropped.append(p)
    return dropped


def latest_checkpoint(out_dir: Path, plan_hash: str) -> dict | None:
    """The last stage checkpoint of this plan in ``out_dir``, or None.

    Raises:
        UnsafeCheckpoint: A checkpoint there does not load with ``weights_only=True``.
    """
    for p in reversed(_stage_checkpoints(out_dir)):
        ckpt = load_checkpoint(p)
        if ckpt.get("plan_hash") == plan_hash:
            return ckpt
    return None


def save_checkpoint(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a killed run never leaves half a checkpoint


def made_on(device: torch.device, precision: Precision, runtime: Runtime) -> dict[str, str]:
    """Where a checkpoint's numbers were made: the device (a GPU by its name), precision, GPU numerics."""
    return {"device": device_name(device), "precision": precision.name, "numerics": runtime.numerics}


def resume_note(ckpt: dict, here: dict[str, str]) -> str | None:
    """What to say when a checkpoint made on another device or precision is resumed here, or None."""
    there = ckpt.get("made_on")
    if there is None or (there["device"], there["precision"]) == (here["device"], here["precision"]):
        return None
    return (f"resumed after stage {ckpt['stage_index'] + 1} from a checkpoint made on {there['device']} "
            f"({there['precision']}), going on on {here['device']} ({here['precision']}): "
            "the later stages' numbers differ from a run on one machine")


def on_cpu(state: Any) -> Any:
    """An optimizer state dict with its tensors on the CPU (a checkpoint must load where there is no GPU)."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: on_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [on_cpu(v) for v in state]
    return state


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu() for n, t in module.state_dict().items()}


def student_only_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state of its first group (the student's), without the method's modules'."""
    state = optimizer.state_dict()
    keep = set(state["param_groups"][0]["params"])
    return {"state": {k: v for k, v in state["state"].items() if k in keep}, "param_groups": state["param_groups"][:1]}


def stage_payload(*, plan_hash: str, stage_index: int, student: torch.nn.Module,
                  optimizer: torch.optim.Optimizer | None, where: dict[str, str], results: list[StageResult]) -> dict:
    """What a checkpoint of a finished stage holds: the student, the carried optimizer state (None
    where each stage restarts it), where it was made, the results so far."""
    return {
        "version": CHECKPOINT_VERSION,
        "plan_hash": plan_hash,
        "stage_index": stage_index,
        "student": cpu_state(student),
        "optimizer": None if optimizer is None else on_cpu(student_only_state(optimizer)),
        "made_on": where,
        # Plain data only (loaded back with weights_only=True): dataclasses as dicts of numbers.
        # (Whether a stage came from the stage cache belongs to the run, not to the stage.)
        "results": [{**asdict(r), "reused": False} for r in results],
    }


def partial_payload(*, stage_index: int, result: StageResult, student: torch.nn.Module, method: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, rng: dict[str, Any]) -> dict:
    """A stage after ``len(result.epoch_metrics)`` epochs: all that its next epoch reads."""
    return {
        "version": CHECKPOINT_VERSION,
        "kind": "partial_stage",
        "stage_index": stage_index,
        "epochs_done": len(result.epoch_metrics),
        "student": cpu_state(student),
        "method": cpu_state(method),
        "optimizer": on_cpu(optimizer.state_dict()),
        **rng,
        "stage": asdict(result),
    }
