"""Hydra plugin package: the submitit launchers that claim each job's artifacts at submission.

Hydra only instantiates launchers from the `hydra_plugins` namespace; the code is refusal_lab.launcher.
"""

from __future__ import annotations

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from refusal_lab.launcher import Claiming


class ClaimingSlurmLauncher(Claiming, SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher with claims at submission."""


class ClaimingLocalLauncher(Claiming, LocalLauncher):
    """hydra-submitit-launcher's local launcher with claims at submission."""
