"""Models: trained networks and the Bayes-optimal predictors (SPEC B)."""
from normscale.model.bayes import BayesPredictor, build_bayes

__all__ = ["BayesPredictor", "build_bayes"]
