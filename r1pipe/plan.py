"""`r1pipe plan`: what a recipe builds and needs, without running it.

Parameters are counted by instantiating the model on the meta device (no memory, no weights), so
the numbers are the real module's, not a formula's. Memory per device is an estimate: weights,
gradients and AdamW states under the recipe's precision and ZeRO stage, plus activations
(Korthikanti et al. 2022, "Reducing Activation Recomputation": about s*b*h*(34 + 5*a*s/h) bytes per
layer in 16-bit, 2*s*b*h with full recomputation) and the logits of one micro batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r1pipe.config import RecipeError, Workload
from r1pipe.model.hf_adapter import MODEL_TYPES
from r1pipe.pipeline import is_pipeline, load_pipeline
from r1pipe.runner import load_recipe

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
    if hf.get("model_type") in MODEL_TYPES:
        from r1pipe.model import DeepseekForCausalLM, parameter_counts
        from r1pipe.model.config import DeepseekConfig

        config = DeepseekConfig.from_hf_dict(hf)
        counts = parameter_counts(config)
        with torch.device("meta"):
            module = DeepseekForCausalLM(config)
        plan = ModelPlan(
            kind=f"{config.model_type} (ours)",
            total=counts["total"],
            activated=counts["activated"],
            mtp=counts["mtp"],
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


def _gb(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _count(n: int) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e8 else f"{n / 1e6:,.2f}M"


def _fp8_linear_params(module: torch.nn.Module) -> int:
    from r1pipe.kernels.linear import fp8_linear_targets

    return sum(m.weight.numel() for _, m in fp8_linear_targets(module))


def memory_per_device(plan: ModelPlan, work: Workload, gpus: int) -> dict[str, float]:
    """Bytes per device for weights, gradients, optimizer states and activations."""
    wbytes = _BYTES.get("bf16" if work.precision == "bf16" else work.model_dtype, 4)
    zero = work.zero_stage
    params = plan.total + plan.mtp
    trainable = plan.trainable
    shard = max(gpus, 1)
    weights = params * wbytes / (shard if zero >= 3 else 1)
    grads = trainable * wbytes / (shard if zero >= 2 else 1)
    master = trainable * 4 if wbytes == 2 else 0
    optim = (trainable * 8 + master) / (shard if zero >= 1 else 1)
    out = {"weights": weights, "gradients": grads, "optimizer (AdamW)": optim}
    if work.precision == "fp8":
        out["FP8 weight copies (W and W^T, 1 byte each)"] = 2 * plan.fp8_linear
    tokens = micro_batch_tokens(work)
    if tokens and plan.hidden:
        seq = work.sequence_length
        per_layer = tokens * plan.hidden * (34 + 5 * plan.heads * seq / plan.hidden)
        if work.gradient_checkpointing:
            per_layer = 2 * tokens * plan.hidden
        out["activations (est.)"] = per_layer * plan.layers * (wbytes / 2)
        out["logits (one chunk, fp32)"] = min(tokens, 1024) * plan.vocab * 4
    if work.reference_model:
        out["reference model"] = params * wbytes / (shard if zero >= 3 else 1)
    return out


def micro_batch_tokens(work: Workload) -> int | None:
    """Tokens of one micro batch at most."""
    if work.micro_batch_size and work.sequence_length:
        return work.micro_batch_size * work.sequence_length
    return None


def tokens_per_step(work: Workload) -> int | None:
    """Tokens of one optimizer step at most."""
    if work.sequences_per_step and work.sequence_length:
        return work.sequences_per_step * work.sequence_length
    return None


def print_plan(recipe: str, overrides=(), gpus: int | None = None) -> list[dict]:
    """Print the plan of a stage recipe, or of each step of a pipeline; returns the rows."""
    from rich.console import Console
    from rich.table import Table

    if is_pipeline(recipe):
        _, planned = load_pipeline(recipe, overrides)
        steps = [(p.step.name, p.data["stage"], p.preview) for p in planned]
    else:
        cfg = load_recipe(recipe, overrides)
        steps = [(Path(recipe).stem, cfg.stage, cfg)]
    console = Console(width=120)
    rows = []
    for name, stage, cfg in steps:
        # a step whose references to earlier outputs sit where only a resolved value validates: nothing to size
        work = cfg.workload() if cfg is not None else Workload()
        path = work.model_path
        table = Table(title=f"r1pipe plan: {name} ({stage})", show_header=False)
        table.add_column("what")
        table.add_column("value")
        row = {"step": name, "stage": stage}
        if path is None or "${" in str(path):
            table.add_row("model", f"{path or '-'} (produced by an earlier step)")
        elif _awaits_earlier_run(str(path)):
            table.add_row("model", f"{path} (not there yet: an earlier run writes it)")
        else:
            plan = plan_model(str(path), lora=work.lora)
            n_gpus = gpus or work.devices
            memory = memory_per_device(plan, work, n_gpus)
            row.update(total=plan.total, activated=plan.activated, mtp=plan.mtp, memory=memory)
            table.add_row("model", f"{path} [{plan.kind}], {plan.layers} layers, hidden {plan.hidden}")
            table.add_row("parameters", _count(plan.total) + (f" (+ MTP {_count(plan.mtp)})" if plan.mtp else ""))
            table.add_row("activated per token", _count(plan.activated))
            for key, value in memory.items():
                table.add_row(f"memory/device: {key}", _gb(value))
            table.add_row(f"memory/device: total ({n_gpus} device{'s' if n_gpus > 1 else ''})", _gb(sum(memory.values())))
            for note in plan.notes:
                table.add_row("note", note)
        tokens = tokens_per_step(work)
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
