"""torchvision's pretrained weights by name (``IMAGENET1K_V1``, ``DEFAULT``), as a local file.

A teacher given as ``{arch: resnet34, weights: IMAGENET1K_V1}`` is torchvision's published
checkpoint: this module finds it in torch hub's cache (``$TORCH_HOME/hub/checkpoints``, where
torchvision's own loader keeps it) or fetches it there, checks it against the hash prefix in its file
name (torchvision names its files ``<arch>-<sha256 prefix>.pth``), and hands back the path; from there
it is a local checkpoint like any other.

``SMSKD_WEIGHTS_URL``
    Fetch from this base URL (a mirror holding torchvision's files under their own names) instead of
    ``https://download.pytorch.org/models/``; still checked against the file name's hash prefix.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from smskd_search.digest import sha256_of_file
from smskd_search.errors import UserError

ENV_WEIGHTS_URL = "SMSKD_WEIGHTS_URL"


def torchvision_archs() -> list[str]:
    """The zoo's archs that are torchvision's own modules, so torchvision's weights fit them.

    A name alone does not say it: the zoo's ``vgg13`` is the CIFAR benchmark's, not torchvision's.
    """
    from smskd_search.models import MODELS

    return sorted(n for n, f in MODELS.items() if f.__module__.startswith("smskd_search.models.imagenet."))


def weights_error(arch: str, name: str) -> str | None:
    """Why ``name`` is not torchvision weights of the zoo's ``arch`` (None if it is); no network.

    Example:

        >>> weights_error("resnet18", "IMAGENET1K_V1") is None
        True
    """
    try:
        _weights(arch, name, "teacher.weights")
    except UserError as exc:
        return str(exc).removeprefix("teacher.weights: ")
    return None


def _weights(arch: str, name: str, field: str):  # -> torchvision.models.WeightsEnum member
    import torchvision

    if arch not in torchvision_archs():
        raise UserError(f"{field}: torchvision publishes no weights for arch {arch!r} (the zoo's archs that are "
                        f"torchvision's: {', '.join(torchvision_archs())}); leave weights out to train it")
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (KeyError, ValueError):
        raise UserError(f"{field}: torchvision publishes no weights for arch {arch!r}") from None
    try:
        return enum[name]
    except KeyError:
        raise UserError(f"{field}: {arch} has no weights {name!r}; torchvision has {', '.join(enum.__members__)}") from None


def published_top1(arch: str, name: str) -> float | None:
    """The ImageNet-1K top-1 (%) torchvision publishes for these weights, if it does."""
    metrics = _weights(arch, name, "teacher.weights").meta.get("_metrics", {})
    return metrics.get("ImageNet-1K", {}).get("acc@1")


def published_classes(arch: str, name: str) -> int:
    """How many classes these weights classify (1000 for torchvision's ImageNet-1K weights)."""
    return len(_weights(arch, name, "teacher.weights").meta["categories"])


def _hash_prefix(filename: str) -> str:
    stem = filename.rsplit(".", 1)[0]
    return stem.rsplit("-", 1)[-1] if "-" in stem else ""


def weights_file(arch: str, name: str, field: str = "teacher.weights", timeout_s: float = 60.0) -> Path:
    """The local file of torchvision's weights ``name`` for ``arch``, fetched into torch hub's cache
    if it is not there yet.

    Args:
        arch: A torchvision model name (``resnet34``).
        name: A member of its weights enum (``IMAGENET1K_V1``, or ``DEFAULT``).
        field: The field the name came from (for the message).
        timeout_s: Give up on a connection that says nothing for this long.

    Raises:
        UserError: One line naming ``field``, the file and why, when the name is unknown or the file
            is neither cached nor fetchable (no network, a hash mismatch).
    """
    import torch

    w = _weights(arch, name, field)
    filename = w.url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if path.is_file():
        return path
    base = os.environ.get(ENV_WEIGHTS_URL)
    url = f"{base.rstrip('/')}/{filename}" if base else w.url
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{filename}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(tmp, "wb") as f:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                f.write(chunk)
        prefix = _hash_prefix(filename)
        if prefix and not sha256_of_file(tmp).startswith(prefix):
            raise UserError(f"{field}: {url} does not have the sha256 its name promises ({prefix}...)")
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"{field}: {name} for {arch} is not in {path} and could not be fetched from {url} "
                        f"({exc}); copy the file there, or set teacher.checkpoint to a local state dict") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path
