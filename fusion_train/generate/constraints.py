"""Modality-constrained decoding by logit masking, as Meta's inference does (Chameleon §2.4).

Per row of a batch, a small state machine over the vocabulary layout:

- **text**: text pieces, `<unk>` and the two stops (`</s>`, the SFT end-of-turn id). Never an image
  code, an image marker, `<s>`, `<pad>` or an unused reserved id.
- **image**: the prompt ends with `<racm3:break>`; exactly `grid²` image codes follow, then
  `<eoss>` is forced and the row is done.
- **interleaved**: text as above, plus `<racm3:break>` while a whole image block still fits in the
  row's budget; after it the row is in an image block (codes, then `<eoss>`) and then back in text.

A row is finished at a stop id, at the end of its image (image mode) or when its budget is spent.
"""

from __future__ import annotations

from enum import Enum

import torch

from fusion_train.vocab import Modality, VocabLayout


class Mode(str, Enum):
    TEXT = "text"
    IMAGE = "image"
    INTERLEAVED = "interleaved"


def stop_ids(vocab: VocabLayout) -> tuple[int, int]:
    """`</s>` and the SFT end of turn (`<reserved08706>` in Chameleon's layout)."""
    return vocab.eos, vocab.sft_separator


def text_ids(vocab: VocabLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean over the vocabulary: what a text position may emit."""
    allowed = vocab.modality_mask(Modality.TEXT, device)
    allowed[[vocab.unk, *stop_ids(vocab)]] = True
    return allowed


class ModalityConstraints:
    def __init__(self, vocab: VocabLayout, modes: list[Mode], budgets: list[int], device: torch.device | str = "cpu"):
        """`budgets`: tokens each row may still emit (max_new_tokens, less where the context ends)."""
        self.vocab = vocab
        self.image_tokens = vocab.image_tokens
        too_small = [i for i, (m, b) in enumerate(zip(modes, budgets, strict=True))
                     if Mode(m) == Mode.IMAGE and b <= vocab.image_tokens]  # fmt: skip
        if too_small:
            raise ValueError(
                f"image mode needs room for {vocab.image_tokens} codes and <eoss> ({vocab.image_tokens + 1} tokens); "
                f"rows {too_small} have budgets {[budgets[i] for i in too_small]}: raise max_new_tokens or shorten the prompt"
            )
        self.interleaved = torch.tensor([Mode(m) == Mode.INTERLEAVED for m in modes], device=device)
        self.image_mode = torch.tensor([Mode(m) == Mode.IMAGE for m in modes], device=device)
        self.in_image = self.image_mode.clone()  # an image-mode prompt ends with <racm3:break>
        self.codes_done = torch.zeros(len(modes), dtype=torch.long, device=device)
        self.remaining = torch.tensor(budgets, dtype=torch.long, device=device)
        self.finished = self.remaining <= 0
        self.text = text_ids(vocab, device)
        self.codes = vocab.modality_mask(Modality.IMAGE, device)
        self.stops = torch.tensor(stop_ids(vocab), device=device)

    def allowed(self) -> torch.Tensor:
        """[B, vocab] boolean: the ids each row may emit next (a finished row: `<pad>` alone)."""
        v = self.vocab
        in_codes = self.in_image & (self.codes_done < self.image_tokens)
        closing = self.in_image & ~in_codes
        allowed = torch.where(in_codes[:, None], self.codes, self.text)
        allowed[closing] = False
        allowed[closing, v.end_of_image] = True
        may_open = self.interleaved & ~self.in_image & (self.remaining >= v.image_block_length)
        allowed[may_open, v.begin_of_image] = True
        allowed[self.finished] = False
        allowed[self.finished, v.pad] = True
        return allowed

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(~self.allowed(), float("-inf"))

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Take each row's emitted token; returns which rows emitted one (were not finished before)."""
        v = self.vocab
        emitted = ~self.finished
        self.remaining -= emitted.long()
        is_code = (tokens >= v.image_code_start) & (tokens < v.image_code_end)
        self.codes_done += (emitted & is_code).long()
        closed = emitted & (tokens == v.end_of_image)
        opened = emitted & (tokens == v.begin_of_image)
        self.in_image = (self.in_image | opened) & ~closed
        self.codes_done[opened | closed] = 0
        stopped = torch.isin(tokens, self.stops) | (closed & self.image_mode)
        self.finished = self.finished | (emitted & stopped) | (self.remaining <= 0)
        return emitted

    @property
    def done(self) -> bool:
        return bool(self.finished.all())
