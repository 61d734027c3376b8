"""A search's settings as one typed object, checked once, when it is made.

The command line builds a :class:`SearchSettings` from its flags, a notebook from keywords
(``run_search(space, budget=8)`` makes one); either way a bad value is one :class:`UserError` line
naming its flag, before anything is imported, written or started. Kept apart from
:mod:`smskd_search.search` (which imports torch, Ray and scikit-learn: about ten seconds on a small
machine) so that the command line says what is wrong with a flag at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from smskd_search.errors import UserError

# The size cap of each cache folder: engine.prefix_cache.DEFAULT_MAX_BYTES (not imported here: the
# engine imports torch; a test keeps the two equal).
DEFAULT_CACHE_MAX_BYTES = 2 * 2**30


@dataclass(frozen=True)
class ConfirmSettings:
    """How many plans to confirm, and on how many fresh seeds.

    Args:
        plans: The best distinct searched plans (by their single-seed value) to confirm.
        baselines: The best baselines to confirm beside them (what the plans must beat).
        seeds: Fresh seeds per plan (the same seeds for every plan, so differences are paired).
    """

    plans: int = 3
    baselines: int = 2
    seeds: int = 3

    @property
    def enabled(self) -> bool:
        return self.seeds > 0 and self.plans + self.baselines > 0


def check_requests(cpus_per_trial: float | None, gpus_per_trial: float | None, max_concurrent: int | None) -> None:
    """The resource flags' own ranges."""
    # Written as "not x > 0": a NaN fails the range too.
    if cpus_per_trial is not None and not cpus_per_trial > 0:
        raise UserError(f"--cpus-per-trial must be > 0 (got {cpus_per_trial:g})")
    if gpus_per_trial is not None and not gpus_per_trial >= 0:
        raise UserError(f"--gpus-per-trial must be >= 0 (got {gpus_per_trial:g})")
    if max_concurrent is not None and max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1 (got {max_concurrent})")


@dataclass(frozen=True)
class SearchSettings:
    """Everything a search is asked to do, besides its space; each field is a flag of ``smskd-search``.

    Making one checks every value that can be judged alone (a UserError naming the flag otherwise).

    Args:
        budget: The study's total number of finished trials (earlier runs included on resume;
            trials the search itself cut short do not count and are run again).
        study: The study name (default: from the space's name).
        studies_dir: Where studies, teachers and trial folders live.
        max_concurrent: Trials at once (default: as many as the cluster's resources fit).
        cpus_per_trial: CPUs per trial (default: the space's ``runtime``).
        gpus_per_trial: GPUs per trial, fractional to pack trials (default: the space's ``runtime``).
        address: A Ray cluster to join (default: start local Ray).
        seed: The sampler's seed.
        timeout: Seconds for the whole search, teacher included; then no new trial starts.
        resume: Continue the existing study to its budget (also after the process was killed).
        prune: Apply the space's pruning.
        baselines: Enqueue the baselines first (each method alone, a sequence without reference).
        confirm: After the budget, re-run the best distinct plans and baselines on fresh seeds
            (:class:`ConfirmSettings`); None: no confirmation. The ranking uses the confirmed means.
        deterministic: The same space and ``seed`` give the same study on CPU (same trials, same
            values): trials run one at a time, so the sampler is asked and told, and the rungs
            filled, in trial-number order. Costs the parallelism (about 2x the wall time on 2 cores).
            On a GPU, the teacher and the trials also run PyTorch's deterministic algorithms
            (:func:`~smskd_search.engine.device.set_numerics`); without it GPU values are close,
            not bit-for-bit, from run to run.
        cache: Keep every finished stage in ``studies_dir/cache/stages`` (shared by the studies
            there: its key says everything that determines a stage) and start each trial from the
            longest prefix of its stages found there; the frozen teacher's outputs are kept in
            ``studies_dir/cache/teacher_outputs``, and with augmentation the teacher's logits of
            each epoch's batches in ``studies_dir/cache/teacher_logits`` (KD, DKD and CE epochs
            read them instead of running the teacher). The values are the same as without it (on CPU).
        cache_max_bytes: The size cap of each of the three cache folders (least recently used first).
        cuda_graphs: On a GPU, the teacher (where it is trained) and each trial record their
            training step as a CUDA graph and replay it (:mod:`~smskd_search.engine.step_graph`);
            no effect on a CPU. Off by default until measured on a GPU.
        mps: On a GPU shared by packed trials (``gpus_per_trial`` below 1), run them under NVIDIA MPS:
            a control daemon of the search's own, started before Ray and stopped after it
            (:mod:`~smskd_search.search.mps`); the summary says where it was not started, and why.
            Off by default until measured on a GPU.
        storage: A folder for everything trials write (stage checkpoints, Tune's files, the stage
            cache), which every node of a cluster must mount at the same path, or an ``s3://`` URI
            (pyarrow's form, :mod:`~smskd_search.search.storage_fs`); default ``studies_dir``. The
            study file stays in ``studies_dir`` (only the driver writes it). Joining a cluster of
            several nodes without it is refused before anything is written.

    Example:

        >>> SearchSettings(budget=8, deterministic=True).trials_at_once
        1
        >>> SearchSettings(budget=0)
        Traceback (most recent call last):
        ...
        smskd_search.errors.UserError: --budget must be >= 1 (got 0)
    """

    budget: int = 50
    study: str | None = None
    studies_dir: Path = Path("studies")
    max_concurrent: int | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    address: str | None = None
    seed: int = 0
    timeout: float | None = None
    resume: bool = False
    prune: bool = True
    baselines: bool = True
    confirm: ConfirmSettings | None = ConfirmSettings()
    deterministic: bool = False
    cache: bool = True
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    storage: str | Path | None = None
    cuda_graphs: bool = False
    mps: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "studies_dir", Path(self.studies_dir))
        self._check()

    def _check(self) -> None:
        if self.budget < 1:
            raise UserError(f"--budget must be >= 1 (got {self.budget})")
        if self.timeout is not None and not self.timeout > 0:
            raise UserError(f"--timeout must be > 0 seconds (got {self.timeout:g})")
        check_requests(self.cpus_per_trial, self.gpus_per_trial, self.max_concurrent)
        if self.cache and self.cache_max_bytes < 1:
            raise UserError(f"--cache-max-gb must be > 0 (got {self.cache_max_bytes / 2**30:g})")
        if self.deterministic and self.max_concurrent not in (None, 1):
            raise UserError(f"--max-concurrent {self.max_concurrent}: --deterministic runs one trial at a time")
        c = self.confirm
        if c is not None and min(c.plans, c.baselines, c.seeds) < 0:
            raise UserError(f"--confirm/--confirm-seeds must be >= 0 (got {c.plans} plans, {c.seeds} seeds)")

    @property
    def trials_at_once(self) -> int | None:
        """``max_concurrent``, or 1 when ``deterministic`` (None: as many as the resources fit)."""
        return 1 if self.deterministic else self.max_concurrent


__all__ = ["DEFAULT_CACHE_MAX_BYTES", "ConfirmSettings", "SearchSettings", "check_requests"]
