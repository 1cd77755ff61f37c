"""The predecessor's notebook import, kept working: `from normscale.analysis_utils import load_eval_results`."""
from normscale.collate import load_eval_results

__all__ = ["load_eval_results"]
