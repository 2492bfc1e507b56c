"""Stage jobs: one SAE per array task from a shared store (`sae.hooks`), locked per hook point.

    python -m refusal_lab -m hydra/launcher=slurm 'stages=[sae]' 'sae.hooks=[residuals_0],[residuals_1]'

Each task trains only its hooks, into the same `<artifacts>/sae/<fingerprint>/` folder:
`sae.hooks` is left out of the SAE fingerprint (an SAE's initialisation and batches do not
depend on which hooks train beside it: refusal_lab.sae.train.hook_seed), so the tasks' SAEs
are the ones a single job would train. The pipeline locks `<sae folder>/<hook>.lock` per hook
instead of the whole folder, so the tasks run in parallel, and a task whose hook is already
trained skips it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from refusal_lab.errors import ConfigError
from refusal_lab.fingerprint import exclusive


def selected_hooks(requested: list[str], available: list[str]) -> list[str]:
    """The hooks a job trains: `sae.hooks` (in the store's order), or every hook point when it is empty."""
    if not requested:
        return list(available)
    unknown = [h for h in requested if h not in available]
    if unknown:
        raise ConfigError(f"sae.hooks: {unknown} are not hook points of the store; valid: {available}")
    return [h for h in available if h in requested]


def hook_locks(folder: Path, hooks: list[str]) -> list[Path]:
    """The artifacts a job locks: one per hook folder (sorted, so two jobs always lock in the same order)."""
    return [folder / hook for hook in sorted(hooks)]


class HookSubset:
    """An activation source (refusal_lab.sae.source.ActivationSource) showing only some hook points."""

    def __init__(self, source: Any, hooks: list[str]) -> None:
        self._source = source
        self._hooks = selected_hooks(hooks, list(source.hook_points))

    @property
    def hook_points(self) -> list[str]:
        return list(self._hooks)

    @property
    def d_model(self) -> int:
        return int(self._source.d_model)

    @property
    def n_tokens(self) -> int:
        return int(self._source.n_tokens)

    @property
    def fingerprint(self) -> str:
        return str(self._source.fingerprint)

    @property
    def attrs(self) -> Any:
        return getattr(self._source, "attrs", None)

    def read(self, hook: str, start: int, stop: int) -> np.ndarray:
        if hook not in self._hooks:
            raise KeyError(f"sae: hook {hook!r} is not among this job's sae.hooks {self._hooks}")
        return self._source.read(hook, start, stop)

    def tokens(self) -> dict[str, np.ndarray]:
        return self._source.tokens()

    def samples(self) -> dict[str, Any]:
        return self._source.samples()


def stage_locks(spec: Any, ctx: Any) -> list[Path]:
    """What the pipeline locks while `spec` runs: the stage's `locks(ctx)` when it has them, else its artifact."""
    locks = getattr(spec, "locks", None)
    return list(locks(ctx)) if locks is not None else [ctx.paths[spec.name]]


@contextmanager
def locked(paths: list[Path]) -> Iterator[None]:
    """Exclusive locks on all `paths`, taken in the given order (refusal_lab.fingerprint.exclusive)."""
    with ExitStack() as stack:
        for path in paths:
            stack.enter_context(exclusive(path))
        yield
