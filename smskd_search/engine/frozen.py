"""Forward passes of frozen models (the teacher, the reference) for training batches.

A frozen model in eval mode gives each sample the same output every time it sees it. When training
batches are not augmented, its outputs for the whole training split are computed once (per stage
for the reference, per run for the teacher) and gathered by sample index, instead of one extra
forward pass per step. :class:`FrozenOutputsMemo` keeps the teacher's across runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from smskd_search.engine.device import Precision
from smskd_search.models.base import Features

if TYPE_CHECKING:
    from smskd_search.engine.prefix_cache import PrefixCache, Runtime

# Beyond this many cached floats (~2 GiB), fall back to per-batch forwards.
MAX_CACHED_FLOATS = 512 * 2**20


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (BN statistics frozen) and no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    return freeze(copy.deepcopy(model))


class FrozenForward:
    def __init__(self, model: nn.Module, precision: Precision, images: torch.Tensor | None = None,
                 batch_size: int = 1024, need_features: bool = True,
                 precomputed: tuple[torch.Tensor, Features | None] | None = None):
        self.model = model
        self.precision = precision
        # ``precomputed``: outputs over the training split computed earlier (the same model, inputs
        # and batch size), e.g. kept by a :class:`FrozenOutputsMemo`.
        self.cache: tuple[torch.Tensor, Features | None] | None = precomputed
        if images is not None and precomputed is None:
            self.cache = self._precompute(images, batch_size, need_features)

    @property
    def cached(self) -> bool:
        return self.cache is not None

    @torch.no_grad()
    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
        # no_grad rather than inference_mode: feature losses save the teacher's tensors for backward,
        # and inference tensors may not be saved.
        with self.precision.autocast():
            return self.model(self.precision.prepare_input(x))

    @torch.no_grad()
    def _precompute(self, images: torch.Tensor, batch_size: int, need_features: bool):
        logits_parts: list[torch.Tensor] = []
        feat_parts: list[Features] = []
        n = images.shape[0]
        for start in range(0, n, batch_size):
            logits, feats = self._run(images[start : start + batch_size])
            logits_parts.append(logits)
            if need_features:
                feat_parts.append(feats)
                if start == 0:
                    per_sample = sum(f[0].numel() for f in feats.stages + feats.preact) + feats.pooled[0].numel()
                    if per_sample * n > MAX_CACHED_FLOATS:
                        return None
        logits = torch.cat(logits_parts)
        if not need_features:
            return logits, None
        cat = lambda xs: torch.cat(xs)  # noqa: E731
        feats = Features(
            stages=[cat([f.stages[i] for f in feat_parts]) for i in range(len(feat_parts[0].stages))],
            preact=[cat([f.preact[i] for f in feat_parts]) for i in range(len(feat_parts[0].preact))],
            pooled=cat([f.pooled for f in feat_parts]),
        )
        return logits, feats

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, Features | None]:
        if self.cache is None:
            return self._run(x)
        logits, feats = self.cache
        if feats is None:
            return logits.index_select(0, idx), None
        # Stage and pre-activation maps are gathered when a method reads them, not before: a logit
        # method (KD, DKD) would otherwise copy every cached feature map of the batch each step
        # (about 19k floats per sample for cnn_large, ~0.4 ms of a ~4.5 ms digits step).
        return (logits.index_select(0, idx),
                Features(_Gathered(feats.stages, idx), _Gathered(feats.preact, idx), feats.pooled.index_select(0, idx)))


class _Gathered(Sequence):
    """The rows ``idx`` of each cached tensor, gathered on first access (a read-only list)."""

    __slots__ = ("_src", "_idx", "_out")

    def __init__(self, src: list[torch.Tensor], idx: torch.Tensor):
        self._src, self._idx = src, idx
        self._out: list[torch.Tensor | None] = [None] * len(src)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self._src)))]
        t = self._out[i]
        if t is None:
            t = self._out[i] = self._src[i].index_select(0, self._idx)
        return t

    def __add__(self, other):
        return list(self) + list(other)

    def __radd__(self, other):
        return list(other) + list(self)


# ------------------------------------------------------------------------------ kept across runs
def _digest(data: Any, n: int = 32) -> str:
    # As the stage-prefix cache digests its keys (keys that existing caches hold).
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:n]


FrozenCache = tuple[torch.Tensor, Features | None] | None


def frozen_outputs_key(*, teacher_sha256: str, data_identity: Any, need_features: bool, batch_size: int,
                       runtime: Runtime) -> str:
    """The memo key of a frozen teacher's outputs over a training split."""
    return _digest({"teacher": teacher_sha256, "data": data_identity, "features": need_features,
                    "batch_size": batch_size, "runtime": [runtime.threads, runtime.device, runtime.precision,
                                                          runtime.torch_version, runtime.engine_version]
                                                         + ([runtime.numerics] if runtime.numerics else [])})


def _to_payload(cache: tuple[torch.Tensor, Features | None]) -> dict:
    logits, feats = cache
    out: dict[str, Any] = {"logits": logits.cpu(), "features": None}
    if feats is not None:
        out["features"] = {"stages": [t.cpu() for t in feats.stages], "preact": [t.cpu() for t in feats.preact],
                           "pooled": feats.pooled.cpu()}
    return out


def _from_payload(payload: dict, device: torch.device) -> tuple[torch.Tensor, Features | None]:
    f = payload["features"]
    feats = None
    if f is not None:
        feats = Features(stages=[t.to(device) for t in f["stages"]], preact=[t.to(device) for t in f["preact"]],
                         pooled=f["pooled"].to(device))
    return payload["logits"].to(device), feats


class FrozenOutputsMemo:
    """A frozen teacher's outputs over a training split, kept across runs (the most recent one in
    this process; all of them in ``store`` when given, for other processes).

    ``computed`` counts the computations it could not avoid, ``loaded`` the loads from ``store``.
    """

    def __init__(self, store: PrefixCache | None = None):
        self.store = store
        self._key: str | None = None
        self._value: FrozenCache = None
        self.computed = 0
        self.loaded = 0

    def get(self, key: str, device: torch.device, compute: Callable[[], FrozenCache]) -> FrozenCache:
        if self._key == key:
            return self._value
        value: FrozenCache = None
        payload = self.store.get(key) if self.store is not None else None
        if payload is not None:
            value = _from_payload(payload, device)
            self.loaded += 1
        else:
            value = compute()
            self.computed += 1
            if value is not None and self.store is not None:
                self.store.put(key, _to_payload(value))
        self._key, self._value = key, value
        return value
