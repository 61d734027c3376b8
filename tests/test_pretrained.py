"""torchvision's pretrained weights by name: found in torch hub's cache, or fetched from a real HTTP
server (a local mirror) and checked against the hash prefix of torchvision's file name."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
import torchvision

from smskd_search.engine.teacher import load_weights_checked
from smskd_search.errors import UserError
from smskd_search.models import create_model
from smskd_search.models.pretrained import ENV_WEIGHTS_URL, published_top1, weights_file

URL_NAME = "resnet18-f37072fd.pth"  # torchvision's IMAGENET1K_V1 file for resnet18


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A real HTTP server over a folder, as the weights mirror."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(ENV_WEIGHTS_URL, f"http://127.0.0.1:{server.server_address[1]}/")
    yield root
    server.shutdown()
    thread.join(timeout=10)


def torchvision_like_file(folder: Path) -> tuple[Path, dict]:
    """A resnet18 state dict saved under a name whose hash prefix is its own (as torchvision's are)."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    tmp = folder / "tmp.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    path = folder / f"resnet18-{digest}.pth"
    tmp.rename(path)
    return path, state


def test_cached_file_is_used_and_loads_into_the_zoo_model(hub):
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, hub / URL_NAME)
    path = weights_file("resnet18", "IMAGENET1K_V1")
    assert path == hub / URL_NAME
    assert weights_file("resnet18", "DEFAULT") == path  # DEFAULT is an alias of IMAGENET1K_V1 here
    model = create_model("resnet18", 1000, 3, 224)
    load_weights_checked(model, path, "resnet18", field="teacher.weights")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert published_top1("resnet18", "IMAGENET1K_V1") == pytest.approx(69.758)


def test_fetched_from_a_mirror_and_hash_checked(hub, mirror, monkeypatch):
    served, state = torchvision_like_file(mirror)
    # The real resnet18 name carries torchvision's hash; serve our file under it and the check fails.
    (mirror / URL_NAME).write_bytes(served.read_bytes())
    with pytest.raises(UserError, match=r"teacher.weights: .*resnet18-f37072fd.pth does not have the sha256"):
        weights_file("resnet18", "IMAGENET1K_V1")
    assert not any(hub.glob("*")), "a file that failed its check must not stay in the cache"
    # A weights enum whose file name matches what the mirror serves: fetched, checked, cached.
    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setattr(type(w), "url", property(lambda self: f"https://example.invalid/{served.name}"))
    path = weights_file("resnet18", "IMAGENET1K_V1")
    assert path == hub / served.name and path.read_bytes() == served.read_bytes()


def test_unknown_names_and_unreachable_mirror_are_one_line_errors(hub, monkeypatch):
    with pytest.raises(UserError, match="teacher.weights: resnet18 has no weights 'IMAGENET9K'; torchvision has IMAGENET1K_V1"):
        weights_file("resnet18", "IMAGENET9K")
    with pytest.raises(UserError, match="teacher.weights: torchvision publishes no weights for arch 'resnet8x4'"):
        weights_file("resnet8x4", "IMAGENET1K_V1")
    monkeypatch.setenv(ENV_WEIGHTS_URL, "http://127.0.0.1:9/")  # the discard port: refused at once
    with pytest.raises(UserError, match=r"is not in .*resnet18-f37072fd.pth and could not be fetched from http://127.0.0.1:9/"):
        weights_file("resnet18", "IMAGENET1K_V1", timeout_s=5)
