"""Exponential moving average of the trained weights, kept OUTSIDE the DeepSpeed engine.

API
  ema = EMA(model, decay=0.999, warmup=False, every_n_steps=1, rank0_only=False)
  ema.update(model, step)      after each optimizer step (COLLECTIVE under ZeRO-3: every rank)
  ema.shadow_params()          {param name: fp32 CPU tensor} ({} on non-zero ranks if rank0_only)
  ema.state_dict() / ema.load_state_dict(sd)   for checkpoints (client state)
  EMA.from_state_dict(sd)      a model-less EMA from a checkpoint (for `spoxl export`)
  spoxl.engine.export.export_all(model, out, formats, ema=ema) writes the EMA under OUT/ema/

What it tracks: the parameters with requires_grad (the LoRA tensors, or the whole UNet for full
fine-tuning), by their `named_parameters()` names on the unwrapped module, in fp32 on CPU (read
from DeepSpeed's fp32 master copy under bf16/fp16, see zero_utils.gathered_state_dict): the
shadow never occupies accelerator memory and is not sharded by ZeRO (SimpleTuner keeps its EMA
the same way). Under ZeRO-3 each update gathers the trainable parameters chunk by chunk
(deepspeed.zero.GatheredParameters, DeepSpeed #2056), so every rank must call update().

Update rule, per update: shadow = d * shadow + (1 - d) * param, with d = decay, or with
warmup=True d = min(decay, (1 + n) / (10 + n)) where n counts updates done so far (the
diffusers EMAModel warmup, so early shadows are not dominated by the random init).
`every_n_steps=k` updates only when step % k == 0 (cheaper for big UNets).

rank0_only=True keeps the shadow on rank 0 alone (saves host memory for full SDXL); then only
rank 0's state_dict carries it, so a checkpoint must be resumed with rank 0 restoring it
(the default, every rank keeps a copy, has no such constraint).
"""

from __future__ import annotations

import torch

from spoxl.engine.zero_utils import gathered_state_dict, is_rank0, unwrap
from spoxl.errors import SpoxlError


class EMA:
    def __init__(
        self,
        model,
        decay: float = 0.999,
        warmup: bool = False,
        every_n_steps: int = 1,
        rank0_only: bool = False,
    ):
        if not 0.0 <= decay < 1.0:
            raise SpoxlError(f"EMA decay must be in [0, 1), got {decay}")
        if every_n_steps < 1:
            raise SpoxlError(f"EMA every_n_steps must be >= 1, got {every_n_steps}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.every_n_steps = int(every_n_steps)
        self.rank0_only = bool(rank0_only)
        self.num_updates = 0
        self.names = [n for n, p in unwrap(model).named_parameters() if p.requires_grad]
        if not self.names:
            raise SpoxlError("EMA: the model has no trainable parameters")
        # Initial shadow = the current weights (collective under ZeRO-3).
        self.shadow = self._read(model)

    @classmethod
    def from_state_dict(cls, state: dict) -> "EMA":
        """An EMA holding a saved shadow, without a model (offline export from a checkpoint)."""
        ema = cls.__new__(cls)
        ema.rank0_only = False
        ema.names = list(state["shadow"])
        ema.shadow = {}
        ema.load_state_dict(state)
        return ema

    def _keeps(self) -> bool:
        return not self.rank0_only or is_rank0()

    def _read(self, model) -> dict[str, torch.Tensor]:
        wanted = set(self.names)
        return gathered_state_dict(model, keep=lambda n, t: n in wanted, rank0_only=self.rank0_only)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model, step: int | None = None) -> bool:
        """Fold the current weights into the shadow; returns whether an update happened.

        Collective under ZeRO-3 (every rank must call it with the same step).
        """
        if step is not None and step % self.every_n_steps != 0:
            return False
        d = self.current_decay()
        current = self._read(model)
        if self._keeps():
            for name, value in current.items():
                # lerp: shadow + (1 - d) * (value - shadow) == d * shadow + (1 - d) * value
                self.shadow[name].lerp_(value, 1.0 - d)
        self.num_updates += 1
        return True

    def shadow_params(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "every_n_steps": self.every_n_steps,
            "num_updates": self.num_updates,
            "shadow": {k: v.clone() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if self._keeps():
            missing = sorted(set(self.names) - set(shadow))
            extra = sorted(set(shadow) - set(self.names))
            if missing or extra:
                bad = (missing or extra)[0]
                raise SpoxlError(f"EMA state does not match the model's trainable parameters (e.g. {bad})")
            self.shadow = {k: shadow[k].to("cpu", torch.float32, copy=True) for k in self.names}
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.every_n_steps = int(state["every_n_steps"])
        self.num_updates = int(state["num_updates"])
