"""Needle in a haystack, for text and for pictures: whether a model finds, anywhere in a long
context, the one thing a question at its end asks for (Gemini 1.5's evaluation, arXiv 2403.05530;
MM-NIAH's for pictures, arXiv 2406.07230).

A haystack of L tokens is held-out shards' documents joined (their own `<s>`/`</s>` dropped, so that
it reads as one document; pictures never cut), with a needle inserted at depth d (0: the start, 1:
the end of the haystack; moved back to a picture's start rather than into it):

- text: " The secret number: 7341." ... " What is the secret number? The secret number:" -> "7341"
- image: " The key picture:" + a held-out picture (the haystack has others) ... " Draw the key picture
  again:" -> the picture's `<image>` and its first ANSWER_CODES codes

The sequence is `<s>` + haystack with needle + question + answer, L tokens in all. Retrieval is
exact when every answer token is the model's most likely next token after what precedes it: what
greedy decoding would produce, scored in one forward without a KV cache. The answer's mean log
probability per token is kept too (a graded signal for small models). Every (L, d) cell averages
`trials` haystacks, each with its own needle and filler (seeded).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fusion_train.data.haystacks import KINDS, Haystacks, NeedleError, example
from fusion_train.tokenizers.text import TextTokenizer

log = logging.getLogger(__name__)


@dataclass
class NeedleSettings:
    kind: str = "text"
    lengths: tuple[int, ...] = (2048,)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 4
    seed: int = 0

    def check(self, context: int, stretched: bool, extrapolate: bool) -> None:
        """`context`: the positions the model was trained for; `stretched`: RoPE scaling is given."""
        if self.kind not in KINDS:
            raise NeedleError(f"needle kind {self.kind!r}: choose one of {KINDS}")
        if not self.lengths or min(self.lengths) < 1 or self.trials < 1:
            raise NeedleError("give at least one haystack length and one trial, all positive")
        if any(not 0.0 <= d <= 1.0 for d in self.depths) or not self.depths:
            raise NeedleError(f"depths {list(self.depths)} must lie in [0, 1] (0: the start, 1: the end)")
        longest = max(self.lengths)
        if longest > context and not (stretched or extrapolate):
            raise NeedleError(
                f"haystack length {longest:,} is longer than the model's context ({context:,} positions): give "
                '--rope-scaling to stretch RoPE over it (e.g. \'{"rope_type": "linear", "factor": '
                f"{-(-longest // context)}}}'), or --extrapolate to test the model beyond its context as it is"
            )


def build_cells(settings: NeedleSettings, haystacks: Haystacks, text: TextTokenizer) -> list[dict]:
    """Every (length, depth, trial): its sequence and the answer at its end."""
    rng = np.random.default_rng(settings.seed)
    cells = []
    for length in settings.lengths:
        for depth in settings.depths:
            for trial in range(settings.trials):
                ids, answer = example(settings.kind, length, depth, haystacks, text, rng)
                cells.append({"length": length, "depth": depth, "trial": trial, "ids": ids, "answer": answer})
    return cells


@torch.no_grad()
def score(model, cells: list[dict], batch_size: int, device: torch.device) -> None:
    """Each cell's `retrieved` (exact) and `answer_logprob` (mean per answer token), in place."""
    for start in range(0, len(cells), batch_size):
        batch = cells[start : start + batch_size]
        if len({len(c["ids"]) for c in batch}) > 1:  # one length per batch
            score(model, batch[:1], 1, device)
            score(model, batch[1:], batch_size, device)
            continue
        keep = max(len(c["answer"]) for c in batch) + 1
        ids = torch.from_numpy(np.stack([c["ids"] for c in batch])).to(device)
        logits = model(ids, logits_to_keep=keep).float()
        for row, cell in enumerate(batch):
            n = len(cell["answer"])
            predicting = logits[row, keep - 1 - n : keep - 1]  # the positions before each answer token
            answer = torch.from_numpy(cell["answer"]).to(device)
            cell["retrieved"] = bool((predicting.argmax(-1) == answer).all())
            cell["answer_logprob"] = F.log_softmax(predicting, -1).gather(1, answer[:, None]).mean().item()


def grid(cells: list[dict], settings: NeedleSettings) -> dict:
    """Accuracy and answer log probability per (length, depth), averaged over trials."""
    out = {"accuracy": {}, "answer_logprob": {}}
    for length in settings.lengths:
        for key, field in (("accuracy", "retrieved"), ("answer_logprob", "answer_logprob")):
            out[key][str(length)] = {
                str(depth): float(np.mean([c[field] for c in cells if (c["length"], c["depth"]) == (length, depth)]))
                for depth in settings.depths
            }
    return out


def write_report(result: dict, out: Path, name: str) -> list[Path]:
    """NAME.json (settings and the grids), NAME.md (a table) and NAME.png (the accuracy heat map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    accuracy = result["grid"]["accuracy"]
    lengths, depths = list(accuracy), list(next(iter(accuracy.values())))
    values = np.array([[accuracy[length][depth] for length in lengths] for depth in depths])
    figure, axes = plt.subplots(figsize=(1.6 + 1.1 * len(lengths), 1.2 + 0.45 * len(depths)))
    image = axes.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    axes.set_xticks(range(len(lengths)), [f"{int(length):,}" for length in lengths])
    axes.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
    axes.set_xlabel("haystack length (tokens)")
    axes.set_ylabel("needle depth")
    for (row, column), value in np.ndenumerate(values):
        axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
    axes.set_title(f"{result['settings']['kind']} needle: exact retrieval ({result['label']})", fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.05)
    figure.tight_layout()
    png, table, data = out / f"{name}.png", out / f"{name}.md", out / f"{name}.json"
    figure.savefig(png, dpi=120)
    plt.close(figure)
    rows = [f"| depth | {' | '.join(f'{int(length):,}' for length in lengths)} |", "|---" * (len(lengths) + 1) + "|"]
    rows += [f"| {float(d):.0%} | {' | '.join(f'{accuracy[length][d]:.2f}' for length in lengths)} |" for d in depths]
    table.write_text(
        f"{result['settings']['kind']} needle, exact retrieval, {result['label']}\n\n" + "\n".join(rows) + "\n"
    )
    data.write_text(json.dumps(result, indent=1) + "\n")
    return [data, table, png]


def evaluate(model, text: TextTokenizer, haystacks: Haystacks, settings: NeedleSettings, batch_size: int,
             device: torch.device, label: str) -> dict:  # fmt: skip
    cells = build_cells(settings, haystacks, text)
    score(model, cells, batch_size, device)
    return {"label": label, "settings": asdict(settings), "grid": grid(cells, settings),
            "mean_accuracy": float(np.mean([c["retrieved"] for c in cells]))}  # fmt: skip
