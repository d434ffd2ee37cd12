"""Test-only fault injection: `spoxl.train` on every rank, except that rank 1 ALONE fails loading
the model (as a node-local copy of the weights that is damaged would), before any collective,
while rank 0 loads fine and goes on into DeepSpeed's first broadcast, where it waits for a rank
that is gone. This is the lost-message race: the error exists on rank 1 only, and rank 0, the
rank that usually speaks for the job, never saw it. Run by the deepspeed launcher in place of
`--module spoxl.train`:

    deepspeed --num_gpus 2 tests/engine/train_rank1_fails_first.py --config ... [--set ...]

The hook replaces spoxl.models.loading.load_sdxl from outside, so the package carries no
test-only switch.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from spoxl import train  # noqa: E402
from spoxl.errors import SpoxlError  # noqa: E402
from spoxl.models import loading  # noqa: E402

MESSAGE = "model /nodes/n1/sdxl/unet/diffusion_pytorch_model.safetensors is truncated (expected 10 MB, found 3 MB)"


def damaged_load(*args, **kwargs):
    raise SpoxlError(MESSAGE)


if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        loading.load_sdxl = damaged_load
    code = train.main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
