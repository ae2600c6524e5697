"""The policy a training run starts from: a local directory, a hub id (downloaded) or a V3 preset, loaded
through r1pipe.model.policy, then made trainable: FP8 linears, LoRA adapters, gradient checkpointing."""

from __future__ import annotations

from pathlib import Path

import torch

from r1pipe.config import RecipeError
from r1pipe.train.sections import ModelSection


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
