"""Samples during training: fixed prompts generated every `trainer.eval_every` steps with a fixed
seed, so that a user sees what the model has learned (text continuation, caption -> image,
image -> caption) as it learns it. The loggers take them: PNG files and `samples.jsonl` in the run
folder, images and a table in W&B, and `fusion-report` shows them as a grid (prompts by steps).

Generation observes: the model is put back in train mode, the training RNG streams are restored
(sampling draws from its own seeded generator), the KV cache is freed. Under ZeRO-1/2 rank 0
generates alone; under ZeRO-3 or expert parallelism every rank runs the same forwards, since each
holds only a part of the weights, and rank 0's tokens are broadcast each step so that the ranks
stop together.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torch.distributed as dist

from fusion_train.data.trained_with import TrainedWith, load_tokenizers
from fusion_train.generate.constraints import Mode
from fusion_train.generate.documents import Codec
from fusion_train.generate.generator import Generator, Request
from fusion_train.generate.guidance import Guidance
from fusion_train.generate.page import Sample
from fusion_train.generate.sampling import Sampling
from fusion_train.monitor.config import SamplesConfig
from fusion_train.monitor.loggers import Loggers
from fusion_train.monitor.observer import Observer


class TrainingSamples(Observer):
    def __init__(self, cfg: SamplesConfig, trained_with: TrainedWith, model: torch.nn.Module, loggers: Loggers,
                 every: int, device: torch.device, rank: int, everyone: bool,
                 unsharded: Callable[[], AbstractContextManager] = contextlib.nullcontext):  # fmt: skip
        """Samples from `model` every `every` optimizer steps, to `loggers`; `everyone`: every rank
        takes part in each forward (the weights are spread over the ranks). `unsharded()`: the
        model on whole sequences meanwhile (under sequence parallelism the prompts are not split:
        each rank that generates runs the whole model on them, as without it)."""
        self.cfg, self.model, self.loggers, self.every = cfg, model, loggers, every
        self.unsharded = unsharded
        self.device, self.rank = device, rank
        self.everyone = everyone
        self.requests: list[Request] = []
        self.codec = None
        if not (self.everyone or rank == 0):
            return
        where = "eval_samples: the run"
        self.codec = Codec(*load_tokenizers(trained_with, cfg.text_tokenizer, cfg.image_tokenizer, device, where,
                                            cfg.audio_tokenizer))  # fmt: skip
        for i, prompt in enumerate(cfg.prompts):
            mode = prompt.get("mode", "text")
            ids = self.codec.prompt_ids(list(prompt["prompt"]), mode, cfg.chat, f"eval_samples.prompts[{i}]",
                                        Path(cfg.image_dir))  # fmt: skip
            self.requests.append(Request(ids, Mode(mode)))

    def after_step(self, step: int) -> None:
        if step % self.every == 0:
            samples, seconds = self.generate()
            self.loggers.log_samples(samples, step)
            self.loggers.log({"samples/seconds": seconds}, step)

    def generate(self) -> tuple[list[Sample], float]:
        """This step's samples (on rank 0; an empty list elsewhere) and the seconds they took."""
        if self.codec is None:
            return [], 0.0
        started = time.perf_counter()
        agree = rank_zeros_tokens if self.everyone else None
        sampling = Sampling(self.cfg.temperature, self.cfg.top_p, self.cfg.top_k, self.cfg.seed)
        guidance = Guidance(self.cfg.image_scale, self.cfg.text_scale) if self.cfg.guidance else None
        with inference(self.model, self.device, self.unsharded):
            generator = Generator(self.model, self.codec.vocab, agree=agree)
            outputs = generator.generate(self.requests, sampling, self.cfg.max_new_tokens, guidance)
        if self.rank != 0:
            return [], 0.0
        samples = []
        for prompt, request, output in zip(self.cfg.prompts, self.requests, outputs, strict=True):
            pictures_and_text = self.codec.decode(output.tokens, request.mode)
            samples.append(Sample(list(prompt["prompt"]), request.mode.value, pictures_and_text, output.stop,
                                  len(output.tokens)))  # fmt: skip
        return samples, time.perf_counter() - started


@contextlib.contextmanager
def inference(model: torch.nn.Module, device: torch.device, unsharded: Callable[[], AbstractContextManager]):
    """`model` in eval mode on whole sequences meanwhile; afterwards back in train mode, the
    training RNG streams as they were and the KV cache's memory freed."""
    cuda = [device] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=cuda), unsharded():
            yield
    finally:
        model.train()
        if cuda:
            torch.cuda.empty_cache()


def rank_zeros_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Every rank's generation step takes rank 0's tokens (ZeRO-3: the ranks stop together)."""
    dist.broadcast(tokens, src=0)
    return tokens
