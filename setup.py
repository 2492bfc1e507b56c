"""Packaging hook (the project metadata is in pyproject.toml).

The Hydra configs live in the top-level `conf/` of the repository, which is where users read and edit them. A wheel
must carry them too, or an installed `python -m refusal_lab` cannot start ("Primary config directory not found"),
so the package `refusal_lab.conf` is mapped onto `conf/`: a build copies `conf/**/*.yaml` into `refusal_lab/conf/`.
`refusal_lab/__main__.py` uses that copy when it exists and `../conf` in a source checkout (editable installs).
pyproject.toml cannot add a mapped package next to `packages.find`, hence this file.
"""

from setuptools import find_namespace_packages, setup

setup(
    # Namespace discovery, as pyproject's packages.find did: a subpackage without __init__.py still ships.
    packages=[
        *find_namespace_packages(include=["refusal_lab", "refusal_lab.*"]),
        "refusal_lab.conf",
        "hydra_plugins.refusal_lab_launcher",  # the launchers of conf/hydra/launcher (Hydra's plugin namespace)
    ],
    package_dir={"refusal_lab.conf": "conf"},
)
