"""Packs: runs of one shape trained together with a leading run axis (normscale.pack.stacked)."""
from normscale.pack.stacked import (PackStep, SequentialRuns, StackedAdamW, StackedModel, StackedRuns,
                                    clip_grad_norms_per_run, stack_batches)

__all__ = ["PackStep", "SequentialRuns", "StackedAdamW", "StackedModel", "StackedRuns", "clip_grad_norms_per_run",
           "stack_batches"]
