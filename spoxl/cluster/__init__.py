"""Cluster plumbing around the deepspeed launcher: hostfiles, SLURM, memory estimates, failure watchdog.

Nothing here imports deepspeed or torch at module import time, so `spoxl preflight` and the SLURM
helper stay usable from a login node's plain Python.
"""
