"""Run directories: resolved config, metrics (JSONL + TensorBoard), logs, plots and atomic checkpoints.

    runs/<name>/config.yaml          the resolved recipe; a rerun with the same config resumes
    runs/<name>/metrics.jsonl        one JSON object per logged step
    runs/<name>/samples.jsonl        sample completions (GRPO, distillation, evaluation)
    runs/<name>/tb/                  TensorBoard events
    runs/<name>/logs/run.log         the log
    runs/<name>/plots/*.png          curves of the main metrics
    runs/<name>/checkpoints/step_N/  complete checkpoints only (written under a temporary name)
    runs/<name>/outputs.json         what later pipeline stages consume (checkpoint, dataset, ...)
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from r1pipe.config import RecipeError, StageConfig, dump_config
from r1pipe.model.atomic import atomic_write_dir, atomic_write_text

_CHECKPOINT_PREFIX = "step_"


def capture_rng_state() -> dict:
    """Every RNG a run touches, so a resumed run draws the same numbers."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RunDir:
    """One run's directory. Create with `RunDir.open(cfg)`; it resumes an identical earlier run."""

    def __init__(self, path: Path, report_to=("tensorboard",)):
        self.path = Path(path)
        for sub in ("checkpoints", "logs", "plots"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        self.logger = _setup_logger(self.path / "logs" / "run.log")
        self._tb = None
        self._wandb = None
        self._report_to = tuple(report_to)

    # -- creation -------------------------------------------------------------------------------
    @classmethod
    def open(cls, cfg: StageConfig, overwrite: bool = False, main_process: bool = True) -> RunDir:
        """Create `<output_dir>/<name>/` for `cfg`, or reopen it to resume the same run.

        An existing run with a different config, or a non-run directory, is never touched
        unless `overwrite` is set. Other ranks of a multi-process launch wait for the main
        process to have written this run's config, then join the directory without changing it.
        """
        path = cfg.run.path
        resolved = dump_config(cfg)
        config_file = path / "config.yaml"
        if not main_process:
            deadline = time.time() + 300
            while not (config_file.is_file() and config_file.read_text() == resolved):
                if time.time() > deadline:
                    raise RecipeError(f"{path}: rank 0 did not set up this run directory within 300 s")
                time.sleep(0.5)
            return cls(path, ())
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                if not config_file.is_file():
                    raise RecipeError(
                        f"{path}: exists and is not an r1pipe run; choose another run.name or pass --overwrite"
                    )
                if config_file.read_text() != resolved:
                    changed = _changed_keys(config_file.read_text(), resolved)
                    raise RecipeError(
                        f"{path}: holds a run with a different config (changed: {changed}); "
                        "rerun with the same recipe to resume, choose another run.name, or pass --overwrite"
                    )
            else:
                shutil.rmtree(path)
        if "wandb" in cfg.run.report_to:
            try:
                import wandb
            except ImportError:
                raise RecipeError("run.report_to: wandb is not installed (pip install wandb)") from None
        run = cls(path, cfg.run.report_to)
        config_file.write_text(resolved)
        if "wandb" in cfg.run.report_to:
            import wandb

            run._wandb = wandb.init(
                project="r1pipe", name=cfg.run.name, dir=str(path), config=cfg.model_dump(mode="json"), resume="allow"
            )
        return run

    # -- metrics --------------------------------------------------------------------------------
    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def log_metrics(self, step: int, metrics: dict) -> None:
        """Append one record to metrics.jsonl and send scalars to TensorBoard / W&B."""
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        with open(self.metrics_file, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))}
        if "tensorboard" in self._report_to:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path / "tb"))
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def read_metrics(self) -> list[dict]:
        if not self.metrics_file.is_file():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint we resume from (they will be redone)."""
        for name in ("metrics.jsonl", "samples.jsonl"):
            file = self.path / name
            if not file.is_file():
                continue
            kept = [line for line in file.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
            atomic_write_text(file, "".join(line + "\n" for line in kept))

    def log_samples(self, step: int, samples: list[dict]) -> None:
        with open(self.path / "samples.jsonl", "a") as handle:
            handle.writelines(json.dumps({"step": int(step), **{k: _plain(v) for k, v in sample.items()}}) + "\n" for sample in samples)

    def plot(self, keys: list[str], filename: str = "curves.png", title: str | None = None) -> Path | None:
        """One panel per metric against step, from metrics.jsonl; keys never logged are skipped.

        Noisy metrics (`is_noisy`: rewards and accuracies, measured on one rollout batch each) are drawn
        as faint raw points under their exponential moving average (`ema`), and the panel title gives the
        mean of the first and of the last few steps, so a trend smaller than the step-to-step noise shows."""
        records = self.read_metrics()
        series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = min(3, len(series))
        rows = (len(series) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
        for ax, (key, points) in zip(axes.flat, series.items(), strict=False):
            draw_metric(ax, key, points)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(series):]:
            ax.axis("off")
        fig.suptitle(title or self.path.name)
        fig.tight_layout()
        out = self.path / "plots" / filename
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first (temporary directories are never listed)."""
        found = []
        for child in (self.path / "checkpoints").iterdir():
            name = child.name
            if child.is_dir() and name.startswith(_CHECKPOINT_PREFIX) and name[len(_CHECKPOINT_PREFIX):].isdigit():
                found.append((int(name[len(_CHECKPOINT_PREFIX):]), child))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def save_checkpoint(self, step: int, write_fn: Callable[[Path], None], keep_last: int | None = 2) -> Path:
        """Write `checkpoints/step_<step>` atomically, then prune all but the newest `keep_last`."""
        target = atomic_write_dir(self.path / "checkpoints" / f"{_CHECKPOINT_PREFIX}{step}", write_fn)
        if keep_last is not None:
            for _, old in self.checkpoints()[:-keep_last]:
                shutil.rmtree(old)
        self.logger.info("saved checkpoint %s", target)
        return target

    # -- outputs --------------------------------------------------------------------------------
    @property
    def outputs_file(self) -> Path:
        return self.path / "outputs.json"

    def write_outputs(self, outputs: dict) -> None:
        """Record what the finished stage produced; its presence marks the run complete."""
        atomic_write_text(self.outputs_file, json.dumps({k: _plain(v) for k, v in outputs.items()}, indent=2))

    def read_outputs(self) -> dict | None:
        return json.loads(self.outputs_file.read_text()) if self.outputs_file.is_file() else None

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


# ----------------------------------------------------------------------------------------------
# Curves

NOISY_METRICS = ("reward", "accuracy")


def is_noisy(key: str) -> bool:
    """Metrics measured on one rollout batch: reward, reward/<name>/mean, accuracy (not the /std ones),
    smoothed in plots."""
    parts = key.split("/")
    return (parts[0] in NOISY_METRICS or parts[-1] == "accuracy") and parts[-1] != "std"


def ema_span(count: int) -> int:
    """The EMA span for a curve of `count` points: a fifth of the run, 3 to 50 points."""
    return int(min(50, max(3, round(count / 5))))


def ema(values, span: int) -> list[float]:
    """Exponential moving average with alpha = 2 / (span + 1), bias-corrected (TensorBoard's debiased
    smoothing): early points are an average of the values so far, not pulled towards zero."""
    alpha = 2.0 / (span + 1)
    out, average, weight = [], 0.0, 0.0
    for value in values:
        average = (1 - alpha) * average + alpha * float(value)
        weight = (1 - alpha) * weight + alpha
        out.append(average / weight)
    return out


def draw_metric(ax, key: str, points: list[tuple[float, float]], label: str | None = None, color=None) -> None:
    """One metric on a matplotlib axis: a plain line, or for a noisy metric (`is_noisy`) faint raw
    points under their EMA, and the mean of the first and of the last `span` points in the title
    (or the legend label): the change over the run without the single-step noise."""
    steps, values = zip(*points, strict=True)
    if not is_noisy(key) or len(points) < 6:
        ax.plot(steps, values, lw=1.2, label=label, color=color)
        if label is None:
            ax.set_title(key, fontsize=10)
        return
    span = ema_span(len(points))
    line = ax.plot(steps, values, lw=0.6, alpha=0.3, marker=".", ms=3, color=color)[0]
    ax.plot(steps, ema(values, span), lw=1.8, color=line.get_color(),
            label=f"{label} (EMA {span})" if label else f"EMA (span {span})")
    head, tail = np.mean(values[:span]), np.mean(values[-span:])
    summary = f"first {span} steps {head:.3g} -> last {span} {tail:.3g}"
    if label is None:
        ax.set_title(f"{key}\n{summary}", fontsize=9)
        ax.legend(fontsize=7, loc="best")
    else:
        ax.plot([], [], " ", label=summary)


def _plain(value):
    """JSON-friendly scalars: tensors and numpy numbers become Python numbers, paths strings."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _changed_keys(old_yaml: str, new_yaml: str) -> str:
    import yaml

    def flatten(node, prefix=""):
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                out.update(flatten(value, f"{prefix}{key}."))
            return out
        return {prefix.rstrip("."): node}

    old, new = flatten(yaml.safe_load(old_yaml) or {}), flatten(yaml.safe_load(new_yaml) or {})
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")


def _setup_logger(log_file: Path) -> logging.Logger:
    """The `r1pipe` logger writes to the current run's log file and to the console (once)."""
    logger = logging.getLogger("r1pipe")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
            handler.close()
    file_handler = logging.FileHandler(log_file)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(file_handler)
    if not any(getattr(h, "_r1pipe_console", False) for h in logger.handlers):
        from rich.logging import RichHandler

        console = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        console._r1pipe_console = True
        logger.addHandler(console)
    return logger
