"""Ray for a search: resource arithmetic per trial, starting (or joining) Ray, quiet loggers."""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from smskd_search.data import ENV_VARS as DATA_ENV_VARS
from smskd_search.data import PATH_ENV_VARS as DATA_PATH_ENV_VARS
from smskd_search.errors import UserError
from smskd_search.search import storage_fs as sfs
from smskd_search.search.net import unreachable
from smskd_search.search.storage_fs import AWS_ENV
from smskd_search.space import RuntimeSpec

# Environment variables a trial worker must see as the driver does (set before Ray starts): the
# data layer's own list, so that a variable it starts reading is propagated without a second edit.
# With them, the AWS variables a trial reads its --storage URI with (credentials, region, endpoint).
PROPAGATED_ENV = (*DATA_ENV_VARS, "RAY_CHDIR_TO_TRIAL_DIR")
# Of those, the ones holding a path: made absolute, since a trial on another node (or in another
# working directory) would resolve a relative one elsewhere.
PATH_ENV = DATA_PATH_ENV_VARS
# Seconds to wait for a TCP connection to a cluster's address before calling it unreachable (Ray
# itself retries for about two minutes, printing each attempt).
CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class TrialResources:
    """What each trial asks of Ray, the device it trains on, and how many run at once.

    Args:
        per_trial: Tune's resource request (``{"cpu": 1.0}`` or ``{"cpu": 1.0, "gpu": 0.25}``).
        device: ``"cuda"`` when the trials get GPUs, else ``"cpu"``.
        concurrent: Trials run at the same time.
        notes: What was adjusted, in words (an ignored ``--gpus-per-trial``).
    """

    per_trial: dict[str, float]
    device: str
    concurrent: int
    notes: list[str] = field(default_factory=list)

    @property
    def threads(self) -> int:
        """torch threads per trial: its CPU share, at least one."""
        return max(1, int(self.per_trial["cpu"]))


def trial_resources(cluster: dict[str, float], runtime: RuntimeSpec, cpus_per_trial: float | None,
                    gpus_per_trial: float | None, max_concurrent: int | None) -> TrialResources:
    """Per-trial resources on this cluster (``ray.cluster_resources()``); flags override the space.

    Example:

        >>> from smskd_search.space import RuntimeSpec
        >>> r = trial_resources({"CPU": 2.0}, RuntimeSpec(), None, None, None)
        >>> r.per_trial, r.device, r.concurrent
        ({'cpu': 1.0}, 'cpu', 2)
    """
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    cpt = float(cpus_per_trial if cpus_per_trial is not None else runtime.cpus_per_trial)
    if cpus and cpt > cpus:
        raise UserError(f"--cpus-per-trial {cpt:g} exceeds the cluster's {cpus:g} CPUs")
    gpt = float(gpus_per_trial if gpus_per_trial is not None else runtime.gpus_per_trial)
    notes: list[str] = []
    if gpus > 0 and gpt > 0:
        if gpt > gpus:
            raise UserError(f"--gpus-per-trial {gpt:g} exceeds the cluster's {gpus:g} GPUs")
        per_trial, device = {"cpu": cpt, "gpu": gpt}, "cuda"
        fit = min(math.floor(gpus / gpt + 1e-9), math.floor(cpus / cpt + 1e-9))
    else:
        if gpus_per_trial:
            notes.append(f"--gpus-per-trial {gpus_per_trial:g} ignored: the Ray cluster has no GPU")
        per_trial, device = {"cpu": cpt}, "cpu"
        fit = math.floor(cpus / cpt + 1e-9)
    concurrent = max_concurrent if max_concurrent is not None else max(1, fit)
    return TrialResources(per_trial, device, concurrent, notes)


def propagated_env(environ: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    """The variables of ``names`` set in ``environ``, path-valued ones (:data:`PATH_ENV`) made absolute.

    Example:

        >>> propagated_env({"SMSKD_DATA": "/data", "HOME": "/root"}, PROPAGATED_ENV)
        {'SMSKD_DATA': '/data'}
    """
    return {k: str(Path(environ[k]).expanduser().absolute()) if k in PATH_ENV and environ[k] else environ[k]
            for k in names if k in environ}


def _current_cluster() -> str | None:
    """The address ``ray.init(address="auto")`` joins first: RAY_ADDRESS, else the one ``ray start``
    recorded in ``<tmp>/ray/ray_current_cluster`` (both named in ray.init's documentation)."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    recorded = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        return recorded.read_text().strip() or None
    except OSError:
        return None


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def check_address(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A one-line UserError within ``timeout`` seconds if nothing answers at the cluster ``address`` names.

    Checked before a study is written: ``ray.init`` would otherwise retry for minutes. ``None`` and
    ``"local"`` start a new local Ray (nothing to check); ``"auto"`` must find an address where
    ``ray.init`` looks first (RAY_ADDRESS, a ``ray start`` on this machine). (Ray's last resort for
    ``"auto"``, any Ray process it finds running here, is not looked for: pass its host:port.)

    Args:
        address: ``--address``: None, ``"local"``, ``"auto"``, ``host:port`` or ``ray://host:port``.
        timeout: Seconds for the TCP connection.
    """
    if address is None or address == "local":
        return
    target, where = address, ""
    if address == "auto":
        found = _current_cluster()
        if found is None:
            raise UserError("--address auto: no running Ray cluster found (RAY_ADDRESS is unset and no `ray start` "
                            "is recorded on this machine); pass the head's host:port")
        target, where = found, f" (found {'in RAY_ADDRESS' if os.environ.get('RAY_ADDRESS') else 'from ray start'})"
    hp = _host_port(target)
    if hp is None:
        raise UserError(f"--address {address}: {target!r} is not 'auto', host:port or ray://host:port{where}")
    why = unreachable(hp, timeout)
    if why is not None:
        raise UserError(f"--address {address}: no Ray cluster answers at {hp[0]}:{hp[1]}{where} ({why})")


def check_storage(storage: str | os.PathLike | None) -> str | None:
    """``--storage`` as an absolute folder (made if missing) or a URI whose bucket answers, or None;
    one UserError line otherwise (:func:`~smskd_search.search.storage_fs.check_uri`).

    Example:

        >>> check_storage(None) is None
        True
    """
    if storage is None:
        return None
    text = str(storage)
    if sfs.is_uri(text):
        return sfs.check_uri(text)
    root = Path(text).expanduser().absolute()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--storage {text}: cannot make the folder: {exc.strerror or exc}") from None
    if not os.access(root, os.W_OK):
        raise UserError(f"--storage {text}: {root} is not writable")
    return str(root)


def check_nodes_reach(root: str, given: bool) -> int:
    """On a cluster of several nodes, check that every node sees ``root``; returns the node count.

    Trials on other nodes write their stage checkpoints, Tune's files and the stage cache under
    ``root``: a folder on the driver's disk alone would fail them after their first stage. With
    several alive nodes and no ``--storage`` (``given`` False) that is one UserError; with one, a
    marker file written here must be visible from a task pinned to each node.

    Args:
        root: The storage folder (absolute) or URI: a URI's marker is looked for through its
            filesystem, so that a node whose credentials or endpoint reach another server fails here.
        given: Whether the user passed ``--storage``.
    """
    from smskd_search.search._ray import ray

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return len(nodes)
    if not given:
        raise UserError(f"--storage: the cluster has {len(nodes)} nodes, and trials on the others cannot reach "
                        f"{root} on this machine; pass --storage with a folder every node mounts at the same path, "
                        "or an s3:// URI")
    marker = sfs.join(root, f".smskd-storage-check-{os.getpid()}-{socket.gethostname()}")
    try:
        sfs.write_text(marker, "seen\n")
    except OSError as exc:  # a bucket this driver may read but not write, a full disk
        raise UserError(f"--storage {root}: cannot write there: {str(exc).strip().splitlines()[0][:300]}") from None
    try:
        @ray.remote(num_cpus=0)
        def sees(path: str) -> tuple[bool, str]:
            from smskd_search.search import storage_fs

            try:
                return storage_fs.exists(path), socket.gethostname()
            except OSError:  # the endpoint or the credentials fail on that node
                return False, socket.gethostname()

        refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(marker)
                for n in nodes]
        try:
            answers = ray.get(refs, timeout=120)
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"--storage {root}: not every node of the cluster answered within 120 s "
                            "(a node without free CPUs for a zero-CPU task, or one that is gone)") from None
        for node, (seen, host) in zip(nodes, answers):
            if not seen:
                what = ("does not see what this machine wrote there (its endpoint or credentials reach another storage)"
                        if sfs.is_uri(root) else "does not see this folder; pass a folder every node mounts at the same path")
                raise UserError(f"--storage {root}: node {host} ({node.get('NodeManagerAddress')}) {what}")
    finally:
        sfs.remove(marker)
    return len(nodes)


def worker_env(environ: Mapping[str, str], storage: str | None) -> dict[str, str]:
    """What trial workers get of ``environ``: :data:`PROPAGATED_ENV`, and the AWS variables only
    where ``storage`` is a URI.

    Example:
        >>> env = {"SMSKD_DATA": "/data", "AWS_SECRET_ACCESS_KEY": "s"}
        >>> worker_env(env, "/mnt/shared"), worker_env(env, "s3://b/p")
        ({'SMSKD_DATA': '/data'}, {'SMSKD_DATA': '/data', 'AWS_SECRET_ACCESS_KEY': 's'})
    """
    aws = AWS_ENV if storage is not None and sfs.is_uri(storage) else ()
    return propagated_env(environ, (*PROPAGATED_ENV, *aws))


def start_ray(address: str | None, storage: str | None = None, extra_env: Mapping[str, str] | None = None) -> bool:
    """Start local Ray (or join ``address``) unless this process already has Ray; True if started.

    The workers get :data:`PROPAGATED_ENV` as this process has them, and the AWS variables
    (:data:`~smskd_search.search.storage_fs.AWS_ENV`) only where ``storage`` is a URI: Ray writes a
    runtime environment into its logs on every node, and a search that does not need the
    credentials should not spread them. ``extra_env`` goes to the workers too (an MPS daemon's pipe).
    """
    from smskd_search.search._ray import ENV_DEFAULTS, ray

    if ray.is_initialized():
        return False
    check_address(address)
    env_vars = {**propagated_env(os.environ, tuple(ENV_DEFAULTS)), **worker_env(os.environ, storage),
                **(extra_env or {})}
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, runtime_env={"env_vars": env_vars})
    except ConnectionError as exc:
        raise UserError(f"--address {address}: cannot connect to a Ray cluster: {str(exc).splitlines()[0]}") from None
    except RuntimeError as exc:
        # Something answers at the address but it is not a Ray cluster's GCS (Ray's words for it).
        if not str(exc).startswith("Failed to connect to GCS"):
            raise
        raise UserError(f"--address {address}: no Ray cluster at that address (it answers, but not as Ray's GCS)") from None
    return True


def quiet_ray_loggers() -> None:
    # Tune logs an error line for every trial still running at a Ctrl-C or time budget ("Trials did
    # not complete"); the summary says it once, in words.
    for name in ("ray.tune.tune", "ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("ray").setLevel(logging.ERROR)


__all__ = ["PATH_ENV", "PROPAGATED_ENV", "TrialResources", "check_address", "check_nodes_reach", "check_storage",
           "worker_env",
           "propagated_env", "quiet_ray_loggers", "start_ray", "trial_resources"]
