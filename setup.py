from setuptools import find_packages, setup

# torch is deliberately unpinned: GPU clusters bring their own CUDA build; `make install` puts the
# CPU wheel in place first on machines without one. mup is installed by `make install` with --no-deps
# (its torchvision dependency breaks transformers' imports), so it is not listed here. These are the ranges normscale
# accepts; the versions it was tested with are pinned in tools/constraints.txt, which `make install`
# (tools/install.sh) installs from unless NORMSCALE_UNCONSTRAINED=1.
setup(
    name="normscale",
    version="0.1.0",
    description="Normative scaling experiments on in-context learning",
    # hydra_plugins: a namespace package (no __init__.py), where Hydra finds hydra/launcher=slurm and local
    packages=[*find_packages(include=["normscale", "normscale.*"]), "hydra_plugins",
              "hydra_plugins.normscale_launcher"],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy>=1.26",
        "h5py>=3.10",
        "hydra-core>=1.3.2",
        "omegaconf>=2.3",
        "hydra-submitit-launcher>=1.2",
        "submitit>=1.5",
        "accelerate>=1.0",
        "deepspeed>=0.15",
        "transformers>=4.45",
        "safetensors>=0.4",
        "wandb>=0.17",
        "python-dotenv>=1.0",
        "pyyaml>=6.0",  # imported directly (run configs), not only through omegaconf
        "tqdm>=4.66",
        "pandas>=2.0",
        "matplotlib>=3.8",
        "scipy>=1.11",
    ],
    extras_require={"dev": ["pytest>=8", "pytest-timeout>=2.3"]},
)
