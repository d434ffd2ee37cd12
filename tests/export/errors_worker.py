"""One of 2 plain gloo ranks (no DeepSpeed) started by test_export_errors.py: rank 0 alone meets an
error inside a collective export; every rank must raise the same one-line SpoxlError instead of
rank 1 waiting in the collective that follows (here until the group's 40 s timeout).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=P python errors_worker.py OUT_DIR
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(out: Path) -> None:
    from diffusers import UNet2DConditionModel

    from export_helpers import lora_unet
    from spoxl.engine.export import export_lora, export_unet
    from spoxl.errors import SpoxlError
    from spoxl.models.tiny import tiny_unet_config

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=40))
    rank = dist.get_rank()
    torch.manual_seed(0)
    unet = lora_unet(UNet2DConditionModel(**tiny_unet_config()))
    name = next(n for n, _ in unet.named_parameters() if "lora_A" in n)
    # Overrides that exist on rank 0 only (an EMA kept with rank0_only=True), and are wrong there.
    cases = {
        "lora": lambda: export_lora(unet, out / "lora", overrides={name: torch.zeros(1)} if rank == 0 else None),
        "unet": lambda: export_unet(unet, out / "unet", overrides={"nope.weight": torch.zeros(1)} if rank == 0 else None),
    }
    for case, call in cases.items():
        try:
            call()
            result = "no error"
        except SpoxlError as e:
            result = f"SpoxlError: {e}"
        except Exception as e:  # noqa: BLE001 - the test reports what was raised
            result = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        (out / f"{case}_rank{rank}.txt").write_text(result)
    dist.barrier()  # both ranks still talk to each other after the errors
    (out / f"done_rank{rank}").write_text("ok")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)
