"""Progress bars draw on a terminal and stay silent when stderr is a file or a pipe (CI, SLURM)."""

from __future__ import annotations

import io
import sys

import pytest

from refusal_lab import progress as progress_mod
from refusal_lab.progress import bars_enabled, progress, progress_bar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_off_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()  # what CI and SLURM give: a file-like stream that is not a TTY
    monkeypatch.setattr(sys, "stderr", err)
    assert not bars_enabled()
    assert list(progress(range(50), desc="quiet", file=err, mininterval=0)) == list(range(50))
    with progress_bar(total=10, desc="quiet", file=err, mininterval=0) as bar:
        bar.update(10)
        assert bar.disable
    assert err.getvalue() == ""


def test_bars_on_when_stderr_is_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err = _Tty()
    monkeypatch.setattr(sys, "stderr", err)
    assert bars_enabled()
    assert list(progress(range(5), desc="shown", file=err, mininterval=0)) == list(range(5))
    assert "shown" in err.getvalue()


def test_a_closed_or_missing_stderr_counts_as_no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_mod.sys, "stderr", None)
    assert not bars_enabled()
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(progress_mod.sys, "stderr", closed)
    assert not bars_enabled()
