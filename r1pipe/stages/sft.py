"""Stage `sft`: chat SFT (cold start, or a student on distilled data), loss on assistant tokens only."""

from __future__ import annotations

from pydantic import Field

from r1pipe.config import StageConfig, Workload, register_stage
from r1pipe.data import DataSection, build_sft_rows
from r1pipe.train.lm import train_lm
from r1pipe.train.sections import ModelSection, TrainSection, training_workload


class SFTConfig(StageConfig):
    model: ModelSection = Field(description="Policy to fine-tune (HF directory or r1pipe checkpoint).")
    data: DataSection = Field(
        description="Chat sources: `messages`, or `prompt` + `completion` (+ `reasoning` for the R1 think format)."
    )
    train: TrainSection = Field(description="Optimisation, schedule, precision and checkpoints.")

    def workload(self) -> Workload:
        return training_workload(self.model, self.train, self.data.max_length)


@register_stage("sft", SFTConfig,
                summary="supervised fine-tuning on chats (cold start, or a student on distilled data)")
def run(cfg: SFTConfig, run_dir) -> dict:
    return train_lm(cfg, run_dir, build_sft_rows)
