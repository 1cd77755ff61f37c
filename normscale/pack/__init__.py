"""Packed sweeps (issue 13): runs of one shape trained together in one process.

forming.py (standard library) says which runs can share a pack and forms packs; stacked.py (torch) trains a pack as
one model with a leading run axis: StackedModel, per-run clipping and AdamW, StackedRuns, StackedLoops.
Importing this package imports neither (the sweep planner imports forming without torch).
"""
