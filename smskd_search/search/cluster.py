"""Ray for a search: resource arithmetic per trial, starting (or joining) Ray, quiet loggers."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

from smskd_search.errors import UserError
from smskd_search.space import RuntimeSpec

# Environment variables a trial worker must see as the driver does (set before Ray starts).
PROPAGATED_ENV = ("SMSKD_TEST_ACCESS_LOG", "SMSKD_DATA_ROOT", "RAY_CHDIR_TO_TRIAL_DIR")


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


def check_requests(cpus_per_trial: float | None, gpus_per_trial: float | None, max_concurrent: int | None) -> None:
    """The flags' own ranges, checked before anything is written or started."""
    if cpus_per_trial is not None and cpus_per_trial <= 0:
        raise UserError(f"--cpus-per-trial must be > 0 (got {cpus_per_trial:g})")
    if gpus_per_trial is not None and gpus_per_trial < 0:
        raise UserError(f"--gpus-per-trial must be >= 0 (got {gpus_per_trial:g})")
    if max_concurrent is not None and max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1 (got {max_concurrent})")


def trial_resources(cluster: dict[str, float], runtime: RuntimeSpec, cpus_per_trial: float | None,
                    gpus_per_trial: float | None, max_concurrent: int | None) -> TrialResources:
    """Per-trial resources on this cluster (``ray.cluster_resources()``); flags override the space.

    Example:

        >>> from smskd_search.space import RuntimeSpec
        >>> r = trial_resources({"CPU": 2.0}, RuntimeSpec(), None, None, None)
        >>> r.per_trial, r.device, r.concurrent
        ({'cpu': 1.0}, 'cpu', 2)
    """
    check_requests(cpus_per_trial, gpus_per_trial, max_concurrent)
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


def start_ray(address: str | None) -> bool:
    """Start local Ray (or join ``address``) unless this process already has Ray; True if started."""
    from smskd_search.search._ray import ENV_DEFAULTS, ray

    if ray.is_initialized():
        return False
    env_vars = {k: os.environ[k] for k in (*PROPAGATED_ENV, *ENV_DEFAULTS) if k in os.environ}
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, runtime_env={"env_vars": env_vars})
    except ConnectionError as exc:
        raise UserError(f"--address {address}: cannot connect to a Ray cluster: {exc}") from None
    return True


def quiet_ray_loggers() -> None:
    # Tune logs an error line for every trial still running at a Ctrl-C or time budget ("Trials did
    # not complete"); the summary says it once, in words.
    for name in ("ray.tune.tune", "ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("ray").setLevel(logging.ERROR)


__all__ = ["PROPAGATED_ENV", "TrialResources", "check_requests", "quiet_ray_loggers", "start_ray", "trial_resources"]
