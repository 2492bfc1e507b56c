"""Progress bars for long loops that stay quiet where nobody watches them.

`progress(...)` is tqdm, disabled unless stderr is a terminal: a run in a terminal shows
bars, while CI, SLURM and Hydra log files (stderr redirected to a file or a pipe) get none of
tqdm's carriage-return noise. The stages' log lines (start, cache hit or miss, end) go
through `logging` and are what those logs keep.

    from refusal_lab.progress import progress, progress_bar
    for batch in progress(batches, desc="collect"):      # iterate
        ...
    with progress_bar(total=n_steps, desc="sae") as bar:   # update by hand
        bar.update(1)
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar, cast

from tqdm import tqdm

T = TypeVar("T")


def bars_enabled() -> bool:
    """True when stderr (where tqdm draws) is attached to a terminal."""
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    # Decided per bar, not at import: pytest, Hydra and submitit swap stderr after import.
    kwargs.setdefault("disable", not bars_enabled())
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return kwargs


def progress(iterable: Iterable[T], total: int | None = None, desc: str | None = None, **kwargs: Any) -> Iterator[T]:
    """Iterate `iterable` behind a tqdm bar that is off when stderr is not a TTY."""
    return cast(Iterator[T], iter(tqdm(iterable, total=total, desc=desc, **_options(kwargs))))


def progress_bar(total: int | None = None, desc: str | None = None, **kwargs: Any) -> tqdm:
    """A manual tqdm bar (`.update(n)`, use as a context manager), off when stderr is not a TTY."""
    return tqdm(total=total, desc=desc, **_options(kwargs))
