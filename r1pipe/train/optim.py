"""Optimisation of a TrainSection: AdamW (decay on matrices only), the warmup + decay schedule, and the
DeepSpeed ZeRO config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from r1pipe.config import RecipeError
from r1pipe.train.sections import TrainSection


def build_optimizer(module: torch.nn.Module, train: TrainSection) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; matrices decay, vectors (biases, norms) do not.

    With ZeRO optimizer offload the states live in CPU memory, where DeepSpeed's vectorised
    DeepSpeedCPUAdam (AdamW mode) does the update.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if train.deepspeed is not None and train.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=train.lr, betas=train.adam_betas, eps=train.adam_eps, adamw_mode=True)
    # The fused kernel updates each parameter in one pass, without the foreach path's temporary copies
    # of every state (about the size of the parameters), on CPU as on CUDA.
    fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.adam_betas, eps=train.adam_eps, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection):
    """Linear warmup then cosine/linear/constant, via transformers' get_scheduler."""
    from transformers import get_scheduler

    name, kwargs = train.scheduler, None
    if name == "constant":
        name = "constant_with_warmup"
    elif name == "cosine" and train.min_lr_ratio > 0:
        name, kwargs = "cosine_with_min_lr", {"min_lr_rate": train.min_lr_ratio}
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=train.warmup_steps,
        num_training_steps=train.max_steps,
        scheduler_specific_kwargs=kwargs,
    )


def deepspeed_config(train: TrainSection, world_size: int) -> dict:
    """The DeepSpeed JSON for a TrainSection; `train.deepspeed.config` overrides its keys."""
    ds = train.deepspeed
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.batch_size // (train.micro_batch_size * world_size),
        "gradient_clipping": train.max_grad_norm,
        "bf16": {"enabled": train.precision == "bf16"},
        "zero_optimization": {
            "stage": ds.zero_stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e7,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.config is not None:
        try:
            user = json.loads(Path(ds.config).read_text())
        except json.JSONDecodeError as err:
            raise RecipeError(f"train.deepspeed.config: {ds.config}: invalid JSON: {err}") from None
        config = _merge(config, user)
    return config


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
