"""Batched, modality-constrained generation with a Chameleon model.

Prompts of different lengths share a batch (left-padded; the KV cache keeps each row's own
positions). Each step: one forward of every row's newest token, guidance combined for image-mode
requests, the constraints' mask, the sampler; the loop ends when every request is finished. The
model is only read: call it under `model.eval()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from fusion_train.generate.constraints import ModalityConstraints, Mode, VideoPlan, video_script
from fusion_train.generate.guidance import STREAMS, Guidance, combine, guidance_prompts
from fusion_train.generate.sampling import Sampling, next_tokens
from fusion_train.model.kv_cache import KVCache
from fusion_train.vocab import VocabLayout


@dataclass
class Request:
    prompt: list[int]  # ids from `<s>`; in image mode ending with `<racm3:break>`, in video mode inside a video
    mode: Mode = Mode.TEXT
    video: VideoPlan | None = None  # what a video-mode request makes


@dataclass
class Generation:
    tokens: list[int]  # the generated ids, the prompt not included
    stop: str  # end_of_sequence, end_of_turn, image_done, audio_done, video_done, stop_sequence, max_new_tokens
    # or context_full


class Generator:
    def __init__(self, model, vocab: VocabLayout, use_cache: bool = True,
                 agree: Callable[[torch.Tensor], torch.Tensor] | None = None):  # fmt: skip
        """`use_cache=False` recomputes the whole sequence for every token (a reference, and the
        benchmark's baseline). `agree`: given each step's tokens, returns those every process uses:
        under ZeRO-3 all ranks run the forwards together and must stop together."""
        self.model, self.vocab, self.use_cache, self.agree = model, vocab, use_cache, agree
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.context = model.cfg.max_seq_len

    @torch.no_grad()
    def generate(self, requests: list[Request], sampling: Sampling, max_new_tokens: int,
                 guidance: Guidance | None = None, progress: bool = False,
                 stop_when: Callable[[int, list[int]], bool] | None = None) -> list[Generation]:  # fmt: skip
        """`max_new_tokens` bounds text and interleaved requests; an image-mode request is its
        picture's codes and `<eoss>`. `stop_when(request index, its tokens so far)`, asked after each
        token a request emits, finishes it when True (a benchmark's stop strings)."""
        scripts = [video_script(self.vocab, r.video) if r.mode == Mode.VIDEO else None for r in requests]
        budgets = [
            self._budget(i, r, max_new_tokens, s) for i, (r, s) in enumerate(zip(requests, scripts, strict=True))
        ]
        constraints = ModalityConstraints(self.vocab, [r.mode for r in requests], budgets, self.device, scripts)
        streams = [self._streams(r, guidance) for r in requests]
        sequences = [list(s) for request_streams in streams for s in request_streams]
        request_of_row = torch.tensor([i for i, s in enumerate(streams) for _ in s], device=self.device)
        generated: list[list[int]] = [[] for _ in requests]
        stops = ["context_full" if b < max_new_tokens and r.mode not in (Mode.IMAGE, Mode.VIDEO) else "max_new_tokens"
                 for r, b in zip(requests, budgets, strict=True)]  # fmt: skip
        rng = sampling.generator()
        logits, cache = self._prefill(sequences, max(budgets))
        for _ in tqdm(range(max(budgets)), desc="generating", disable=not progress, leave=False):
            request_logits = self._combine(logits, streams, guidance)
            tokens = next_tokens(constraints.mask(request_logits), sampling, rng)
            if self.agree is not None:
                tokens = self.agree(tokens)
            was_finished = constraints.finished.clone()
            emitted = constraints.advance(tokens)
            self._record(tokens, emitted, constraints.finished & ~was_finished, requests, generated, stops)
            if stop_when is not None:
                self._stop_early(stop_when, emitted, constraints, generated, stops)
            if constraints.done:
                break
            row_tokens = tokens[request_of_row]
            if self.use_cache:
                logits = self.model.decode(row_tokens[:, None], cache)[:, -1]
            else:
                for sequence, token in zip(sequences, row_tokens.tolist(), strict=True):
                    sequence.append(token)
                logits, _ = self._prefill(sequences, 0)
        return [Generation(tokens, stop) for tokens, stop in zip(generated, stops, strict=True)]

    def _budget(self, index: int, request: Request, max_new_tokens: int, script: torch.Tensor | None) -> int:
        if not request.prompt or request.prompt[0] != self.vocab.bos:
            raise ValueError(f"prompt {index} must start with <s> (id {self.vocab.bos})")
        if len(request.prompt) >= self.context:
            raise ValueError(
                f"prompt {index} has {len(request.prompt)} tokens: the model's context is {self.context} "
                "(model.max_seq_len); shorten it"
            )
        room = self.context - len(request.prompt)
        if script is not None:
            if len(script) > room:
                raise ValueError(
                    f"prompt {index}: {request.video.frames} video frames need {len(script)} tokens, and the "
                    f"model's context (model.max_seq_len={self.context}) leaves {room} after the prompt: ask for "
                    "fewer frames"
                )
            return len(script)
        wanted = self.vocab.image_tokens + 1 if request.mode == Mode.IMAGE else max_new_tokens
        return min(wanted, room)

    def _streams(self, request: Request, guidance: Guidance | None) -> list[list[int]]:
        if request.mode == Mode.IMAGE and request.prompt[-1] != self.vocab.begin_of_image:
            raise ValueError("an image-mode prompt ends with <racm3:break>")
        if request.mode == Mode.AUDIO and request.prompt[-1] != self.vocab.begin_of_audio:
            raise ValueError("an audio-mode prompt ends with <begin-audio>")
        if request.mode == Mode.VIDEO and not inside_video(request.prompt, self.vocab):
            raise ValueError(
                "a video-mode prompt ends inside a video: after <begin-video> and its header, or its chunks"
            )
        if guidance is not None and request.mode == Mode.IMAGE:
            return guidance_prompts(request.prompt, self.vocab)
        return [request.prompt]

    def _prefill(self, sequences: list[list[int]], room: int) -> tuple[torch.Tensor, KVCache]:
        """Last-position logits of left-padded `sequences`, and their cache with `room` more slots."""
        length = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), length), self.vocab.pad, dtype=torch.long)
        valid = torch.zeros(len(sequences), length, dtype=torch.bool)
        for row, sequence in enumerate(sequences):
            ids[row, length - len(sequence) :] = torch.tensor(sequence)
            valid[row, length - len(sequence) :] = True
        cache = KVCache.for_model(self.model.cfg, len(sequences), length + room, self.device, self.dtype)
        logits = self.model.decode(ids.to(self.device), cache, valid.to(self.device))
        return logits[:, -1], cache

    @staticmethod
    def _combine(logits: torch.Tensor, streams: list[list[list[int]]], guidance: Guidance | None) -> torch.Tensor:
        """One row of logits per request: its only stream's, or its three streams' guided mix."""
        first_rows = torch.tensor([0, *[len(s) for s in streams[:-1]]]).cumsum(0)
        combined = logits[first_rows.to(logits.device)].float()
        guided = [i for i, s in enumerate(streams) if len(s) == STREAMS]
        if guided:
            rows = torch.cat([first_rows[i] + torch.arange(STREAMS) for i in guided]).to(logits.device)
            combined[guided] = combine(logits[rows], guidance)
        return combined

    @staticmethod
    def _stop_early(stop_when, emitted, constraints: ModalityConstraints, generated, stops) -> None:
        for i in (emitted & ~constraints.finished).nonzero().flatten().tolist():
            if stop_when(i, generated[i]):
                constraints.finished[i] = True
                stops[i] = "stop_sequence"

    def _record(self, tokens, emitted, newly_finished, requests, generated, stops) -> None:
        v = self.vocab
        reasons = {v.eos: "end_of_sequence", v.sft_separator: "end_of_turn"}
        for i in emitted.nonzero().flatten().tolist():
            generated[i].append(int(tokens[i]))
        for i in newly_finished.nonzero().flatten().tolist():
            token = int(tokens[i])
            if token in reasons:
                stops[i] = reasons[token]
            elif requests[i].mode == Mode.IMAGE and token == v.end_of_image:
                stops[i] = "image_done"
            elif requests[i].mode == Mode.AUDIO and token == v.end_of_audio:
                stops[i] = "audio_done"
            elif requests[i].mode == Mode.VIDEO and token == v.end_of_video:
                stops[i] = "video_done"


def inside_video(ids: list[int], vocab: VocabLayout) -> bool:
    """Whether `ids` end in an open video block, between its chunks."""
    opened = max((i for i, token in enumerate(ids) if token == vocab.begin_of_video), default=-1)
    between_chunks = ids[-1] in (vocab.end_of_image, vocab.end_of_audio) or vocab.begin_of_image not in ids[opened:]
    return opened >= 0 and vocab.end_of_video not in ids[opened:] and between_chunks
