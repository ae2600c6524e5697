"""`r1pipe plan`: what a recipe builds and needs, without running it.

Parameters are counted by instantiating the model on the meta device (no memory, no weights), so
the numbers are the real module's, not a formula's. Memory per device is an estimate: weights,
gradients and AdamW states under the recipe's precision and ZeRO stage, plus activations
(Korthikanti et al. 2022, "Reducing Activation Recomputation": about s*b*h*(34 + 5*a*s/h) bytes per
layer in 16-bit, 2*s*b*h with full recomputation) and the logits of one micro batch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r1pipe.config import RecipeError, load_recipe

KNOWN_CONFIGS = Path(__file__).parent / "hub_configs"
"""config.json of the dense hub models our recipes name, so `plan` works offline."""

HUB_PRESETS = {
    "deepseek-ai/DeepSeek-V3": "deepseek-v3-671b",
    "deepseek-ai/DeepSeek-V3-Base": "deepseek-v3-671b",
    "deepseek-ai/DeepSeek-R1": "deepseek-v3-671b",
    "deepseek-ai/DeepSeek-V2": "deepseek-v2-236b",
    "deepseek-ai/DeepSeek-V2-Lite": "deepseek-v2-lite-16b",
    "deepseek-ai/DeepSeek-V2-Lite-Chat": "deepseek-v2-lite-16b",
}
"""Hub ids of the DeepSeek checkpoints whose architecture our shipped presets describe."""

_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2}


@dataclass
class ModelPlan:
    kind: str
    total: int
    activated: int
    mtp: int = 0
    trainable: int = 0
    hidden: int = 0
    layers: int = 0
    heads: int = 0
    vocab: int = 0
    fp8_linear: int = 0  # weights that train.precision fp8 would run through FP8Linear
    notes: list[str] = field(default_factory=list)


def _hub_config(path: str) -> dict | None:
    local = Path(path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    bundled = KNOWN_CONFIGS / (path.replace("/", "--") + ".json")
    if bundled.is_file():
        return json.loads(bundled.read_text())
    return None


def model_config_dict(path: str) -> dict:
    """config.json contents for a local directory, a V3 preset, or a known hub id."""
    found = _hub_config(path)
    if found is not None:
        return found
    from r1pipe.model.config import PRESET_DIR, DeepseekConfig

    preset = HUB_PRESETS.get(path, path)
    if (PRESET_DIR / f"{preset}.json").is_file():
        return DeepseekConfig.preset(preset).to_hf_dict()
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path).to_dict()
    except Exception as err:
        raise RecipeError(
            f"model.path: cannot find a config for {path!r} (not a directory with config.json, a preset, "
            f"or a reachable hub id: {type(err).__name__})"
        ) from None


def plan_model(path: str, lora: bool = False) -> ModelPlan:
    """Count parameters of the model a recipe names, on the meta device."""
    hf = model_config_dict(path)
    if hf.get("model_type") in ("deepseek_v2", "deepseek_v3"):
        from r1pipe.model import DeepseekForCausalLM
        from r1pipe.model.config import DeepseekConfig

        config = DeepseekConfig.from_hf_dict(hf)
        with torch.device("meta"):
            module = DeepseekForCausalLM(config)
        names = [(n, p.numel()) for n, p in module.named_parameters()]
        mtp = sum(n for name, n in names if _is_mtp(name, config.num_hidden_layers))
        routed = sum(n for name, n in names if _is_routed_expert(name) and not _is_mtp(name, config.num_hidden_layers))
        total = sum(n for _, n in names) - mtp
        share = config.num_experts_per_tok / config.n_routed_experts if config.n_routed_experts else 1.0
        plan = ModelPlan(
            kind=f"{config.model_type} (ours)",
            total=total,
            activated=int(total - routed * (1 - share)),
            mtp=mtp,
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            vocab=config.vocab_size,
        )
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**hf) if "model_type" in hf else None
        if config is None:
            raise RecipeError(f"model.path: {path!r}: config.json has no model_type")
        with torch.device("meta"):
            module = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in module.parameters())  # a tied matrix counts once
        plan = ModelPlan(
            kind=config.model_type,
            total=total,
            activated=total,
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            vocab=config.vocab_size,
        )
    plan.trainable = plan.total + plan.mtp
    plan.fp8_linear = _fp8_linear_params(module)
    if lora:
        plan.notes.append("LoRA: only adapters train (optimizer memory ~0)")
        plan.trainable = 0
    return plan


def _is_mtp(name: str, num_layers: int) -> bool:
    return name.startswith("mtp") or re.search(rf"(^|\.)layers\.({num_layers}|{num_layers + 1}|{num_layers + 2})\.", name) is not None


def _is_routed_expert(name: str) -> bool:
    return ".experts" in name and "shared_experts" not in name


def _gb(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _count(n: int) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e8 else f"{n / 1e6:,.2f}M"


def _fp8_linear_params(module: torch.nn.Module) -> int:
    from r1pipe.kernels.linear import fp8_linear_targets

    return sum(m.weight.numel() for _, m in fp8_linear_targets(module))


def memory_per_device(plan: ModelPlan, cfg, gpus: int) -> dict[str, float]:
    """Bytes per device for weights, gradients, optimizer states and activations."""
    train = getattr(cfg, "train", None)
    model = getattr(cfg, "model", None)
    precision = getattr(train, "precision", "fp32")
    weight_dtype = "bf16" if precision == "bf16" else getattr(model, "dtype", "float32")
    wbytes = _BYTES.get(weight_dtype, 4)
    zero = getattr(getattr(train, "deepspeed", None), "zero_stage", 0) or 0
    params = plan.total + plan.mtp
    trainable = plan.trainable
    shard = max(gpus, 1)
    weights = params * wbytes / (shard if zero >= 3 else 1)
    grads = trainable * wbytes / (shard if zero >= 2 else 1)
    master = trainable * 4 if wbytes == 2 else 0
    optim = (trainable * 8 + master) / (shard if zero >= 1 else 1)
    out = {"weights": weights, "gradients": grads, "optimizer (AdamW)": optim}
    if precision == "fp8":
        out["FP8 weight copies (W and W^T, 1 byte each)"] = 2 * plan.fp8_linear
    tokens = micro_batch_tokens(cfg)
    if tokens and plan.hidden:
        seq = max_sequence_length(cfg) or 1
        per_layer = tokens * plan.hidden * (34 + 5 * plan.heads * seq / plan.hidden)
        if getattr(model, "gradient_checkpointing", False):
            per_layer = 2 * tokens * plan.hidden
        out["activations (est.)"] = per_layer * plan.layers * (wbytes / 2)
        out["logits (one chunk, fp32)"] = min(tokens, 1024) * plan.vocab * 4
    grpo = getattr(cfg, "grpo", None)
    if grpo is not None and getattr(grpo, "beta", 0):
        out["reference model"] = params * wbytes / (shard if zero >= 3 else 1)
    return out


def micro_batch_tokens(cfg) -> int | None:
    train = getattr(cfg, "train", None)
    seq = max_sequence_length(cfg)
    micro = getattr(train, "micro_batch_size", None)
    return micro * seq if micro and seq else None


def max_sequence_length(cfg) -> int | None:
    for section in ("data", "grpo", "rollout", "train"):
        node = getattr(cfg, section, None)
        length = getattr(node, "max_length", None) or getattr(node, "max_seq_length", None)
        if length:
            return int(length)
        prompt = getattr(node, "max_prompt_length", None)
        completion = getattr(node, "max_completion_length", None) or getattr(node, "max_new_tokens", None)
        if prompt and completion:
            return int(prompt) + int(completion)
    return None


def tokens_per_step(cfg) -> int | None:
    train = getattr(cfg, "train", None)
    seq = max_sequence_length(cfg)
    grpo = getattr(cfg, "grpo", None)
    if grpo is not None:
        prompts = getattr(grpo, "prompts_per_step", None) or getattr(grpo, "batch_prompts", None)
        group = getattr(grpo, "num_generations", None) or getattr(grpo, "group_size", None)
        if prompts and group and seq:
            return int(prompts) * int(group) * seq
    batch = getattr(train, "batch_size", None)
    return int(batch) * seq if batch and seq else None


def print_plan(recipe: str, overrides=(), gpus: int | None = None) -> list[dict]:
    """Print the plan of a stage recipe, or of each step of a pipeline; returns the rows."""
    from rich.console import Console
    from rich.table import Table

    from r1pipe.pipeline import is_pipeline, load_pipeline

    if is_pipeline(recipe):
        _, planned = load_pipeline(recipe, overrides)
        configs = [(p.step.name, _config_for_plan(p)) for p in planned]
    else:
        configs = [(Path(recipe).stem, load_recipe(recipe, overrides))]
    console = Console(width=120)
    rows = []
    for name, cfg in configs:
        model = getattr(cfg, "model", None)
        path = getattr(model, "path", None) or getattr(getattr(cfg, "teacher", None), "path", None)
        table = Table(title=f"r1pipe plan: {name} ({cfg.stage})", show_header=False)
        table.add_column("what")
        table.add_column("value")
        row = {"step": name, "stage": cfg.stage}
        if path is None or "${" in str(path):
            table.add_row("model", f"{path or '-'} (produced by an earlier step)")
        elif _awaits_earlier_run(str(path)):
            table.add_row("model", f"{path} (not there yet: an earlier run writes it)")
        else:
            plan = plan_model(str(path), lora=getattr(model, "lora", None) is not None)
            n_gpus = gpus or getattr(getattr(cfg, "train", None), "num_gpus", None) or 1
            memory = memory_per_device(plan, cfg, n_gpus)
            row.update(total=plan.total, activated=plan.activated, mtp=plan.mtp, memory=memory)
            table.add_row("model", f"{path} [{plan.kind}], {plan.layers} layers, hidden {plan.hidden}")
            table.add_row("parameters", _count(plan.total) + (f" (+ MTP {_count(plan.mtp)})" if plan.mtp else ""))
            table.add_row("activated per token", _count(plan.activated))
            for key, value in memory.items():
                table.add_row(f"memory/device: {key}", _gb(value))
            table.add_row(f"memory/device: total ({n_gpus} device{'s' if n_gpus > 1 else ''})", _gb(sum(memory.values())))
            for note in plan.notes:
                table.add_row("note", note)
        tokens = tokens_per_step(cfg)
        if tokens:
            table.add_row("tokens per step (max)", f"{tokens:,}")
            row["tokens_per_step"] = tokens
        console.print(table)
        rows.append(row)
    return rows


def _awaits_earlier_run(path: str) -> bool:
    """A missing local path under a run directory (runs/<name>/...): another recipe's output, not a typo."""
    parts = Path(path).parts
    return not Path(path).exists() and len(parts) > 2 and parts[0] == "runs"


def _config_for_plan(planned):
    """A pipeline step's config; one still waiting on earlier outputs is read as plain attributes."""
    from r1pipe.config import get_stage

    if not planned.refs:
        return planned.resolve({})
    get_stage(planned.data["stage"])
    return _namespace(planned.data)


def _namespace(node):
    from types import SimpleNamespace

    if isinstance(node, dict):
        return SimpleNamespace(**{k: _namespace(v) for k, v in node.items()})
    return node
