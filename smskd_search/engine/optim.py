"""Optimizers and learning-rate schedules, computed from training progress (no scheduler state)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from smskd_search.engine.device import optimizer_impl_kwargs
from smskd_search.plan import RecipeSpec, ScheduleSpec


def build_optimizer(groups: list[dict], recipe: RecipeSpec, device: torch.device) -> torch.optim.Optimizer:
    kw = optimizer_impl_kwargs(device)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay, nesterov=recipe.nesterov, **kw)
    return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay, **kw)


def lr_at(base_lr: float, schedule: ScheduleSpec, progress: float) -> float:
    """Learning rate at ``progress`` in [0, 1) of the schedule's span (a stage, or the whole run).

    Step decays happen at epoch boundaries (as in the benchmark codebases); cosine decays per step,
    and so does ``wsd`` after its first milestone.
    """
    if schedule.kind == "constant":
        return base_lr
    if schedule.kind == "cosine":
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule.kind == "wsd":
        start = schedule.milestones[0]
        if progress < start:
            return base_lr
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * min((progress - start) / (1.0 - start), 1.0)))
    passed = sum(1 for m in schedule.milestones if progress >= m - 1e-9)
    return base_lr * schedule.gamma**passed


def step_progress(epoch: int, step: int, steps_per_epoch: int, span_epochs: int, kind: str) -> float:
    if kind == "step":
        return epoch / span_epochs
    return (epoch + step / steps_per_epoch) / span_epochs


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None) -> None:
    """zero_grad, backward, step; through the grad scaler when fp16 needs one."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def trainable(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in params if p.requires_grad]
