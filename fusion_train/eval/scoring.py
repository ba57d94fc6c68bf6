"""Log-likelihoods of continuations after their contexts: how multiple-choice benchmarks score
answers, for lm-eval's model class (eval/harness.py) and the in-loop tasks (train/downstream.py).

Image codes are masked out of the softmax, as HF transformers' Chameleon masks them in every
forward, so that the scores equal the harness's HF backend's on an HF export."""

from __future__ import annotations

import torch

from fusion_train.tokenizers.text import TextTokenizer
from fusion_train.vocab import Modality, VocabLayout


def encode_pair(text: TextTokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """`<s>` and the context's ids, and the continuation's, as lm-eval splits them: the two encoded
    together and cut where the context alone ends (a space ending the context goes with the
    continuation), so that the tokens at the join are those of the whole text."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, alone = text.encode([context + continuation, context])
    return [text.vocab.bos, *alone], whole[len(alone) :]


@torch.no_grad()
def continuation_scores(
    model, vocab: VocabLayout, pairs: list[tuple[list[int], list[int]]]
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the continuation's summed log-probability, and
    whether each of its tokens was the most likely. One right-padded forward, whose logits are kept
    only from the first position any continuation needs (not [batch, length, vocabulary] for whole
    contexts); a pair longer than the model's context is cut from the left."""
    device, context = next(model.parameters()).device, model.cfg.max_seq_len
    rows = [(before + after)[-(context + 1) :] for before, after in pairs]
    lengths = [min(len(after), len(row) - 1) for (_, after), row in zip(pairs, rows, strict=True)]
    width = max(len(r) for r in rows) - 1
    ids = torch.full((len(rows), width), vocab.pad, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row) - 1] = torch.tensor(row[:-1])
    first = min(len(row) - 1 - length for row, length in zip(rows, lengths, strict=True))
    logits = model(ids.to(device), logits_to_keep=width - first).float()
    log_probs = logits.masked_fill_(vocab.modality_mask(Modality.IMAGE, device), float("-inf")).log_softmax(-1)
    sums, greedy = [], []
    for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
        targets = torch.tensor(row[-length:], device=device)
        predicted = log_probs[i, len(row) - 1 - length - first : len(row) - 1 - first]
        sums.append(predicted.gather(-1, targets[:, None]).sum())
        greedy.append((predicted.argmax(-1) == targets).all())
    return list(zip(torch.stack(sums).tolist(), torch.stack(greedy).tolist(), strict=True))  # one host sync
