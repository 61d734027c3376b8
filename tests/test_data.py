"""Datasets: each loader on fixtures written in the real on-disk formats, seeded stratified splits,
no test sample reachable from the train/val API, tensor augmentation."""

from __future__ import annotations

import gzip
import pickle
import struct
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from smskd_search.data import TensorLoader, load_data, load_test_split, sources
from smskd_search.data.loader import TensorSplit, random_crop, random_flip
from smskd_search.errors import UserError
from smskd_search.plan import AugmentSpec, DatasetSpec


def _rows(t: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in t.flatten(1)}


def _check_splits(spec: DatasetSpec, n_train_total: int, n_classes: int):
    d = load_data(spec)
    assert len(d.train) + len(d.val) == n_train_total
    assert d.info.num_classes == n_classes
    assert abs(len(d.val) - spec.val_fraction * n_train_total) <= n_classes
    # Stratified: every class keeps its share in validation (within one sample of rounding).
    full = torch.cat([d.train.labels, d.val.labels])
    for c in range(n_classes):
        share = (full == c).sum().item() * spec.val_fraction
        assert abs((d.val.labels == c).sum().item() - share) <= 1.0 + 1e-9
    # Disjoint train / val.
    assert not (_rows(d.train.images) & _rows(d.val.images))
    return d


def _labelled_rows(split: TensorSplit) -> Counter:
    """The split's (image bytes, label) rows, with their multiplicities."""
    return Counter(zip((r.numpy().tobytes() for r in split.images.flatten(1)), split.labels.tolist()))


def test_digits_splits_are_seeded_stratified_and_disjoint():
    spec = DatasetSpec(name="digits", val_fraction=0.35, test_fraction=0.2, split_seed=3)
    d = _check_splits(spec, 1437, 10)  # 1,797 less the 20% test split
    test = load_test_split(spec, d.info)
    # Row by row: train, val and test together are the source's 1,797 rows, each used once (the
    # source, normalised as the loader does; a duplicate image counts as often as it occurs).
    x, y, _, _ = sources.load_digits_arrays()
    mean, std = torch.tensor(d.info.mean).view(1, -1, 1, 1), torch.tensor(d.info.std).view(1, -1, 1, 1)
    source = _labelled_rows(TensorSplit((torch.from_numpy(x) - mean) / std, torch.from_numpy(y)))
    parts = [_labelled_rows(s) for s in (d.train, d.val, test)]
    assert sum(parts, Counter()) == source and sum(source.values()) == 1797
    assert [sum(p.values()) for p in parts] == [len(d.train), len(d.val), 360]
    # The same seed gives the same rows in the same order; another seed, other rows in validation.
    again = load_data(spec)
    for a, b in ((d.train, again.train), (d.val, again.val)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(load_test_split(spec, d.info).images, test.images)
    other = load_data(spec.model_copy(update={"split_seed": 4}))
    assert _labelled_rows(other.val) != parts[1] and sum(_labelled_rows(other.val).values()) == len(d.val)
    assert d.info.in_channels == 1 and d.info.image_size == 8


def test_test_split_only_through_the_explicit_call(tmp_path, monkeypatch):
    log = tmp_path / "test-access.log"
    monkeypatch.setenv("SMSKD_TEST_ACCESS_LOG", str(log))
    spec = DatasetSpec(name="digits", val_fraction=0.35, test_fraction=0.2)
    d = load_data(spec)
    assert not log.exists()
    assert not any("test" in f for f in vars(d)) and not any("test" in f for f in vars(d.info))
    test = load_test_split(spec, d.info)
    assert log.read_text().count("dataset=digits") == 1
    assert len(test) == 360
    # sklearn's indices: the test rows are exactly the ones the train/val API never returns.
    x, y, _, _ = sources.load_digits_arrays()
    from smskd_search.data.splits import stratified_split

    keep, held = stratified_split(y, 0.2, spec.split_seed)
    assert len(set(keep) & set(held)) == 0 and len(keep) == len(d.train) + len(d.val)


def _write_idx(path, array: np.ndarray):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (200, 28, 28)), np.repeat(np.arange(10), 20)
    xt, yt = rng.integers(0, 256, (50, 28, 28)), np.repeat(np.arange(10), 5)
    _write_idx(raw / "train-images-idx3-ubyte.gz", x)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", y)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", xt)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", yt)
    spec = DatasetSpec(name="fashion_mnist", root=str(tmp_path), val_fraction=0.1)
    d = _check_splits(spec, 200, 10)
    assert d.info.image_size == 28 and d.info.in_channels == 1
    test = load_test_split(spec, d.info)
    assert len(test) == 50 and not (_rows(test.images) & (_rows(d.train.images) | _rows(d.val.images)))
    # Pixel values survive the IDX reader: undo the normalisation of one image.
    mean, std = d.info.mean[0], d.info.std[0]
    assert torch.allclose(test.images[0, 0] * std + mean, torch.from_numpy(xt[0]).float() / 255, atol=1e-5)


def test_train_subset_is_seeded_stratified_and_leaves_test_alone(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (300, 28, 28)), np.repeat(np.arange(10), 30)
    _write_idx(raw / "train-images-idx3-ubyte.gz", x)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", y)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", x[:40])
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", y[:40])
    spec = DatasetSpec(name="fashion_mnist", root=str(tmp_path), val_fraction=0.2, train_subset=100)
    d = _check_splits(spec, 100, 10)
    assert torch.bincount(torch.cat([d.train.labels, d.val.labels])).tolist() == [10] * 10  # 30 -> 10 a class
    # Every image kept is one of the originals; the same seed keeps the same ones, another seed others.
    originals = {((r.astype(np.float32) / 255 - d.info.mean[0]) / d.info.std[0]).astype(np.float32).tobytes() for r in x}
    assert _rows(d.train.images) <= originals
    again, other = load_data(spec), load_data(spec.model_copy(update={"split_seed": 1}))
    assert torch.equal(again.train.images, d.train.images) and not torch.equal(other.train.images, d.train.images)
    assert len(load_test_split(spec, d.info)) == 40
    with pytest.raises(UserError, match=r"^dataset\.train_subset: 301 is more than the 300 training images"):
        load_data(spec.model_copy(update={"train_subset": 301}))


def test_hashes_of_plans_without_a_subset_are_unchanged():
    # Measured before train_subset existed: stored studies' plan keys and teacher caches still match.
    from smskd_search.engine.teacher import teacher_key
    from smskd_search.space import load_space, make_plan

    sp = load_space("default").space
    plan = make_plan(sp, [("kd", 4), ("fitnet", 6)], seed=3)
    assert (plan.content_hash(), plan.canonical_hash(), teacher_key(sp.problem)) == (
        "4c4972927bda", "4c4972927bdaab96", "ba1cd72f2b7b")
    sub = plan.model_copy(deep=True)
    sub.problem.dataset.train_subset = 1000
    assert sub.canonical_hash() != plan.canonical_hash() and teacher_key(sub.problem) != teacher_key(sp.problem)


def _write_cifar(folder, name: str, n_per_file: int, n_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    layout = sources.CIFAR_LAYOUT[name]
    (folder / layout[0]).mkdir(parents=True)
    for fname in layout[1] + [layout[2]]:
        data = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        labels = [i % n_classes for i in range(n_per_file)]
        with open(folder / layout[0] / fname, "wb") as f:
            pickle.dump({b"data": data, layout[3]: labels}, f)


@pytest.mark.parametrize("name, n_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_torchvision_layout(tmp_path, name, n_classes):
    per_file = 100 if name == "cifar10" else 500
    _write_cifar(tmp_path, name, per_file, n_classes, seed=1)
    spec = DatasetSpec(name=name, root=str(tmp_path), val_fraction=0.2)
    n_train = per_file * len(sources.CIFAR_LAYOUT[name][1])
    d = _check_splits(spec, n_train, n_classes)
    assert d.info.image_size == 32 and d.info.in_channels == 3
    test = load_test_split(spec, d.info)
    assert len(test) == per_file and not (_rows(test.images) & _rows(d.train.images))


def test_missing_cifar_is_one_clear_error(tmp_path):
    with pytest.raises(UserError) as exc:
        load_data(DatasetSpec(name="cifar100", root=str(tmp_path / "nowhere")))
    msg = str(exc.value)
    assert "dataset.root" in msg and str(tmp_path / "nowhere") in msg and "\n" not in msg


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(2)
    classes = ["cat", "dog", "emu"]
    for split, n in (("train", 12), ("test", 4)):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    spec = DatasetSpec(name="imagefolder", root=str(tmp_path), val_fraction=0.25)
    d = _check_splits(spec, 36, 3)
    assert d.info.image_size == 16
    test = load_test_split(spec, d.info)
    assert len(test) == 12 and sorted(test.labels.tolist()) == sorted([0, 1, 2] * 4)


def test_random_crop_is_a_shift_of_the_padded_image():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5) + 1
    gen = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        matches = [(i, j) for i in range(5) for j in range(5) if torch.equal(padded[b, :, i:i + 5, j:j + 5], out[b])]
        assert matches, "every crop must be a 5x5 window of the zero-padded image"


def test_flip_and_determinism():
    x = torch.randn(64, 3, 4, 4)
    out = random_flip(x, torch.Generator().manual_seed(1))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54
    again = random_flip(x, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


@pytest.mark.parametrize("padding,flip", [(0, False), (2, False), (0, True), (2, True)])
def test_an_epoch_started_at_a_batch_is_the_tail_of_the_full_pass(padding, flip):
    from smskd_search.plan import AugmentSpec

    split = TensorSplit(torch.randn(50, 1, 6, 6), torch.arange(50) % 5)
    aug = AugmentSpec(crop_padding=padding, flip=flip)

    def loader():
        return TensorLoader(split, 8, shuffle=True, augment=aug, generator=torch.Generator().manual_seed(3))

    full = list(loader())
    assert len(full) == 7
    for start in (0, 3, 6):
        tail = list(loader().batches(start))
        assert len(tail) == 7 - start
        assert all(torch.equal(a, b) for got, want in zip(tail, full[start:]) for a, b in zip(got, want))


def test_loader_visits_every_sample_once_per_epoch():
    split = TensorSplit(torch.randn(50, 1, 4, 4), torch.arange(50) % 5)
    loader = TensorLoader(split, 16, shuffle=True, augment=AugmentSpec(crop_padding=1, flip=True),
                          generator=torch.Generator().manual_seed(0))
    seen = torch.cat([idx for _, _, idx in loader])
    assert sorted(seen.tolist()) == list(range(50)) and len(loader) == 4
    for x, y, idx in loader:
        assert x.shape[1:] == (1, 4, 4) and torch.equal(y, split.labels[idx])


def test_a_large_folder_decodes_in_processes_to_the_same_arrays(tmp_path, monkeypatch):
    """Above PARALLEL_DECODE_MIN images the folder is decoded in chunks by worker processes: the same
    arrays as in one process, in class then file-name order, an odd-sized image resized to the first
    one's size."""
    rng = np.random.default_rng(4)
    expected = []
    for label, c in enumerate(("a", "b")):
        (tmp_path / c).mkdir()
        for i in range(11):
            shape = (12, 10, 3) if (label, i) == (1, 3) else (8, 10, 3)  # one odd size (H 12 instead of 8)
            img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
            img.save(tmp_path / c / f"{i:02d}.png")
            expected.append((np.asarray(img.resize((10, 8))).transpose(2, 0, 1), label))
    monkeypatch.setattr(sources, "PARALLEL_DECODE_MIN", 8)
    serial = sources._read_folder(tmp_path, ["a", "b"], processes=1)
    import concurrent.futures

    pools = []

    class Pool(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, n, **kw):
            pools.append(n)
            super().__init__(n, **kw)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Pool)
    parallel = sources._read_folder(tmp_path, ["a", "b"], processes=3)
    assert pools == [3]  # three worker processes decoded it
    assert serial[0].shape == (22, 3, 8, 10) and serial[1].tolist() == [0] * 11 + [1] * 11
    assert all(np.array_equal(serial[0][k], x) for k, (x, _) in enumerate(expected))
    assert np.array_equal(serial[0], parallel[0]) and np.array_equal(serial[1], parallel[1])


def test_concurrent_imagefolder_decodes_never_share_a_temporary_file(tmp_path, monkeypatch):
    """Two trials on one node decode the same folder at once: each writes its own temporary file,
    and the cache ends whole (a shared temporary name let one writer rename the other's file)."""
    import threading

    rng = np.random.default_rng(3)
    for split, n in (("train", 4), ("test", 2)):
        for c in ("a", "b"):
            (tmp_path / "img" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "img" / split / c / f"{i}.png")
    monkeypatch.setenv("SMSKD_CACHE", str(tmp_path / "cache"))
    both_writing = threading.Barrier(2, timeout=30)
    written, real_savez = [], np.savez

    def savez(file, **arrays):
        written.append(getattr(file, "name", file))
        both_writing.wait()  # neither has finished (or renamed) before the other starts
        real_savez(file, **arrays)

    monkeypatch.setattr(sources.np, "savez", savez)
    results, errors = [], []

    def decode():
        try:
            results.append(sources.load_imagefolder_arrays(str(tmp_path / "img")))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=decode) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(results) == 2 and len(set(map(str, written))) == 2
    (cached,) = (tmp_path / "cache").iterdir()  # one cache file, no temporary left behind
    assert cached.name.startswith("imagefolder-") and cached.suffixes == [".npz"]
    monkeypatch.setattr(sources.np, "savez", real_savez)
    again = sources.load_imagefolder_arrays(str(tmp_path / "img"))  # from the cache file
    assert all(np.array_equal(a, b) for a, b in zip(again, results[0]))


def test_the_imagefolder_test_split_is_test_else_val_and_cache_names_stay(tmp_path, monkeypatch):
    """A folder with test/ keeps the decoded cache file it had (its name is the listing's hash, as
    before val/ was read); one with only val/ takes its test split from there."""
    import hashlib
    import shutil

    rng = np.random.default_rng(4)
    for split, n in (("train", 4), ("test", 2), ("val", 3)):
        for c in ("a", "b"):
            (tmp_path / "img" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "img" / split / c / f"{i}.png")
    monkeypatch.setenv("SMSKD_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "img"
    listing = "\n".join(f"{p.relative_to(base)}:{p.stat().st_size}" for split in ("train", "test")
                        for p in sorted((base / split).rglob("*")) if p.suffix == ".png")
    key = hashlib.sha256(f"{base.resolve()}\n{listing}".encode()).hexdigest()[:16]
    _, _, xt, _ = sources.load_imagefolder_arrays(str(base))
    assert len(xt) == 4 and [p.name for p in (tmp_path / "cache").iterdir()] == [f"imagefolder-{key}.npz"]
    shutil.rmtree(base / "test")
    _, _, xt, yt = sources.load_imagefolder_arrays(str(base))
    assert len(xt) == 6 and yt.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.real_component("fashion_mnist")
@pytest.mark.skipif(not sources.DEBIAN_FASHION_MNIST.is_dir(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_the_cpu_fashion_mnist_space_reads_a_subset_of_the_real_data():
    from smskd_search.space import load_space

    spec = load_space("fashion-mnist-cpu").space.problem.dataset
    d = load_data(spec)
    assert (d.info.num_train, d.info.num_val, d.info.image_size) == (4000, 1000, 28)
    assert torch.bincount(d.train.labels).tolist() == [400] * 10 and torch.bincount(d.val.labels).tolist() == [100] * 10
    assert len(load_test_split(spec, d.info)) == 10000  # the whole official test split
