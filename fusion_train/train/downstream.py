"""Downstream tasks inside training (`trainer.eval_tasks`), every `trainer.eval_every` steps, as
OLMo-core's in-loop evaluator runs them: small fixed subsets scored without leaving the training
processes, logged as `downstream/<task>/<metric>` (W&B, metrics.jsonl, fusion-report), with what
each call cost (`downstream/<task>/seconds`, and a line in the log).

Multiple choice: every rank scores its share of the questions (rank r takes questions r, r + W,
...) in the same number of forwards, since ZeRO-3 gathers parameters inside each (and experts spread
over ranks exchange tokens); the counts are summed over the ranks. Captions are generated as the
training samples are (rank 0 alone, or every rank together under ZeRO-3 or expert parallelism:
monitor/samples.py) and scored on rank 0. The prompts are encoded when
the run starts, so that a missing file is an error before the first step.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fusion_train.data.trained_with import TrainedWith, load_tokenizers, recorded_tokenizer_paths
from fusion_train.eval.image_to_text import Prompting, answer, caption_scores, prompt_ids, read_captions
from fusion_train.eval.multiple_choice import read_questions, right_answers
from fusion_train.eval.scoring import continuation_scores
from fusion_train.generate.documents import Codec
from fusion_train.generate.generator import Generator
from fusion_train.monitor.observer import Observer
from fusion_train.monitor.samples import inference, rank_zeros_tokens
from fusion_train.train.config import ConfigError, DownstreamTask, weights_spread_over_ranks

log = logging.getLogger(__name__)
KINDS = ("multiple_choice", "caption")


class MultipleChoice:
    def __init__(self, spec: DownstreamTask, codec: Codec, rank: int, world_size: int, device: torch.device):
        questions = read_questions(Path(spec.path), spec.limit)
        self.mine = questions[rank::world_size]
        self.pairs = [pair for question in self.mine for pair in question.pairs(codec)]
        self.padding = questions[0].pairs(codec)[:1]  # what a rank whose share has ended scores
        most_pairs = max(sum(len(q.choices) for q in questions[r::world_size]) for r in range(world_size))
        self.forwards, self.batch_size = math.ceil(most_pairs / spec.batch_size), spec.batch_size
        self.vocab, self.device = codec.vocab, device

    def run(self, model) -> dict[str, float]:
        scores = []
        for index in range(self.forwards):
            batch = self.pairs[index * self.batch_size : (index + 1) * self.batch_size]
            scored = continuation_scores(model, self.vocab, batch or self.padding)
            scores += [log_likelihood for log_likelihood, _ in scored[: len(batch)]]
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)
        for question in self.mine:
            mine, scores = scores[: len(question.choices)], scores[len(question.choices) :]
            counts += torch.tensor([*right_answers(question, mine), 1.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)
        right, right_normalised, asked = counts.tolist()
        return {"acc": right / asked, "acc_norm": right_normalised / asked}


class Captions:
    def __init__(self, spec: DownstreamTask, codec: Codec, generates: bool, everyone: bool, rank: int):
        examples = read_captions(Path(spec.annotations), Path(spec.images))
        self.asked = examples[: spec.limit]
        self.prompts = (
            prompt_ids(codec, self.asked, Prompting("", spec.shots, spec.chat), examples) if generates else []
        )
        self.codec, self.spec, self.everyone, self.rank = codec, spec, everyone, rank

    def run(self, model) -> dict[str, float]:
        if not self.prompts:
            return {}
        generator = Generator(model, self.codec.vocab, agree=rank_zeros_tokens if self.everyone else None)
        captions = answer(generator, self.codec, self.prompts, self.spec.batch_size, self.spec.max_new_tokens)
        if self.rank != 0:
            return {}
        return caption_scores({e.key: c for e, c in zip(self.asked, captions, strict=True)},
                              {e.key: e.references for e in self.asked})  # fmt: skip


class ScheduledDownstream(Observer):
    def __init__(self, trainer):
        cfg = trainer.cfg
        self.trainer, self.every, self.model = trainer, cfg.trainer.eval_every, trainer.engine.module
        everyone = weights_spread_over_ranks(cfg)
        dataset = trainer.loader.dataset
        trained_with = TrainedWith(trainer.vocab, recorded_tokenizer_paths(cfg.data), dataset.fingerprints)
        self.tasks = []
        for index, spec in enumerate(cfg.trainer.eval_tasks):
            where = f"trainer.eval_tasks[{index}] ({spec.name})"
            try:
                self.tasks.append((spec.name, self._task(spec, trained_with, everyone)))
            except (ValueError, FileNotFoundError) as error:
                raise ConfigError(f"{where}: {error}") from None

    def _task(self, spec: DownstreamTask, trained_with: TrainedWith, everyone: bool):
        trainer = self.trainer
        if spec.kind not in KINDS:
            raise ValueError(f"kind {spec.kind!r} is not one of {KINDS}")
        needed = ("path",) if spec.kind == "multiple_choice" else ("annotations", "images")
        if any(getattr(spec, setting) is None for setting in needed):
            raise ValueError(f"a {spec.kind} task needs {' and '.join(needed)}")
        if spec.kind == "multiple_choice":
            codec = Codec(*load_tokenizers(trained_with, None, None, trainer.device, "the run")[:2])
            return MultipleChoice(spec, codec, trainer.rank, trainer.world_size, trainer.device)
        if shutil.which("java") is None:
            raise ValueError("caption tasks are scored by the COCO caption toolkit, whose tokenizer runs on Java: "
                             "install it (apt-get install default-jre-headless)")  # fmt: skip
        generates = everyone or trainer.rank == 0
        codec = Codec(*load_tokenizers(trained_with, None, None, trainer.device, "the run")[:2])
        if codec.images is None:
            raise ValueError("a caption task reads pictures, and the run's shards record no image tokenizer")
        return Captions(spec, codec, generates, everyone, trainer.rank)

    def after_step(self, step: int) -> None:
        if step % self.every:
            return
        metrics = {}
        for name, task in self.tasks:
            started = time.perf_counter()
            with inference(self.model, self.trainer.device, lambda: self.trainer.sequence.unsharded(self.model)):
                values = task.run(self.model)
            seconds = time.perf_counter() - started
            metrics |= {f"downstream/{name}/{metric}": value for metric, value in values.items()}
            metrics[f"downstream/{name}/seconds"] = seconds
            if self.trainer.rank == 0:
                shown = ", ".join(f"{metric} {value:.4g}" for metric, value in values.items())
                log.info("downstream task %s at step %d: %s (%.2f s)", name, step, shown, seconds)
        self.trainer.loggers.log(metrics, step)
