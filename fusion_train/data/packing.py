"""Pack documents into fixed-length training sequences.

Documents are concatenated; a long text continues in the next sequence, but an image block is
never split: when the next image does not fit, the rest of the sequence is padding and the image
opens the next one. A long video continues too, cut only between its time chunks (a frame and the
sound of its span, Mirasol3B's unit) or after its marker and header: never inside a frame or an
audio window. `labels` are the input ids, -100 on padding, on tokens whose
loss mask is 0 (SFT prompts) and on each document's first token (nothing before it in the sequence
predicts it). `doc_ids` number the document pieces of a sequence (padding -1), for document
masking; `in_video` marks the tokens of video blocks (the loss of video frames and sound is logged
apart from still images and clips).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fusion_train.data.manifest import DataError
from fusion_train.data.shards import Document, image_block_starts
from fusion_train.model.loss import IGNORE_INDEX
from fusion_train.vocab import VocabLayout


class Packer:
    def __init__(self, seq_len: int, vocab: VocabLayout, sources: list[str]):
        if vocab.image_block_length > seq_len:
            raise ValueError(f"seq_len={seq_len} cannot hold one image block ({vocab.image_block_length} ids)")
        self.seq_len, self.vocab, self.sources = seq_len, vocab, sources
        self.current: tuple[int, Document, Units, np.ndarray] | None = None  # (source, document, its units, in video)
        self.offset = 0

    def _start(self, source: int, document: Document) -> None:
        starts = document.image_starts
        starts = image_block_starts(document.tokens, self.vocab) if starts is None else starts
        in_video = video_mask(document.tokens, self.vocab)
        units = indivisible_units(document.tokens, self.vocab, starts, in_video)
        too_long = units.lengths() > self.seq_len
        if too_long.any():
            raise DataError(
                f"data source {self.sources[source]!r}: a video chunk (a frame and the sound of its span) of "
                f"{int(units.lengths()[too_long][0])} tokens does not fit data.seq_len={self.seq_len}: raise "
                "data.seq_len (sequence parallelism makes room), or build the shards again with a higher "
                "--video-fps (less sound per frame) or a lower-resolution image tokenizer"
            )
        self.current = (source, document, units, in_video)
        self.offset = 0

    def _fitting(self, space: int) -> int:
        """Tokens of the current document, from the offset, that fit in `space` without cutting
        an image block or a video's time chunk."""
        _, document, units, _ = self.current
        end = min(len(document.tokens), self.offset + space)
        cut = units.starts[(units.starts < end) & (units.ends > end)]
        return (int(cut[0]) if len(cut) else end) - self.offset

    def next_sequence(self, next_document: Callable[[], tuple[int, Document] | None]) -> dict[str, torch.Tensor] | None:
        """The next sequence; `next_document` returns None at the end of a finite input (held-out
        data), where the last sequence is padded, and after which this returns None."""
        tokens = np.full(self.seq_len, self.vocab.pad, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        doc_ids = np.full(self.seq_len, -1, dtype=np.int64)
        in_video = np.zeros(self.seq_len, dtype=bool)
        documents_per_source = np.zeros(len(self.sources), dtype=np.int64)
        filled = piece = 0
        while filled < self.seq_len:
            if self.current is None:
                drawn = next_document()
                if drawn is None:
                    break
                source, document = drawn
                self._start(source, document)
                documents_per_source[source] += 1
            take = self._fitting(self.seq_len - filled)
            if take == 0:  # the next image does not fit: pad, and it opens the next sequence
                break
            _, document, _, document_in_video = self.current
            span = slice(self.offset, self.offset + take)
            part = document.tokens[span]
            part_labels = part.copy()
            if document.loss_mask is not None:
                part_labels[document.loss_mask[span] == 0] = IGNORE_INDEX
            if self.offset == 0:
                part_labels[0] = IGNORE_INDEX
            tokens[filled : filled + take], labels[filled : filled + take] = part, part_labels
            doc_ids[filled : filled + take] = piece
            in_video[filled : filled + take] = document_in_video[span]
            filled, piece, self.offset = filled + take, piece + 1, self.offset + take
            if self.offset == len(document.tokens):
                self.current = None
        if filled == 0:
            return None
        return {
            "input_ids": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "doc_ids": torch.from_numpy(doc_ids),
            "in_video": torch.from_numpy(in_video),
            "documents_per_source": torch.from_numpy(documents_per_source),
        }

    def state_dict(self) -> dict:
        if self.current is None:
            return {"current": None}
        source, document, _, _ = self.current
        mask = None if document.loss_mask is None else torch.from_numpy(document.loss_mask.copy())
        return {"current": (source, torch.from_numpy(document.tokens.copy()), mask), "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.current = None
        if state["current"] is not None:
            source, tokens, mask = state["current"]
            self._start(source, Document(tokens.numpy(), None if mask is None else mask.numpy()))
            self.offset = state["offset"]


@dataclass
class Units:
    """Spans [starts, ends) of a document that a sequence boundary must not cut, in order."""

    starts: np.ndarray
    ends: np.ndarray

    def lengths(self) -> np.ndarray:
        return self.ends - self.starts


def video_mask(tokens: np.ndarray, vocab: VocabLayout) -> np.ndarray:
    """True on the tokens of video blocks, from `<begin-video>` to `<end-video>`."""
    opened = np.cumsum(tokens == vocab.begin_of_video)
    closed_before = np.cumsum(tokens == vocab.end_of_video) - (tokens == vocab.end_of_video)
    return opened > closed_before


def indivisible_units(tokens: np.ndarray, vocab: VocabLayout, image_starts: np.ndarray,
                      in_video: np.ndarray) -> Units:  # fmt: skip
    """Image blocks outside videos; in each video, its marker and header, then its time chunks:
    from one frame's image to the next frame's, the last to `<end-video>`."""
    outside = image_starts[~in_video[image_starts]]
    starts, ends = [outside], [outside + vocab.image_block_length]
    for begin, end in zip(np.flatnonzero(tokens == vocab.begin_of_video), np.flatnonzero(tokens == vocab.end_of_video),
                          strict=True):  # fmt: skip
        frames = image_starts[(image_starts > begin) & (image_starts < end)]
        bounds = np.concatenate([[begin], frames, [end + 1]])
        starts.append(bounds[:-1])
        ends.append(bounds[1:])
    starts, ends = np.concatenate(starts), np.concatenate(ends)
    order = np.argsort(starts, kind="stable")
    return Units(starts[order], ends[order])
