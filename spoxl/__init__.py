"""spoxl: preference fine-tuning (SPO, Diffusion-DPO, MaPO, NCP) of SDXL at cluster scale."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend tries to fetch an optional 4-bit GEMM kernel from the hub at import
# and warns when it cannot; spoxl never uses 4-bit GEMMs, so that warning is only noise on CPU.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
