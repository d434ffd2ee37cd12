"""spoxl.kernels: fused sampling and preference-loss kernels with pure-torch references.

Public ops (see spoxl.kernels.ops for shapes and the gradient contract):
  pool_step, transition_logprob, pool_logprobs                   (spoxl.kernels.ops)
  spo_loss, diffusion_dpo_loss, mapo_loss, ncp_loss               (one module each in spoxl.kernels.losses;
                                                                   return_metrics=True -> (loss, metrics))

Backend: SPOXL_KERNELS=auto|torch|triton, read at call time (spoxl.kernels.dispatch). Importing
this package never imports triton; the Triton backend is loaded on first use.
"""

from spoxl.kernels.backends import backend_ops
from spoxl.kernels.dispatch import choose_backend, requested_backend, use_backend
from spoxl.kernels.losses import diffusion_dpo_loss, mapo_loss, ncp_loss, spo_loss
from spoxl.kernels.ops import pool_logprobs, pool_step, transition_logprob

__all__ = [
    "pool_step",
    "transition_logprob",
    "pool_logprobs",
    "spo_loss",
    "diffusion_dpo_loss",
    "mapo_loss",
    "ncp_loss",
    "use_backend",
    "choose_backend",
    "requested_backend",
    "backend_ops",
]
