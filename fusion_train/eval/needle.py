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

import functools
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fusion_train.data.manifest import DataError, Manifest, Skip
from fusion_train.data.shards import ShardReader, image_block_starts
from fusion_train.tokenizers.text import TextTokenizer
from fusion_train.vocab import VocabLayout

log = logging.getLogger(__name__)
KINDS = ("text", "image")
ANSWER_CODES = 16  # of a picture's codes retrieved: enough that chance cannot match them


class NeedleError(ValueError):
    """A needle evaluation that cannot run as asked: what to change is in the message."""


@dataclass
class Needle:
    statement: np.ndarray  # inserted into the haystack
    question: np.ndarray  # after the haystack
    answer: np.ndarray  # what must follow the question

    def __len__(self) -> int:
        return len(self.statement) + len(self.question) + len(self.answer)


def text_needle(text: TextTokenizer, rng: np.random.Generator) -> Needle:
    """A random four-digit secret; its tokens in the statement are those of the answer, after the
    same words as the question ends with (the passkey format of Landmark Attention, arXiv 2305.16300)."""
    statement, number, full_stop, question = text.encode(
        [" The secret number:", str(int(rng.integers(1000, 10000))), ".", " What is the secret number? "
         "The secret number:"]
    )  # fmt: skip
    number = np.array(number)
    return Needle(np.array(statement + list(number) + full_stop), np.array(question), number)


def image_needle(text: TextTokenizer, picture: np.ndarray, whole: bool = False) -> Needle:
    """`picture`: an image block (`<image>`, codes, `</image>`); the answer is its start, or with
    `whole` all of it (a training document must hold whole pictures)."""
    statement, question = text.encode([" The key picture:", " Draw the key picture again:"])
    return Needle(
        np.concatenate([statement, picture]), np.array(question), picture if whole else picture[: 1 + ANSWER_CODES]
    )


class Haystacks:
    """Filler and needle pictures from the documents of held-out shards (each folder read up to what
    is needed)."""

    def __init__(self, folders: list[Path], vocab: VocabLayout, tokens_needed: int, pictures_needed: int):
        self.vocab = vocab
        self.texts: list[np.ndarray] = []  # document bodies without pictures
        self.picture_documents: list[np.ndarray] = []  # bodies with pictures
        for folder in folders:
            text_tokens = 0
            for body in _bodies(Path(folder), _manifest(folder, vocab), vocab):
                if vocab.begin_of_image in body:
                    self.picture_documents.append(body)
                else:
                    self.texts.append(body)
                    text_tokens += len(body)
                if text_tokens >= tokens_needed and len(self.picture_documents) > pictures_needed:
                    break
        if not self.texts:
            raise NeedleError(
                f"the haystack shards {', '.join(map(str, folders))} have no text-only documents to fill a haystack "
                "with: add a folder of held-out text shards to --haystack"
            )

    @functools.cached_property
    def pictures(self) -> list[np.ndarray]:
        """Every picture's image block, in reading order."""
        length = self.vocab.image_block_length
        return [d[s : s + length] for d in self.picture_documents for s in image_block_starts(d, self.vocab)]

    def filler(self, kind: str, budget: int, rng: np.random.Generator, leave_out: np.ndarray | None = None):
        """`budget` tokens of documents in a random order: text ones, and for an image haystack also
        those with pictures (whole; a text one is cut to fill the rest), except `leave_out`'s."""
        pieces = list(self.texts)
        if kind == "image":
            pieces += [d for d in self.picture_documents if leave_out is None or not _contains(d, leave_out)]
        order = rng.permutation(len(pieces))
        filled, remaining = [], budget
        while remaining > 0:  # a small held-out set is read again: still a haystack, if a repetitive one
            for i in order:
                piece = pieces[i]
                if self.vocab.begin_of_image in piece and len(piece) > remaining:
                    continue  # a picture is never cut
                filled.append(piece[:remaining])
                remaining -= len(filled[-1])
                if remaining == 0:
                    break
        return np.concatenate(filled) if filled else np.zeros(0, dtype=np.int64)


def _manifest(folder: Path, vocab: VocabLayout) -> Manifest:
    try:
        manifest = Manifest.read(folder)
    except DataError as error:
        raise NeedleError(f"haystack {folder}: {error}") from None
    if manifest.vocab != vocab:
        raise NeedleError(f"haystack {folder} was built for another vocabulary layout than the model's")
    return manifest


def _bodies(folder: Path, manifest: Manifest, vocab: VocabLayout) -> Iterator[np.ndarray]:
    """Each document's tokens without its `<s>`/`</s>`; bad samples are skipped, counted in the log."""
    skipped = Counter()
    for shard in manifest.shards:
        reader = ShardReader(folder / shard.name, vocab)  # a missing or damaged shard: its own warning, skipped
        try:
            for index in range(len(reader)):
                try:
                    tokens = reader.read(index).tokens
                except Skip as skip:
                    skipped[skip.reason] += 1
                    continue
                yield tokens[1:-1] if tokens[0] == vocab.bos and tokens[-1] == vocab.eos else tokens
        finally:
            reader.close()
            if skipped:
                log.warning("haystack %s: bad samples skipped so far: %s", folder, dict(skipped))


def _contains(document: np.ndarray, picture: np.ndarray) -> bool:
    starts = np.flatnonzero(document == picture[0])
    return any(np.array_equal(document[s : s + len(picture)], picture) for s in starts)


def insertion_point(filler: np.ndarray, depth: float, vocab: VocabLayout) -> int:
    """Where depth `depth` of the filler is, moved back to the start of a picture it falls in."""
    position = round(depth * len(filler))
    for start in image_block_starts(filler, vocab):
        if start < position < start + vocab.image_block_length:
            return int(start)
    return position


def sequence(filler: np.ndarray, needle: Needle, depth: float, vocab: VocabLayout) -> np.ndarray:
    at = insertion_point(filler, depth, vocab)
    return np.concatenate([[vocab.bos], filler[:at], needle.statement, filler[at:], needle.question, needle.answer])


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


def example(kind: str, length: int, depth: float, haystacks: Haystacks, text: TextTokenizer,
            rng: np.random.Generator, whole_picture: bool = False) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One haystack of `length` tokens with a fresh needle at `depth`: (its ids, the answer at their
    end). `whole_picture`: an image needle's answer is all of the picture (see image_needle)."""
    picture = None
    if kind == "image":
        pictures = haystacks.pictures
        if not pictures:
            raise NeedleError("the haystack shards have no pictures: an image needle needs held-out image documents")
        picture = pictures[int(rng.integers(len(pictures)))]
    needle = text_needle(text, rng) if picture is None else image_needle(text, picture, whole_picture)
    budget = length - 1 - len(needle)
    if budget < 0:
        raise NeedleError(
            f"a {kind} needle and its question take {len(needle) + 1} tokens: a haystack of {length} cannot hold "
            f"them; give lengths of at least {len(needle) + 1}"
        )
    return sequence(haystacks.filler(kind, budget, rng, picture), needle, depth, haystacks.vocab), needle.answer


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
