"""The teacher's weights from the driver to the trials, through Ray's object store.

A trial may run on a node that does not have the driver's disk, so it never opens the teacher's
path: the driver reads the teacher's file once, checks it against the sha256 the study is bound to,
and ships the bytes with the trials' shared context (``tune.with_parameters`` puts it in the object
store). Each trial hashes what it received and refuses bytes that do not match.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from smskd_search.engine import TeacherRecord
from smskd_search.errors import UserError


class TeacherTransportError(UserError):
    """The teacher's weights a trial received do not hash to the driver's sha256."""


@dataclass(frozen=True)
class TeacherPayload:
    """The teacher as it travels: its record (``path`` only says where it came from) and its file's bytes.

    Args:
        record: :class:`TeacherRecord` as a dict.
        weights: The bytes of the teacher's checkpoint file, as the driver read them.
    """

    record: dict[str, Any]
    weights: bytes

    @property
    def sha256(self) -> str:
        return str(self.record["sha256"])


def pack(record: TeacherRecord) -> TeacherPayload:
    """The payload of the driver's teacher; a UserError if its file changed since it was hashed.

    Args:
        record: The teacher the search ensured (its ``path`` is on the driver's disk).
    """
    try:
        weights = Path(record.path).read_bytes()
    except OSError as exc:
        raise UserError(f"teacher: cannot read {record.path} on the driver: {exc.strerror or exc}") from None
    got = hashlib.sha256(weights).hexdigest()
    if got != record.sha256:
        raise UserError(f"teacher: {record.path} changed on the driver (sha256 {got[:12]}, "
                        f"the record says {record.sha256[:12]}); run `smskd-search teacher` again")
    return TeacherPayload(asdict(record), weights)


def unpack(payload: TeacherPayload) -> tuple[TeacherRecord, bytes]:
    """The record and the checked weights, on the trial's side.

    Args:
        payload: What the trial received.

    Raises:
        TeacherTransportError: The bytes do not hash to the driver's sha256.
    """
    got = hashlib.sha256(payload.weights).hexdigest()
    if got != payload.sha256:
        raise TeacherTransportError(
            f"teacher weights: the {len(payload.weights)} bytes this trial received hash to sha256 {got[:12]}, "
            f"the driver sent {payload.sha256[:12]}: refused (corrupted on the way)")
    return TeacherRecord(**payload.record), payload.weights


__all__ = ["TeacherPayload", "TeacherTransportError", "pack", "unpack"]
