"""Stage `pretrain`: next-token training on raw text (tiny base models for the demo and tests)."""

from __future__ import annotations

from pydantic import Field

from r1pipe.config import StageConfig, Workload, register_stage
from r1pipe.data import DataSection, build_pretrain_rows
from r1pipe.train.lm import train_lm
from r1pipe.train.sections import ModelSection, TrainSection, training_workload


class PretrainConfig(StageConfig):
    model: ModelSection = Field(description="Policy to train (a V3 preset name starts from random weights).")
    data: DataSection = Field(description="Raw text sources: each record's `text` field (map with columns).")
    train: TrainSection = Field(description="Optimisation, schedule, precision and checkpoints.")

    def workload(self) -> Workload:
        return training_workload(self.model, self.train, self.data.max_length)


@register_stage("pretrain", PretrainConfig,
                summary="next-token training of a base model on raw text")
def run(cfg: PretrainConfig, run_dir) -> dict:
    return train_lm(cfg, run_dir, build_pretrain_rows)
