"""One training epoch of one SMSKD stage: CE + the stage method's loss (+ the TCP-weighted reference).

Metrics are accumulated on the device and read once per epoch, so the step has no host-device
synchronisation (which is also what lets :mod:`~smskd_search.engine.step_graph` record it as a CUDA graph).
"""

from __future__ import annotations

import contextlib
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


class GraphedSteps(Protocol):
    """What :func:`train_epoch` asks of a recorded step (:class:`~smskd_search.engine.step_graph.StepGraph`)."""

    sums: torch.Tensor

    def begin_epoch(self, parts: StepParts, teacher: TeacherForward, optimizer: torch.optim.Optimizer) -> None: ...

    def takes(self, x: torch.Tensor) -> bool: ...

    def step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, lr: float) -> bool: ...

    def eager_step(self) -> contextlib.AbstractContextManager[None]: ...


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


@dataclass
class StepTerms:
    """What a step computes before its backward: the loss, its parts, the student's logits."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    ref: torch.Tensor
    s_logits: torch.Tensor
    batch: KDBatch


@dataclass
class StepParts:
    """What a step's loss is made of, for one epoch: the models, the method, the reference, the numerics."""

    student: nn.Module
    method: Method
    reference: ReferenceTerm | None
    precision: Precision
    stage_epoch: int
    autocast_cache: bool = True

    def terms(self, teacher_out: tuple[torch.Tensor, Features | None], x: torch.Tensor, y: torch.Tensor,
              idx: torch.Tensor) -> StepTerms:
        """CE + the method's loss (+ the TCP-weighted reference) on one batch, given the teacher's outputs."""
        method, precision = self.method, self.precision
        reference = self.reference
        ref_spec = reference.spec if reference is not None and reference.active else None
        t_logits, t_feats = teacher_out
        with precision.autocast(self.autocast_cache):
            s_logits, s_feats = self.student(precision.prepare_input(x))
            ce = F.cross_entropy(s_logits.float(), y)
            batch = KDBatch(s_logits, s_feats, t_logits, t_feats, y, idx if method.needs_indices else None,  # type: ignore[arg-type]
                            self.stage_epoch)
            kd = method(batch)
            loss = method.params.ce_weight * ce + kd
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
                ref = torch.zeros((), device=y.device)
        return StepTerms(loss, ce, kd, ref, s_logits, batch)


def accumulate(sums: torch.Tensor, t: StepTerms, y: torch.Tensor) -> None:
    """Add a step's loss, CE, KD and reference terms (times its batch size) and its correct count to ``sums``."""
    b = y.shape[0]
    with torch.no_grad():
        sums += torch.stack([
            t.loss.detach().double() * b, t.ce.detach().double() * b, t.kd.detach().double() * b,
            t.ref.detach().double() * b, (t.s_logits.detach().argmax(1) == y).sum().double(),
        ])


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
    graph: GraphedSteps | None = None,
) -> EpochStats:
    """One epoch; with ``graph``, its full batches after the graph's warm-up replay one recorded step
    (:mod:`~smskd_search.engine.step_graph`), the others run as below."""
    student.train()
    method.train()
    device = loader.device
    # loss, ce, kd, ref, correct; a graph's steps add to its own tensor, so the eager ones do too
    sums = graph.sums if graph is not None else torch.zeros(5, dtype=torch.float64, device=device)
    steps = len(loader)
    parts = StepParts(student, method, reference, precision, stage_epoch)
    if graph is not None:
        graph.begin_epoch(parts, teacher, optimizer)
    lr = schedule.base_lr
    for step, (x, y, idx) in enumerate(loader):
        progress = step_progress(schedule.epoch_offset + stage_epoch, step, steps, schedule.span_epochs, schedule.spec.kind)
        lr = lr_at(schedule.base_lr, schedule.spec, progress)
        if graph is not None and graph.takes(x) and graph.step(x, y, idx, lr):
            continue
        set_lr(optimizer, lr)
        with graph.eager_step() if graph is not None else contextlib.nullcontext():
            terms = parts.terms(teacher(x, idx), x, y, idx)
            backward_and_step(terms.loss, optimizer, scaler)
            method.on_step_end(terms.batch)
            accumulate(sums, terms, y)
    n = sum(min(loader.batch_size, loader.num_samples - i * loader.batch_size) for i in range(steps))
    loss_v, ce_v, kd_v, ref_v, correct = (sums / max(n, 1)).tolist()
    return EpochStats(loss=loss_v, ce=ce_v, kd=kd_v, ref=ref_v, acc=correct, lr=lr)
