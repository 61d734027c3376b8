"""The workbench: what a worker sets up once and every run on it shares.

The device and its precision, the problem's data splits on it, the frozen teacher (checked by its
record's digest), and the caches that outlive a run: the stage-prefix cache, the frozen teacher's
outputs over the training split, the teacher-logit store. A search's trial, ``verify``'s worker and
the ``train`` command each build one (:meth:`Workbench.open`) and hand it to
:func:`~smskd_search.engine.run_plan`.

Neither Ray nor Optuna is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from smskd_search.data import DataSplits, load_data
from smskd_search.engine.device import Precision, pick_device, pick_precision, set_numerics
from smskd_search.engine.frozen import FrozenOutputsMemo, freeze
from smskd_search.engine.logit_store import LogitStore
from smskd_search.engine.prefix_cache import PrefixCache
from smskd_search.engine.teacher import DEFAULT_CACHE, TeacherRecord, ensure_teacher, load_teacher
from smskd_search.errors import UserError
from smskd_search.plan import Plan, ProblemSpec


@dataclass
class Workbench:
    """Device, data, teacher and caches, shared by the runs of one worker (one problem).

    Args:
        device: Where runs train.
        precision: Their precision (:func:`~smskd_search.engine.device.pick_precision`).
        data: The problem's splits, on ``device``: held as tensors, or streamed from an image folder
            (``data.info.streamed``; then the frozen-outputs memo and the logit store sit unused).
        teacher: The teacher model, frozen and prepared for ``precision``.
        teacher_record: Its record (weights' digest, path).
        stage_cache: The stage-prefix cache (:mod:`~smskd_search.engine.prefix_cache`), or None.
        frozen_memo: Keeps the frozen teacher's outputs over the training split across runs.
        logit_store: Keeps the teacher's logits per epoch of augmented batches across runs
            (:mod:`~smskd_search.engine.logit_store`), or None.
        deterministic: On a GPU, PyTorch's deterministic algorithms (no TF32, no cuDNN autotuner):
            the same plan and seed then give the same bits there too, at a cost in speed. (A CPU
            run is bit-reproducible either way.)
    """

    device: torch.device
    precision: Precision
    data: DataSplits
    teacher: nn.Module
    teacher_record: TeacherRecord
    stage_cache: PrefixCache | None = None
    frozen_memo: FrozenOutputsMemo | None = None
    logit_store: LogitStore | None = None
    deterministic: bool = False

    @classmethod
    def open(cls, problem: ProblemSpec, *, device: torch.device | str | None = None, precision: str = "auto",
             teacher_cache: str | Path = DEFAULT_CACHE, data: DataSplits | None = None,
             teacher_record: TeacherRecord | None = None, teacher: nn.Module | None = None,
             teacher_weights: bytes | None = None, stage_cache: PrefixCache | None = None,
             frozen_memo: FrozenOutputsMemo | None = None, logit_store: LogitStore | None = None,
             deterministic: bool = False) -> Workbench:
        """Set up a worker for ``problem``: what is not given is loaded (the data), trained once
        into ``teacher_cache`` or read from there (the teacher).

        Args:
            problem: The plans' problem (dataset, teacher, student).
            device: ``"cpu"``, ``"cuda"``... (default: CUDA where there is one).
            precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``.
            teacher_cache: The teacher cache folder (the teacher trains once per problem).
            data, teacher_record, teacher: Already loaded (a search's worker keeps them across trials).
            teacher_weights: The teacher's weights as bytes (a trial never reads the driver's path).
            stage_cache, frozen_memo, logit_store, deterministic: As the class's fields.
        """
        dev = pick_device(device)
        prec = pick_precision(dev, precision)
        set_numerics(dev, prec, deterministic)
        if data is None:
            data = load_data(problem.dataset, dev)
        if teacher_record is None:
            teacher_record = ensure_teacher(problem, cache_root=teacher_cache, device=dev, data=data)
        if teacher is None:
            teacher = load_teacher(problem, teacher_record, data.info, dev, weights=teacher_weights)
        return cls(dev, prec, data, prec.prepare_model(freeze(teacher)), teacher_record, stage_cache, frozen_memo,
                   logit_store, deterministic)

    def check_teacher(self, plan: Plan) -> None:
        """Raise where the plan was made with another teacher than this workbench's."""
        if plan.teacher_sha256 and plan.teacher_sha256 != self.teacher_record.sha256:
            raise UserError(
                f"teacher_sha256: the plan was made with teacher {plan.teacher_sha256[:12]} but the cached "
                f"teacher is {self.teacher_record.sha256[:12]} ({self.teacher_record.path})"
            )
