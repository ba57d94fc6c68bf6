"""Modality-constrained decoding by logit masking, as Meta's inference does (Chameleon §2.4).

Per row of a batch, a small state machine over the vocabulary layout:

- **text**: text pieces, `<unk>` and the two stops (`</s>`, the SFT end-of-turn id). Never an image
  code, an image marker, `<s>`, `<pad>` or an unused reserved id.
- **image**: the prompt ends with `<racm3:break>`; exactly `grid²` image codes follow, then
  `<eoss>` is forced and the row is done.
- **audio**: the prompt ends with `<begin-audio>`; codes follow frame by frame, each position
  admitting only its residual level's codes; `<end-audio>` may follow any whole frame, and is forced
  when the budget leaves room for no further frame; then the row is done.
- **video**: the prompt ends inside an open video block (after `<begin-video>` and its header, or
  after the chunks of a video to continue); the rest follows a script: per frame `<racm3:break>`,
  `grid²` image codes, `<eoss>`, then, for a video with sound, `<begin-audio>`, the frame's span of
  audio frames level by level, `<end-audio>`; `<end-video>` after the last frame. Markers are
  forced, codes sampled among their kind; the row is done after `<end-video>`.
- **interleaved**: text as above, plus `<racm3:break>` while a whole image block still fits in the
  row's budget, and (in a layout with audio) `<begin-audio>` while a frame and the end still fit;
  after either the row is in that block and then back in text.

A row is finished at a stop id, at the end of its image, clip or video (image, audio and video
modes) or when its budget is spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from fusion_train.vocab import Modality, VocabLayout


class Mode(str, Enum):
    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"
    VIDEO = "video"
    INTERLEAVED = "interleaved"


@dataclass(frozen=True)
class VideoPlan:
    """What a video-mode request makes: `frames` more frames, each with `clip_codes` audio frames of
    sound (0: a silent video)."""

    frames: int
    clip_codes: int = 0


IMAGE_CODE = -1  # a script entry: an image code; -2 - q: a code of audio level q; an id >= 0: that id


def video_script(vocab: VocabLayout, plan: VideoPlan) -> torch.Tensor:
    """The video layout's positions from the open block on: the ids to force and the kinds of code."""
    frame = [vocab.begin_of_image, *[IMAGE_CODE] * vocab.image_tokens, vocab.end_of_image]
    if plan.clip_codes:
        levels = [IMAGE_CODE - 1 - level for level in range(vocab.audio_levels)]
        frame += [vocab.begin_of_audio, *levels * plan.clip_codes, vocab.end_of_audio]
    return torch.tensor(frame * plan.frames + [vocab.end_of_video])


def stop_ids(vocab: VocabLayout) -> tuple[int, int]:
    """`</s>` and the SFT end of turn (`<reserved08706>` in Chameleon's layout)."""
    return vocab.eos, vocab.sft_separator


def text_ids(vocab: VocabLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean over the vocabulary: what a text position may emit."""
    allowed = vocab.modality_mask(Modality.TEXT, device)
    allowed[[vocab.unk, *stop_ids(vocab)]] = True
    return allowed


class ModalityConstraints:
    def __init__(self, vocab: VocabLayout, modes: list[Mode], budgets: list[int], device: torch.device | str = "cpu",
                 scripts: list[torch.Tensor | None] | None = None):  # fmt: skip
        """`budgets`: tokens each row may still emit (max_new_tokens, less where the context ends);
        `scripts`: each video-mode row's `video_script` (its budget is the script's length)."""
        self.vocab = vocab
        self.image_tokens, self.levels = vocab.image_tokens, vocab.audio_levels
        modes = [Mode(m) for m in modes]
        if Mode.AUDIO in modes and not vocab.audio_ids:
            raise ValueError("audio mode: the model's vocabulary has no audio codes")
        self._video(modes, scripts or [None] * len(modes), device)
        needs = {Mode.IMAGE: (vocab.image_tokens + 1, f"{vocab.image_tokens} codes and <eoss>"),
                 Mode.AUDIO: (self.levels + 1, f"a frame of {self.levels} codes and <end-audio>")}  # fmt: skip
        for mode, (least, what) in needs.items():
            too_small = [i for i, (m, b) in enumerate(zip(modes, budgets, strict=True)) if m == mode and b < least]
            if too_small:
                raise ValueError(
                    f"{mode.value} mode needs room for {what} ({least} tokens); rows {too_small} have budgets "
                    f"{[budgets[i] for i in too_small]}: raise max_new_tokens or shorten the prompt"
                )
        self.interleaved = self._rows(modes, Mode.INTERLEAVED, device)
        self.image_mode, self.audio_mode = self._rows(modes, Mode.IMAGE, device), self._rows(modes, Mode.AUDIO, device)
        self.in_image, self.in_audio = self.image_mode.clone(), self.audio_mode.clone()  # prompts open the block
        self.codes_done = torch.zeros(len(modes), dtype=torch.long, device=device)
        self.remaining = torch.tensor(budgets, dtype=torch.long, device=device)
        self.finished = self.remaining <= 0
        self.text = text_ids(vocab, device)
        self.codes = vocab.modality_mask(Modality.IMAGE, device)
        ids = torch.arange(vocab.vocab_size, device=device)
        self.level_codes = torch.stack([(ids >= start) & (ids < end) for start, end in
                                        map(vocab.audio_level_range, range(self.levels))]) if self.levels else None  # fmt: skip
        self.stops = torch.tensor(stop_ids(vocab), device=device)

    def _video(self, modes: list[Mode], scripts: list[torch.Tensor | None], device) -> None:
        """The video rows' scripts, padded into one table, and what each kind of code may be."""
        unscripted = [
            row for row, (m, s) in enumerate(zip(modes, scripts, strict=True)) if m == Mode.VIDEO and s is None
        ]
        if unscripted:
            raise ValueError(f"video mode: row {unscripted[0]} has no video_script (what its frames and sound are)")
        self.video_mode = self._rows(modes, Mode.VIDEO, device)
        length = max((len(s) for s in scripts if s is not None), default=0)
        self.scripts = torch.full((len(modes), length), self.vocab.pad, dtype=torch.long, device=device)
        for row, script in enumerate(scripts):
            if script is not None:
                self.scripts[row, : len(script)] = script.to(device)
        ids = torch.arange(self.vocab.vocab_size, device=device)
        self.code_kinds = torch.stack([self.vocab.modality_mask(Modality.IMAGE, device)] + [
            (ids >= start) & (ids < end) for start, end in map(self.vocab.audio_level_range, range(self.levels))])  # fmt: skip
        self.position = torch.zeros(len(modes), dtype=torch.long, device=device)

    def _follow_scripts(self, allowed: torch.Tensor) -> None:
        """Each video row's next position: its forced id, or the codes of its kind."""
        rows = self.video_mode & ~self.finished
        if not rows.any():
            return
        step = self.scripts[rows, self.position[rows]]
        forced = step >= 0
        masks = self.code_kinds[(IMAGE_CODE - step).clamp(min=0)]
        masks[forced] = False
        masks[forced.nonzero().flatten(), step[forced]] = True
        allowed[rows] = masks

    @staticmethod
    def _rows(modes: list[Mode], mode: Mode, device) -> torch.Tensor:
        return torch.tensor([m == mode for m in modes], device=device)

    def allowed(self) -> torch.Tensor:
        """[B, vocab] boolean: the ids each row may emit next (a finished row: `<pad>` alone)."""
        v = self.vocab
        in_codes = self.in_image & (self.codes_done < self.image_tokens)
        closing = self.in_image & ~in_codes
        allowed = torch.where(in_codes[:, None], self.codes, self.text)
        allowed[closing] = False
        allowed[closing, v.end_of_image] = True
        outside = ~self.in_image & ~self.in_audio
        may_open = self.interleaved & outside & (self.remaining >= v.image_block_length)
        allowed[may_open, v.begin_of_image] = True
        if self.levels:
            self._audio(allowed, outside)
        self._follow_scripts(allowed)
        allowed[self.finished] = False
        allowed[self.finished, v.pad] = True
        return allowed

    def _audio(self, allowed: torch.Tensor, outside: torch.Tensor) -> None:
        """Inside a clip, the codes of the position's level, and the end after a whole frame (forced
        when no further frame fits); in interleaved text, the opening while a frame and the end fit."""
        v = self.vocab
        level = self.codes_done % self.levels
        at_frame_end = self.in_audio & (level == 0) & (self.codes_done > 0)
        must_close = at_frame_end & (self.remaining < self.levels + 1)
        allowed[self.in_audio] = self.level_codes[level[self.in_audio]]
        allowed[at_frame_end, v.end_of_audio] = True
        allowed[must_close] = False
        allowed[must_close, v.end_of_audio] = True
        may_open = self.interleaved & outside & (self.remaining >= self.levels + 2)
        allowed[may_open, v.begin_of_audio] = True

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(~self.allowed(), float("-inf"))

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Take each row's emitted token; returns which rows emitted one (were not finished before)."""
        v = self.vocab
        emitted = ~self.finished
        self.remaining -= emitted.long()
        self.position += emitted.long()
        is_code = (tokens >= v.image_code_start) & (tokens < v.image_code_end)
        is_code |= (tokens >= v.audio_code_start) & (tokens < v.vocab_size)
        self.codes_done += (emitted & is_code).long()
        closed = emitted & ((tokens == v.end_of_image) | (self.levels > 0) & (tokens == v.end_of_audio))
        opened_image = emitted & (tokens == v.begin_of_image)
        opened_audio = emitted & (self.levels > 0) & (tokens == v.begin_of_audio)
        self.in_image = (self.in_image | opened_image) & ~closed
        self.in_audio = (self.in_audio | opened_audio) & ~closed
        self.codes_done[opened_image | opened_audio | closed] = 0
        stopped = torch.isin(tokens, self.stops) | (closed & (self.image_mode | self.audio_mode))
        stopped |= self.video_mode & (tokens == v.end_of_video)
        self.finished = self.finished | (emitted & stopped) | (self.remaining <= 0)
        return emitted

    @property
    def done(self) -> bool:
        return bool(self.finished.all())
