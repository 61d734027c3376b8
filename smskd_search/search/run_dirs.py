"""A trial's run folder in the search's storage: where its stage checkpoints are kept for a resume.

With a folder for storage the trial works in its run folder itself. With a URI (``s3://...``) it
works in a scratch folder on its node (:func:`work_dir`): it adopts the stage checkpoints of its run
folder and of earlier attempts from the storage first (:func:`adopt`), uploads each checkpoint as
its stage ends (:func:`push`), and removes the scratch folder when it ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from smskd_search.search import storage_fs as sfs


def stage_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("stage*.pt"), key=lambda p: int(p.stem[5:]) if p.stem[5:].isdigit() else -1)


def _is_stage_file(name: str) -> bool:
    return name.startswith("stage") and name.endswith(".pt") and name[5:-3].isdigit()


SCRATCH_PREFIX = "smskd-trial-"


def _sweep_scratch() -> None:
    """Remove the scratch folders of trial processes that are gone (killed with no clean-up)."""
    for p in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = p.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:  # alive, and someone else's
            pass


def work_dir(run_dir: str) -> Path:
    """The folder the trial trains in: its run folder, or a new scratch folder for a URI (named by
    the process, so that the next trial on the node removes it if this process dies uncleanly)."""
    if sfs.is_uri(run_dir):
        _sweep_scratch()
        return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def adopt(src: str | Path, work: Path) -> list[str]:
    """Copy into ``work`` the stage checkpoints of ``src`` (a folder or URI) it does not have yet;
    returns their names. Each arrives whole (copied under a temporary name first), even if killed."""
    mine = {p.name for p in stage_files(work)}
    src = str(src)
    if sfs.is_uri(src):
        names = [rel for rel, _, _, is_dir in sfs.listing(src) if not is_dir and _is_stage_file(rel)]
        for name in names:
            if name not in mine:
                sfs.download(sfs.join(src, name), work / name)
        return [n for n in names if n not in mine]
    folder = Path(src)
    if not folder.is_dir() or folder.resolve() == work.resolve():
        return []
    out = []
    for p in stage_files(folder):
        if p.name not in mine:
            tmp = work / (p.name + ".part")
            shutil.copy2(p, tmp)
            tmp.replace(work / p.name)
            out.append(p.name)
    return out


def push(checkpoint: Path, run_dir: str) -> None:
    """Keep a stage checkpoint the trial just wrote in its run folder (an upload for a URI)."""
    if sfs.is_uri(run_dir):
        sfs.upload(checkpoint, sfs.join(run_dir, checkpoint.name))


def finish(work: Path, run_dir: str) -> None:
    """The trial is over: its scratch folder (a URI's) goes; the run folder stays (see :func:`drop`)."""
    if sfs.is_uri(run_dir):
        shutil.rmtree(work, ignore_errors=True)


def drop(run_dir: str) -> None:
    """Remove a run folder and its checkpoints (nobody will resume from them)."""
    sfs.remove(run_dir)


__all__ = ["adopt", "drop", "finish", "push", "stage_files", "work_dir"]
