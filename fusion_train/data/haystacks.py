"""Haystacks for needle-in-a-haystack sequences: held-out shards' documents joined into filler of
any length, with a needle (a text secret or a picture) inserted at a depth and the question that
asks for it at the end. The evaluation (fusion_train/eval/needle.py) scores models on them; the
retrieval shards that teach a model the task (data_pipelines/needle.py) are made of them too.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
