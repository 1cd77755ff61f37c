"""Packed sweeps (issue 13): runs of one shape trained together as one model with a leading run axis.
forming.py (standard library) says which runs can share a pack; importing this package imports nothing else."""
