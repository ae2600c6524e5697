"""Hugging Face safetensors checkpoints for DeepseekForCausalLM, under the exact HF parameter names.

On disk every routed expert is its own `model.layers.<i>.mlp.experts.<e>.{gate,up,down}_proj.weight`
(what DeepSeek released, what transformers writes and what vLLM's loader reads); in memory they are
stacked into 3-D tensors for the grouped GEMM. MTP modules live at `model.layers.<num_hidden_layers+k>`
and also carry copies of the shared embedding and head (`embed_tokens`, `shared_head.head`) as in the
released V3 weights. FP8 weights (`float8_e4m3fn` + `<name>_scale_inv`, 128x128 blocks) are
dequantized on load with r1pipe.kernels.fp8 (optionally computed in FP8 again, see `load_pretrained`).
"""
from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r1pipe.model.config import DeepseekConfig
from r1pipe.model.modeling import DeepseekForCausalLM

EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
FP32_TENSORS = ("e_score_correction_bias",)  # kept in fp32 whatever the model dtype (as HF and vLLM do)


class CheckpointError(ValueError):
    """A checkpoint directory that does not match its config; the message names the tensor."""


def hf_named_tensors(model: DeepseekForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """Our parameters and persistent buffers under their HF checkpoint names (experts unstacked)."""
    config = model.config
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        match = EXPERT_KEY.match(name)
        if match is None:
            yield name, tensor
            continue
        prefix, kind = match.groups()
        for e in range(tensor.shape[0]):
            if kind == "down_proj":
                yield f"{prefix}.{e}.down_proj.weight", tensor[e]
            else:
                gate, up = tensor[e].chunk(2, dim=0)
                yield f"{prefix}.{e}.gate_proj.weight", gate
                yield f"{prefix}.{e}.up_proj.weight", up
    for k in range(config.num_nextn_predict_layers):
        prefix = f"model.layers.{config.num_hidden_layers + k}"
        yield f"{prefix}.embed_tokens.weight", model.model.embed_tokens.weight.detach()
        yield f"{prefix}.shared_head.head.weight", model.lm_head.weight.detach()


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)\s*", size.upper())
    if match is None:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (use e.g. '5GB' or a byte count)")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    return int(float(match.group(1)) * units[match.group(2)])


def save_pretrained(model: DeepseekForCausalLM, directory: str | Path, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None) -> None:
    """Write config.json and safetensors shards (+ model.safetensors.index.json when more than one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = total = 0
    seen = set()
    for name, tensor in hf_named_tensors(model):
        target = torch.float32 if name.endswith(FP32_TENSORS) else (dtype or tensor.dtype)
        tensor = tensor.detach().to("cpu", target).contiguous()
        if tensor.data_ptr() in seen:  # the MTP copies of the shared embedding/head: safetensors wants its own
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
        total += size
    weight_dtype = dtype or model.lm_head.weight.dtype
    config = model.config.replace(quantization_config=None)
    hf = config.to_hf_dict()
    hf["torch_dtype"] = str(weight_dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for stale in list(directory.glob("model*.safetensors")) + list(directory.glob("model.safetensors.index.json")):
        stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / filename, metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class CheckpointReader:
    """Lazy access to the tensors of a safetensors directory (single file or sharded with an index)."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / "model.safetensors").is_file():
            with safe_open(directory / "model.safetensors", "pt") as f:
                weight_map = {name: "model.safetensors" for name in f.keys()}
        else:
            raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
        self.weight_map = weight_map
        self.handles = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        filename = self.weight_map[name]
        if filename not in self.handles:
            path = self.directory / filename
            if not path.is_file():
                raise CheckpointError(f"{self.directory}: shard {filename} (holding {name}) is missing")
            self.handles[filename] = safe_open(path, "pt")
        return self.handles[filename].get_tensor(name)

    def weight(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """The tensor `name` in `dtype` on `device`, dequantized from FP8 blocks (on that device, so a GPU
        uses the Triton kernel) when stored as float8_e4m3fn."""
        if name not in self:
            raise CheckpointError(f"{self.directory}: missing tensor {name}")
        tensor = self.get(name).to(device)
        if tensor.dtype == torch.float8_e4m3fn:
            scale_name = f"{name}_scale_inv"
            if scale_name not in self:
                raise CheckpointError(f"{self.directory}: FP8 tensor {name} has no {scale_name}")
            from r1pipe.kernels.fp8 import weight_dequant

            return weight_dequant(tensor, self.get(scale_name).to(device, torch.float32), dtype=dtype)
        return tensor.to(dtype)


def load_pretrained(directory: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    keep_fp8: bool = False) -> DeepseekForCausalLM:
    """Build the model from `directory`/config.json and load its safetensors weights, checking every
    tensor's presence and shape (errors name the tensor). FP8 weights are dequantized into `dtype`;
    `keep_fp8` also runs the dense linear layers through r1pipe.kernels' FP8Linear (128x128 weight
    blocks re-quantized from the dequantized weights reproduce the stored FP8 values), with the
    embedding, head, gates and eh_proj in high precision as in V3."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    config = DeepseekConfig.from_pretrained(directory)
    reader = CheckpointReader(directory)
    mtp_prefixes = [f"model.layers.{config.num_hidden_layers + k}." for k in range(config.num_nextn_predict_layers)]
    if mtp_prefixes and not any(name.startswith(tuple(mtp_prefixes)) for name in reader.weight_map):
        warnings.warn(f"{directory}: config has num_nextn_predict_layers={config.num_nextn_predict_layers} but the "
                      f"checkpoint holds no {mtp_prefixes[0]}* tensors; loading without MTP", stacklevel=2)
        config = config.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    model.to_empty(device=device)
    model.to(dtype)
    for moe in model.moe_layers().values():
        moe.expert_load.zero_()
    used = set()
    with torch.no_grad():
        for name, target in model.state_dict().items():
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue
            value = read_tensor(reader, name, target, used)
            target.copy_(value)
    expected_extra = {f"{p}{suffix}" for p in mtp_prefixes for suffix in ("embed_tokens.weight", "shared_head.head.weight")}
    unexpected = [n for n in reader.weight_map
                  if n not in used and n not in expected_extra and not n.endswith(("_scale_inv", "rotary_emb.inv_freq"))]
    if unexpected:
        warnings.warn(f"{directory}: {len(unexpected)} tensors not used by the model, e.g. {unexpected[:3]}",
                      stacklevel=2)
    if keep_fp8:
        from r1pipe.kernels.linear import convert_to_fp8_linear

        convert_to_fp8_linear(model)
    return model


def read_tensor(reader: CheckpointReader, name: str, target: torch.Tensor, used: set) -> torch.Tensor:
    """Checkpoint tensor(s) for our parameter `name`, stacked for experts, shape-checked against `target`."""
    dtype = torch.float32 if name.endswith(FP32_TENSORS) else target.dtype
    match = EXPERT_KEY.match(name)
    if match is None:
        parts = {name: tuple(target.shape)}
    else:
        prefix, kind = match.groups()
        num_experts, rows = target.shape[0], target.shape[1]
        projections = ("down_proj",) if kind == "down_proj" else ("gate_proj", "up_proj")
        per = rows // len(projections)
        parts = {f"{prefix}.{e}.{p}.weight": (per, target.shape[2]) for e in range(num_experts) for p in projections}
    tensors = []
    for part, shape in parts.items():
        tensor = reader.weight(part, dtype, target.device)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{reader.directory}: tensor {part} has shape {list(tensor.shape)}, "
                                  f"config expects {list(shape)}")
        tensors.append(tensor)
        used.add(part)
    if match is None:
        return tensors[0]
    if kind == "down_proj":
        return torch.stack(tensors)
    return torch.stack([torch.cat(tensors[i:i + 2]) for i in range(0, len(tensors), 2)])
