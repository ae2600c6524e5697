"""Our model's weights <-> a Hugging Face safetensors directory, under the exact HF parameter names.

Names, shard layout and file format are `r1pipe.model.hf_adapter`'s; this module moves one model's
tensors through them, checking every tensor's presence and shape on the way in. FP8 weights
(`float8_e4m3fn` + `<name>_scale_inv`, 128x128 blocks) are dequantized on load by the reader.
The model class is not imported here (modeling imports this module and builds the model itself, see
`modeling.load_pretrained`): the functions take any DeepseekForCausalLM.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from r1pipe.model.config import DeepseekConfig
from r1pipe.model.hf_adapter import (CheckpointError, CheckpointReader, DeepseekStateDictAdapter, dtype_name,
                                     hf_dtype, plan_shards, write_json, write_safetensors)


def save_pretrained(model: nn.Module, directory: str | Path, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None) -> None:
    """Write config.json and safetensors shards (+ model.safetensors.index.json when more than one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.replace(quantization_config=None).to_hf_dict()
    config["torch_dtype"] = dtype_name(dtype or model.lm_head.weight.dtype)
    write_json(directory / "config.json", config)
    named = dict(DeepseekStateDictAdapter(model.config).to_hf(model.state_dict()))
    stored = {name: hf_dtype(name, dtype or tensor.dtype) for name, tensor in named.items()}
    plan = plan_shards({name: tensor.numel() * stored[name].itemsize for name, tensor in named.items()},
                       max_shard_size)

    def units():
        seen = set()
        for name, tensor in named.items():
            tensor = tensor.detach().to("cpu", stored[name]).contiguous()
            if tensor.data_ptr() in seen:  # the MTP copies of the shared embedding/head: safetensors wants its own
                tensor = tensor.clone()
            seen.add(tensor.data_ptr())
            yield name, {name: tensor}

    write_safetensors(directory, plan, units())


def open_checkpoint(directory: str | Path) -> tuple[DeepseekConfig, CheckpointReader]:
    """The config of `directory` and a reader of its weights. A config that declares MTP modules the weights
    lack (transformers writes V3 without them) is read as one without MTP, with a warning."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    config = DeepseekConfig.from_pretrained(directory)
    reader = CheckpointReader(directory)
    mtp_prefixes = DeepseekStateDictAdapter(config).mtp_prefixes
    if mtp_prefixes and not any(name.startswith(mtp_prefixes) for name in reader.weight_map):
        warnings.warn(f"{directory}: config has num_nextn_predict_layers={config.num_nextn_predict_layers} but the "
                      f"checkpoint holds no {mtp_prefixes[0]}* tensors; loading without MTP", stacklevel=3)
        config = config.replace(num_nextn_predict_layers=0)
    return config, reader


def load_state(model: nn.Module, reader: CheckpointReader) -> None:
    """Copy every stored tensor of `model` from `reader` (experts stacked, shapes checked, errors naming the
    tensor); warn about checkpoint tensors that nothing read."""
    adapter = DeepseekStateDictAdapter(model.config)
    used = set()
    with torch.no_grad():
        for name, target in model.state_dict().items():
            if adapter.is_stored(name):
                target.copy_(read_tensor(reader, adapter, name, target, used))
    unexpected = adapter.unused(reader.weight_map, used)
    if unexpected:
        warnings.warn(f"{reader.directory}: {len(unexpected)} tensors not used by the model, e.g. {unexpected[:3]}",
                      stacklevel=3)


def read_tensor(reader: CheckpointReader, adapter: DeepseekStateDictAdapter, name: str, target: torch.Tensor,
                used: set) -> torch.Tensor:
    """Checkpoint tensor(s) for our parameter `name`, stacked for experts, shape-checked against `target`."""
    dtype = hf_dtype(name, target.dtype)
    tensors = []
    for part, shape in adapter.hf_parts(name, tuple(target.shape)).items():
        tensor = reader.weight(part, dtype, target.device)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{reader.directory}: tensor {part} has shape {list(tensor.shape)}, "
                                  f"config expects {list(shape)}")
        tensors.append(tensor)
        used.add(part)
    return adapter.merge(name, tensors)
