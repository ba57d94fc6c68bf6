"""Classifier-free guidance for image blocks, Meta's three streams (InstructPix2Pix's form):

    logits = u + image_scale · (img − u) + text_scale · (full − img)

`full` is conditioned on the whole prompt, `img` on the prompt's images alone and `u` on nothing
(`<s><racm3:break>`). The three run as rows of one batch, one forward per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fusion_train.vocab import VocabLayout

STREAMS = 3  # full, image-only, unconditional, in this order within a request's rows


@dataclass
class Guidance:
    image_scale: float = 1.2
    text_scale: float = 3.0


def guidance_prompts(prompt: list[int], vocab: VocabLayout) -> list[list[int]]:
    """The three streams' prompts for an image-mode prompt (which ends with `<racm3:break>`).

    A chat prompt (the SFT separator before `<racm3:break>`) keeps the separator in all three: a
    fine-tuned model draws after it, and without it `u` and `img` would be the pretraining prior
    (pictures on coloured backgrounds, in the demo), so that `full − img` amplified how an answer
    differs from a pretraining picture rather than what the instruction asked for."""
    framing = prompt[-2:] if prompt[-2:-1] == [vocab.sft_separator] else prompt[-1:]
    images = image_blocks(prompt[: -len(framing)], vocab)
    return [prompt, [vocab.bos, *images, *framing], [vocab.bos, *framing]]


def image_blocks(ids: list[int], vocab: VocabLayout) -> list[int]:
    """The complete image blocks of `ids`, concatenated in order."""
    kept, block = [], None
    for token in ids:
        if token == vocab.begin_of_image:
            block = [token]
        elif block is not None:
            block.append(token)
            if token == vocab.end_of_image:
                kept += block
                block = None
    return kept


def combine(streams: torch.Tensor, guidance: Guidance) -> torch.Tensor:
    """[R * 3, vocab] logits of R requests' streams -> [R, vocab] guided logits."""
    full, image_only, unconditional = streams.float().unflatten(0, (-1, STREAMS)).unbind(1)
    return (
        unconditional + guidance.image_scale * (image_only - unconditional) + guidance.text_scale * (full - image_only)
    )
