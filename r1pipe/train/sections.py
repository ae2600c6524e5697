"""The recipe sections of every training stage: the policy (`model`, with LoRA) and its optimisation (`train`,
with DeepSpeed ZeRO)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from r1pipe.config import ExistingPath, Section, Workload, split_evenly


class LoraSection(Section):
    """LoRA adapters through PEFT; only the adapters train."""

    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear'."
    )


class ModelSection(Section):
    """Which policy to train and how to load it."""

    path: str = Field(
        description="HF model directory, r1pipe checkpoint directory, or a V3 preset name (e.g. nano-v3) "
        "for a freshly initialised model."
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer directory; default: the model path (required for presets)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the weights are loaded in (keep float32 for mixed-precision training)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    lora: LoraSection | None = Field(None, description="Train LoRA adapters instead of all weights.")
    compile_moe: bool = Field(
        True, description="V3 policies on CUDA: torch.compile each MoE layer (1.52x transformers' MoE on an "
        "H100 vs 1.27x eager, docs/PERFORMANCE.md). Not applied on CPU or under ZeRO-3."
    )


class DeepSpeedSection(Section):
    """DeepSpeed ZeRO for multi-GPU runs (launch with `deepspeed` or `torchrun`)."""

    zero_stage: Literal[2, 3] = Field(2, description="ZeRO stage: 2 shards optimizer+gradients, 3 also weights.")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory.")
    config: ExistingPath | None = Field(
        None, description="DeepSpeed JSON merged over the generated config (its keys win)."
    )


class TrainSection(Section):
    """Optimisation: steps, batch, learning-rate schedule, precision, checkpoints."""

    max_steps: int = Field(description="Optimizer steps to run.", gt=0)
    batch_size: int = Field(
        8, gt=0, description="Sequences (packed rows) per optimizer step, over all ranks."
    )
    micro_batch_size: int = Field(
        8, gt=0, description="Sequences per forward/backward on one rank; accumulation = batch/(micro*ranks)."
    )
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup (transformers' get_scheduler)."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the global gradient norm (0 = no clipping).")
    precision: Literal["fp32", "bf16", "fp8"] = Field(
        "fp32", description="bf16: autocast (single process) or DeepSpeed bf16 with fp32 master weights. "
        "fp8: bf16 autocast with the dense Linear layers' three GEMMs in FP8 (DeepSeek-V3 block scaling, "
        "r1pipe.kernels.FP8Linear; embeddings, output head, MoE router and MTP eh_proj stay bf16); one "
        "process on a CUDA GPU with FP8 tensor cores (compute capability 8.9+: L4, L40, H100, H200)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    log_every: int = Field(1, gt=0, description="Write metrics every N steps.")
    eval_every: int = Field(0, ge=0, description="Validation loss on data.eval_rows every N steps (0 = at the end).")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept (older ones are deleted).")
    deepspeed: DeepSpeedSection | None = Field(None, description="Use DeepSpeed ZeRO (multi-GPU).")

    @model_validator(mode="after")
    def _micro_divides_batch(self):
        split_evenly(self.batch_size, self.micro_batch_size,
                     f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}",
                     ValueError)
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds max_steps {self.max_steps}")
        return self


def training_workload(model: ModelSection, train: TrainSection, sequence_length: int | None) -> Workload:
    """What a run that trains `model` under `train` loads and processes (for `r1pipe plan`); one optimizer
    step takes `train.batch_size` sequences of up to `sequence_length` tokens."""
    return Workload(
        model_path=model.path, model_dtype=model.dtype, lora=model.lora is not None, precision=train.precision,
        zero_stage=train.deepspeed.zero_stage if train.deepspeed is not None else 0,
        gradient_checkpointing=model.gradient_checkpointing, micro_batch_size=train.micro_batch_size,
        sequence_length=sequence_length, sequences_per_step=train.batch_size,
    )
