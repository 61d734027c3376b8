"""The one device decision: no other module of the package calls ``torch.cuda``, ``torch.backends``
or ``torch.Generator(`` (``tests/test_device.py`` reads the sources to hold it so).

It decides, per process:

- **the device**, always with its index (``cuda:0``, never ``cuda``): tensors report an indexed
  device, so an unindexed one compares unequal to their own (the first GPU run crashed on exactly
  that, a generator on ``cuda`` against data on ``cuda:0``);
- **random generators** on that device (:func:`make_generator`);
- **precision**: bf16 autocast where the GPU has bf16 natively (compute capability 8.0 and up: A100,
  H100, L4, RTX 30xx on), fp16 autocast with grad scaling on older GPUs (V100, T4), fp32 on the CPU
  and on request;
- **numerics** (:class:`Numerics`): TF32 and cuDNN's autotuner on a GPU for speed, or PyTorch's
  deterministic algorithms with ``deterministic=True`` (``--deterministic``). What changes numbers is
  recorded in the cache keys (:meth:`Numerics.key`) and in checkpoints;
- **memory**: a packed trial's cap on its GPU share (:func:`limit_memory`) and the release of what a
  process no longer needs (:func:`release_memory`);
- **CUDA graphs**: a stream for the eager steps before a recording (:func:`side_stream`) and the
  recording itself (:func:`record_graph`);
- **which failures are the machine's** (:func:`is_device_fault`): out of memory and CUDA, cuBLAS and
  cuDNN errors are infrastructure failures, never the plan's.

On a CPU, the same plan, seed and thread count give the same bits. On a GPU they do so only with
deterministic algorithms on; otherwise runs agree closely (to the last digits of bf16), not bitwise:
cuDNN's autotuner may pick other kernels in another process, and atomics sum in any order.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

# cuBLAS needs a fixed workspace for reproducible matmuls under deterministic algorithms; it must be
# set before the process's first cuBLAS call (PyTorch raises otherwise).
CUBLAS_WORKSPACE = ":4096:8"


def cuda_available() -> bool:
    return torch.cuda.is_available()


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """The device to run on, indexed when it is a GPU.

    Args:
        requested: ``None`` or ``"auto"`` (a GPU where there is one), ``"cpu"``, ``"cuda"`` (this
            process's current GPU: ``cuda:0`` in a Ray worker, which sees only its own GPUs) or
            ``"cuda:N"``.

    Raises:
        UserError: A GPU is asked for where there is none, or an index beyond the GPUs present.

    Example:

        >>> pick_device("cpu")
        device(type='cpu')
    """
    from smskd_search.errors import UserError

    if requested is None or str(requested) == "auto":
        requested = "cuda" if cuda_available() else "cpu"
    try:
        dev = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device: {requested!r} is not a device (cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise UserError(f"--device: {requested!r}: only cpu and cuda are supported")
    if not cuda_available():
        raise UserError(f"--device: {requested} requested but no CUDA device is available")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        raise UserError(f"--device: {requested}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two devices are the same one (``cuda`` is this process's current GPU).

    Example:

        >>> same_device("cpu", torch.device("cpu")), same_device("cpu", "meta")
        (True, False)
    """
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if a.index is None or b.index is None else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def make_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A seeded random generator on ``device`` (indexed: it must compare equal to the data's device)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return torch.Generator(dev).manual_seed(seed)


def device_name(device: torch.device) -> str:
    """``cpu``, or the GPU's name (``NVIDIA H200``)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def describe_device(device: torch.device) -> dict[str, object]:
    """The device in figures a log can carry: name, and on a GPU its compute capability and memory."""
    if device.type != "cuda":
        return {"device": str(device), "name": "cpu"}
    props = torch.cuda.get_device_properties(device)
    return {"device": str(device), "name": props.name, "capability": f"{props.major}.{props.minor}",
            "native_bf16": native_bf16(device), "memory_gib": round(props.total_memory / 2**30, 1)}


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: compute capability 8.0 and up (Ampere on). Older GPUs emulate it slowly,
    which ``torch.cuda.is_bf16_supported()`` counts as support by default."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


@dataclass(frozen=True)
class Precision:
    """How forwards run: autocast dtype (None: fp32), grad scaling, memory format."""

    autocast_dtype: torch.dtype | None
    grad_scaling: bool
    channels_last: bool
    device_type: str

    @property
    def name(self) -> str:
        """``fp32``, ``bf16`` or ``fp16`` (what a checkpoint records)."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]

    def autocast(self, cache: bool = True):
        """The forward's autocast. ``cache=False`` for a region recorded as a CUDA graph: autocast's
        cache of cast weights must not outlive the recording (PyTorch's CUDA-graph notes)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype, cache_enabled=cache)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.grad_scaling else None


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_precision(device: torch.device, mode: str = "auto") -> Precision:
    """``auto``: bf16 autocast + channels_last on a GPU with native bf16, fp16 autocast with grad
    scaling on an older GPU, plain fp32 on the CPU (so that CPU runs are bit-reproducible).
    ``fp32``, ``bf16`` and ``fp16`` force a choice (``bf16`` works on the CPU too).

    Example:

        >>> pick_precision(torch.device("cpu")).name, pick_precision(torch.device("cpu"), "bf16").name
        ('fp32', 'bf16')
    """
    cuda = device.type == "cuda"
    if mode == "auto":
        if not cuda:
            return Precision(None, False, False, device.type)
        mode = "bf16" if native_bf16(device) else "fp16"
    if mode == "fp32":
        return Precision(None, False, cuda, device.type)
    if mode == "bf16":
        return Precision(torch.bfloat16, False, cuda, device.type)
    if mode == "fp16":
        return Precision(torch.float16, cuda, cuda, device.type)
    raise ValueError(f"unknown precision {mode!r} (one of {', '.join(PRECISIONS)})")


@dataclass(frozen=True)
class Numerics:
    """The settings besides device and precision that change a GPU run's numbers.

    Args:
        deterministic: PyTorch's deterministic algorithms (and cuDNN's deterministic kernels).
        tf32: fp32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa).
        cudnn_benchmark: cuDNN's autotuner picks each convolution's kernel by timing (per process).
    """

    deterministic: bool = False
    tf32: bool = False
    cudnn_benchmark: bool = False

    def key(self) -> str:
        """One word for cache keys: ``deterministic``, or the TF32 and cuDNN choices."""
        if self.deterministic:
            return "deterministic"
        return f"tf32={self.tf32}/cudnn_benchmark={self.cudnn_benchmark}"


def set_numerics(device: torch.device, precision: Precision, deterministic: bool = False) -> Numerics:
    """Set this process's GPU numerics; returns them (on a CPU: nothing to set, the default).

    Without ``deterministic``: TF32 for what runs in fp32 unless fp32 was asked for, and cuDNN's
    autotuner (the shapes of a run do not change). With it: deterministic algorithms, no TF32, no
    autotuner; an op without a deterministic CUDA kernel then raises instead of varying.
    """
    if device.type != "cuda":
        return Numerics()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    tf32 = not deterministic and precision.autocast_dtype is not None
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return current_numerics(device)


def current_numerics(device: torch.device) -> Numerics:
    """What this process's settings are now (on a CPU: the default, which changes no number there)."""
    if device.type != "cuda":
        return Numerics()
    return Numerics(deterministic=torch.are_deterministic_algorithms_enabled(),
                    tf32=bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32),
                    cudnn_benchmark=bool(torch.backends.cudnn.benchmark))


def optimizer_impl_kwargs(device: torch.device) -> dict:
    """Fused optimizer kernels on CUDA (one launch per step), foreach on the CPU."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_rng_state(device: torch.device) -> torch.Tensor | None:
    """The accelerator's random stream (None on the CPU, whose stream ``torch.get_rng_state`` has)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_device_rng_state(device: torch.device, state: torch.Tensor | None) -> None:
    """Put back what ``device_rng_state`` returned."""
    if device.type == "cuda" and state is not None:
        torch.cuda.set_rng_state(state, device)


@contextlib.contextmanager
def side_stream(device: torch.device):
    """Run the block on a fresh CUDA stream that follows the current one, which then waits for it: the
    eager steps before a CUDA-graph recording (PyTorch's CUDA-graph notes warm up this way). A no-op on a CPU."""
    if device.type != "cuda":
        yield
        return
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


def record_graph(device: torch.device, fn: Callable[[], None], rehearse: bool = False) -> Callable[[], None]:
    """Record ``fn``'s kernels as one CUDA graph, without running them; returns the graph's replay.

    The replay reruns exactly those kernels on the same memory: ``fn`` must read its inputs from, and
    leave its outputs in, tensors that outlive the graph, and must not synchronise with the host.

    Args:
        device: A CUDA device (or any device with ``rehearse``).
        fn: The work to record.
        rehearse: Return ``fn`` itself, recording nothing: the graphed path's own code, eager, on any
            device (how the tests check it on a CPU).
    """
    if rehearse:
        return fn
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def limit_memory(device: torch.device, share: float) -> float | None:
    """Cap this process's GPU memory at ``share`` of the GPU (a trial packed at ``share`` GPUs per
    trial): past it, its allocations fail with out-of-memory instead of taking its neighbours'.
    Returns the cap in bytes (None on a CPU, or for a whole GPU)."""
    if device.type != "cuda" or share >= 1.0:
        return None
    torch.cuda.set_per_process_memory_fraction(max(share, 0.01), device)
    return share * torch.cuda.get_device_properties(device).total_memory


def release_memory(device: torch.device) -> None:
    """Hand the GPU memory this process's allocator caches (and nothing references) back to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory(device: torch.device) -> tuple[int, int]:
    """(max allocated, max reserved) bytes on the GPU since the last reset; (0, 0) on a CPU."""
    if device.type != "cuda":
        return 0, 0
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# Messages of device failures that reach Python as a plain RuntimeError (older torch builds, the
# CUDA caching allocator, cuBLAS and cuDNN handles). Matched as substrings.
_DEVICE_FAULT_MESSAGES = (
    "CUDA out of memory", "out of memory", "CUDA error", "CUBLAS_STATUS", "cuBLAS error", "CUDNN_STATUS",
    "cuDNN error", "NCCL error", "device-side assert", "an illegal memory access", "CUDA driver",
    "no kernel image is available", "unspecified launch failure",
)


def is_device_fault(exc: BaseException) -> bool:
    """An out-of-memory or a CUDA, cuBLAS or cuDNN error: the machine's failure, never the plan's.

    After most of them (an illegal address, a launch failure) the process's CUDA context is unusable
    for good, so the worker that hit one must not train again.

    Example:

        >>> is_device_fault(RuntimeError("CUDA error: an illegal memory access was encountered"))
        True
        >>> is_device_fault(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"))
        False
    """
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _DEVICE_FAULT_MESSAGES)
