"""Packaging hook (the project metadata is in pyproject.toml).

The Hydra configs live in the top-level `conf/` of the repository, which is where users read and edit them. A wheel
must carry them too, or an installed `python -m refusal_lab` cannot start ("Primary config directory not found"),
so the package `refusal_lab.conf` is mapped onto `conf/`: a build copies `conf/**/*.yaml` into `refusal_lab/conf/`.
`refusal_lab/__main__.py` uses that copy when it exists and `../conf` in a source checkout (editable installs).
pyproject.toml cannot add a mapped package next to `packages.find`, hence this file.

`hydra_plugins` itself is listed (a namespace package: no __init__.py) so that an editable install exposes its
folder. Hydra finds launchers by walking `hydra_plugins.__path__` with pkgutil; setuptools' editable finder maps
the listed packages for import, but a parent namespace that is not listed gets no path in `__path__` (only a path-hook
placeholder that pkgutil cannot list), so the scan missed `refusal_lab_launcher` and `hydra/launcher=local|slurm`
failed with "Unknown plugin class" from any directory but the clone's root (issue 18). Listed, the namespace's
`__path__` holds the clone's `hydra_plugins/` beside site-packages' (hydra-submitit-launcher's). A wheel installs both
into site-packages/hydra_plugins/, which the scan always saw.
"""

from setuptools import find_namespace_packages, setup

setup(
    # Namespace discovery, as pyproject's packages.find did: a subpackage without __init__.py still ships.
    packages=[
        *find_namespace_packages(include=["refusal_lab", "refusal_lab.*"]),
        "refusal_lab.conf",
        "hydra_plugins",  # Hydra's plugin namespace: listed so an editable install puts its folder in the scan
        "hydra_plugins.refusal_lab_launcher",  # the launchers of conf/hydra/launcher (Hydra's plugin namespace)
    ],
    package_dir={"refusal_lab.conf": "conf"},
)
