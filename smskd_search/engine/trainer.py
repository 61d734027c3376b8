"""One training epoch of one SMSKD stage: CE + the stage method's loss (+ the TCP-weighted reference).

Metrics are accumulated on the device and read once per epoch, so the step has no host-device
synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from smskd_search.data import BatchLoader
from smskd_search.engine.device import Precision
from smskd_search.engine.frozen import FrozenForward
from smskd_search.engine.optim import backward_and_step, lr_at, set_lr, step_progress
from smskd_search.engine.tcp import reference_loss, tcp_weights
from smskd_search.methods import KDBatch, Method
from smskd_search.models.base import Features
from smskd_search.plan import ReferenceSpec, ScheduleSpec


class TeacherForward(Protocol):
    """The teacher's outputs for a batch (a :class:`FrozenForward`, or an epoch served from the
    logit store, :class:`~smskd_search.engine.logit_store.EpochTeacher`)."""

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, Features | None]: ...


@dataclass
class ReferenceTerm:
    """The frozen previous-stage student and how strongly to anchor to it."""

    forward: FrozenForward
    spec: ReferenceSpec

    @property
    def active(self) -> bool:
        return self.spec.lambda_ref > 0.0 and self.spec.weight_mode != "none"


@dataclass
class Schedule:
    """Where this epoch sits in the lr schedule's span (a stage, or the whole run)."""

    base_lr: float
    spec: ScheduleSpec
    span_epochs: int
    epoch_offset: int  # epochs of the span before this stage (0 when each stage restarts it)


@dataclass
class EpochStats:
    loss: float
    ce: float
    kd: float
    ref: float
    acc: float
    lr: float


def train_epoch(
    *,
    student: nn.Module,
    method: Method,
    teacher: TeacherForward,
    reference: ReferenceTerm | None,
    loader: BatchLoader,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    stage_epoch: int,
    precision: Precision,
    scaler: torch.amp.GradScaler | None = None,
) -> EpochStats:
    student.train()
    method.train()
    device = loader.device
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, ce, kd, ref, correct
    ce_weight = method.params.ce_weight
    steps = len(loader)
    ref_spec = reference.spec if reference is not None and reference.active else None
    lr = schedule.base_lr
    for step, (x, y, idx) in enumerate(loader):
        progress = step_progress(schedule.epoch_offset + stage_epoch, step, steps, schedule.span_epochs, schedule.spec.kind)
        lr = lr_at(schedule.base_lr, schedule.spec, progress)
        set_lr(optimizer, lr)
        t_logits, t_feats = teacher(x, idx)
        with precision.autocast():
            s_logits, s_feats = student(precision.prepare_input(x))
            ce = F.cross_entropy(s_logits.float(), y)
            batch = KDBatch(s_logits, s_feats, t_logits, t_feats, y, idx if method.needs_indices else None, stage_epoch)
            kd = method(batch)
            loss = ce_weight * ce + kd
            if ref_spec is not None:
                r_logits, r_feats = reference.forward(x, idx)  # type: ignore[union-attr]
                w = tcp_weights(t_logits, y, ref_spec.weight_mode, ref_spec.normalize)
                if ref_spec.loss == "logit_kl":
                    ref = reference_loss(s_logits, r_logits, w, loss="logit_kl", tau=ref_spec.temperature)
                else:
                    k = ref_spec.feature_stage
                    ref = reference_loss(s_feats.stages[k], r_feats.stages[k], w, loss="feature_mse")  # type: ignore[union-attr]
                loss = loss + ref_spec.lambda_ref * ref
            else:
                ref = torch.zeros((), device=device)
        backward_and_step(loss, optimizer, scaler)
        method.on_step_end(batch)
        b = y.shape[0]
        with torch.no_grad():
            sums += torch.stack([
                loss.detach().double() * b, ce.detach().double() * b, kd.detach().double() * b,
                ref.detach().double() * b, (s_logits.detach().argmax(1) == y).sum().double(),
            ])
    n = sum(min(loader.batch_size, loader.num_samples - i * loader.batch_size) for i in range(steps))
    loss_v, ce_v, kd_v, ref_v, correct = (sums / max(n, 1)).tolist()
    return EpochStats(loss=loss_v, ce=ce_v, kd=kd_v, ref=ref_v, acc=correct, lr=lr)
