"""DESIGN's dependency direction, checked in fresh interpreters: the library layers import nothing above them."""
import subprocess
import sys

import pytest

FORBIDDEN = {
    "normscale.config": ["torch", "numpy", "hydra", "omegaconf", "normscale.data", "normscale.model"],
    "normscale.pack.forming": ["torch", "numpy", "hydra", "normscale.data", "normscale.model", "normscale.pack.stacked"],
    "normscale.registry": ["torch", "numpy", "hydra", "omegaconf", "normscale.settings", "normscale.data", "normscale.model"],
    "normscale.settings": ["torch", "numpy", "hydra", "omegaconf", "normscale.data", "normscale.model"],
    **{f"normscale.settings.{name}": ["hydra", "omegaconf", "accelerate", "transformers", "normscale.data", "normscale.model",
                                      "normscale.dist", "normscale.cli"]
       for name in ("balls_and_urns", "linear_regression", "classification")},
    "normscale.data": ["hydra", "omegaconf", "accelerate", "deepspeed", "normscale.dist", "normscale.model", "normscale.cli"],
    "normscale.model": ["hydra", "omegaconf", "accelerate", "deepspeed", "normscale.dist", "normscale.data", "normscale.cli"],
    "normscale.eval": ["hydra", "normscale.train", "normscale.collate", "normscale.analysis"],
    "normscale.collate": ["hydra", "torch", "normscale.train", "normscale.analysis", "normscale.eval", "normscale.dist",
                          "accelerate", "deepspeed", "transformers"],
    "normscale.analysis.report": ["torch", "normscale.eval", "normscale.dist", "accelerate", "deepspeed", "transformers"],
    "normscale.analysis_utils": ["torch", "normscale.eval", "normscale.dist", "accelerate", "deepspeed", "transformers"],
    "normscale.layout": ["torch", "numpy", "yaml", "hydra", "normscale.data", "normscale.model"],
    "normscale.runlock": ["torch", "numpy", "normscale.data", "normscale.model"],
    "normscale.provenance": ["torch", "numpy"],
    "normscale.sweep": ["torch", "numpy", "normscale.data", "normscale.model", "normscale.dist"],
    "normscale.analysis.normative": ["torch", "h5py", "normscale.data", "normscale.model", "normscale.dist"],
    # Hydra imports every plugin at start-up, for every command
    "hydra_plugins.normscale_launcher": ["torch", "submitit", "normscale.cli", "normscale.train", "normscale.pack.forming"],
}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_module_imports_nothing_above_it(module):
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert module in loaded
    assert not [m for m in FORBIDDEN[module] if m in loaded]
