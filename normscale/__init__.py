"""normscale: normative scaling experiments on in-context learning (see README.md and docs/ARCHITECTURE.md)."""
__version__ = "0.1.0"
