"""Readers for each dataset's on-disk format. Each returns (images, labels, test_images, test_labels)
as numpy arrays: images NCHW (uint8, or float32 in [0, 1]), labels int64. Nothing is downloaded,
except CIFAR-10/100 for a dataset with ``download: true`` (see :mod:`smskd_search.data.download`)."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np

from smskd_search.cpus import usable_cpus
from smskd_search.data.download import cifar_source, download_cifar
from smskd_search.data.folder_index import IMAGE_SUFFIXES, class_folders, test_folder
from smskd_search.errors import UserError

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# The environment variables read here (smskd_search.data.ENV_VARS lists them for the search).
ENV_DATA = "SMSKD_DATA"  # the default dataset root (a dataset without ``root``)
ENV_CACHE = "SMSKD_CACHE"  # where decoded imagefolder arrays are cached


def absolute_root(root: str | None) -> str | None:
    """``root`` as an absolute path (a relative one is taken from the working directory), None as None.

    Example:

        >>> absolute_root("/srv/data"), absolute_root(None)
        ('/srv/data', None)
    """
    return None if root is None else str(Path(root).expanduser().absolute())


def default_root() -> Path:
    return Path(os.environ.get(ENV_DATA, "data"))


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE, Path.home() / ".cache" / "smskd_search"))


def load_digits_arrays() -> Arrays:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    return images, d.target.astype(np.int64), None, None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UserError(f"{path}: not an IDX file of unsigned bytes")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist_arrays(root: str | None) -> Arrays:
    """torchvision's layout (<root>/FashionMNIST/raw/*-ubyte[.gz]) or Debian's dataset-fashion-mnist."""
    candidates = []
    if root is not None:
        candidates += [Path(root) / "FashionMNIST" / "raw", Path(root)]
    else:
        candidates += [default_root() / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for folder in candidates:
        paths = [_find_idx(folder, s) for s in stems]
        if all(p is not None for p in paths):
            x, y, xt, yt = (_read_idx(p) for p in paths)  # type: ignore[arg-type]
            return x[:, None], y.astype(np.int64), xt[:, None], yt.astype(np.int64)
    looked = ", ".join(str(c) for c in candidates)
    raise UserError(
        f"dataset.root: Fashion-MNIST not found (looked in {looked}); install the Debian package "
        "dataset-fashion-mnist or put the IDX files under <root>/FashionMNIST/raw/"
    )


CIFAR_LAYOUT = {
    # name: (folder, train files, test file, label key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels"),
    "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels"),
}


def _read_cifar_batches(files: list[Path], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f in files:
        with open(f, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar_arrays(name: str, root: str | None, download: bool = False) -> Arrays:
    """torchvision's python layout (<root>/cifar-10-batches-py or <root>/cifar-100-python), read
    directly; only when ``download`` is true and files are missing is the archive fetched first."""
    folder_name, train_files, test_file, label_key = CIFAR_LAYOUT[name]
    folder = (Path(root) if root is not None else default_root()) / folder_name
    files = [folder / f for f in train_files + [test_file]]

    def missing() -> list[str]:
        return [f.name for f in files if not f.is_file()]

    if missing() and download:
        download_cifar(name, folder.parent, lambda: not missing())
        if missing():
            raise UserError(f"dataset.download: the archive fetched from {cifar_source(name)[0]} did not hold "
                            f"{folder} (missing {', '.join(missing())})")
    if missing():
        raise UserError(
            f"dataset.root: {name} not found in {folder} (missing {', '.join(missing())}); set dataset.download: "
            f"true, or download the python version from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
            f"into {folder.parent}"
        )
    try:
        x, y = _read_cifar_batches(files[:-1], label_key)
        xt, yt = _read_cifar_batches(files[-1:], label_key)
    except Exception as exc:  # noqa: BLE001 - any unreadable batch file is the same user error
        raise UserError(f"dataset.root: {folder} holds unreadable {name} files: {str(exc).splitlines()[0]}") from None
    return x, y, xt, yt




# Below this many images a folder is decoded in this process: worker processes cost more than they save.
PARALLEL_DECODE_MIN = 4000


def _decode_chunk(files: list[Path], size: tuple[int, int]) -> np.ndarray:
    """``files`` decoded as RGB at ``size`` (width, height), as one uint8 array (N, 3, H, W)."""
    from PIL import Image

    out = np.empty((len(files), 3, size[1], size[0]), np.uint8)
    for i, p in enumerate(files):
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != size:
                im = im.resize(size)
            out[i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    return out


def _read_folder(folder: Path, classes: list[str], processes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every image under ``folder/<class>/`` in class then file-name order, as one uint8 array (N, 3,
    H, W) at the first image's size, and the labels.

    A large folder is decoded in chunks by ``processes`` worker processes (default: this process's
    CPUs; Pillow's decoding holds the GIL for small images, so threads do not help); the chunks are
    joined in order, so the arrays are the same whatever their number."""
    from PIL import Image

    files: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        found = sorted(p for p in (folder / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if (folder / cls).is_dir() else []
        files += found
        labels += [label] * len(found)
    if not files:
        raise UserError(f"dataset.root: no images under {folder}")
    with Image.open(files[0]) as im:
        size = im.size
    n = min(processes or usable_cpus(), max(1, len(files) // (PARALLEL_DECODE_MIN // 4)))
    if n == 1 or len(files) < PARALLEL_DECODE_MIN:
        return _decode_chunk(files, size), np.asarray(labels, np.int64)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    step = -(-len(files) // (4 * n))  # a few chunks per process: an uneven one does not hold the rest up
    chunks = [files[i:i + step] for i in range(0, len(files), step)]
    # fork: the workers need nothing but this function and its arguments (spawn would import torch
    # again in each of them). They run no torch op and no BLAS: a forked child of a process with
    # torch's OpenMP pool hangs in its first parallel region (verify.py spawns for that reason).
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork")) as pool:
        parts = list(pool.map(_decode_chunk, chunks, [size] * len(chunks)))
    return np.concatenate(parts), np.asarray(labels, np.int64)


def load_imagefolder_arrays(root: str | None) -> Arrays:
    """``<root>/train/<class>/*`` and the test split's ``<root>/test/<class>/*`` (else ``<root>/val/``,
    ImageNet's layout), decoded once and cached as .npz."""
    if root is None:
        raise UserError("dataset.root: imagefolder needs a root with train/<class>/ and test/<class>/ (or val/) folders")
    base = Path(root)
    if not (base / "train").is_dir():
        raise UserError(f"dataset.root: {base / 'train'} not found (imagefolder needs train/<class>/ and test/<class>/)")
    classes = class_folders(base / "train")
    if not classes:
        raise UserError(f"dataset.root: no class folders under {base / 'train'}")
    # test/ as before (and the same cache key); val/ only where there is no test/.
    test = test_folder(base)
    listing = "\n".join(
        f"{p.relative_to(base)}:{p.stat().st_size}" for folder in (base / "train", test) if folder is not None
        for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES
    )
    key = hashlib.sha256(f"{base.resolve()}\n{listing}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"imagefolder-{key}.npz"
    if cached.is_file():
        z = np.load(cached)
        has_test = z["xt"].size > 0
        return z["x"], z["y"], z["xt"] if has_test else None, z["yt"] if has_test else None
    x, y = _read_folder(base / "train", classes)
    if test is not None:
        xt, yt = _read_folder(test, classes)
    else:
        xt = yt = None
    cached.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name of this writer's own: trials on one node decode the same folder at once, and
    # a shared name would let one rename (or truncate) the file another is still writing.
    fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=f"{cached.stem}.", suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x=x, y=y, xt=xt if xt is not None else np.zeros((0,), np.uint8),
                     yt=yt if yt is not None else np.zeros((0,), np.int64))
        os.replace(tmp, cached)  # atomic: a reader sees the whole cache file or none
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return x, y, xt, yt
