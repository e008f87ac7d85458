"""How a training step is taken: backward and optimizer step through plain autograd, fp16's gradient
scaler, or DeepSpeed's engine; the optimizer, the lr schedule and their state for checkpoints.

The stages only call `backward(loss)` for each micro batch and `step()` once per optimizer step.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig

from rlhf_exp import distributed
from rlhf_exp.errors import ConfigError, NonFiniteError
from rlhf_exp.optim import build_optimizer, build_scheduler

# stage.on_nonfinite: a NaN / inf gradient norm stops the run before the update (stop) or drops that update
# and goes on (skip_step; the schedule still advances). fp16's scaler skips overflowing steps by itself.
NONFINITE_POLICIES = ("stop", "skip_step")
DEEPSPEED_STATE = "deepspeed"  # parallel=deepspeed_*: DeepSpeed's partitioned optimizer checkpoint in a checkpoint


class Engine:
    def __init__(self, model: torch.nn.Module, stage: DictConfig, hardware: DictConfig, parallel: DictConfig,
                 precision: str, device: torch.device, total_steps: int):
        self.model, self.max_grad_norm = model, stage.max_grad_norm
        self.on_nonfinite = stage.get("on_nonfinite") or "stop"
        self.optimizer = build_optimizer(model, stage, hardware.optimizer,
                                         shard_states=bool((parallel or {}).get("shard_optimizer")))
        self.scheduler = build_scheduler(self.optimizer, stage, total_steps)
        self.deepspeed = None
        if distributed.world_size() > 1 and distributed.deepspeed_stage(parallel):
            if precision == "fp16":
                raise ConfigError("hardware.precision", "fp16 under DeepSpeed needs DeepSpeed's own fp16 block; "
                                  "use hardware.precision=bf16 or fp32")
            self.deepspeed = distributed.deepspeed_engine(model, self.optimizer, parallel, stage.max_grad_norm)
        # fp16's narrow range underflows small gradients: scale the loss up, unscale before clipping
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" and self.deepspeed is None else None

    def backward(self, loss: torch.Tensor) -> None:
        if self.deepspeed is not None:
            distributed.deepspeed_backward(self.deepspeed, loss)  # reduces partitioned gradients
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self) -> dict[str, float]:
        """Clip, step, advance the schedule, zero the gradients: every stage's update ends here."""
        lr = self.scheduler.get_last_lr()[0]
        if self.deepspeed is not None:  # DeepSpeed clips, steps its partitioned optimizer and zeroes
            self.deepspeed.step()  # its norm is known only after its step: a non-finite one stops the run here
            self._advance_schedule()
            grad_norm = float(self.deepspeed.get_global_grad_norm())
            if not math.isfinite(grad_norm):
                raise NonFiniteError("train/grad_norm", grad_norm, applied=True)
            return {"train/grad_norm": grad_norm, "train/lr": lr}
        distributed.sum_gradients(self.model)  # torchrun: the global batch's gradient on every rank
        metrics = {"train/lr": lr}
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            metrics["train/grad_scale"] = float(self.scaler.get_scale())
        grad_norm = float(distributed.clip_grad_norm(self.model.parameters(), self.max_grad_norm or float("inf")))
        if self.scaler is None and not math.isfinite(grad_norm):  # every rank sees the same summed norm
            self.optimizer.zero_grad(set_to_none=True)
            if self.on_nonfinite == "stop":
                raise NonFiniteError("train/grad_norm", grad_norm)
            self._advance_schedule()
            return {"train/grad_norm": grad_norm, "train/skipped_steps": 1.0, **metrics}
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when the gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self._advance_schedule()
        self.optimizer.zero_grad(set_to_none=True)
        return {"train/grad_norm": grad_norm, **metrics}

    def _advance_schedule(self) -> None:
        """One step of the schedule per optimizer step taken or skipped (a non-finite or fp16-overflow step), so the
        learning rate stays with the step counter, as in HF's Trainer. torch warns when the first of them was a
        skipped one, which is meant here."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
            self.scheduler.step()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Scheduler and scaler state, and the optimizer's whole state (gathered to rank 0 when sharded;
        under DeepSpeed its partitions are written by `save_partitions`)."""
        state = {"scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        state["optimizer"] = {} if self.deepspeed is not None else distributed.full_optimizer_state(
            self.model, self.optimizer)
        return state

    def save_partitions(self, folder: Path) -> None:
        """DeepSpeed's partitioned optimizer state, one file per rank (collective)."""
        if self.deepspeed is not None:
            distributed.barrier()  # the folder exists; every rank writes its partition into it
            self.deepspeed.save_checkpoint(str(folder / DEEPSPEED_STATE), tag="state")
            distributed.barrier()

    def model_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state gathered to rank 0 when its weights are sharded, else None (collective)."""
        if self.deepspeed is not None:
            return distributed.deepspeed_model_state(self.deepspeed)
        return distributed.full_model_state(self.model)

    def load_state_dict(self, state: dict, folder: Path, parallel_name: str) -> None:
        made_by_deepspeed = (folder / DEEPSPEED_STATE).is_dir()
        if (self.deepspeed is not None) != made_by_deepspeed:
            made = "a deepspeed_* parallel mode" if made_by_deepspeed else "a parallel mode other than DeepSpeed's"
            raise ConfigError("parallel", f"{folder}'s optimizer state was saved under {made} and does not load "
                              f"under parallel={parallel_name} here: resume under the mode that made it")
        if self.deepspeed is not None:  # the weights came with the model
            self.deepspeed.load_checkpoint(str(folder / DEEPSPEED_STATE), tag="state", load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
        else:
            distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def close(self) -> None:
        if self.deepspeed is not None:
            self.deepspeed.destroy()  # its hooks and communication buffers
        self.model = self.optimizer = self.scheduler = self.deepspeed = self.scaler = None
