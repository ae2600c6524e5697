"""The policy's weights as a rollout engine takes them: HF names, LoRA merged, ZeRO-3 shards gathered a
layer at a time; and the HF directory a vLLM engine starts from."""
from __future__ import annotations

import re
from pathlib import Path

from r1pipe.model.hf_adapter import merged_peft_name, mtp_prefixes


def engine_weights(policy, zero3: bool = False):
    """The policy's weights under the names an HF checkpoint uses (what vLLM's loaders expect).

    A PEFT policy is merged for the push and unmerged after, so the adapters keep training. Under
    ZeRO-3 each rank holds a shard of every parameter: see ``_gathered_weights``.
    """
    module = policy.module
    if zero3:
        yield from _gathered_weights(policy.model)
    elif hasattr(module, "merge_adapter"):
        module.merge_adapter()
        try:
            for name, tensor in module.state_dict().items():
                if (hf_name := merged_peft_name(name)) is not None:
                    yield hf_name, tensor
        finally:
            module.unmerge_adapter()
    else:
        yield from _hf_names(policy.model)


def _hf_names(model):
    """Our V3 stores experts fused and names them per expert on the way out; HF models already match."""
    return model.hf_named_tensors() if hasattr(model, "hf_named_tensors") else iter(model.state_dict().items())


def _gathered_weights(model):
    """ZeRO-3: gather one decoder layer at a time (then the embedding, norm and head), yield its tensors.

    A whole 671B model never fits on one device; a layer does. Every rank must iterate (the gather is
    collective). MTP layers also yield copies of the shared embedding and head, so those join their group.
    """
    import deepspeed

    layers = {name: m for name, m in model.named_modules() if re.fullmatch(r"model\.layers\.\d+", name)}
    shared = [p for n, p in model.named_parameters() if not n.startswith("model.layers.")]
    mtp = mtp_prefixes(model.config.num_hidden_layers, getattr(model.config, "num_nextn_predict_layers", 0))
    groups = [(f"{name}.", list(layer.parameters()) + (shared if f"{name}.".startswith(mtp) else []))
              for name, layer in layers.items()]
    groups.append(("", shared))
    for prefix, params in groups:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for name, tensor in _hf_names(model):
                in_group = name.startswith(prefix) if prefix else not name.startswith("model.layers.")
                if in_group and tensor.numel() > 0:
                    yield name, tensor


def write_engine_checkpoint(policy, tokenizer, directory: Path) -> None:
    """An HF directory of the current (merged) policy for vLLM to start from."""
    directory.mkdir(parents=True, exist_ok=True)
    module = policy.module
    if hasattr(module, "merge_adapter"):
        state = dict(engine_weights(policy))
        module.get_base_model().save_pretrained(directory, state_dict=state)
    else:
        policy.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
