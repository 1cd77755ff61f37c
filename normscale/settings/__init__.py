"""Settings (task families): one module per setting, each a `Setting` (normscale.settings.base) with its Bayes
predictors (normscale.settings.bayes) and the NetworkIO its networks read and predict by
(normscale.settings.network_io). The registry's functions are re-exported here, so `settings.get(name, task)` builds
a setting; importing this package imports no torch (only the registry), its modules do.
"""
from normscale.registry import PLUGINS_VARIABLE, Facts, facts, get, names, register, setting_class

__all__ = ["PLUGINS_VARIABLE", "Facts", "facts", "get", "names", "register", "setting_class"]
