"""Documents to token sequences, the sequence contract of DESIGN.md.

- text: `<s> text </s>`
- image-text and audio-text pairs: `<s> media caption </s>` or `<s> caption media </s>`, the media
  first in a seeded half of the pairs (captioning as well as generation)
- interleaved: `<s>` segments in their order `</s>`
- SFT: `<s>` then per turn `prompt <sep> answer </s>`; the loss mask is 0 on prompts and
  separators, 1 on answers and their `</s>`

An image is `<racm3:break>`, its grid of codes in raster order (code c as id 4 + c), `<eoss>`; a
clip is `<begin-audio>`, its codes frame by frame, each frame's levels in order, `<end-audio>`
(`VocabLayout.audio_codes_to_ids`). A video is `<begin-video>`, its header as text, per sampled
frame its image then the sound of its span as a clip (a silent video has no clips), `<end-video>`
(Mirasol3B's time-aligned chunks; tokenizers/video.py makes and reads them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from fusion_train.tokenizers.text import TextTokenizer
from fusion_train.vocab import VocabLayout


@dataclass
class AudioCodes:
    """A clip's codes [levels, frames], as the audio tokenizer gives them."""

    codes: np.ndarray


@dataclass
class VideoCodes:
    """A video's codes: its header (what it is, as text), each sampled frame's image codes
    [frames, grid, grid], and the sound of each frame's span as a clip's codes [levels, frames]
    (None: a video without sound)."""

    header: str
    frames: np.ndarray
    sound: list[np.ndarray] | None = None


Segment = str | np.ndarray | AudioCodes | VideoCodes  # text, an image's codes [grid, grid], a clip's, a video's


@dataclass
class TokenizedDocument:
    tokens: np.ndarray  # int64 ids
    loss_mask: np.ndarray | None = None  # uint8, 1 where trained on; None: everywhere
    metadata: dict = field(default_factory=dict)  # what the shard's sample records beside its ids


def seeded_coin(seed: int, record: tuple[int, int]) -> bool:
    """A fair coin per seed and record (input file number, record number in it), the same in any
    process and in any part of a build."""
    digest = hashlib.blake2b(f"{seed}:{record[0]}:{record[1]}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 1 == 1


class DocumentTokenizer:
    def __init__(self, text: TextTokenizer, vocab: VocabLayout, seed: int = 0):
        self.text, self.vocab, self.seed = text, vocab, seed

    def image_block(self, codes: np.ndarray) -> np.ndarray:
        grid = self.vocab.image_grid
        if codes.shape != (grid, grid):
            raise ValueError(f"image codes have shape {codes.shape}, expected the layout's grid ({grid}, {grid})")
        if codes.min() < 0 or codes.max() >= self.vocab.image_codebook_size:
            raise ValueError(f"image codes outside [0, {self.vocab.image_codebook_size})")
        ids = codes.reshape(-1).astype(np.int64) + self.vocab.image_code_start
        return np.concatenate([[self.vocab.begin_of_image], ids, [self.vocab.end_of_image]])

    def audio_block(self, clip: AudioCodes) -> np.ndarray:
        if not self.vocab.audio_ids:
            raise ValueError("the vocabulary has no audio codes: its layout needs audio_codebook_size and audio_levels")
        ids = self.vocab.audio_codes_to_ids(torch.from_numpy(np.asarray(clip.codes))).numpy()
        return np.concatenate([[self.vocab.begin_of_audio], ids, [self.vocab.end_of_audio]])

    def video_block(self, video: VideoCodes) -> np.ndarray:
        if video.sound is not None and len(video.sound) != len(video.frames):
            raise ValueError(f"a video of {len(video.frames)} frames has {len(video.sound)} clips: one a frame")
        parts = [[self.vocab.begin_of_video], self.text.encode([video.header])[0]]
        for index, frame in enumerate(video.frames):
            parts.append(self.image_block(frame))
            if video.sound is not None:
                parts.append(self.audio_block(AudioCodes(video.sound[index])))
        parts.append([self.vocab.end_of_video])
        return np.concatenate([np.asarray(part, dtype=np.int64) for part in parts])

    def segments(self, segments: list[Segment]) -> np.ndarray:
        encoded = iter(self.text.encode([s for s in segments if isinstance(s, str)]))
        pieces = [self._ids(s, encoded) for s in segments]
        return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)

    def _ids(self, segment: Segment, encoded_texts) -> np.ndarray:
        if isinstance(segment, str):
            return np.asarray(next(encoded_texts), dtype=np.int64)
        if isinstance(segment, VideoCodes):
            return self.video_block(segment)
        return self.audio_block(segment) if isinstance(segment, AudioCodes) else self.image_block(segment)

    def document(self, segments: list[Segment]) -> TokenizedDocument:
        """Text and interleaved documents."""
        body = self.segments(segments)
        return TokenizedDocument(np.concatenate([[self.vocab.bos], body, [self.vocab.eos]]).astype(np.int64))

    def pair(self, media: Segment, caption: str, record: tuple[int, int]) -> TokenizedDocument:
        """An image or clip with its caption, the media first when the record's coin says so."""
        return self.document([media, caption] if seeded_coin(self.seed, record) else [caption, media])

    def sft(self, turns: list[tuple[list[Segment], list[Segment]]]) -> TokenizedDocument:
        return self.sft_document([self.sft_turn(prompt, answer) for prompt, answer in turns])

    def sft_turn(self, prompt: list[Segment], answer: list[Segment]) -> TokenizedDocument:
        """`prompt <sep> answer </s>`, trained on the answer and its `</s>`."""
        prompt_ids = np.concatenate([self.segments(prompt), [self.vocab.sft_separator]]).astype(np.int64)
        answer_ids = np.concatenate([self.segments(answer), [self.vocab.eos]]).astype(np.int64)
        mask = np.concatenate([np.zeros(len(prompt_ids), np.uint8), np.ones(len(answer_ids), np.uint8)])
        return TokenizedDocument(np.concatenate([prompt_ids, answer_ids]), mask)

    def sft_document(self, turns: list[TokenizedDocument]) -> TokenizedDocument:
        """`<s>` and the turns."""
        tokens = np.concatenate([[self.vocab.bos], *(turn.tokens for turn in turns)]).astype(np.int64)
        return TokenizedDocument(tokens, np.concatenate([np.zeros(1, np.uint8), *(turn.loss_mask for turn in turns)]))
