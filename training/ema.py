"""An exponential moving average of the weights (RT-DETR's ModelEMA, DINO's detrex recipe, LW-DETR), kept by the
training script when `--ema_decay` is on: evaluations, best/ and last/ use the average, checkpoints hold it.

After optimizer step t (t = 1, 2, ...), with d_t = decay * (1 - exp(-t / warmup_steps)) (RT-DETR's ramp: the first
steps' weights, far from the end, fade out fast):

    ema_t = d_t * ema_{t-1} + (1 - d_t) * weights_t

The averaging is timm's `ModelEmaV3` (a copy of the model, updated in place with foreach lerp); this file adds the
ramp, the step count, the checkpoint file and the several-process rule.

- Floating-point buffers (BatchNorm running statistics) are averaged like the weights, as RT-DETR and timm do: the
  statistics then describe the averaged network's activations, not the last step's; integer buffers
  (num_batches_tracked) are copied. Frozen BatchNorm's buffers never change, so averaging leaves them as they are.
- Several processes: DDP keeps the weights identical after each step, but a trainable BatchNorm updates its running
  statistics from each process's own batch (DDP broadcasts process 0's at the next forward). The average's buffers
  are therefore taken from process 0 after each update, so every process holds the same average (each evaluates its
  share of the validation set with it).
- The average is fp32 like the weights (Accelerate's mixed precision is autocast; the weights stay fp32), so timm's
  bf16 stochastic rounding never applies.
"""
import math

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import save_file
from timm.utils import ModelEmaV3

EMA_FILE = "ema.safetensors"   # in checkpoint-N: the average's state dict, its step count in the metadata


def check_ema_arguments(decay: float | None, warmup_steps: int) -> None:
    """--ema_decay: None or 0 is off, else in (0, 1); --ema_warmup_steps >= 0 (0: the full decay from step 1)."""
    if decay is not None and not 0 <= decay < 1:
        raise ValueError(f"--ema_decay={decay} is outside [0, 1): give the weight of the previous average, e.g. "
                         "0.9999 (RT-DETR, long runs) or 0.993 (a run of ~1000 steps), or 0 to turn EMA off.")
    if warmup_steps < 0:
        raise ValueError(f"--ema_warmup_steps={warmup_steps} is negative: give the ramp's length in optimizer steps "
                         "(RT-DETR: 2000), or 0 for no ramp.")


def ema_decay_at(updates: int, *, decay: float, warmup_steps: int) -> float:
    """d_t after `updates` optimizer steps (RT-DETR: decay * (1 - exp(-updates / warmups)))."""
    if warmup_steps == 0:
        return decay
    return decay * (1 - math.exp(-updates / warmup_steps))


class WeightEma(ModelEmaV3):
    """timm's ModelEmaV3 with RT-DETR's ramp, counted in optimizer steps. `module` is the average: a copy of the
    unwrapped model (Accelerate's autocast forward included), in eval mode, without gradients."""

    def __init__(self, model: torch.nn.Module, *, decay: float, warmup_steps: int):
        super().__init__(model, decay=decay, foreach=True)
        self.warmup_steps = warmup_steps
        self.updates = 0
        self.module.requires_grad_(False)

    def get_decay(self, step: int | None = None) -> float:
        return ema_decay_at(self.updates if step is None else step, decay=self.decay, warmup_steps=self.warmup_steps)

    @torch.no_grad()
    def step(self, model: torch.nn.Module, accelerator: Accelerator) -> None:
        """One update after an optimizer step; `model` is the unwrapped model. Every process calls it together."""
        self.updates += 1
        self.update(model, step=self.updates)
        if accelerator.num_processes > 1:
            buffers = [b for b in self.module.buffers() if b.is_floating_point()]
            if buffers:   # one broadcast of process 0's averaged buffers (see the module docstring)
                flat = torch.cat([b.flatten() for b in buffers])
                torch.distributed.broadcast(flat, src=0)
                for b, values in zip(buffers, flat.split([b.numel() for b in buffers])):
                    b.copy_(values.view_as(b))

    def save(self, checkpoint) -> None:
        """The average's state dict and step count into checkpoint/EMA_FILE (call on the main process)."""
        tensors = {k: v.detach().contiguous() for k, v in self.module.state_dict().items()}
        save_file(tensors, str(checkpoint / EMA_FILE), metadata={"updates": str(self.updates)})

    def load(self, checkpoint) -> None:
        """Back from checkpoint/EMA_FILE: the same average, the same step count (a resumed run stays bit-exact)."""
        with safe_open(str(checkpoint / EMA_FILE), "pt") as f:   # one read: the tensors and the step count
            updates = int(f.metadata()["updates"])
            state_dict = {name: f.get_tensor(name) for name in f.keys()}
        self.module.load_state_dict(state_dict, strict=True)
        self.updates = updates

    def describe(self) -> dict:
        """metrics.json's run.ema."""
        return {"decay": self.decay, "warmup_steps": self.warmup_steps, "updates": self.updates}
