"""The README's editable install runs a sweep from any directory (issue 18).

Hydra finds `hydra/launcher=local|slurm` by walking the `hydra_plugins` namespace package with pkgutil, so the
installed layout decides whether the launchers exist: with setuptools' editable finder the scan saw only
hydra-submitit-launcher's folder, and a sweep started outside the clone failed with "Unknown plugin class".

The test makes the README's `pip install -e .` of a copy of the sources into a fresh venv (no pip, no packages of
its own: the current interpreter's site-packages are a plain path entry of it, so its dependencies come from there
while no `.pth` of the current environment, such as its own editable finder, is run), then starts a two-job local
multirun from a folder outside both. `--no-deps --no-build-isolation` keep it offline; the editable layout is the
one `pip install -e .` writes. `.ci/wheel.sh` runs the same sweep against the installed wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "refusal_lab", "conf", "hydra_plugins")


def editable_venv(tmp: Path) -> tuple[Path, Path]:
    """(python of a fresh venv with `pip install -e` of a copy of the sources, that copy)."""
    src, venv = tmp / "src", tmp / "venv"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "local"))
        else:
            shutil.copy2(path, src / name)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    parents = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    # Plain lines: the new venv imports the current one's packages, but runs none of its .pth files.
    Path(site, "parent_site.pth").write_text("".join(f"{p}\n" for p in parents))
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "-e", str(src)], check=True, cwd=tmp)
    return python, src


def test_editable_install_runs_a_local_sweep_outside_the_clone(tmp_path: Path) -> None:
    python, src = editable_venv(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HYDRA_FULL_ERROR": "1"}

    where = subprocess.run(
        [python, "-c", "import refusal_lab, hydra_plugins.refusal_lab_launcher as p; print(refusal_lab.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(src), "the editable install must serve the copied sources"

    sweep = tmp_path / "sweep"
    cmd = [
        python, "-m", "refusal_lab", "-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep}",
        f"artifacts_dir={tmp_path / 'artifacts'}", "stages=[collect]", "tracking=disabled", "data.limit=4",
        "inference.max_new_tokens=2,4",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    tokens = sorted(OmegaConf.load(p.parent / ".hydra" / "config.yaml").inference.max_new_tokens for p in summaries)
    assert tokens == [2, 4], f"one summary per job: {summaries}"
    assert not (elsewhere / "multirun").exists() and not (elsewhere / "outputs").exists()
