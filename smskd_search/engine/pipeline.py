"""``run_plan``: one SMSKD pipeline, stage by stage.

Stage 1 trains with CE + its method's loss. At each stage end the student is evaluated on the
validation split, checkpointed, and copied into a frozen reference (eval mode, no gradients); the
method's extra modules are dropped; the next stage builds its own from probed shapes, with a fresh
optimizer and a restarted lr schedule unless the plan says otherwise. From stage 2 on, the loss adds
``lambda_ref * mean_i(w_i * tau^2 * KL(ref || student))`` with TCP weights ``w_i``.

Neither Ray nor Optuna is imported here: a plan runs wherever torch runs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from smskd_search.data import DataInfo, DataSplits, TensorLoader, load_data, load_test_split
from smskd_search.engine.device import Precision, pick_device, pick_precision, rng_state, set_rng_state
from smskd_search.engine.evaluate import EvalResult, evaluate
from smskd_search.engine.frozen import FrozenForward, freeze, frozen_copy
from smskd_search.engine.optim import build_optimizer, trainable
from smskd_search.engine.teacher import DEFAULT_CACHE, TeacherRecord, ensure_teacher, load_teacher
from smskd_search.engine.trainer import ReferenceTerm, Schedule, train_epoch
from smskd_search.errors import UserError
from smskd_search.methods import MethodContext, build_method
from smskd_search.models import create_model, probe_shapes
from smskd_search.plan import Plan

CHECKPOINT_VERSION = 1


@dataclass
class EpochMetrics:
    epoch: int  # 1-based within the stage
    cum_epochs: int
    train_loss: float
    train_ce: float
    train_kd: float
    train_ref: float
    train_acc: float
    lr: float
    val_acc: float
    val_loss: float


@dataclass
class StageResult:
    index: int  # 0-based
    method: str
    epochs: int
    cum_epochs: int
    val_acc: float
    val_loss: float
    n_val: int
    reference_active: bool
    epoch_metrics: list[EpochMetrics] = field(default_factory=list)


@dataclass
class RunResult:
    plan_hash: str
    stages: list[StageResult]
    stopped_early: bool
    resumed_from_stage: int | None
    teacher: TeacherRecord
    data_info: DataInfo
    student: nn.Module | None = None

    @property
    def final_val_acc(self) -> float:
        return self.stages[-1].val_acc

    def to_dict(self) -> dict:
        return {
            "plan_hash": self.plan_hash,
            "stages": [asdict(s) for s in self.stages],
            "stopped_early": self.stopped_early,
            "resumed_from_stage": self.resumed_from_stage,
            "teacher": asdict(self.teacher),
        }


class StageCallback(Protocol):
    def __call__(self, stage_index: int, cum_epochs: int, result: StageResult, checkpoint: Path | None) -> bool | None:
        """Return True to stop the run after this stage (the search prunes through this)."""


EpochCallback = Callable[[int, EpochMetrics], None]


def checkpoint_path(out_dir: Path, stage_index: int) -> Path:
    return out_dir / f"stage{stage_index + 1}.pt"


def latest_checkpoint(out_dir: Path, plan_hash: str) -> dict | None:
    """The last stage checkpoint of this plan in ``out_dir``, or None."""
    found = sorted(out_dir.glob("stage*.pt"), key=lambda p: int(p.stem[5:]) if p.stem[5:].isdigit() else -1)
    for p in reversed(found):
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
        if ckpt.get("plan_hash") == plan_hash:
            return ckpt
    return None


def _save_checkpoint(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a killed run never leaves half a checkpoint


def _stage_seed(plan_seed: int, stage_index: int) -> int:
    # Each stage draws from its own seeded streams, so a resumed run replays them exactly.
    return plan_seed * 1_000_003 + stage_index


def run_plan(
    plan: Plan,
    *,
    device: torch.device | str | None = None,
    precision: str = "auto",
    out_dir: str | Path | None = None,
    resume: bool = False,
    on_stage_end: StageCallback | None = None,
    on_epoch_end: EpochCallback | None = None,
    teacher_cache: str | Path = DEFAULT_CACHE,
    data: DataSplits | None = None,
    teacher_model: nn.Module | None = None,
    teacher_record: TeacherRecord | None = None,
    cache_frozen_outputs: bool = True,
    keep_student: bool = True,
) -> RunResult:
    """Run a plan stage by stage; see the module docstring for the exact semantics.

    ``data``, ``teacher_model`` and ``teacher_record`` may be passed in to share them across runs
    (the search does so). ``cache_frozen_outputs`` precomputes the teacher's and the reference's
    outputs when training batches are not augmented (the results are the same, the steps cheaper).
    """
    dev = pick_device(str(device) if device is not None else None)
    prec: Precision = pick_precision(dev, precision)
    out = Path(out_dir) if out_dir is not None else None
    plan_hash = plan.content_hash()
    if data is None:
        data = load_data(plan.problem.dataset, dev)
    info = data.info

    if teacher_record is None:
        teacher_record = ensure_teacher(plan.problem, cache_root=teacher_cache, device=dev, data=data)
    if plan.teacher_sha256 and plan.teacher_sha256 != teacher_record.sha256:
        raise UserError(
            f"teacher_sha256: the plan was made with teacher {plan.teacher_sha256[:12]} but the cached "
            f"teacher is {teacher_record.sha256[:12]} ({teacher_record.path})"
        )
    if teacher_model is None:
        teacher_model = load_teacher(plan.problem, teacher_record, info, dev)
    teacher_model = prec.prepare_model(freeze(teacher_model))

    torch.manual_seed(plan.seed)
    student = create_model(plan.problem.student.arch, info.num_classes, info.in_channels, info.image_size).to(dev)
    student = prec.prepare_model(student)
    in_shape = (info.in_channels, info.image_size, info.image_size)
    s_shapes, t_shapes = probe_shapes(student, in_shape), probe_shapes(teacher_model, in_shape)

    results: list[StageResult] = []
    start_stage = 0
    resumed_from: int | None = None
    opt_state: dict | None = None
    if resume and out is not None:
        ckpt = latest_checkpoint(out, plan_hash)
        if ckpt is not None:
            student.load_state_dict(ckpt["student"])
            results = [_stage_result_from_dict(d) for d in ckpt["results"]]
            start_stage = ckpt["stage_index"] + 1
            resumed_from = ckpt["stage_index"]
            opt_state = ckpt.get("optimizer")
            set_rng_state(ckpt["rng"], dev)

    augmented = plan.recipe.augment.enabled
    cache_inputs = data.train.images if (cache_frozen_outputs and not augmented) else None
    teacher_fw = FrozenForward(teacher_model, prec, cache_inputs, plan.recipe.eval_batch_size, need_features=True)
    scaler = prec.grad_scaler()
    total_epochs = plan.total_epochs
    cum_epochs = sum(s.epochs for s in plan.stages[:start_stage])
    optimizer: torch.optim.Optimizer | None = None
    stopped = False

    for k in range(start_stage, len(plan.stages)):
        stage = plan.stages[k]
        seed = _stage_seed(plan.seed, k)
        torch.manual_seed(seed)
        ctx = MethodContext(s_shapes, t_shapes, teacher_model, info.num_classes, info.num_train, stage.epochs)
        method = build_method(stage.method, stage.params, ctx).to(dev)

        reference = None
        if k > 0:
            ref_model = prec.prepare_model(frozen_copy(student))
            need_feats = plan.reference.loss == "feature_mse"
            ref_fw = FrozenForward(ref_model, prec, cache_inputs if plan.reference.lambda_ref > 0 else None,
                                   plan.recipe.eval_batch_size, need_features=need_feats)
            reference = ReferenceTerm(ref_fw, plan.reference)

        student_params = trainable(student.parameters())
        method_params = trainable(method.parameters())
        if plan.restart_optimizer or optimizer is None:
            optimizer = build_optimizer([{"params": student_params}], plan.recipe, dev)
            if not plan.restart_optimizer and opt_state is not None:
                optimizer.load_state_dict(opt_state)  # resumed: the student's momentum carries on
            if method_params:
                optimizer.add_param_group({"params": method_params})
        else:
            # One optimizer over the run: the student keeps its momentum; the previous method's
            # modules leave with their state, the new method's join as a fresh group.
            for group in optimizer.param_groups[1:]:
                for p in group["params"]:
                    optimizer.state.pop(p, None)
            del optimizer.param_groups[1:]
            if method_params:
                optimizer.add_param_group({"params": method_params})
        schedule = Schedule(
            base_lr=plan.recipe.lr,
            spec=plan.recipe.schedule,
            span_epochs=stage.epochs if plan.restart_optimizer else total_epochs,
            epoch_offset=0 if plan.restart_optimizer else cum_epochs,
        )
        loader = TensorLoader(data.train, plan.recipe.batch_size, shuffle=True, augment=plan.recipe.augment,
                              generator=torch.Generator(dev).manual_seed(seed))
        stage_result = StageResult(k, stage.method, stage.epochs, cum_epochs, 0.0, 0.0, info.num_val,
                                   reference is not None and reference.active)
        val: EvalResult | None = None
        for e in range(stage.epochs):
            stats = train_epoch(student=student, method=method, teacher=teacher_fw, reference=reference,
                                loader=loader, optimizer=optimizer, schedule=schedule, stage_epoch=e,
                                precision=prec, scaler=scaler)
            cum_epochs += 1
            val = evaluate(student, data.val, prec, plan.recipe.eval_batch_size)
            em = EpochMetrics(e + 1, cum_epochs, stats.loss, stats.ce, stats.kd, stats.ref, stats.acc,
                              stats.lr, val.acc, val.loss)
            stage_result.epoch_metrics.append(em)
            if on_epoch_end is not None:
                on_epoch_end(k, em)
        assert val is not None
        stage_result.cum_epochs, stage_result.val_acc, stage_result.val_loss = cum_epochs, val.acc, val.loss
        results.append(stage_result)

        ckpt_file = None
        if out is not None:
            ckpt_file = checkpoint_path(out, k)
            _save_checkpoint(ckpt_file, {
                "version": CHECKPOINT_VERSION,
                "plan_hash": plan_hash,
                "stage_index": k,
                "student": {n: t.detach().cpu() for n, t in student.state_dict().items()},
                "optimizer": None if plan.restart_optimizer else _student_only_state(optimizer),
                "rng": rng_state(dev),
                "results": [asdict(r) for r in results],
            })
        del method, reference  # the stage's extra modules and reference go with it
        wants_stop = on_stage_end is not None and on_stage_end(k, cum_epochs, stage_result, ckpt_file)
        if wants_stop and k + 1 < len(plan.stages):
            stopped = True
            break

    return RunResult(plan_hash, results, stopped, resumed_from, teacher_record, info,
                     student if keep_student else None)


def _student_only_state(optimizer: torch.optim.Optimizer) -> dict:
    state = optimizer.state_dict()
    n_student = len(state["param_groups"][0]["params"])
    keep = set(state["param_groups"][0]["params"])
    return {
        "state": {k: v for k, v in state["state"].items() if k in keep},
        "param_groups": state["param_groups"][:1],
        "_n": n_student,
    }


def _stage_result_from_dict(d: dict) -> StageResult:
    d = dict(d)
    d["epoch_metrics"] = [EpochMetrics(**m) for m in d.get("epoch_metrics", [])]
    return StageResult(**d)


def evaluate_test(plan: Plan, result: RunResult, device: torch.device | str | None = None,
                  precision: str = "auto") -> EvalResult:
    """Test accuracy of a finished run's student: the explicit evaluation call, never made in a search."""
    if result.student is None:
        raise ValueError("the run did not keep its student (keep_student=False)")
    dev = next(result.student.parameters()).device if device is None else pick_device(str(device))
    test = load_test_split(plan.problem.dataset, result.data_info, dev)
    return evaluate(result.student, test, pick_precision(dev, precision), plan.recipe.eval_batch_size)


def write_results(path: Path, plan: Plan, result: RunResult, test: EvalResult | None) -> None:
    payload = result.to_dict()
    payload["plan_name"] = plan.name
    payload["sequence"] = plan.sequence()
    payload["total_epochs"] = plan.total_epochs
    payload["final_val_acc"] = result.final_val_acc
    payload["n_val"] = result.stages[-1].n_val
    if test is not None:
        payload["test_acc"], payload["n_test"] = test.acc, test.n
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
