"""`spoxl train-preference-model`: train the step-aware preference model (spoxl.spo.spm_training)."""

from __future__ import annotations


def add_arguments(p) -> None:
    from spoxl.spo.spm_training import add_arguments as spm_arguments

    spm_arguments(p)


def run(args) -> int:
    from spoxl.spo.spm_training import run as train

    return train(args)
