"""Fetch CIFAR-10 / CIFAR-100 for a dataset with ``download: true``, with torchvision's own downloader.

The URL, the archive's file name and its md5 are torchvision's (``torchvision.datasets.CIFAR10`` /
``CIFAR100``: ``url``, ``filename``, ``tgz_md5``), and so is the layout the archive extracts to under
the dataset's root (``cifar-10-batches-py`` / ``cifar-100-python``), which
:func:`smskd_search.data.sources.load_cifar_arrays` then reads. The archive is kept beside it, as
torchvision keeps it. Two processes fetching into one root at once take turns (a lock file there).

Environment variables (a search passes both on to its trials):

``SMSKD_CIFAR_URL``
    Fetch the archive from this URL (a mirror) instead of torchvision's. It applies to whichever of
    the two datasets is being fetched, and is still checked against torchvision's md5, so a mirror
    of the original archive needs nothing else.
``SMSKD_CIFAR_MD5``
    The md5 the fetched archive must have, instead of torchvision's: for a mirror that serves an
    archive of its own making (the tests serve a tiny generated one). There is no way to skip the check.

Any failure (no network, HTTP 404, md5 mismatch, an unreadable archive) is one ``UserError`` line
naming ``dataset.download``, the URL and the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path

from smskd_search.errors import UserError

ENV_CIFAR_URL = "SMSKD_CIFAR_URL"
ENV_CIFAR_MD5 = "SMSKD_CIFAR_MD5"
ENV_VARS = (ENV_CIFAR_URL, ENV_CIFAR_MD5)

# name: (torchvision's dataset class, the name said to the user)
CIFAR_CLASSES = {"cifar10": ("CIFAR10", "CIFAR-10"), "cifar100": ("CIFAR100", "CIFAR-100")}


def cifar_source(name: str) -> tuple[str, str, str]:
    """(url, archive file name, md5) of ``name``'s archive: torchvision's, or the environment's.

    Example:

        >>> url, filename, md5 = cifar_source("cifar10")
        >>> filename, len(md5)
        ('cifar-10-python.tar.gz', 32)
    """
    from torchvision import datasets

    cls = getattr(datasets, CIFAR_CLASSES[name][0])
    url = os.environ.get(ENV_CIFAR_URL) or cls.url
    md5 = os.environ.get(ENV_CIFAR_MD5) or cls.tgz_md5
    return url, cls.filename, md5


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _reason(exc: BaseException, archive: Path, md5: str) -> str:
    from torchvision.datasets.utils import calculate_md5

    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    if isinstance(exc, RuntimeError) and "corrupted" in str(exc) and archive.is_file():
        return f"the archive's md5 is {calculate_md5(archive)}, not {md5} (a mirror's own archive: set {ENV_CIFAR_MD5})"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def download_cifar(name: str, root: Path, present: Callable[[], bool]) -> None:
    """Fetch and extract ``name``'s archive into ``root`` unless ``present()`` says its files are there.

    Args:
        name: ``cifar10`` or ``cifar100``.
        root: The dataset's root (created if need be).
        present: Whether the extracted files are all there; asked again once the lock is held, so
            that a process that waited for another's download does not fetch it again.

    Raises:
        UserError: One line naming ``dataset.download``, the URL and the reason.
    """
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive

    url, filename, md5 = cifar_source(name)
    archive = root / filename
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"dataset.download: cannot create {root} to fetch {name} into: {exc}") from None
    with _locked(root / f".{filename}.lock"):
        if present():
            return
        print(f"downloading {CIFAR_CLASSES[name][1]} from {url} into {root} (about 170 MB)...", file=sys.stderr, flush=True)
        try:
            download_and_extract_archive(url, str(root), filename=filename, md5=md5)
        except Exception as exc:  # noqa: BLE001 - every failure to fetch is the same one-line user error
            why = _reason(exc, archive, md5)
            if archive.is_file() and not check_integrity(str(archive), md5):
                archive.unlink()  # a partial or wrong download is not kept
            raise UserError(f"dataset.download: fetching {name} from {url} failed: {why}") from None


__all__ = ["ENV_CIFAR_MD5", "ENV_CIFAR_URL", "ENV_VARS", "cifar_source", "download_cifar"]
