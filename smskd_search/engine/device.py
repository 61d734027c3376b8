"""Device and precision choices, in one place: no other module calls device-specific APIs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def pick_device(requested: str | None = None) -> torch.device:
    """``cuda`` when present unless told otherwise."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from smskd_search.errors import UserError

        raise UserError("--device: cuda requested but no CUDA device is available")
    return dev


@dataclass(frozen=True)
class Precision:
    """How forwards run: autocast dtype (None: fp32), grad scaling, memory format."""

    autocast_dtype: torch.dtype | None
    grad_scaling: bool
    channels_last: bool
    device_type: str

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.grad_scaling else None


def pick_precision(device: torch.device, mode: str = "auto") -> Precision:
    """``auto``: bf16 autocast + channels_last on CUDA (fp16 with grad scaling where bf16 is not
    supported), plain fp32 on the CPU so that CPU runs are bit-reproducible. ``fp32``, ``bf16`` and
    ``fp16`` force a choice (``bf16`` works on the CPU too)."""
    cuda = device.type == "cuda"
    if mode == "auto":
        if not cuda:
            return Precision(None, False, False, device.type)
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "fp32":
        return Precision(None, False, cuda, device.type)
    if mode == "bf16":
        return Precision(torch.bfloat16, False, cuda, device.type)
    if mode == "fp16":
        return Precision(torch.float16, cuda, cuda, device.type)
    raise ValueError(f"unknown precision {mode!r}")


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
