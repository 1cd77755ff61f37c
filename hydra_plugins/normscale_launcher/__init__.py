"""normscale's Hydra launchers (conf/hydra/launcher/slurm.yaml and local.yaml): hydra-submitit-launcher's, which
train a sweep with pack=N as one submitit job per pack (normscale.launcher). Hydra instantiates launchers only
from the hydra_plugins namespace package."""
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from normscale.launcher import PackLauncher


class SlurmLauncher(PackLauncher, submitit_launcher.SlurmLauncher):
    """hydra/launcher=slurm: a SLURM job per sweep point, or per pack with pack=N."""


class LocalLauncher(PackLauncher, submitit_launcher.LocalLauncher):
    """hydra/launcher=local: a local process per sweep point, or per pack with pack=N."""
