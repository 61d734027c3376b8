"""The teacher: trained once per (arch, dataset split, recipe) and cached, or loaded from a user's
checkpoint or torchvision's published weights and checked against its arch. Never retrained inside
a plan run."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from smskd_search.data import DataSplits, load_data, load_test_split
from smskd_search.data.folder_split import class_positions, data_identity
from smskd_search.digest import sha256_of_file
from smskd_search.engine.device import Precision, pick_device, pick_precision, release_memory, set_numerics
from smskd_search.engine.evaluate import evaluate
from smskd_search.engine.frozen import freeze
from smskd_search.engine.optim import build_optimizer, trainable
from smskd_search.engine.step_graph import StepGraph, graph_blocker
from smskd_search.engine.trainer import Schedule, train_epoch
from smskd_search.errors import UserError
from smskd_search.methods.ce import CE
from smskd_search.models import count_parameters, create_model
from smskd_search.models.base import Features
from smskd_search.models.pretrained import published_classes, published_top1, weights_file
from smskd_search.plan import ProblemSpec

DEFAULT_CACHE = Path("studies") / "teachers"


@dataclass
class TeacherRecord:
    arch: str
    path: str
    sha256: str
    val_acc: float
    n_val: int
    test_acc: float | None
    n_test: int | None
    epochs: int | None
    source: str  # "trained", "checkpoint" or "pretrained" (torchvision's weights)
    key: str


def teacher_key(problem: ProblemSpec) -> str:
    """Hash of what determines the teacher: arch, dataset split (not its root folder), recipe; or
    the sha256 of its file, for a user's checkpoint or torchvision's weights (fetched if missing)."""
    ds = data_identity(problem.dataset)
    data = {"arch": problem.teacher.arch, "dataset": ds, "recipe": problem.teacher.recipe.model_dump(mode="json")}
    if problem.teacher.checkpoint:
        data = {"arch": problem.teacher.arch, "dataset": ds, "checkpoint": file_sha256(problem.teacher.checkpoint)}
    elif problem.teacher.weights:
        path = pretrained_path(problem)
        data = {"arch": problem.teacher.arch, "dataset": ds, "pretrained": _memo_sha256(path)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def pretrained_path(problem: ProblemSpec) -> Path:
    """The local file of the teacher's torchvision ``weights`` (torch hub's cache; fetched if missing)."""
    assert problem.teacher.weights is not None
    return weights_file(problem.teacher.arch, problem.teacher.weights, "teacher.weights")


# (path, size, mtime) -> sha256: torchvision's files are up to ~100 MB and the key is asked for
# several times per run; a file that changes gets a new mtime and is hashed again.
_SHA256_MEMO: dict[tuple[str, int, int], str] = {}


def _memo_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_MEMO:
        _SHA256_MEMO[key] = file_sha256(path, "teacher.weights")
    return _SHA256_MEMO[key]


def file_sha256(path: str | Path, field: str = "teacher.checkpoint") -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{field}: file not found: {p}")
    return sha256_of_file(p)


def teacher_dir(problem: ProblemSpec, cache_root: str | Path = DEFAULT_CACHE) -> Path:
    return Path(cache_root) / f"{problem.teacher.arch}-{problem.dataset.name}-{teacher_key(problem)}"


def _state_dict_of(obj: object) -> dict:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state_dict (expected a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights_checked(model: nn.Module, path: str | Path | bytes, arch: str, field: str = "teacher.checkpoint",
                         keep_classes: list[int] | None = None) -> None:
    """Load a checkpoint into ``model`` or raise one UserError line saying why it does not fit.

    Args:
        model: The freshly built model.
        path: The checkpoint file, or its bytes (a search's trial gets the teacher's file that way).
        arch: The model's arch (for the message).
        field: The field the checkpoint came from (for the message).
        keep_classes: Where the dataset's classes sit among those the checkpoint classifies (a
            subset such as ImageNet-100 of a 1000-class teacher): the classifier keeps those rows,
            so the teacher's logits are its full logits read at the kept classes.
    """
    source = io.BytesIO(path) if isinstance(path, bytes) else path
    if isinstance(path, bytes):
        path = f"<{len(path)} bytes sha256 {hashlib.sha256(path).hexdigest()[:12]}>"
    try:
        state = _state_dict_of(torch.load(source, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"{field}: {path} cannot be read as a checkpoint: {str(exc).splitlines()[0]}") from None
    own = model.state_dict()
    head = _classifier_keys(own)
    if keep_classes is not None and head is not None:
        state = _keep_head_rows(state, own, head, keep_classes)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if (head is not None and not missing and not unexpected and bad and set(bad) <= set(head)
            and state[head[0]].shape[0] != own[head[0]].shape[0]):
        raise UserError(f"{field}: {path} does not fit arch {arch!r}: it classifies {state[head[0]].shape[0]} classes, "
                        f"the dataset has {own[head[0]].shape[0]}; use a dataset with the same classes, or a folder "
                        "of all of them with dataset.classes keeping some (replacing the classifier head is not "
                        "supported)")
    if missing or unexpected or bad:
        why = []
        if bad:
            k = bad[0]
            why.append(f"{len(bad)} shape mismatch(es), e.g. {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        if missing:
            why.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            why.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise UserError(f"{field}: {path} does not fit arch {arch!r}: " + "; ".join(why))
    model.load_state_dict(state)


def _classifier_keys(own: dict) -> tuple[str, str] | None:
    """The state-dict names of the classifier's weight (the model's last matrix) and its bias."""
    matrices = [k for k in own if own[k].dim() == 2]
    return (matrices[-1], matrices[-1].removesuffix("weight") + "bias") if matrices else None


def _keep_head_rows(state: dict, own: dict, head: tuple[str, str], keep: list[int]) -> dict:
    """``state`` with its classifier cut to the rows ``keep``, where it classifies more classes than
    the model and ``keep`` names as many as the model has."""
    weight, bias = head
    if weight not in state:
        return state
    rows = state[weight].shape[0]
    if rows <= own[weight].shape[0] or len(keep) != own[weight].shape[0] or max(keep) >= rows:
        return state
    index = torch.tensor(keep)
    cut = dict(state)
    cut[weight] = state[weight].index_select(0, index)
    if bias in state:
        cut[bias] = state[bias].index_select(0, index)
    return cut


EpochCallback = Callable[[int, int, float, float], None]  # (epoch, epochs, train loss, val acc)


@dataclass(frozen=True)
class TeacherJob:
    """What is about to be trained, said before the first epoch (it can take hours)."""

    arch: str
    parameters: int
    epochs: int
    images: int
    val_images: int
    device: str
    augmented: bool

    def describe(self) -> str:
        aug = ", augmented" if self.augmented else ""
        return (f"training the teacher {self.arch} ({self.parameters:,} parameters) for {self.epochs} epochs on "
                f"{self.images:,} images{aug} (validation {self.val_images:,}) on {self.device}; cached for later runs")


def train_teacher_model(problem: ProblemSpec, data: DataSplits, device: torch.device, precision: Precision,
                        on_epoch: EpochCallback | None = None, on_start: Callable[[TeacherJob], None] | None = None,
                        cuda_graphs: bool = False, graph: StepGraph | None = None) -> nn.Module:
    """Train the teacher on labels alone: the students' own epoch (:func:`train_epoch`) with CE and no
    teacher, so the teacher's step can be recorded as a CUDA graph as theirs is.

    Args:
        cuda_graphs: On a GPU, record the step and replay it (:mod:`~smskd_search.engine.step_graph`):
            a teacher's step at its batch is launch-bound as a student's is. No effect on a CPU.
        graph: The recorded step to use (the tests pass a rehearsed one); ``cuda_graphs`` makes one.
    """
    recipe = problem.teacher.recipe
    torch.manual_seed(recipe.seed)
    model = create_model(problem.teacher.arch, data.info.num_classes, data.info.in_channels, data.info.image_size)
    if on_start is not None:
        on_start(TeacherJob(problem.teacher.arch, count_parameters(model), recipe.epochs, data.info.num_train,
                            data.info.num_val, str(device), recipe.augment.enabled))
    model = precision.prepare_model(model.to(device))
    opt = build_optimizer([{"params": trainable(model.parameters())}], recipe, device)
    loader = data.train.loader(recipe.batch_size, shuffle=True, augment=recipe.augment, seed=recipe.seed)
    scaler = precision.grad_scaler()
    labels_only = CE(CE.Params(), None)  # type: ignore[arg-type]  # CE reads no context
    schedule = Schedule(recipe.lr, recipe.schedule, span_epochs=recipe.epochs, epoch_offset=0)
    if graph is None and cuda_graphs and graph_blocker(device, precision, labels_only,
                                                       teacher_features_from_store=False) is None:
        graph = StepGraph(device)
    for epoch in range(recipe.epochs):
        stats = train_epoch(student=model, method=labels_only, teacher=_no_teacher, reference=None, loader=loader,
                            optimizer=opt, schedule=schedule, stage_epoch=epoch, precision=precision, scaler=scaler,
                            graph=graph)
        if on_epoch is not None:
            val = evaluate(model, data.val, precision, recipe.eval_batch_size)
            on_epoch(epoch + 1, recipe.epochs, stats.loss, val.acc)
    return model


def _no_teacher(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, Features | None]:
    return None, None  # type: ignore[return-value]  # the teacher has none: CE reads neither


def cached_teacher(problem: ProblemSpec, cache_root: str | Path = DEFAULT_CACHE) -> TeacherRecord | None:
    """The problem's teacher from the cache, if there and intact (its file hashes to its record)."""
    meta_path = teacher_dir(problem, cache_root) / "teacher.json"
    if not meta_path.is_file():
        return None
    record = TeacherRecord(**json.loads(meta_path.read_text()))
    if Path(record.path).is_file() and file_sha256(record.path) == record.sha256:
        return record
    return None


def store_teacher(problem: ProblemSpec, cache_root: str | Path, weights: bytes, record: TeacherRecord) -> TeacherRecord:
    """Cache a teacher trained elsewhere (its checkpoint's bytes and its record); the stored record.

    Args:
        problem: The teacher's problem (its cache folder).
        cache_root: The teacher cache.
        weights: The checkpoint file's bytes.
        record: Its record where it was trained (``path`` and ``sha256`` are set here).
    """
    folder = teacher_dir(problem, cache_root)
    folder.mkdir(parents=True, exist_ok=True)
    weights_path = (folder / "teacher.pt").resolve()
    tmp = weights_path.with_suffix(".pt.tmp")
    tmp.write_bytes(weights)
    tmp.replace(weights_path)
    stored = TeacherRecord(**{**asdict(record), "path": str(weights_path), "sha256": file_sha256(weights_path),
                              "key": teacher_key(problem)})
    (folder / "teacher.json").write_text(json.dumps(asdict(stored), indent=2))
    return stored


def ensure_teacher(
    problem: ProblemSpec,
    *,
    cache_root: str | Path = DEFAULT_CACHE,
    device: torch.device | str = "cpu",
    data: DataSplits | None = None,
    with_test: bool = False,
    on_epoch: EpochCallback | None = None,
    on_start: Callable[[TeacherJob], None] | None = None,
    deterministic: bool = False,
    cuda_graphs: bool = False,
) -> TeacherRecord:
    """The cached teacher of a problem: a cache hit, a checked user checkpoint or torchvision's
    weights (``teacher.weights``), or a trained one; its top-1 on the validation split measured.

    Args:
        problem: The problem whose teacher is wanted.
        cache_root: The teacher cache (one folder per :func:`teacher_key`).
        device: Where to train it on a cache miss.
        data: The problem's splits, if already loaded.
        with_test: Also measure test accuracy (only the explicit teacher command asks for it, so a
            search never touches the test split).
        on_epoch: Called (epoch, epochs, train loss, val acc) after each teacher epoch.
        on_start: Called once with the :class:`TeacherJob` before a teacher is trained (not on a
            cache hit, a user checkpoint or torchvision's weights).
        deterministic: On a GPU, train with PyTorch's deterministic algorithms (see
            :func:`~smskd_search.engine.device.set_numerics`).
        cuda_graphs: On a GPU, train it with its step recorded as a CUDA graph (see
            :func:`train_teacher_model`). The cache key does not hold it: as for the device, the
            teacher is the one trained first, and what follows knows it by its file's sha256.
    """
    device = pick_device(device)
    folder = teacher_dir(problem, cache_root)
    meta_path = folder / "teacher.json"
    record = cached_teacher(problem, cache_root)
    if record is not None:
        if with_test and record.test_acc is None:
            record = _add_test_accuracy(problem, record, device, data)
            meta_path.write_text(json.dumps(asdict(record), indent=2))
        return record
    if data is None:
        data = load_data(problem.dataset, device)
    precision = pick_precision(device)
    set_numerics(device, precision, deterministic)
    model, weights_path, source = _obtain(problem, data, device, precision, folder, on_epoch, on_start, cuda_graphs)
    epochs = problem.teacher.recipe.epochs if source == "trained" else None
    val = evaluate(model, data.val, precision, problem.teacher.recipe.eval_batch_size)
    record = TeacherRecord(
        arch=problem.teacher.arch, path=str(weights_path), sha256=file_sha256(weights_path),
        val_acc=val.acc, n_val=val.n, test_acc=None, n_test=None, epochs=epochs, source=source,
        key=teacher_key(problem),
    )
    if with_test:
        record = _add_test_accuracy(problem, record, device, data, model)
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(asdict(record), indent=2))
    del model, data
    release_memory(device)  # the trials that follow need the GPU more than this process's cache
    return record


def _obtain(problem: ProblemSpec, data: DataSplits, device: torch.device, precision: Precision, folder: Path,
            on_epoch: EpochCallback | None, on_start: Callable[[TeacherJob], None] | None,
            cuda_graphs: bool = False) -> tuple[nn.Module, Path, str]:
    """The teacher's model on ``device``, its file and its source: a user's checkpoint or
    torchvision's weights (loaded and checked), else trained and saved in ``folder``."""
    teacher, info = problem.teacher, data.info
    if teacher.checkpoint or teacher.weights:
        path = Path(teacher.checkpoint) if teacher.checkpoint else pretrained_path(problem)
        model = create_model(teacher.arch, info.num_classes, info.in_channels, info.image_size)
        load_weights_checked(model, path, teacher.arch, "teacher.weights" if teacher.weights else "teacher.checkpoint",
                             class_positions(problem.dataset))
        return model.to(device), path.resolve(), "pretrained" if teacher.weights else "checkpoint"
    model = train_teacher_model(problem, data, device, precision, on_epoch, on_start, cuda_graphs)
    folder.mkdir(parents=True, exist_ok=True)
    weights_path = (folder / "teacher.pt").resolve()
    tmp = weights_path.with_suffix(".pt.tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(weights_path)
    return model, weights_path, "trained"


def _add_test_accuracy(problem: ProblemSpec, record: TeacherRecord, device: torch.device,
                       data: DataSplits | None, model: nn.Module | None = None) -> TeacherRecord:
    if data is None:
        data = load_data(problem.dataset, device)
    if model is None:
        model = load_teacher(problem, record, data.info, device)
    test = evaluate(model, load_test_split(problem.dataset, data.info, device), pick_precision(device))
    record.test_acc, record.n_test = test.acc, test.n
    return record


def load_teacher(problem: ProblemSpec, record: TeacherRecord, info, device: torch.device | str,
                 weights: bytes | None = None) -> nn.Module:
    """The teacher model, frozen (eval mode, no gradients), on ``device``.

    Args:
        problem: The problem (the teacher's arch).
        record: The teacher's record.
        info: The dataset's shapes (:class:`DataInfo`).
        device: Where the model goes.
        weights: The bytes of the teacher's file, already checked against ``record.sha256`` by the
            caller; None: read ``record.path``.
    """
    model = create_model(problem.teacher.arch, info.num_classes, info.in_channels, info.image_size)
    field = "teacher.weights" if problem.teacher.weights else "teacher.checkpoint"
    load_weights_checked(model, weights if weights is not None else record.path, problem.teacher.arch, field,
                         class_positions(problem.dataset))
    return freeze(model.to(device))


def published_note(problem: ProblemSpec, record: TeacherRecord) -> str | None:
    """torchvision's published top-1 of the teacher's weights, said beside the measured one when
    the dataset is ImageNet-like (its teacher classifies as many classes as the weights do).

    Args:
        problem: The problem (the teacher's arch and weights name).
        record: The teacher's record (its file says how many classes it classifies).
    """
    teacher = problem.teacher
    if teacher.weights is None or record.source != "pretrained":
        return None
    top1 = published_top1(teacher.arch, teacher.weights)
    state = _state_dict_of(torch.load(record.path, map_location="cpu", weights_only=True))
    head = [v for v in state.values() if v.dim() == 2][-1:]
    if top1 is None or not head or head[0].shape[0] != published_classes(teacher.arch, teacher.weights):
        return None
    return (f"torchvision publishes {top1:.2f}% top-1 for {teacher.arch} {teacher.weights}: on the full ImageNet-1K "
            f"validation set (50,000 images), not on this split (n={record.n_val})")


def describe(record: TeacherRecord) -> str:
    test = f", test acc {100 * record.test_acc:.2f}% (n={record.n_test})" if record.test_acc is not None else ""
    return f"teacher {record.arch}: val acc {100 * record.val_acc:.2f}% (n={record.n_val}){test} [{record.path}]"


