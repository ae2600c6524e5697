"""Hugging Face I/O of the DeepSeek-V2/V3 family: checkpoint names, safetensors directories, config facts.

The one place that knows how our state dict maps onto a Hugging Face checkpoint (what DeepSeek
released, what transformers writes and vLLM reads), in the manner of torchtitan's per-model
`state_dict_adapter`; checkpointing, export and the rollout weight pushes all go through it:
- routed experts are stacked 3-D tensors in memory (`...mlp.experts.{gate_up_proj,down_proj}`, for the
  grouped GEMM) and one matrix per expert on disk (`...mlp.experts.<e>.{gate,up,down}_proj.weight`);
- MTP modules live at `model.layers.<num_hidden_layers + k>` and also carry copies of the shared
  embedding and head (`embed_tokens`, `shared_head.head`), as in the released V3 weights;
- a tied head is not stored (transformers and vLLM rebuild it from the embedding);
- some tensors stay in fp32 whatever the dtype (`FP32_TENSORS`), and vLLM needs config keys that recent
  transformers no longer writes (`add_vllm_defaults`);
- a safetensors directory is one file or shards + an index; the shard plan is huggingface_hub's (the one
  transformers uses), the files keep the names transformers gives them.
Nothing here imports the model, so every layer above (config included) can use it.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from huggingface_hub import StateDictSplit, split_state_dict_into_shards_factory
from safetensors import safe_open
from safetensors.torch import save_file

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")  # config.json model_type values our DeepseekForCausalLM reads
FP32_TENSORS = ("e_score_correction_bias",)  # name suffixes kept in fp32 whatever the dtype (as HF and vLLM do)
VLLM_V3_DEFAULTS = {"topk_method": "noaux_tc", "scoring_func": "sigmoid"}
LAYERS = "model.layers."
MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # the copies each MTP module carries on disk
TIED_HEAD = "lm_head.weight"
SAFETENSORS_FILES = "model{suffix}.safetensors"  # huggingface_hub's pattern: model.safetensors, model-00001-of-00002...
INDEX_FILE = "model.safetensors.index.json"
EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
# what a checkpoint may hold that no parameter of ours reads: FP8 scales (folded into their weight on
# load) and the rotary frequencies older transformers saved
NOT_PARAMETERS = ("_scale_inv", "rotary_emb.inv_freq")


class CheckpointError(ValueError):
    """A checkpoint directory that does not match its config; the message names the tensor."""


# ----------------------------------------------------------------------------------------------
# config.json and names


def add_vllm_defaults(hf_config: dict) -> dict:
    """`hf_config` with the V3 routing keys vLLM's DeepSeek loader needs and transformers >= 5 no longer
    writes (the routing fields of DeepSeek-V3's released config.json); other model types are returned unchanged."""
    if hf_config.get("model_type") == "deepseek_v3":
        for key, value in VLLM_V3_DEFAULTS.items():
            hf_config.setdefault(key, value)
    return hf_config


def write_json(path: Path, data: dict) -> None:
    """config.json and the index as every writer here formats them (2-space indent, final newline)."""
    path.write_text(json.dumps(data, indent=2) + "\n")


def dtype_name(dtype: torch.dtype) -> str:
    """`dtype` as config.json's torch_dtype and vLLM's weight-update metadata spell it ('bfloat16')."""
    return str(dtype).removeprefix("torch.")


def hf_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype checkpoint tensor `name` is stored and loaded in when the model's is `dtype`."""
    return torch.float32 if name.endswith(FP32_TENSORS) else dtype


def is_tied_head(name: str, tie_word_embeddings: bool) -> bool:
    """Whether `name` is an output head tied to the embedding (never stored)."""
    return bool(tie_word_embeddings) and name == TIED_HEAD


def mtp_prefixes(num_hidden_layers: int, num_mtp_layers: int) -> tuple[str, ...]:
    """Name prefixes of the MTP modules: `model.layers.<num_hidden_layers + k>.` for k < num_mtp_layers."""
    return tuple(f"{LAYERS}{num_hidden_layers + k}." for k in range(num_mtp_layers))


def declared_mtp_layers(hf_config: dict) -> int | None:
    """How many MTP modules a raw config.json declares; None for a model type other than DeepSeek's (whose
    num_nextn_predict_layers, if any, means nothing to us)."""
    if hf_config.get("model_type") not in MODEL_TYPES:
        return None
    return int(hf_config.get("num_nextn_predict_layers", 0) or 0)


def merged_peft_name(name: str) -> str | None:
    """The base model's checkpoint name of a PEFT-wrapped model's tensor `name` (adapters merged), or None
    for the LoRA matrices and PEFT's copies of trained modules, which are not weights of the base model."""
    if "lora_" in name or "modules_to_save" in name:
        return None
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


class DeepseekStateDictAdapter:
    """DeepseekForCausalLM's state dict <-> Hugging Face checkpoint names, for one DeepseekConfig.

    `to_hf` names our tensors as a checkpoint stores them (to save, export or push to vLLM); `hf_parts` and
    `merge` go back, one of our tensors at a time, so a loader can read, check and convert lazily.
    """

    def __init__(self, config):
        self.config = config

    @property
    def mtp_prefixes(self) -> tuple[str, ...]:
        return mtp_prefixes(self.config.num_hidden_layers, self.config.num_nextn_predict_layers)

    @property
    def mtp_copies(self) -> tuple[str, ...]:
        """Checkpoint names of the MTP modules' copies of the shared embedding and head."""
        return tuple(prefix + shared for prefix in self.mtp_prefixes for shared in MTP_SHARED)

    def is_stored(self, name: str) -> bool:
        """Whether our tensor `name` has a place in the checkpoint (a tied head has none)."""
        return not is_tied_head(name, self.config.tie_word_embeddings)

    def to_hf(self, state_dict: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor) for every stored tensor of `state_dict`, experts as views of their stack,
        then the MTP modules' copies of the embedding and head."""
        for name, tensor in state_dict.items():
            if not self.is_stored(name):
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
        for prefix in self.mtp_prefixes:
            embed, head = MTP_SHARED
            yield prefix + embed, state_dict["model.embed_tokens.weight"]
            yield prefix + head, state_dict[TIED_HEAD]

    def hf_parts(self, name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """The checkpoint tensors that make up our tensor `name` of `shape`, with the shape each must have,
        in the order `merge` takes them."""
        match = EXPERT_KEY.match(name)
        if match is None:
            return {name: tuple(shape)}
        prefix, kind = match.groups()
        num_experts, rows, columns = shape
        projections = ("down_proj",) if kind == "down_proj" else ("gate_proj", "up_proj")
        per = rows // len(projections)
        return {f"{prefix}.{e}.{p}.weight": (per, columns) for e in range(num_experts) for p in projections}

    def merge(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """Our tensor `name` from its `hf_parts` (experts stacked, gate and up concatenated per expert)."""
        match = EXPERT_KEY.match(name)
        if match is None:
            return parts[0]
        if match.group(2) == "down_proj":
            return torch.stack(parts)
        return torch.stack([torch.cat(parts[i:i + 2]) for i in range(0, len(parts), 2)])

    def unused(self, checkpoint_names: Iterable[str], used: set[str]) -> list[str]:
        """Checkpoint tensors that a load did not read and that are not expected to be left over."""
        expected = set(self.mtp_copies)
        return [n for n in checkpoint_names if n not in used and n not in expected and not n.endswith(NOT_PARAMETERS)]


# ----------------------------------------------------------------------------------------------
# safetensors directories


def parse_size(size: int | str) -> int:
    """A shard size in bytes from an int or '5GB', '500 MB', '1.5GB' (decimal units, as huggingface_hub)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)\s*", size.upper())
    if match is None:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (use e.g. '5GB' or a byte count)")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    return int(float(match.group(1)) * units[match.group(2)])


def plan_shards(unit_bytes: Mapping[str, int], max_shard_size: int | str) -> StateDictSplit:
    """Which file each unit goes to (a unit: a tensor, or a weight with its FP8 scale, never split).

    huggingface_hub's split (transformers' own): units in order, a new file when the next would pass the
    limit, a unit over the limit alone in a file of its own. The byte counts are given rather than read
    from storages, because an expert is a view of its layer's stack, whose whole storage huggingface_hub's
    torch helper would count; and so a writer can plan before it converts anything.
    """
    return split_state_dict_into_shards_factory(dict(unit_bytes), get_storage_size=lambda size: size,
                                                filename_pattern=SAFETENSORS_FILES,
                                                max_shard_size=parse_size(max_shard_size))


def remove_safetensors(directory: Path) -> None:
    """Delete the weights of an earlier save, so no stale shard or index outlives a new layout."""
    for stale in [*directory.glob(SAFETENSORS_FILES.format(suffix="*")), directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)


def write_safetensors(directory: Path, plan: StateDictSplit,
                      units: Iterable[tuple[str, dict[str, torch.Tensor]]]) -> None:
    """Save the `units` (key, tensors), in the order planned, into the files of `plan`, then the index
    when sharded. A file is written as soon as its last unit has come, so memory holds the file being
    filled (and a unit too large for any file) rather than the model."""
    remove_safetensors(directory)
    waiting = {filename: len(keys) for filename, keys in plan.filename_to_tensors.items()}
    filling: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    weight_map = {}
    for key, tensors in units:
        filename = plan.tensor_to_filename[key]
        filling[filename].update(tensors)
        weight_map.update(dict.fromkeys(tensors, filename))
        waiting[filename] -= 1
        if not waiting[filename]:
            save_file(filling.pop(filename), directory / filename, metadata={"format": "pt"})
    if plan.is_sharded:
        write_json(directory / INDEX_FILE, {"metadata": plan.metadata, "weight_map": dict(sorted(weight_map.items()))})


class CheckpointReader:
    """Lazy access to the tensors of a safetensors directory (single file or sharded with an index)."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / INDEX_FILE
        single = SAFETENSORS_FILES.format(suffix="")
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / single).is_file():
            with safe_open(directory / single, "pt") as f:
                weight_map = {name: single for name in f.keys()}
        else:
            raise CheckpointError(f"{directory}: no {single} or {INDEX_FILE}")
        self.weight_map = weight_map
        self.handles = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, name: str):
        filename = self.weight_map[name]
        if filename not in self.handles:
            path = self.directory / filename
            if not path.is_file():
                raise CheckpointError(f"{self.directory}: shard {filename} (holding {name}) is missing")
            self.handles[filename] = safe_open(path, "pt")
        return self.handles[filename]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def meta(self, name: str) -> torch.Tensor:
        """`name`'s shape and dtype as a meta tensor, without reading its data (to plan shards). safetensors
        gives the dtype only as its own code, so an empty slice (or a 0-d tensor, a few bytes) supplies it."""
        piece = self._handle(name).get_slice(name)
        shape = piece.get_shape()
        dtype = (piece[:0] if shape else piece[...]).dtype
        return torch.empty(shape, dtype=dtype, device="meta")

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
