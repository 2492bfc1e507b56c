"""A wheel is a working program: it ships every config and package, and runs from outside the clone.

The wheel is built from a copy of the sources (nothing is written into the repository) without build isolation,
so no network is needed. `.ci/run` also installs it into a fresh venv to check the declared dependencies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "refusal_lab", "conf", "hydra_plugins")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            # conf/local/ is a user's own git-ignored options: copy it so the test sees it is left out.
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    (src / "conf" / "local").mkdir(exist_ok=True)
    (src / "conf" / "local" / "mine.yaml").write_text("# a user's private option\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        check=True,
        cwd=src,
    )
    (built,) = out.glob("refusal_lab-*.whl")
    return built


def test_wheel_ships_every_config_and_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = [p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")]
    configs = [c for c in configs if not c.startswith("local/")]
    assert "config.yaml" in configs and any(c.startswith("data/") for c in configs)
    missing = [c for c in configs if f"refusal_lab/conf/{c}" not in names]
    assert not missing, f"configs not in the wheel: {missing}"
    assert not [n for n in names if n.startswith("refusal_lab/conf/local/")]
    modules = [
        p.relative_to(REPO).as_posix() for d in ("refusal_lab", "hydra_plugins") for p in (REPO / d).rglob("*.py")
    ]
    assert not [m for m in modules if m not in names], "modules missing from the wheel"
    assets = [p.relative_to(REPO).as_posix() for p in (REPO / "refusal_lab" / "organism" / "assets").iterdir()]
    assert not [a for a in assets if a not in names], "organism assets missing from the wheel"
    assert not [n for n in names if n.startswith(("conf/", "tests/"))]  # nothing at the top level of site-packages


def _run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The unpacked wheel first on sys.path: it shadows the editable install of the clone.
    env = {**os.environ, "PYTHONPATH": str(site), "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_installed_wheel_starts_outside_the_clone(wheel: Path, tmp_path: Path) -> None:
    site, cwd = tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    zipfile.ZipFile(wheel).extractall(site)
    where = _run_installed(
        site,
        cwd,
        "-c",
        "import refusal_lab.__main__ as m, hydra_plugins.refusal_lab_launcher as p; "
        "print(m.__file__, m.CONFIG_PATH, p.__file__)",
    )
    assert where.returncode == 0, where.stderr
    module_file, config_path, launcher_file = where.stdout.split()
    assert Path(module_file).is_relative_to(site) and config_path == "conf"
    assert Path(launcher_file).is_relative_to(site)  # conf/hydra/launcher/* name these launchers

    helped = _run_installed(site, cwd, "-m", "refusal_lab", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "model: llama2_7b, mistral_7b, organism" in helped.stdout

    job = _run_installed(site, cwd, "-m", "refusal_lab", "--cfg", "job", "model=mistral_7b", "layers=all")
    assert job.returncode == 0, job.stderr
    assert "name: mistralai/Mistral-7B-Instruct-v0.1" in job.stdout
    assert "- all" in job.stdout  # layers=all
    assert not (cwd / "outputs").exists() or not any((cwd / "outputs").rglob("summary.json"))


def test_source_checkout_uses_the_top_level_conf() -> None:
    import refusal_lab.__main__ as main

    assert not (REPO / "refusal_lab" / "conf").exists(), "conf/ is the source of truth; refusal_lab/conf is built"
    assert main.CONFIG_PATH == "../conf"
