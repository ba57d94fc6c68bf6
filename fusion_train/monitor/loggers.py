"""Where metrics go: `metrics.jsonl` in the run folder always (guard alerts beside it in
`alerts.jsonl`), Weights & Biases on rank 0 when enabled (`WANDB_MODE=offline` honoured), and
TensorBoard when asked for. Each gets the same dict per logged step, and the samples generated
during training (`log_samples`): PNG files under `samples/` and `samples.jsonl` in the run folder,
a table and images in W&B, text and images in TensorBoard.

`metrics.jsonl` also marks where each invocation starts, `{"step": N, "resumed_from": PATH or
null, "time": ...}`: the steps after N that an earlier invocation logged before it was killed are
redone, so a reader takes the last record of each step (as `fusion-report` does)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from fusion_train.generate.documents import Sound
from fusion_train.generate.page import Sample, as_text, save_output
from fusion_train.storage import check_room, writing


def _pictures(sample: Sample) -> list[np.ndarray]:
    return [s for s in sample.output if isinstance(s, np.ndarray)]


def _sounds(sample: Sample) -> list[Sound]:
    return [s for s in sample.output if isinstance(s, Sound)]


class JsonlLogger:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.file = open(run_dir / "metrics.jsonl", "a+b")
        if self.file.tell() and (self.file.seek(-1, 2), self.file.read(1))[1] != b"\n":
            self.file.write(b"\n")  # after half a line from a killed or failed invocation: a line of its own

    def log(self, metrics: dict, step: int) -> None:
        self._write({"step": step, **metrics})

    def mark_start(self, step: int, resumed_from: Path | None) -> None:
        self._write({"step": step, "resumed_from": str(resumed_from) if resumed_from else None, "time": time.time()})

    def _write(self, record: dict) -> None:
        with writing(self.run_dir, "metrics.jsonl", setting="trainer.run_dir"):
            self.file.write((json.dumps(record) + "\n").encode())
            self.file.flush()

    def log_samples(self, samples: list[Sample], step: int) -> None:
        folder = self.run_dir / "samples" / f"step_{step:07d}"
        with open(self.run_dir / "samples.jsonl", "a") as records:
            for index, sample in enumerate(samples):
                record = save_output(sample, folder, f"{index:03d}", self.run_dir)
                records.write(json.dumps({"step": step, "index": index, **record}) + "\n")

    def alert(self, title: str, text: str, step: int) -> None:
        with open(self.run_dir / "alerts.jsonl", "a") as alerts:
            alerts.write(json.dumps({"step": step, "time": time.time(), "title": title, "text": text}) + "\n")

    def close(self) -> None:
        self.file.close()


class WandbLogger:
    """One W&B run per training run: a resumed or requeued job continues it by its stored id.

    Rows go in W&B's own ever-increasing order and the charts' x-axis is `trainer/step` (or
    `data/tokens_seen`): after a rollback the trainer's step goes back, which W&B's step may not.
    Panels group by the key's prefix (loss/, norms/, attn/, ...). The API key comes from the
    environment or W&B's own login and is never put in the config or the run files.
    """

    def __init__(self, run_dir: Path, project: str, entity, group, tags, config: dict, run_id: str | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project, entity=entity, group=group, tags=list(tags), config=config, dir=str(run_dir),
            id=run_id, resume="allow", settings=wandb.Settings(console="off"),
        )  # fmt: skip
        self.run.define_metric("trainer/step")
        self.run.define_metric("*", step_metric="trainer/step")
        self.run_id = self.run.id

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({"trainer/step": step, **metrics})

    def log_samples(self, samples: list[Sample], step: int) -> None:
        table = self.wandb.Table(columns=["step", "prompt", "mode", "output", "image", "stop"])
        row = {"trainer/step": step}
        for index, sample in enumerate(samples):
            images = [self.wandb.Image(p, caption=as_text(sample.prompt)) for p in _pictures(sample)]
            table.add_data(step, as_text(sample.prompt), sample.mode, as_text(sample.output),
                           images[0] if images else None, sample.stop)  # fmt: skip
            if images:
                row[f"samples/prompt_{index}"] = images
            sounds = [self.wandb.Audio(s.samples, sample_rate=s.rate, caption=as_text(sample.prompt))
                      for s in _sounds(sample) if s.samples.size]  # fmt: skip
            if sounds:
                row[f"samples/prompt_{index}_audio"] = sounds
        self.run.log({**row, "samples/table": table})

    def alert(self, title: str, text: str, step: int) -> None:
        self.run.alert(title=title, text=text, level=self.wandb.AlertLevel.WARN)

    def close(self) -> None:
        self.run.finish()


class TensorBoardLogger:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "logging.tensorboard=true needs the tensorboard package: pip install tensorboard"
            ) from error
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_samples(self, samples: list[Sample], step: int) -> None:
        for index, sample in enumerate(samples):
            self.writer.add_text(
                f"samples/prompt_{index}", f"{as_text(sample.prompt)} → {as_text(sample.output)}", step
            )
            for k, picture in enumerate(_pictures(sample)):
                self.writer.add_image(f"samples/prompt_{index}_{k}", picture, step, dataformats="HWC")
        self.writer.flush()

    def alert(self, title: str, text: str, step: int) -> None:
        self.writer.add_text("guard", f"**{title}**: {text}", step)

    def close(self) -> None:
        self.writer.close()


class Loggers:
    """A run's loggers as one: on rank 0 the JSONL file, W&B and TensorBoard as configured; none
    elsewhere. Empty until `open` (the W&B run to continue is known once a checkpoint is read)."""

    def __init__(self):
        self.loggers: list = []
        self.run_dir: Path | None = None

    def open(self, run_dir: Path, cfg, config: dict, step: int, resumed_from: Path | None,
             wandb_run_id: str | None) -> str | None:  # fmt: skip
        """`cfg`: the `logging` group; `config`: the whole run's, for W&B. Returns the W&B run's id."""
        self.run_dir = run_dir
        jsonl = JsonlLogger(run_dir)
        jsonl.mark_start(step, resumed_from)
        self.loggers = [jsonl]
        if cfg.wandb:
            wandb_logger = WandbLogger(run_dir, cfg.project, cfg.entity, cfg.group, cfg.tags, config, wandb_run_id)
            wandb_run_id = wandb_logger.run_id
            self.loggers.append(wandb_logger)
        if cfg.tensorboard:
            self.loggers.append(TensorBoardLogger(run_dir))
        return wandb_run_id

    def log(self, metrics: dict, step: int) -> None:
        if self.loggers:
            check_room(self.run_dir, "the run's logs (metrics.jsonl, W&B's run files)", setting="trainer.run_dir")
        for logger in self.loggers:
            logger.log(metrics, step)

    def log_samples(self, samples: list[Sample], step: int) -> None:
        for logger in self.loggers:
            logger.log_samples(samples, step)

    def alert(self, title: str, text: str, step: int) -> None:
        for logger in self.loggers:
            logger.alert(title, text, step)

    def close(self) -> None:
        """Before any exit, or an offline W&B run loses its history."""
        for logger in self.loggers:
            logger.close()
        self.loggers = []
