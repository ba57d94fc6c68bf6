"""Where metrics go: `metrics.jsonl` in the run folder always, Weights & Biases on rank 0 when
enabled (`WANDB_MODE=offline` honoured). Each gets the same dict per logged step."""

from __future__ import annotations

import json
from pathlib import Path


class JsonlLogger:
    def __init__(self, run_dir: Path):
        self.file = open(run_dir / "metrics.jsonl", "a")

    def log(self, metrics: dict, step: int) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class WandbLogger:
    """One W&B run per training run: a resumed or requeued job continues it by its stored id."""

    def __init__(self, run_dir: Path, project: str, entity, group, tags, config: dict, run_id: str | None):
        import wandb

        self.run = wandb.init(
            project=project, entity=entity, group=group, tags=list(tags), config=config, dir=str(run_dir),
            id=run_id, resume="allow", settings=wandb.Settings(console="off"),
        )  # fmt: skip
        self.run.define_metric("*", step_metric="trainer/step")
        self.run_id = self.run.id

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({"trainer/step": step, **metrics}, step=step)

    def close(self) -> None:
        self.run.finish()
