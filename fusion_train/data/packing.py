"""Pack documents into fixed-length training sequences.

Documents are concatenated; a long text continues in the next sequence, but an image block is
never split: when the next image does not fit, the rest of the sequence is padding and the image
opens the next one. `labels` are the input ids, -100 on padding, on tokens whose loss mask is 0
(SFT prompts) and on each document's first token (nothing before it in the sequence predicts it).
`doc_ids` number the document pieces of a sequence (padding -1), for document masking.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fusion_train.data.shards import Document, image_block_starts
from fusion_train.model.loss import IGNORE_INDEX
from fusion_train.vocab import VocabLayout


class Packer:
    def __init__(self, seq_len: int, vocab: VocabLayout, n_sources: int):
        if vocab.image_block_length > seq_len:
            raise ValueError(f"seq_len={seq_len} cannot hold one image block ({vocab.image_block_length} ids)")
        self.seq_len, self.vocab, self.n_sources = seq_len, vocab, n_sources
        self.current: tuple[int, Document, np.ndarray] | None = None  # (source, document, image starts)
        self.offset = 0

    def _start(self, source: int, document: Document) -> None:
        starts = document.image_starts
        self.current = (source, document, image_block_starts(document.tokens, self.vocab) if starts is None else starts)
        self.offset = 0

    def _fitting(self, space: int) -> int:
        """Tokens of the current document, from the offset, that fit in `space` without cutting
        an image block."""
        _, document, starts = self.current
        end = min(len(document.tokens), self.offset + space)
        cut_block = starts[(starts < end) & (starts + self.vocab.image_block_length > end)]
        return (int(cut_block[0]) if len(cut_block) else end) - self.offset

    def next_sequence(self, next_document: Callable[[], tuple[int, Document] | None]) -> dict[str, torch.Tensor] | None:
        """The next sequence; `next_document` returns None at the end of a finite input (held-out
        data), where the last sequence is padded, and after which this returns None."""
        tokens = np.full(self.seq_len, self.vocab.pad, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        doc_ids = np.full(self.seq_len, -1, dtype=np.int64)
        documents_per_source = np.zeros(self.n_sources, dtype=np.int64)
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
            _, document, _ = self.current
            span = slice(self.offset, self.offset + take)
            part = document.tokens[span]
            part_labels = part.copy()
            if document.loss_mask is not None:
                part_labels[document.loss_mask[span] == 0] = IGNORE_INDEX
            if self.offset == 0:
                part_labels[0] = IGNORE_INDEX
            tokens[filled : filled + take], labels[filled : filled + take] = part, part_labels
            doc_ids[filled : filled + take] = piece
            filled, piece, self.offset = filled + take, piece + 1, self.offset + take
            if self.offset == len(document.tokens):
                self.current = None
        if filled == 0:
            return None
        return {
            "input_ids": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "doc_ids": torch.from_numpy(doc_ids),
            "documents_per_source": torch.from_numpy(documents_per_source),
        }

    def state_dict(self) -> dict:
        if self.current is None:
            return {"current": None}
        source, document, _ = self.current
        mask = None if document.loss_mask is None else torch.from_numpy(document.loss_mask.copy())
        return {"current": (source, torch.from_numpy(document.tokens.copy()), mask), "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.current = None
        if state["current"] is not None:
            source, tokens, mask = state["current"]
            self._start(source, Document(tokens.numpy(), None if mask is None else mask.numpy()))
            self.offset = state["offset"]
