"""The device decision on a machine without a GPU: CUDA faked (``torch.cuda`` patched, tensors "on
cuda" under ``FakeTensorMode``), the choices checked. The first GPU run crashed on a device compared
without its index; these tests would have caught it."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from smskd_search.data import TensorLoader, TensorSplit
from smskd_search.engine import device as dv
from smskd_search.engine.prefix_cache import Runtime
from smskd_search.errors import UserError
from smskd_search.models.pool import adaptive_avg_pool2d
from smskd_search.search.trainable import is_infrastructure_error

PACKAGE = Path(__file__).resolve().parents[1] / "smskd_search"


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two GPUs of compute capability 9.0 (an H100/H200), the current one index 0."""
    state = {"capability": (9, 0), "count": 2}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["count"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Fake")
    return state


class FakeGenerator:
    """Stands in for ``torch.Generator`` on a GPU that is not there: it only keeps its device."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def manual_seed(self, seed):
        self.seed = seed
        return self


def test_no_module_but_the_device_module_calls_cuda_backends_or_generator():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "engine" / "device.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                    and isinstance(node.value.value, ast.Name) and node.value.value.id == "torch" \
                    and node.value.attr in ("cuda", "backends"):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: torch.{node.value.attr}.{node.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Generator" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: torch.Generator(")
    assert offenders == []


def test_the_device_is_always_indexed(fake_cuda):
    assert dv.pick_device(None) == torch.device("cuda", 0)
    assert dv.pick_device("auto") == torch.device("cuda", 0)
    assert dv.pick_device("cuda") == torch.device("cuda", 0)
    assert dv.pick_device("cuda:1") == torch.device("cuda", 1)
    assert dv.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match=r"--device: cuda:2: this machine has 2 CUDA device\(s\)"):
        dv.pick_device("cuda:2")
    with pytest.raises(UserError, match="not a device"):
        dv.pick_device("gpu0")


def test_no_gpu_asked_for_a_gpu_is_one_user_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert dv.pick_device(None) == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA device is available"):
        dv.pick_device("cuda")


def test_devices_compare_with_the_current_index(fake_cuda):
    assert dv.same_device("cuda", "cuda:0") and dv.same_device(torch.device("cuda:0"), "cuda")
    assert not dv.same_device("cuda:1", "cuda") and not dv.same_device("cuda:0", "cpu")


def test_generators_are_made_on_the_indexed_device(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch, "Generator", FakeGenerator)
    g = dv.make_generator("cuda", 7)
    assert g.device == torch.device("cuda", 0) and g.seed == 7


def test_a_loader_over_data_on_the_gpu_accepts_the_gpus_generator(fake_cuda, monkeypatch):
    """The crash of the first GPU run: data reports cuda:0, a generator made on "cuda" reported cuda."""
    monkeypatch.setattr(torch, "Generator", FakeGenerator)
    with FakeTensorMode(allow_non_fake_inputs=True):
        split = TensorSplit(torch.zeros(10, 3, 4, 4, device="cuda"), torch.zeros(10, dtype=torch.int64, device="cuda"))
        assert split.labels.device == torch.device("cuda", 0)
        TensorLoader(split, 4, shuffle=True, generator=FakeGenerator("cuda"))  # unindexed: the old crash
        loader = TensorLoader(split, 4, shuffle=True, generator=dv.make_generator(split.labels.device, 0))
        assert loader.generator.device == torch.device("cuda", 0)
        assert len(loader) == 3
        with pytest.raises(ValueError, match="the generator is on cpu, the data on cuda:0"):
            TensorLoader(split, 4, shuffle=True, generator=FakeGenerator("cpu"))


@pytest.mark.parametrize("capability, name, scaling", [((9, 0), "bf16", False), ((8, 0), "bf16", False),
                                                        ((7, 5), "fp16", True), ((7, 0), "fp16", True)])
def test_precision_is_bf16_where_native_else_fp16_with_grad_scaling(fake_cuda, capability, name, scaling):
    fake_cuda["capability"] = capability
    prec = dv.pick_precision(torch.device("cuda", 0))
    assert (prec.name, prec.grad_scaling, prec.channels_last) == (name, scaling, True)
    assert dv.pick_precision(torch.device("cuda", 0), "fp32").name == "fp32"
    cpu = dv.pick_precision(torch.device("cpu"))
    assert (cpu.name, cpu.grad_scaling, cpu.channels_last) == ("fp32", False, False)


def test_numerics_are_set_on_a_gpu_and_recorded_in_the_cache_key(fake_cuda):
    cuda = torch.device("cuda", 0)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        fast = dv.set_numerics(cuda, dv.pick_precision(cuda))
        assert fast == dv.Numerics(deterministic=False, tf32=True, cudnn_benchmark=True)
        fast_key = Runtime.current(cuda, dv.pick_precision(cuda))
        exact = dv.set_numerics(cuda, dv.pick_precision(cuda), deterministic=True)
        assert exact == dv.Numerics(deterministic=True, tf32=False, cudnn_benchmark=False)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        exact_key = Runtime.current(cuda, dv.pick_precision(cuda))
        fp32 = dv.set_numerics(cuda, dv.pick_precision(cuda, "fp32"))
        assert not fp32.tf32 and fp32.cudnn_benchmark  # fp32 asked for: no TF32 behind the user's back
        assert fast_key.device == "cuda:NVIDIA Fake"
        assert (fast_key.numerics, exact_key.numerics) == ("tf32=True/cudnn_benchmark=True", "deterministic")
        assert fast_key.key_data() != exact_key.key_data()
    finally:
        torch.use_deterministic_algorithms(saved[0])
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved[1:]
    # On a CPU nothing is set and the key is what it was before GPU numerics were recorded.
    cpu = torch.device("cpu")
    assert dv.set_numerics(cpu, dv.pick_precision(cpu), deterministic=True) == dv.Numerics()
    assert not torch.are_deterministic_algorithms_enabled()
    assert "numerics" not in Runtime.current(cpu, dv.pick_precision(cpu)).key_data()


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("CUDA error: no kernel image is available for execution on the device"),
])
def test_cuda_failures_are_the_machines(exc):
    assert dv.is_device_fault(exc) and is_infrastructure_error(exc)


@pytest.mark.skipif(not hasattr(torch, "AcceleratorError"), reason="torch.AcceleratorError is new in torch 2.8")
def test_an_accelerator_error_is_the_machines():
    exc = torch.AcceleratorError("CUDA error: unspecified launch failure")
    assert dv.is_device_fault(exc) and is_infrastructure_error(exc)


@pytest.mark.parametrize("exc", [RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"),
                                 ValueError("crd needs the labels"), KeyError("weight")])
def test_plan_failures_are_not_device_faults(exc):
    assert not dv.is_device_fault(exc) and not is_infrastructure_error(exc)


def test_the_deterministic_pooling_form_averages_the_same_windows():
    x = torch.randn(2, 3, 8, 12, generator=dv.make_generator("cpu", 0))
    for size in (1, (2, 3), (4, 6), (8, 12)):
        oh, ow = (size, size) if isinstance(size, int) else size
        assert torch.allclose(F.avg_pool2d(x, (8 // oh, 12 // ow)), F.adaptive_avg_pool2d(x, size), atol=1e-6)
        # On a CPU (and on a GPU without deterministic algorithms) the adaptive op itself runs.
        assert torch.equal(adaptive_avg_pool2d(x, size), F.adaptive_avg_pool2d(x, size))


def test_memory_helpers_do_nothing_on_a_cpu():
    cpu = torch.device("cpu")
    assert dv.limit_memory(cpu, 0.25) is None and dv.peak_memory(cpu) == (0, 0)
    dv.release_memory(cpu)
    assert dv.device_name(cpu) == "cpu" and dv.device_rng_state(cpu) is None


def test_a_checkpoint_records_where_it_was_made_and_a_resume_elsewhere_says_so(tiny_problem, teacher_cache, tmp_path):
    from conftest import make_plan

    from smskd_search.engine import latest_checkpoint, run_plan

    plan = make_plan(tiny_problem, [("kd", 1), ("kd", 1)], restart_optimizer=False)
    stop = lambda k, cum, res, ckpt: True  # noqa: E731 - after the first stage
    run_plan(plan, teacher_cache=teacher_cache, out_dir=tmp_path, on_stage_end=stop)
    path = tmp_path / "stage1.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["made_on"] == {"device": "cpu", "precision": "fp32", "numerics": ""}
    # Its carried optimizer state is on the CPU, so it loads where there is no GPU.
    momenta = [t for s in ckpt["optimizer"]["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert momenta and all(t.device.type == "cpu" for t in momenta)
    assert run_plan(plan, teacher_cache=teacher_cache, out_dir=tmp_path, resume=True).notes == []
    # The same checkpoint as if a GPU run in bf16 had written it: the resume goes on and says so, once.
    ckpt["made_on"] = {"device": "NVIDIA H200", "precision": "bf16", "numerics": "tf32=True/cudnn_benchmark=True"}
    torch.save(ckpt, path)
    (tmp_path / "stage2.pt").unlink()
    resumed = run_plan(plan, teacher_cache=teacher_cache, out_dir=tmp_path, resume=True)
    assert resumed.resumed_from_stage == 0 and len(resumed.stages) == 2
    assert resumed.notes == ["resumed after stage 1 from a checkpoint made on NVIDIA H200 (bf16), going on on cpu "
                             "(fp32): the later stages' numbers differ from a run on one machine"]
    assert latest_checkpoint(tmp_path, plan.content_hash())["made_on"]["device"] == "cpu"


@pytest.mark.parametrize("exc, retired", [(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
                                          (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
                                          (OSError(28, "No space left on device"), False),
                                          (ValueError("crd needs the labels"), False)])
def test_a_trial_that_hits_a_device_fault_reports_it_and_retires_its_worker(tiny_problem, tmp_path, monkeypatch, exc,
                                                                           retired):
    """Reported as the machine's failure, then raised to Tune (which replaces an errored trial's
    worker instead of reusing it); a plan's own failure and a storage failure are only reported."""
    from conftest import make_plan

    import smskd_search.engine as engine
    from smskd_search.search import trainable as tr
    from smskd_search.search.teacher_transport import TeacherPayload

    reports: list[dict] = []

    class Tune:
        def get_checkpoint(self):
            return None

        def report(self, metrics, checkpoint=None):
            reports.append(metrics)

    def run_plan(plan, bench, options, on_event):
        raise exc

    monkeypatch.setattr(tr, "tune", Tune())
    monkeypatch.setattr(tr, "_workbench", lambda plan, context, root: SimpleNamespace(data=SimpleNamespace(
        info=SimpleNamespace(num_val=1, num_train=1)), logit_store=None))
    monkeypatch.setattr(engine, "run_plan", run_plan)
    plan = make_plan(tiny_problem, [("kd", 1)])
    config = {"plan_yaml": plan.to_yaml(), "run_dir": str(tmp_path / "run"), "threads": 1}
    context = tr.TrialContext(teacher=TeacherPayload({}, b""))
    if retired:
        with pytest.raises(tr.DeviceFault, match="^infrastructure: "):
            tr.train_trial(config, context)
    else:
        tr.train_trial(config, context)
    assert len(reports) == 1 and reports[0]["infrastructure"] is (retired or isinstance(exc, OSError))
    assert reports[0]["error"].startswith("infrastructure: " if reports[0]["infrastructure"] else type(exc).__name__)
