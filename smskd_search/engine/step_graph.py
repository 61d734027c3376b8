"""The training step recorded once as a CUDA graph and replayed (``RunOptions.cuda_graphs``).

At the recipes' batch sizes a step of a small student is launch-bound: the GPU waits on the host's
hundreds of kernel launches (12.8 ms a step at batch 64 and 11.9 ms at batch 512 on an H200). A CUDA
graph launches the whole step, the frozen teacher's and the reference's forwards, the student's
forward and backward, the losses, the optimizer step and the metric sums, as one unit. It runs the
same kernels on the same memory, so it gives the eager step's numbers on the same GPU.

How a stage goes with a :class:`StepGraph`:

1. its first ``warmup_steps`` steps run eagerly on a side stream (the optimizer's state, cuDNN's
   autotuner and the allocator settle there, as PyTorch's CUDA-graph notes ask);
2. at each epoch's first full batch after that, the step is recorded against static buffers (the
   batch, the lr as a device tensor, the teacher's logits where the logit store serves them), with the
   gradients unset so that the backward allocates them in the graph's pool; recording runs nothing,
   so the graph is then replayed for that batch;
3. every later full batch of the epoch is copied into the buffers and the graph replayed; a short
   last batch (another shape) runs eagerly. The next epoch records afresh: a method may read the
   epoch (DKD's warm-up), and one recording per epoch costs milliseconds against an epoch's seconds.

The lr lives in the optimizer's groups as that device tensor only while the step is recorded (a fused
optimizer then reads it from memory at each replay); between recordings the groups hold a float, so
checkpoints, the stage cache and eager steps see what they always did.

What cannot be recorded runs eagerly (:func:`graph_blocker` says why): a CPU, fp16 with grad scaling
(the scaler reads its overflow flag on the host), a method with host-side work after the step
(``Method.on_step_end``: CRD's memory banks and sampled negatives), and the teacher's features served
through the logit store. A recording that fails (an op that synchronises with the host, say) leaves
the rest of the stage to the eager step, said in the run's notes; a device fault is raised as ever.

:class:`ForwardGraph` records the teacher's forward alone, for its pass over the parts of an epoch
the teacher-logit store lacks (:class:`~smskd_search.engine.logit_store.TeacherPass`).

On a CPU the whole path runs with ``rehearse=True``: the same buffers, copies, tensor lr and sums,
with the step called instead of replayed (the tests compare it with the eager step there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from smskd_search.engine.device import Precision, is_device_fault, record_graph, side_stream
from smskd_search.engine.frozen import FrozenForward
from smskd_search.engine.trainer import StepParts, TeacherForward, accumulate
from smskd_search.methods import Method
from smskd_search.models.base import Features

WARMUP_STEPS = 3  # eager steps before the first recording (PyTorch's whole-network example uses 3)


def graph_blocker(device: torch.device, precision: Precision, method: Method | None, *,
                  teacher_features_from_store: bool, rehearse: bool = False) -> str | None:
    """Why a stage's step cannot be recorded as a CUDA graph (one line), or None if it can.

    Example:

        >>> from smskd_search.engine.device import pick_precision
        >>> cpu = torch.device("cpu")
        >>> graph_blocker(cpu, pick_precision(cpu), None, teacher_features_from_store=False)
        'no CUDA device'
    """
    if device.type != "cuda" and not rehearse:
        return "no CUDA device"
    if precision.grad_scaling:
        return "fp16 with grad scaling (the scaler reads its overflow flag on the host each step)"
    if method is not None and type(method).on_step_end is not Method.on_step_end:
        return f"{method.name} works on the host after each step"
    if teacher_features_from_store:
        return "the teacher's features come through the logit store"
    return None


def recording_failure(exc: RuntimeError) -> str:
    """Why a recording failed, in one line, where the run goes on eagerly; a device fault that is not
    the recording's own (a CUDA context that hit an illegal address) is raised again."""
    if is_device_fault(exc) and "captur" not in str(exc):
        raise exc
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"


@dataclass
class _Static:
    """The recorded step's inputs and outputs: they keep their memory for the graph's life."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    t_logits: torch.Tensor | None  # the teacher's logits, where an eager teacher (the logit store) gives them


class StepGraph:
    """One stage's recorded training step; see the module docstring.

    Args:
        device: The stage's device.
        warmup_steps: Eager steps before the first recording.
        rehearse: Run the graphed path without recording (any device; the tests' CPU check).
    """

    def __init__(self, device: torch.device, *, warmup_steps: int = WARMUP_STEPS, rehearse: bool = False):
        self.device = device
        self.warmup_steps = warmup_steps
        self.rehearse = rehearse
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self._lr_value = 0.0
        # The epoch's sums (loss, ce, kd, ref, correct), for the eager steps too: one tensor, added to
        # in step order, as train_epoch's own.
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.eager_steps = 0
        self.replays = 0
        self.recordings = 0
        self._static: _Static | None = None
        self._replay: Callable[[], None] | None = None
        self._parts: StepParts | None = None
        self._teacher: TeacherForward | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        # Why the step could not be recorded (then the stage runs eagerly from that batch on).
        self.failed: str | None = None

    # -------------------------------------------------------------------------------- an epoch
    def begin_epoch(self, parts: StepParts, teacher: TeacherForward, optimizer: torch.optim.Optimizer) -> None:
        """Drop the last epoch's recording (its memory pool goes with it) and take this epoch's step."""
        self._replay = None
        self._parts = replace(parts, autocast_cache=False)
        self._teacher = teacher
        self._optimizer = optimizer
        self.sums.zero_()

    def takes(self, x: torch.Tensor) -> bool:
        """Whether this batch goes through the graph: a full batch, once the warm-up is over."""
        if self.failed is not None or self.eager_steps < self.warmup_steps:
            return False
        return self._static is None or x.shape == self._static.x.shape

    def eager_step(self) -> contextlib.AbstractContextManager[None]:
        """Where a step the graph does not take runs: on a side stream during the warm-up."""
        self.eager_steps += 1
        if self.eager_steps <= self.warmup_steps:
            return side_stream(self.device)
        return contextlib.nullcontext()

    def step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, lr: float) -> bool:
        """Train on one full batch through the graph (recording it first at the epoch's first batch).

        Returns False, having trained nothing, where the recording failed: an op that cannot be
        recorded (it synchronises with the host, say) is no reason to lose the run, so the caller
        trains the batch eagerly and :attr:`failed` says why; a device fault is raised as ever."""
        assert self._teacher is not None
        eager_teacher = not isinstance(self._teacher, FrozenForward)
        t_logits = self._teacher(x, idx)[0] if eager_teacher else None
        if self._static is None:
            self._static = _Static(torch.empty_like(x), torch.empty_like(y), torch.empty_like(idx),
                                   None if t_logits is None else torch.empty_like(t_logits))
        s = self._static
        s.x.copy_(x)
        s.y.copy_(y)
        s.idx.copy_(idx)
        if t_logits is not None:
            assert s.t_logits is not None
            s.t_logits.copy_(t_logits)
        self.lr.fill_(lr)
        self._lr_value = lr
        if self._replay is None:
            try:
                self._replay = self._record()
            except RuntimeError as exc:
                self.failed = recording_failure(exc)
                self._optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
                return False
        if self.rehearse:
            # What a replay does to the gradients: the recorded backward writes them, never adds.
            assert self._optimizer is not None
            self._optimizer.zero_grad(set_to_none=True)
            with self._tensor_lr():
                self._replay()
        else:
            self._replay()
        self.replays += 1
        return True

    # -------------------------------------------------------------------------------- recording
    def _record(self) -> Callable[[], None]:
        assert self._static is not None and self._parts is not None and self._optimizer is not None
        s, optimizer = self._static, self._optimizer
        parts = self._parts
        if parts.reference is not None:
            parts = replace(parts, reference=replace(parts.reference, forward=_NoCacheForward(parts.reference.forward)))
        teacher = _NoCacheForward(self._teacher) if isinstance(self._teacher, FrozenForward) else None

        def one_step() -> None:
            out = teacher(s.x, s.idx) if teacher is not None else (s.t_logits, None)
            terms = parts.terms(out, s.x, s.y, s.idx)  # type: ignore[arg-type]
            terms.loss.backward()
            optimizer.step()
            accumulate(self.sums, terms, s.y)

        # Unset gradients: the recorded backward allocates them in the graph's pool and writes them
        # afresh at each replay (no zeroing step to record).
        optimizer.zero_grad(set_to_none=True)
        self.recordings += 1
        if self.rehearse:
            return one_step
        with self._tensor_lr():
            return record_graph(self.device, one_step)

    @contextlib.contextmanager
    def _tensor_lr(self) -> Iterator[None]:
        """The optimizer's groups read the lr from :attr:`lr` inside the block, and hold its value as a
        float after (what checkpoints and eager steps expect). AdamW's groups say ``capturable`` there
        too: its step refuses a recording otherwise, and its fused state already lives on the device."""
        assert self._optimizer is not None
        groups = self._optimizer.param_groups
        capturable = [g.get("capturable") for g in groups]
        for g in groups:
            g["lr"] = self.lr
            if "capturable" in g and not self.rehearse:
                g["capturable"] = True
        try:
            yield
        finally:
            for g, was in zip(groups, capturable):
                g["lr"] = self._lr_value
                if was is not None:
                    g["capturable"] = was


class ForwardGraph:
    """A frozen forward's logits at one batch shape, recorded once as a CUDA graph and replayed.

    What the teacher's pass over an epoch's parts runs (:class:`~smskd_search.engine.logit_store.TeacherPass`)
    where the run records its steps: the teacher's forward alone is as launch-bound as a step. Its
    first ``warmup_steps`` calls run eagerly on a side stream; then the first full batch records it;
    a batch of another shape (the short last one) runs eagerly. Called as the forward is; the
    logits are a copy (the graph's output is overwritten by the next replay), features None.

    Args:
        forward: The frozen forward (its model and precision).
        device: Its device.
        warmup_steps: Eager calls before the recording.
        rehearse: Run the recorded path without recording (any device; the tests' CPU check).
    """

    def __init__(self, forward: FrozenForward, device: torch.device, *, warmup_steps: int = WARMUP_STEPS,
                 rehearse: bool = False):
        self.forward, self.device, self.warmup_steps, self.rehearse = forward, device, warmup_steps, rehearse
        self.calls = self.replays = 0
        self._x: torch.Tensor | None = None
        self._idx: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self._replay: Callable[[], None] | None = None
        self.failed: str | None = None
        self.noted = False  # whether the run's notes say it failed

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, Features | None]:
        self.calls += 1
        if self.failed is not None or (self._x is not None and x.shape != self._x.shape):
            return self.forward(x, idx)[0], None
        if self.calls <= self.warmup_steps:
            with side_stream(self.device):
                return self.forward(x, idx)[0], None
        if self._replay is None:
            self._x, self._idx = torch.empty_like(x), torch.empty_like(idx)
            live = _NoCacheForward(self.forward)

            def forward_only() -> None:
                self._out = live(self._x, self._idx)[0]

            try:
                self._replay = forward_only if self.rehearse else record_graph(self.device, forward_only)
            except RuntimeError as exc:
                self.failed = recording_failure(exc)
                return self.forward(x, idx)[0], None
        assert self._x is not None and self._idx is not None
        self._x.copy_(x)
        self._idx.copy_(idx)
        self._replay()
        self.replays += 1
        assert self._out is not None
        return self._out.clone(), None


class _NoCacheForward(FrozenForward):
    """A frozen forward (the same model and precomputed outputs) whose live path runs autocast without
    its weight cache, for a recording."""

    def __init__(self, fw: FrozenForward):  # shares the wrapped forward's state; computes nothing
        self.model, self.precision, self.cache = fw.model, fw.precision, fw.cache

    @torch.no_grad()
    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
        with self.precision.autocast(cache=False):
            return self.model(self.precision.prepare_input(x))


__all__ = ["WARMUP_STEPS", "ForwardGraph", "StepGraph", "graph_blocker"]
