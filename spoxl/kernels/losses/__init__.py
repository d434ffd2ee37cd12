"""The preference losses, one module each, on shared reduction kernels.

Each module holds its public op (validation, then the backend spoxl.kernels.dispatch picks), its
torch `reference` (plain autograd: the CPU backend and the tests' oracle), its `head` (the
per-sample scalar math in fp64 torch), and its `fused` Triton path: the shared reduction kernel
named by REDUCTION, the module's `triton_heads()` device function run by the shared head kernel
(which also writes the METRICS), and one shared elementwise backward. Defaults (beta, clip, ...)
live in the method configs only: the ops take them as required keywords.

Adding a loss: a module beside these with the same parts, and its line in LOSSES below.
Importing this package never imports triton: the Triton heads are built on first use.
"""

from spoxl.kernels.losses import dpo, mapo, ncp, spo

# public op name -> the module that implements it
LOSSES = {
    "spo_loss": spo,
    "diffusion_dpo_loss": dpo,
    "mapo_loss": mapo,
    "ncp_loss": ncp,
}

spo_loss = spo.spo_loss
diffusion_dpo_loss = dpo.diffusion_dpo_loss
mapo_loss = mapo.mapo_loss
ncp_loss = ncp.ncp_loss
NCP_KINDS = ncp.NCP_KINDS


def op(name: str):
    """The public op `name` (a key of LOSSES)."""
    return getattr(LOSSES[name], name)
