"""Content fingerprints that name stage artifacts after exactly what produced them."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def fingerprint(payload: Any) -> str:
    """Short sha256 of a JSON-serialisable payload (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON via a temp file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def exclusive(artifact: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<artifact>.lock` while a stage writes `artifact`.

    Sweep jobs whose configs map to the same artifact (a sweep over SAE settings shares one
    store) would otherwise write it at the same time; the second job waits, then finds the
    artifact committed and skips it. flock is per open file, so it also works between threads.
    """
    lock = artifact.with_name(artifact.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another job writing %s", artifact)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
