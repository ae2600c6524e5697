"""One config dataclass for the DeepSeek-V2/V3 family, read from and written to HF `config.json`.

Field names are the Hugging Face keys, so a checkpoint's config maps one to one. Keys we do not use
(`auto_map`, `ep_size`, ...) are kept in `extra` and written back unchanged. Training-only knobs
(bias update speed gamma, MTP loss weight lambda) are stored under their own keys so a saved run
reloads with the same recipe.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1pipe.model.hf_adapter import MODEL_TYPES, add_vllm_defaults, write_json

PRESET_DIR = Path(__file__).parent / "configs"
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
# Keys transformers adds on save that carry nothing we need; dropped on read so they do not pile up.
DERIVED_HF_KEYS = ("qk_head_dim", "head_dim", "architectures", "transformers_version", "dtype", "torch_dtype")


class ConfigError(ValueError):
    """A config.json (or preset) that cannot describe a DeepSeek model; the message names the key."""


@dataclass
class DeepseekConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    # DeepSeekMoE
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # MLA
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    # RoPE (YaRN when rope_scaling["type"] == "yarn")
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # MTP modules, stored as layers num_hidden_layers .. num_hidden_layers + D - 1
    num_nextn_predict_layers: int = 1
    # training: sequence-wise balance loss alpha, bias update speed gamma, MTP loss weight lambda
    aux_loss_alpha: float = 0.0001
    seq_aux: bool = True
    bias_update_speed: float = 0.001
    mtp_loss_weight: float = 0.3
    # FP8 block format of the released weights; None for bf16/fp32 checkpoints
    quantization_config: dict | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_v3(self) -> bool:
        return self.model_type == "deepseek_v3"

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def yarn(self) -> dict | None:
        """The YaRN parameters, or None for plain RoPE."""
        if self.rope_scaling and self.rope_scaling.get("type", self.rope_scaling.get("rope_type")) == "yarn":
            return self.rope_scaling
        return None

    @property
    def softmax_scale(self) -> float:
        """(qk_nope + qk_rope)^-0.5, times mscale^2 under YaRN (mscale from mscale_all_dim)."""
        scale = self.qk_head_dim ** -0.5
        if self.yarn and self.yarn.get("mscale_all_dim"):
            mscale = yarn_mscale(self.yarn["factor"], self.yarn["mscale_all_dim"])
            scale *= mscale * mscale
        return scale

    def validate(self) -> None:
        def fail(key, msg):
            raise ConfigError(f"config key '{key}': {msg}")

        if self.model_type not in MODEL_TYPES:
            fail("model_type", f"unknown model_type {self.model_type!r}; expected one of {MODEL_TYPES}")
        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", f"{self.topk_method!r} is not one of {TOPK_METHODS}")
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", f"{self.scoring_func!r} is not one of {SCORING_FUNCS}")
        if self.hidden_act != "silu":
            fail("hidden_act", f"{self.hidden_act!r} is not supported (DeepSeek experts are SwiGLU: 'silu')")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_rope_head_dim", "v_head_dim"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                fail(key, f"must be a positive integer, got {getattr(self, key)!r}")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", f"must be even for RoPE pairs, got {self.qk_rope_head_dim}")
        if self.n_routed_experts:
            if self.num_experts_per_tok > self.n_routed_experts:
                fail("num_experts_per_tok", f"{self.num_experts_per_tok} > n_routed_experts "
                                            f"{self.n_routed_experts}")
            if self.topk_method != "greedy":
                if self.n_routed_experts % self.n_group:
                    fail("n_group", f"n_routed_experts {self.n_routed_experts} is not divisible by "
                                    f"n_group {self.n_group}")
                if not 1 <= self.topk_group <= self.n_group:
                    fail("topk_group", f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
                per_group = self.n_routed_experts // self.n_group
                if self.topk_group * per_group < self.num_experts_per_tok:
                    fail("topk_group", f"{self.topk_group} groups of {per_group} experts cannot hold "
                                       f"num_experts_per_tok={self.num_experts_per_tok}")
            if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
                fail("scoring_func", "topk_method 'noaux_tc' needs scoring_func 'sigmoid'")
            if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2:
                fail("n_group", "noaux_tc scores a group by its top-2 experts: need >= 2 experts per group")
        if self.yarn:
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.yarn:
                    fail(f"rope_scaling.{key}", "missing for YaRN")

    # ---- HF config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict) -> DeepseekConfig:
        d = dict(d)
        if "model_type" not in d:
            raise ConfigError("config key 'model_type': missing (expected 'deepseek_v3' or 'deepseek_v2')")
        if d["model_type"] not in MODEL_TYPES:
            raise ConfigError(f"config key 'model_type': unknown model_type {d['model_type']!r}; "
                              f"expected one of {MODEL_TYPES}")
        is_v3 = d["model_type"] == "deepseek_v3"
        # transformers >= 5 writes `rope_parameters` (with rope_theta inside); checkpoints write
        # `rope_scaling` + `rope_theta`.
        rope = d.pop("rope_parameters", None)
        if rope is not None and d.get("rope_scaling") is None:
            rope = dict(rope)
            d.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                d["rope_scaling"] = rope
        if d.get("rope_scaling"):
            rs = dict(d["rope_scaling"])
            kind = rs.get("type", rs.get("rope_type"))
            rs["type"] = rs["rope_type"] = kind
            d["rope_scaling"] = rs
        add_vllm_defaults(d)
        if not is_v3:
            d.setdefault("scoring_func", "softmax")
            d.setdefault("num_nextn_predict_layers", 0)
            if d.get("topk_method") == "greedy":
                d.setdefault("n_group", 1)
                d.setdefault("topk_group", 1)
        for key in ("n_group", "topk_group"):  # transformers writes null for greedy V2 routing
            if d.get(key) is None:
                d[key] = 1
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d.get("num_attention_heads", cls.num_attention_heads)
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k not in DERIVED_HF_KEYS}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, value in known.items():
            if "int" in types[key] and "float" not in types[key] and isinstance(value, float):
                raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return cls(**known, extra=extra)

    def to_hf_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if d["quantization_config"] is None:
            del d["quantization_config"]
        if d["rope_scaling"] is None:
            del d["rope_scaling"]
        arch = "DeepseekV3ForCausalLM" if self.is_v3 else "DeepseekV2ForCausalLM"
        d["qk_head_dim"] = self.qk_head_dim
        d["head_dim"] = self.qk_rope_head_dim
        return {"architectures": [arch], **self.extra, **d}

    @classmethod
    def from_json(cls, path: str | Path) -> DeepseekConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json there") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf_dict(d)
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DeepseekConfig:
        return cls.from_json(Path(directory) / "config.json")

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        write_json(Path(directory) / "config.json", self.to_hf_dict())

    @classmethod
    def preset(cls, name: str) -> DeepseekConfig:
        path = PRESET_DIR / f"{name}.json"
        if not path.is_file():
            raise ConfigError(f"unknown model preset {name!r}; shipped presets: {', '.join(preset_names())}")
        return cls.from_json(path)

    def replace(self, **changes: Any) -> DeepseekConfig:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"config key '{unknown[0]}': not a DeepseekConfig field")
        return dataclasses.replace(self, **changes)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 for factor > 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
