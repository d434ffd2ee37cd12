"""Test-only fault injection: `spoxl.train`, with rank 0 SIGKILLed in the middle of saving one step
(every rank's files written, the checkpoint not yet declared complete), as a crash or a
preemption would. Run by the deepspeed launcher in place of `--module spoxl.train`:

    deepspeed --num_gpus 2 tests/engine/train_killed_in_save.py --kill-in-save 4 --config ... [--set ...]

The hook wraps spoxl.engine.checkpoint._save_file from outside, so the package itself carries no
test-only kill switch.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from spoxl import train  # noqa: E402
from spoxl.engine import checkpoint  # noqa: E402


def main() -> int:
    i = sys.argv.index("--kill-in-save")
    kill_at = int(sys.argv[i + 1])
    argv = sys.argv[1:i] + sys.argv[i + 2:]
    save_file = checkpoint._save_file

    def save_then_die(obj, path):
        save_file(obj, path)
        if Path(path).name == "spoxl_rank0.pt" and obj.get("global_step") == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._save_file = save_then_die
    return train.main(argv)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as spoxl.train does: skip the slow interpreter teardown
