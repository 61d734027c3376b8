"""dataset.download: CIFAR-10/100 fetched with torchvision's own downloader, here from a real HTTP
server on 127.0.0.1 that serves a tiny generated archive (SMSKD_CIFAR_URL / SMSKD_CIFAR_MD5)."""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_plan
from pydantic import ValidationError

from smskd_search import data, load_space
from smskd_search import make_plan as make_plan_of_space
from smskd_search.data import download, sources
from smskd_search.errors import UserError
from smskd_search.plan import DatasetSpec
from smskd_search.search.storage import _space_fingerprint

ROOT = Path(__file__).resolve().parent.parent


class Server:
    """A real http.server in a thread: serves ``files`` (path -> bytes), 404 otherwise; counts requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in download.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    data._arrays.cache_clear()
    s = Server()
    yield s
    s.close()
    data._arrays.cache_clear()


def make_archive(name: str, seed: int = 0, per_file: int = 3) -> tuple[bytes, dict[str, np.ndarray]]:
    """A CIFAR archive in torchvision's python layout, a few images per batch file, and its arrays."""
    folder, train_files, test_file, label_key = sources.CIFAR_LAYOUT[name]
    classes = 10 if name == "cifar10" else 100
    rng = np.random.default_rng(seed)
    batches = {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for fname in [*train_files, test_file]:
            images = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            labels = rng.permutation(np.arange(per_file) % classes).tolist()  # every class alike, if many
            batches[fname] = (images, labels)
            payload = pickle.dumps({b"data": images, label_key: labels, b"batch_label": fname.encode()})
            info = tarfile.TarInfo(f"{folder}/{fname}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

    def joined(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([batches[f][0] for f in files]).reshape(-1, 3, 32, 32),
                np.concatenate([np.asarray(batches[f][1], np.int64) for f in files]))

    x, y = joined(train_files)
    xt, yt = joined([test_file])
    return buf.getvalue(), {"x": x, "y": y, "xt": xt, "yt": yt}


def serve(server: Server, monkeypatch, name: str, *, md5: bool = True, per_file: int = 3) -> dict[str, np.ndarray]:
    archive, arrays = make_archive(name, per_file=per_file)
    server.files["/mirror/cifar.tar.gz"] = archive
    monkeypatch.setenv(download.ENV_CIFAR_URL, server.url("/mirror/cifar.tar.gz"))
    if md5:
        monkeypatch.setenv(download.ENV_CIFAR_MD5, hashlib.md5(archive).hexdigest())
    return arrays


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------- the spec
def test_download_is_not_hashed_and_only_for_cifar():
    spec = DatasetSpec(name="cifar10", root="data")
    assert spec.download is False and "download" not in spec.hashed()
    assert spec.model_copy(update={"download": True}).hashed() == spec.hashed()
    DatasetSpec(name="cifar100", download=True)
    with pytest.raises(ValidationError, match=r"download: only cifar10 and cifar100"):
        DatasetSpec(name="digits", download=True)


def test_download_leaves_plan_hashes_and_resume_alone(tiny_problem):
    # The default space's plan hashes as they were before the field existed (test_readme pins them too).
    plan = make_plan_of_space(load_space("default").space, [("kd", 4), ("fitnet", 6)], seed=3)
    assert (plan.content_hash(), plan.canonical_hash()) == ("4c4972927bda", "4c4972927bdaab96")
    cifar = make_plan(tiny_problem.model_copy(update={"dataset": DatasetSpec(name="cifar10")}), [("kd", 2), ("at", 2)])
    fetching = cifar.model_copy(deep=True)
    fetching.problem.dataset.download = True
    assert (fetching.content_hash(), fetching.canonical_hash()) == (cifar.content_hash(), cifar.canonical_hash())
    assert "download" in fetching.to_yaml()  # a plan still says it, for `train` to fetch
    # Resuming a study with download switched on (or off) is the same space.
    base = {"name": "s", "problem": {"dataset": {"name": "cifar10", "root": "data"}, "teacher": {"arch": "cnn_small"},
                                     "student": {"arch": "cnn_nano"}}}
    on = yaml.safe_load(yaml.safe_dump(base))
    on["problem"]["dataset"]["download"] = True
    assert _space_fingerprint(yaml.safe_dump(base)) == _space_fingerprint(yaml.safe_dump(on))
    on["problem"]["dataset"]["split_seed"] = 1
    assert _space_fingerprint(yaml.safe_dump(base)) != _space_fingerprint(yaml.safe_dump(on))


def test_a_trial_on_a_node_without_the_root_fetches_it_when_asked(tiny_problem, tmp_path):
    from smskd_search.search.trainable import _dataset_on_this_node

    plan = make_plan(tiny_problem.model_copy(update={"dataset": DatasetSpec(name="cifar10")}), [("kd", 2)])
    absent = str(tmp_path / "absent")
    with pytest.raises(UserError, match=r"dataset.root: .*absent not found on node"):
        _dataset_on_this_node(plan, absent)
    plan.problem.dataset.download = True
    assert _dataset_on_this_node(plan, absent).root == absent


# ---------------------------------------------------------------------------------- downloading
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_download_fetches_the_archive_once_and_reads_it_exactly(server, monkeypatch, tmp_path, capsys, name):
    want = serve(server, monkeypatch, name)
    x, y, xt, yt = sources.load_cifar_arrays(name, str(tmp_path / "root"), download=True)
    for got, key in ((x, "x"), (y, "y"), (xt, "xt"), (yt, "yt")):
        np.testing.assert_array_equal(got, want[key])
        assert got.dtype == want[key].dtype
    assert x.shape == (3 * len(sources.CIFAR_LAYOUT[name][1]), 3, 32, 32)
    assert server.requests and set(server.requests) == {"/mirror/cifar.tar.gz"}
    err = capsys.readouterr().err
    shown = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    assert f"downloading {shown} from {server.url('/mirror/cifar.tar.gz')} into {tmp_path / 'root'} (about 170 MB)..." in err
    # On disk now: a second load (with download still asked for) reads it without the server.
    hits = len(server.requests)
    again = sources.load_cifar_arrays(name, str(tmp_path / "root"), download=True)
    assert len(server.requests) == hits and "downloading" not in capsys.readouterr().err
    np.testing.assert_array_equal(again[0], want["x"])


def test_load_data_downloads_with_the_spec(server, monkeypatch, tmp_path):
    want = serve(server, monkeypatch, "cifar10", per_file=20)
    spec = DatasetSpec(name="cifar10", root=str(tmp_path), val_fraction=0.2, download=True)
    d = data.load_data(spec)
    assert d.info.num_train + d.info.num_val == len(want["y"]) and d.info.image_size == 32
    test = data.load_test_split(spec, d.info)
    np.testing.assert_array_equal(test.labels.numpy(), want["yt"])
    hits = len(server.requests)
    data._arrays.cache_clear()
    data.load_data(spec)  # from disk
    assert len(server.requests) == hits


def test_without_download_missing_files_are_the_old_error(server, monkeypatch, tmp_path):
    serve(server, monkeypatch, "cifar10")
    with pytest.raises(UserError) as exc:
        data.load_data(DatasetSpec(name="cifar10", root=str(tmp_path / "nowhere")))
    msg = _one_line(exc)
    assert msg.startswith("dataset.root: cifar10 not found in ") and "set dataset.download: true" in msg
    assert server.requests == [] and not (tmp_path / "nowhere").exists()


def test_an_md5_mismatch_is_one_line_and_keeps_nothing(server, monkeypatch, tmp_path):
    serve(server, monkeypatch, "cifar10", md5=False)  # checked against torchvision's md5: not this archive
    url = server.url("/mirror/cifar.tar.gz")
    with pytest.raises(UserError) as exc:
        sources.load_cifar_arrays("cifar10", str(tmp_path), download=True)
    msg = _one_line(exc)
    assert msg.startswith(f"dataset.download: fetching cifar10 from {url} failed: the archive's md5 is "), msg
    assert "SMSKD_CIFAR_MD5" in msg
    assert not (tmp_path / "cifar-10-python.tar.gz").exists() and not (tmp_path / "cifar-10-batches-py").exists()


def test_a_404_is_one_line(server, monkeypatch, tmp_path):
    monkeypatch.setenv(download.ENV_CIFAR_URL, server.url("/absent.tar.gz"))
    with pytest.raises(UserError) as exc:
        sources.load_cifar_arrays("cifar100", str(tmp_path), download=True)
    msg = _one_line(exc)
    assert msg == f"dataset.download: fetching cifar100 from {server.url('/absent.tar.gz')} failed: HTTP 404 Not Found"


def test_an_archive_without_the_dataset_is_one_line(server, monkeypatch, tmp_path):
    archive, _ = make_archive("cifar100")  # served as CIFAR-10: extracts, but not to cifar-10-batches-py
    server.files["/c.tar.gz"] = archive
    monkeypatch.setenv(download.ENV_CIFAR_URL, server.url("/c.tar.gz"))
    monkeypatch.setenv(download.ENV_CIFAR_MD5, hashlib.md5(archive).hexdigest())
    with pytest.raises(UserError) as exc:
        sources.load_cifar_arrays("cifar10", str(tmp_path), download=True)
    msg = _one_line(exc)
    assert msg.startswith(f"dataset.download: the archive fetched from {server.url('/c.tar.gz')} did not hold "), msg


def test_the_url_filename_and_md5_are_torchvisions(monkeypatch):
    from torchvision.datasets import CIFAR10, CIFAR100

    for var in download.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    assert download.cifar_source("cifar10") == (CIFAR10.url, CIFAR10.filename, CIFAR10.tgz_md5)
    assert download.cifar_source("cifar100") == (CIFAR100.url, CIFAR100.filename, CIFAR100.tgz_md5)
    assert set(download.ENV_VARS) <= set(data.ENV_VARS)


# -------------------------------------------------------------------------------------- the CLI
def test_the_cli_refuses_download_for_another_dataset(tmp_path):
    space = yaml.safe_load((ROOT / "spaces" / "default.yaml").read_text())
    space["problem"]["dataset"] = {"name": "digits", "download": True}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    proc = subprocess.run([sys.executable, "-m", "smskd_search.cli", "teacher", "--space", str(path),
                           "--cache", str(tmp_path / "teachers")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: problem.dataset.download: only cifar10"), proc.stderr
    assert not (tmp_path / "teachers").exists()
