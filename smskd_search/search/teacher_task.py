"""On a cluster, the teacher trains as a Ray task where the cluster has the resources for it.

The driver of a search joined to a cluster may be a small head node without a GPU: training
resnet32x4 there would take hours on its CPU. So on a cluster (``--address``) a teacher missing from
the cache is trained by a Ray task that asks for one GPU where the cluster has one (else the CPUs of
its largest node); its progress comes back through a Ray queue and is shown as on the driver, and
its checkpoint comes back as bytes that the driver stores in its teacher cache (the trials then get
them through the object store, see :mod:`~smskd_search.search.teacher_transport`). A search on local
Ray with a GPU trains it so too (its worker exits after the task, handing back the GPU memory it
held); on local Ray without one, the teacher trains in the driver's process. A user's checkpoint
or torchvision's weights (``teacher.weights``) are not trained: the driver loads, checks and
measures them, and the trials get their file's bytes like a trained teacher's.
"""

from __future__ import annotations

import contextlib
import queue as _stdlib_queue
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from smskd_search.data.sources import absolute_root
from smskd_search.engine.teacher import (
    TeacherJob,
    TeacherRecord,
    cached_teacher,
    ensure_teacher,
    store_teacher,
)
from smskd_search.errors import UserError
from smskd_search.plan import ProblemSpec


def task_resources(cluster: dict[str, float], nodes: list[dict[str, Any]]) -> dict[str, float]:
    """One GPU where the cluster has one, else the CPUs of its largest alive node.

    Example:

        >>> task_resources({"CPU": 16, "GPU": 2}, [])
        {'num_gpus': 1, 'num_cpus': 1}
        >>> task_resources({"CPU": 2}, [{"Alive": True, "Resources": {"CPU": 0.0}}, {"Alive": True, "Resources": {"CPU": 2.0}}])
        {'num_cpus': 2}
    """
    if cluster.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}
    per_node = [n.get("Resources", {}).get("CPU", 0.0) for n in nodes if n.get("Alive")]
    return {"num_cpus": max(1, int(max(per_node, default=1)))}


def _train(problem_json: dict[str, Any], progress: Any, deterministic: bool = False,
           cuda_graphs: bool = False) -> tuple[bytes, dict[str, Any], str]:
    """In the task: train the teacher on this node's best device; its bytes, record and node id."""
    import torch

    from smskd_search.engine import ensure_teacher, pick_device
    from smskd_search.search._ray import ray

    # Ray gives the task its CPUs as OMP_NUM_THREADS; torch should use them all.
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    problem = ProblemSpec.model_validate(problem_json)
    with tempfile.TemporaryDirectory(prefix="smskd-teacher-") as tmp:
        record = ensure_teacher(problem, cache_root=tmp, device=pick_device(None),
                                on_start=lambda job: progress.put(("start", asdict(job))),
                                on_epoch=lambda *a: progress.put(("epoch", a)), deterministic=deterministic,
                                cuda_graphs=cuda_graphs)
        weights = Path(record.path).read_bytes()
    return weights, asdict(record), ray.get_runtime_context().get_node_id()


def ensure_teacher_on_cluster(problem: ProblemSpec, cache_root: Path, *,
                              on_epoch: Callable[[int, int, float, float], None] | None = None,
                              on_start: Callable[[TeacherJob], None] | None = None,
                              deterministic: bool = False, cuda_graphs: bool = False) -> tuple[TeacherRecord, str | None]:
    """The problem's teacher: from the driver's cache, else trained by a Ray task and cached here.

    Returns the record and the id of the node that trained it (None on a cache hit).

    Args:
        problem: The space's problem.
        cache_root: The driver's teacher cache.
        on_epoch: Called (epoch, epochs, train loss, val acc) as the task trains.
        on_start: Called with the :class:`TeacherJob` when the task starts training.
        deterministic: Train with PyTorch's deterministic algorithms on a GPU.
        cuda_graphs: On a GPU, record the teacher's training step as a CUDA graph.
    """
    from smskd_search.search._ray import ray

    from ray.exceptions import RayError, RayTaskError
    from ray.util.queue import Queue

    record = cached_teacher(problem, cache_root)
    if record is not None:
        return record, None
    if problem.teacher.checkpoint:
        # A user's checkpoint is only checked and loaded, not trained: here, where the file is.
        return ensure_teacher(problem, cache_root=cache_root), None
    if problem.teacher.weights:
        # torchvision's weights too, fetched into the driver's torch hub cache; measured on the
        # driver's best device (an ImageNet validation split is long on a CPU).
        from smskd_search.engine import pick_device

        return ensure_teacher(problem, cache_root=cache_root, device=pick_device(None)), None
    # The task may run on another node: the dataset's root as the driver means it (absolute).
    dataset = problem.dataset.model_copy(update={"root": absolute_root(problem.dataset.root)})
    sent = problem.model_copy(update={"dataset": dataset}).model_dump(mode="json")
    progress = Queue()
    opts = task_resources(ray.cluster_resources(), ray.nodes())
    # max_calls=1: the worker exits after the task, and its GPU memory (context, cache) goes with it.
    # (Ray takes max_calls only where the function is made remote, not in .options().)
    ref = ray.remote(**opts, max_retries=0, max_calls=1)(_train).remote(sent, progress, deterministic, cuda_graphs)

    def drain() -> None:
        while True:
            try:
                kind, payload = progress.get_nowait()
            except _stdlib_queue.Empty:
                return
            if kind == "start" and on_start is not None:
                on_start(TeacherJob(**payload))
            elif kind == "epoch" and on_epoch is not None:
                on_epoch(*payload)

    try:
        while not ray.wait([ref], timeout=0.5)[0]:
            drain()
        try:
            weights, trained, node = ray.get(ref)
        except RayTaskError as exc:
            # A user error in the task (a dataset missing on that node, ...) is said as it is.
            why = exc.cause if isinstance(exc.cause, UserError) else f"{type(exc.cause).__name__}: {exc.cause}"
            raise UserError(f"teacher (a Ray task): {str(why).splitlines()[0]}") from None
        except RayError as exc:  # the node or the worker died under it
            raise UserError(f"teacher (a Ray task): {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        drain()
    except BaseException:
        with contextlib.suppress(Exception):  # a task that has ended already needs no cancelling
            ray.cancel(ref, force=True)  # Ctrl-C or a failure: the task must not go on training
        raise
    finally:
        progress.shutdown()
    return store_teacher(problem, cache_root, weights, TeacherRecord(**trained)), node


__all__ = ["ensure_teacher_on_cluster", "task_resources"]
