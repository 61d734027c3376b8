"""The streaming image-folder path on a generated JPEG tree: listing, class subsets, torchvision's
RandomResizedCrop drawn from a per-sample generator, and the same batches for the same seed whatever
the number of decoding workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from smskd_search.data.folder_index import choose_classes, index_folder
from smskd_search.data.streaming import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTransform,
    StreamingLoader,
    crop_box,
    eval_view,
    read_image,
)
from smskd_search.errors import UserError

SMALL = ImageTransform(size=32, resize=40)


def write_tree(root: Path, classes: int = 3, per_class: int = 5) -> Path:
    """JPEGs of varied sizes (so crops and resizes differ), each class a different colour cast."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            arr[..., c % 3] //= 2
            Image.fromarray(arr).save(root / f"class{c}" / f"img{i}.jpg", quality=90)
    (root / "class0" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("folder") / "train")


def test_index_lists_images_by_class_in_order(tree):
    classes = choose_classes(sorted(p.name for p in tree.iterdir()), None, 0)
    index = index_folder(tree, classes)
    assert index.classes == ("class0", "class1", "class2")
    assert len(index) == 15  # the .txt is not an image
    assert list(index.files[:2]) == ["class0/img0.jpg", "class0/img1.jpg"]
    assert index.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    sub = index.take(np.array([14, 0]))
    assert sub.files == ("class2/img4.jpg", "class0/img0.jpg") and sub.labels.tolist() == [2, 0]


def test_class_subset_is_seeded_and_checked():
    names = [f"n{i:03d}" for i in range(100)]
    a, b = choose_classes(names, 10, 1), choose_classes(names, 10, 1)
    assert a == b == sorted(a) and len(set(a)) == 10
    assert choose_classes(names, 10, 2) != a
    assert choose_classes(names, ["n005", "n001"], 0) == ["n001", "n005"]
    with pytest.raises(UserError, match="dataset.classes: 'nope' is not a class folder"):
        choose_classes(names, ["nope"], 0)
    with pytest.raises(UserError, match="dataset.classes: 101 classes asked for"):
        choose_classes(names, 101, 0)


@pytest.mark.parametrize("hw", [(375, 500), (500, 375), (224, 224), (30, 400), (400, 30)])
def test_crop_box_is_torchvisions_random_resized_crop(hw):
    # torchvision draws from the global stream; a generator seeded alike gives the same numbers, so
    # the boxes must agree draw for draw, fallback (the extreme ratios) included.
    from torchvision.transforms import RandomResizedCrop

    img = torch.zeros(3, *hw)
    t = ImageTransform()
    for s in range(50):
        torch.manual_seed(s)
        expected = RandomResizedCrop.get_params(img, list(t.scale), list(t.ratio))
        assert crop_box(hw[0], hw[1], t, torch.Generator().manual_seed(s)) == tuple(expected), s


def batches(loader: StreamingLoader) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) for p, q in zip(a, b) for u, v in zip(p, q))


def test_same_seed_same_batches_whatever_the_workers(tree):
    index = index_folder(tree, ["class0", "class1", "class2"])
    make = lambda workers, seed=0: StreamingLoader(index, 4, "cpu", shuffle=True, augment=True, seed=seed,  # noqa: E731
                                                   num_workers=workers, transform=SMALL)
    one, two = make(0), make(2)
    first = [batches(one), batches(one)]
    assert same(first[0], [*batches(two)]) and same(first[1], batches(two))
    x, y, idx = first[0][0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(y, torch.from_numpy(index.labels)[idx])
    # Each epoch a new order and new crops; another seed another sequence.
    assert not same(first[0], first[1])
    assert sorted(torch.cat([b[2] for b in first[1]]).tolist()) == list(range(15))
    assert not same(first[0], batches(make(0, seed=1)))


def test_resume_continues_the_sequence(tree):
    index = index_folder(tree, ["class0", "class1", "class2"])
    a = StreamingLoader(index, 4, "cpu", shuffle=True, augment=True, seed=3, transform=SMALL)
    batches(a)
    state = a.state_dict()
    expected = batches(a)
    b = StreamingLoader(index, 4, "cpu", shuffle=True, augment=True, seed=0, transform=SMALL)
    b.load_state_dict(state)
    assert same(batches(b), expected)


def test_evaluation_is_resize_center_crop_normalised(tree):
    index = index_folder(tree, ["class0", "class1", "class2"])
    loader = StreamingLoader(index, 15, "cpu", transform=SMALL)
    x, y, idx = next(iter(loader))
    assert idx.tolist() == list(range(15))  # evaluation keeps the file order
    img = read_image(str(tree / index.files[7]))
    view = eval_view(img, SMALL)
    assert view.shape == (3, 32, 32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x[7], (view.float() / 255 - mean) / std, rtol=0, atol=1e-5)
    # Two passes over an evaluation loader give the same tensors.
    assert torch.equal(next(iter(loader))[0], x)


def test_a_dropped_loader_stops_its_workers_at_once(tree):
    """Without a reference cycle, the last reference going stops the decoding workers then and
    there (freed by the garbage collector instead, each waited seconds for a stop it never heard)."""
    import gc
    import multiprocessing
    import time

    index = index_folder(tree, choose_classes(sorted(p.name for p in tree.iterdir()), None, 0))
    before = set(multiprocessing.active_children())
    gc.disable()
    try:
        loader = StreamingLoader(index, 4, "cpu", shuffle=True, augment=True, num_workers=1, transform=SMALL)
        assert len(list(loader)) == 4
        assert set(multiprocessing.active_children()) - before  # the persistent worker is up
        start = time.monotonic()
        del loader
        assert not set(multiprocessing.active_children()) - before
        assert time.monotonic() - start < 3
    finally:
        gc.enable()
