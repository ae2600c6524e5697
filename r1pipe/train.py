"""The training engine every stage shares: policy, optimizer, schedule, accumulation, checkpoints.

API (what a stage uses; GRPO reuses all of it with its own loss):

    trainer = Trainer(cfg.model, cfg.train, run_dir, seed=cfg.run.seed, tokenizer=tokenizer)
        # loads the policy (r1pipe.model.policy.load_policy: our V3 or an HF causal LM, LoRA
        # optional), builds AdamW + warmup/cosine|linear|constant schedule (transformers'
        # get_scheduler), wraps in DeepSpeed ZeRO-2/3 when `train.deepspeed` is set.
    extra = trainer.resume()            # None, or the `extra` dict given to save(); restores
                                        # model, optimizer, scheduler, RNG and trainer.step
    while trainer.step < trainer.max_steps:
        micro_batches = ...             # this rank's share of one optimizer step
        metrics = trainer.train_step(micro_batches, loss_fn, weights=None)
            # loss_fn(policy, micro_batch) -> (loss tensor, {name: float|tensor}); each micro
            # batch's loss is scaled by its weight (default 1/len) before backward, so the
            # accumulated gradient is the weighted sum; then clip, optimizer step, scheduler step,
            # policy.after_optimizer_step() (V3 expert-bias update). Returns the weighted metrics
            # averaged over ranks, plus grad_norm and lr. trainer.step is incremented.
        trainer.log(metrics)            # metrics.jsonl + TensorBoard (+ W&B), rank 0 only
        if trainer.should_save(): trainer.save({"data": stream.state_dict()})
    path = trainer.save_final(tokenizer)  # <run>/checkpoints/final, HF format (save_pretrained)

Helpers: `lm_loss` (the pretrain/SFT loss_fn), `Trainer.all_reduce_sum` (e.g. token counts across
ranks, so a global token-weighted mean is exact), `trainer.rank/world_size/is_main/device`,
`trainer.autocast()` (bf16 autocast context when `train.precision` is bf16 or fp8, without DeepSpeed),
`trainer.progress(total)` (a tqdm bar on rank 0).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from r1pipe.config import ExistingPath, RecipeError, Section, Workload

# ----------------------------------------------------------------------------------------------
# Recipe sections


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
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}"
            )
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


# ----------------------------------------------------------------------------------------------
# Policy loading


def resolve_model_path(path: str) -> str:
    """A local directory or V3 preset as is; otherwise a hub id, fetched with huggingface_hub."""
    from r1pipe.model.config import preset_names

    if Path(path).is_dir() or path in preset_names():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(
            f"model.path: {path!r} is not a local model directory, a preset, or a downloadable hub id ({first})"
        ) from None


def load_base_policy(model: ModelSection, device: torch.device | str = "cpu", tokenizer=None):
    """The policy `model.path` names (a directory, a hub id or a V3 preset), without training wrappers.

    A V3 preset starts from fresh weights drawn from the current torch seed; its vocabulary and
    special-token ids follow `tokenizer`.
    """
    from r1pipe.model.config import ConfigError, preset_names
    from r1pipe.model.policy import PolicyError, load_policy

    dtype = getattr(torch, model.dtype)
    path = resolve_model_path(model.path)
    overrides = {}
    if path in preset_names() and tokenizer is not None:
        overrides = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                     "eos_token_id": tokenizer.eos_token_id}
        if tokenizer.bos_token_id is not None:
            overrides["bos_token_id"] = tokenizer.bos_token_id
    try:
        policy = load_policy(path, dtype=dtype, device=device, **overrides)
    except (PolicyError, ConfigError) as err:
        raise RecipeError(f"model.path: {err}") from None
    return policy


def load_trainable_policy(model: ModelSection, device: torch.device | str = "cpu", tokenizer=None,
                          fp8: bool = False):
    """Load the policy (our V3 or an HF causal LM) ready for training: FP8 linears, LoRA and
    checkpointing applied.

    `fp8` swaps the dense Linear layers for FP8Linear (`fp8_skip`) before LoRA wraps them, so the
    adapters themselves stay in high precision.
    """
    policy = load_base_policy(model, device, tokenizer)
    if hasattr(policy.module, "config"):
        # Training never uses a KV cache, and with one transformers ignores packed position ids.
        policy.module.config.use_cache = False
    if model.gradient_checkpointing:
        enable = getattr(policy.module, "gradient_checkpointing_enable", None)
        if enable is None:
            raise RecipeError(f"model.gradient_checkpointing: {type(policy.module).__name__} does not support it")
        enable()
    if fp8:
        from r1pipe.kernels import convert_to_fp8_linear

        if not convert_to_fp8_linear(policy.module, fp8_skip(model, policy, device)):
            raise RecipeError(f"train.precision: fp8 found no Linear layer to run in FP8 in {model.path!r}")
    if model.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=model.lora.r,
            lora_alpha=model.lora.alpha,
            lora_dropout=model.lora.dropout,
            target_modules=model.lora.target_modules,
            task_type=None if policy.is_deepseek else "CAUSAL_LM",  # ours has no HF generation hooks
        )
        policy.module = get_peft_model(policy.module, lora)
    return policy


def compiles_moe(model: ModelSection, policy, device: torch.device | str, zero3: bool = False) -> bool:
    """Whether the trainer torch.compiles the policy's MoE layers (`model.compile_moe`)."""
    return model.compile_moe and torch.device(device).type == "cuda" and policy.is_deepseek and not zero3


def fp8_skip(model: ModelSection, policy, device: torch.device | str) -> tuple[str, ...]:
    """Module-name patterns kept out of FP8: V3's high-precision modules, and the shared experts
    of MoE layers that get compiled (FP8Linear, with its Triton launches and per-shape backend
    timing, is not verified under torch.compile)."""
    from r1pipe.kernels import DEFAULT_SKIP

    return DEFAULT_SKIP + (("*.mlp.shared_experts.*",) if compiles_moe(model, policy, device) else ())


def check_fp8_device(device: torch.device) -> None:
    """FP8 GEMMs need FP8 tensor cores; elsewhere r1pipe.kernels only has its slow reference path."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise RecipeError(
            f"train.precision: fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+), "
            f"this run is on {where}; use bf16"
        )


def load_tokenizer(model: ModelSection):
    """The tokenizer named by `model.tokenizer`, else the one stored with the model."""
    from transformers import AutoTokenizer

    source = model.tokenizer or model.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        key = "model.tokenizer" if model.tokenizer else "model.path"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(f"{key}: no tokenizer at {source!r} (set model.tokenizer): {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule


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


# ----------------------------------------------------------------------------------------------
# The loss for next-token training


def lm_loss(policy, batch: dict) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy on `labels` (-100 = no loss) plus the V3 aux losses, as the policy defines."""
    out = policy.train_loss(batch)
    loss, metrics = out if isinstance(out, tuple) else (out, {})
    return loss, {"loss": loss.detach(), **metrics}


# ----------------------------------------------------------------------------------------------
# The trainer


LossFn = Callable[[Any, dict], tuple[torch.Tensor, dict]]


class Trainer:
    """One policy + optimizer + schedule, single process or DeepSpeed; see the module docstring."""

    def __init__(self, model: ModelSection, train: TrainSection, run_dir, seed: int = 0, tokenizer=None):
        self.model_cfg, self.train_cfg, self.run_dir = model, train, run_dir
        self.seed, self.tokenizer = seed, tokenizer
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.is_main = self.rank == 0
        self.step = 0
        self.max_steps = train.max_steps
        self.device = self._pick_device(train.device)
        per_step = train.micro_batch_size * self.world_size
        if train.batch_size % per_step:
            raise RecipeError(
                f"train.batch_size: {train.batch_size} is not a multiple of micro_batch_size x ranks = {per_step}"
            )
        self.accumulation = train.batch_size // per_step
        if self.world_size > 1 and train.deepspeed is None:
            raise RecipeError("train.deepspeed: a multi-process launch needs a deepspeed section (zero_stage: 2|3)")
        if train.precision == "fp8":
            if train.deepspeed is not None:
                raise RecipeError("train.precision: fp8 runs in one process (not verified under DeepSpeed); "
                                  "use bf16 with train.deepspeed")
            check_fp8_device(self.device)
        if train.deepspeed is not None:
            self._require_deepspeed()
        torch.manual_seed(seed)
        self.policy = load_trainable_policy(model, self.device, tokenizer, fp8=train.precision == "fp8")
        zero3 = train.deepspeed is not None and train.deepspeed.zero_stage == 3
        if compiles_moe(model, self.policy, self.device, zero3):
            self.policy.model.compile_moe()  # ZeRO-3's parameter hooks and compiled graphs do not mix
        self.optimizer = build_optimizer(self.policy.module, train)
        self.scheduler = build_scheduler(self.optimizer, train)
        self.engine = self._init_deepspeed() if train.deepspeed is not None else None
        self._last_step_time = time.perf_counter()

    # -- setup ----------------------------------------------------------------------------------

    def _pick_device(self, choice: str) -> torch.device:
        if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise RecipeError("train.device: cuda requested but no CUDA device is visible")
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    @staticmethod
    def _require_deepspeed() -> None:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise RecipeError("train.deepspeed: DeepSpeed is not installed (pip install deepspeed)") from None

    def _init_deepspeed(self):
        import deepspeed

        deepspeed.init_distributed()
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=self.policy.module,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            config=deepspeed_config(self.train_cfg, self.world_size),
        )
        self.optimizer, self.scheduler = optimizer, scheduler
        self.policy.module = engine  # forwards go through the engine; Policy.model unwraps it
        return engine

    @property
    def zero3(self) -> bool:
        return self.engine is not None and self.train_cfg.deepspeed.zero_stage == 3

    def load_reference(self):
        """A frozen copy of the initial policy (GRPO's KL reference), loaded as the policy was: the same
        path resolution and, for a preset, the same initial weights (drawn from the run seed in a forked
        RNG). Under DeepSpeed it runs in an inference engine, as TRL's reference does: ZeRO-3 shards it
        over the ranks like the policy; under ZeRO-2 it is whole on each rank in the policy's dtype."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            reference = load_base_policy(self.model_cfg, self.device, self.tokenizer)
        reference.module.eval().requires_grad_(False)
        if self.engine is not None:
            import deepspeed

            config = deepspeed_config(self.train_cfg, self.world_size)  # the recipe's, user overrides included
            config["zero_optimization"]["stage"] = 3 if self.zero3 else 0
            config["zero_optimization"].pop("offload_optimizer", None)  # no optimizer
            reference.module = deepspeed.initialize(model=reference.module, config=config)[0]
        return reference

    # -- one optimizer step ---------------------------------------------------------------------

    def autocast(self):
        """bf16 autocast for single-process bf16 and fp8 runs (DeepSpeed casts the model itself)."""
        if self.train_cfg.precision in ("bf16", "fp8") and self.engine is None:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(
        self, micro_batches: Sequence[dict], loss_fn: LossFn = lm_loss, weights: Sequence[float] | None = None
    ) -> dict:
        """Forward/backward each micro batch with its weight, then one optimizer step; returns metrics."""
        if not micro_batches:
            raise ValueError("train_step needs at least one micro batch")
        weights = list(weights) if weights is not None else [1.0 / len(micro_batches)] * len(micro_batches)
        self.policy.module.train()
        sums: dict[str, float] = {}
        for index, (batch, weight) in enumerate(zip(micro_batches, weights, strict=True)):
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if self.engine is not None:  # DeepSpeed reduces gradients and steps at the last micro batch
                self.engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
            with self.autocast():
                loss, metrics = loss_fn(self.policy, batch)
            if self.engine is not None:
                self.engine.backward(loss * weight, scale_wrt_gas=False)
            else:
                (loss * weight).backward()
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + weight * float(value)
        grad_norm = self._optimizer_step()
        self.step += 1
        after = self.policy.after_optimizer_step()
        out = {name: self.all_reduce_mean(value) for name, value in sums.items()}
        if isinstance(after, dict):
            out.update({name: float(value) for name, value in after.items()})
        now = time.perf_counter()
        out.update(grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0], step_time_s=now - self._last_step_time)
        self._last_step_time = now
        return out

    def _optimizer_step(self) -> float:
        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        params = [p for p in self.policy.module.parameters() if p.requires_grad]
        max_norm = self.train_cfg.max_grad_norm if self.train_cfg.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # -- distributed helpers --------------------------------------------------------------------

    def _all_reduce(self, value: float, op) -> float:
        if self.world_size == 1:
            return float(value)
        tensor = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op=op)
        return float(tensor)

    def all_reduce_sum(self, value: float) -> float:
        """Sum a number over ranks (identity in a single process)."""
        return self._all_reduce(value, torch.distributed.ReduceOp.SUM)

    def all_reduce_mean(self, value: float) -> float:
        return self.all_reduce_sum(value) / self.world_size

    def all_reduce_max(self, value: float) -> float:
        """Largest value over ranks (identity in a single process)."""
        return self._all_reduce(value, torch.distributed.ReduceOp.MAX)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's equally shaped `tensor`, concatenated along dim 0 in rank order (CPU result)."""
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor, device=self.device) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor.to(self.device))
        return torch.cat(parts).cpu()

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    # -- logging --------------------------------------------------------------------------------

    def log(self, metrics: dict, force: bool = False) -> None:
        """Write metrics for the current step (every `log_every` steps, rank 0 only)."""
        if self.is_main and (force or self.step % self.train_cfg.log_every == 0 or self.step == self.max_steps):
            self.run_dir.log_metrics(self.step, metrics)

    def progress(self, desc: str = "train"):
        """A progress bar over optimizer steps, starting at the resumed step (silent on other ranks)."""
        return tqdm(total=self.max_steps, initial=self.step, desc=desc, disable=not self.is_main, dynamic_ncols=True)

    # -- checkpoints ----------------------------------------------------------------------------

    def should_save(self) -> bool:
        every = self.train_cfg.save_every
        return every > 0 and self.step % every == 0 and self.step < self.max_steps

    def save(self, extra: dict | None = None, rank_state: Any = None) -> Path:
        """Checkpoint model, optimizer, scheduler, RNG, step and `extra` (e.g. the data position; rank 0's).

        `rank_state` is what differs between ranks (e.g. each rank's share of a GRPO rollout batch): every
        rank writes its own, and `resume` gives each rank back its own under extra["rank_state"].
        """
        from r1pipe.rundir import capture_rng_state

        state = {"step": self.step, "extra": extra or {}}

        def write(directory: Path) -> None:
            if self.engine is not None:
                self.engine.save_checkpoint(str(directory), tag="deepspeed")
            else:
                state["model"] = self.policy.module.state_dict()
                state["optimizer"] = self.optimizer.state_dict()
                state["scheduler"] = self.scheduler.state_dict()
            torch.save(capture_rng_state(), directory / f"rng_rank{self.rank}.pt")
            if rank_state is not None:
                torch.save(rank_state, directory / f"state_rank{self.rank}.pt")
            if self.is_main:
                torch.save(state, directory / "trainer_state.pt")

        return self._write_checkpoint(write)

    def _write_checkpoint(self, write: Callable[[Path], None]) -> Path:
        if self.world_size == 1:
            return self.run_dir.save_checkpoint(self.step, write, keep_last=self.train_cfg.keep_last)
        # Several ranks write into one directory: rank 0 owns the atomic rename, the others write
        # into the staging directory it announces, between two barriers.
        staging = [None]
        if self.is_main:
            def write_all(directory: Path) -> None:
                staging[0] = str(directory)
                torch.distributed.broadcast_object_list(staging, src=0)
                write(directory)
                torch.distributed.barrier()

            path = self.run_dir.save_checkpoint(self.step, write_all, keep_last=self.train_cfg.keep_last)
        else:
            torch.distributed.broadcast_object_list(staging, src=0)
            write(Path(staging[0]))
            torch.distributed.barrier()
            path = None
        shared = [str(path) if path else None]
        torch.distributed.broadcast_object_list(shared, src=0)
        return Path(shared[0])

    def resume(self) -> dict | None:
        """Load the newest complete checkpoint of the run, if any; returns the `extra` given to save()."""
        from r1pipe.rundir import restore_rng_state

        directory = self.run_dir.latest_checkpoint()
        if directory is None:
            return None
        state = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=False)
        if self.engine is not None:
            self.engine.load_checkpoint(str(directory), tag="deepspeed")
        else:
            self.policy.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        rng_file = directory / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            restore_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        rank_file = directory / f"state_rank{self.rank}.pt"
        if rank_file.exists():
            state["extra"]["rank_state"] = torch.load(rank_file, map_location="cpu", weights_only=False)
        self.step = state["step"]
        if self.is_main:
            self.run_dir.logger.info("resumed from %s at step %d", directory, self.step)
        return state["extra"]

    def save_final(self, tokenizer=None, name: str = "final") -> Path:
        """Write the trained policy in its loadable format (save_pretrained) to checkpoints/<name>.

        LoRA adapters are merged into the weights; under ZeRO-3 the shards are gathered first.
        """
        from r1pipe.model.policy import Policy

        directory = Path(self.run_dir.path) / "checkpoints" / name
        module = self.engine.module if self.engine is not None else self.policy.module
        gather = contextlib.nullcontext()
        if self.zero3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        with gather:
            if self.is_main:
                directory.mkdir(parents=True, exist_ok=True)
                final = module.merge_and_unload() if self.model_cfg.lora is not None else module
                if self.model_cfg.lora is not None and self.train_cfg.precision == "fp8":
                    from r1pipe.kernels import refresh_fp8_weights

                    refresh_fp8_weights(final)  # the merge wrote the weights through .data
                Policy(final).save_pretrained(directory)
                if tokenizer is not None:
                    tokenizer.save_pretrained(directory)
        self.barrier()
        return directory


# ----------------------------------------------------------------------------------------------
# The next-token training loop of the pretrain and sft stages


def evaluate_loss(trainer: Trainer, rows: list[dict], pad_id: int) -> float:
    """Token-weighted mean loss over held-out rows (this rank's share, averaged over ranks)."""
    from r1pipe.data import collate

    trainer.policy.module.eval()
    micro = trainer.train_cfg.micro_batch_size
    total, tokens = 0.0, 0
    with torch.no_grad(), trainer.autocast():
        for start in range(trainer.rank * micro, len(rows), micro * trainer.world_size):
            batch = collate(rows[start : start + micro], pad_id)
            batch = {k: v.to(trainer.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss, _ = lm_loss(trainer.policy, batch)
            total += float(loss) * batch["num_loss_tokens"]
            tokens += batch["num_loss_tokens"]
    return trainer.all_reduce_sum(total) / max(trainer.all_reduce_sum(tokens), 1)


def train_lm(cfg, run_dir, build_rows: Callable) -> dict:
    """Pretrain/SFT: rows from `build_rows(data, tokenizer, seed)`, token-weighted loss, resume, final save.

    Each micro batch's loss (a mean over its label tokens) is weighted by its share of the step's
    label tokens over all ranks, so the step's gradient is that of the mean over all its tokens,
    whatever the micro batch size and number of ranks.
    """
    from r1pipe.data import BatchStream, split_eval

    tokenizer = load_tokenizer(cfg.model)
    rows, stats = build_rows(cfg.data, tokenizer, cfg.run.seed)
    rows, eval_rows = split_eval(rows, cfg.data.eval_rows) if cfg.data.eval_rows else (rows, [])
    trainer = Trainer(cfg.model, cfg.train, run_dir, seed=cfg.run.seed, tokenizer=tokenizer)
    stream = BatchStream(rows, cfg.train.batch_size, cfg.run.seed, trainer.rank, trainer.world_size,
                         tokenizer.pad_token_id, cfg.data.shuffle)
    if trainer.is_main:
        run_dir.logger.info("data: %s", ", ".join(f"{k.removeprefix('data/')}={v:.4g}" for k, v in stats.items()))
    extra = trainer.resume()
    if extra is not None:
        stream.load_state_dict(extra["data"])
        if trainer.is_main:
            run_dir.truncate_metrics_after(trainer.step)
    elif trainer.is_main:
        run_dir.log_metrics(0, stats)
    with trainer.progress(cfg.stage) as bar:
        while trainer.step < trainer.max_steps:
            micro_batches = stream.next_step(cfg.train.micro_batch_size)
            tokens = trainer.all_reduce_sum(sum(b["num_loss_tokens"] for b in micro_batches))
            weights = [b["num_loss_tokens"] / max(tokens, 1) * trainer.world_size for b in micro_batches]
            metrics = trainer.train_step(micro_batches, lm_loss, weights)
            metrics["tokens_per_s"] = tokens / metrics["step_time_s"]
            metrics["epoch"] = stream.epoch
            every = cfg.train.eval_every
            if eval_rows and ((every and trainer.step % every == 0) or trainer.step == trainer.max_steps):
                metrics["eval_loss"] = evaluate_loss(trainer, eval_rows, tokenizer.pad_token_id)
            trainer.log(metrics, force="eval_loss" in metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            bar.update(1)
            if trainer.should_save():
                trainer.save({"data": stream.state_dict()})
    checkpoint = trainer.save_final(tokenizer)
    if trainer.is_main:
        run_dir.plot(["loss", "eval_loss", "grad_norm", "lr", "tokens_per_s"], "training.png")
    return {"checkpoint": checkpoint}
