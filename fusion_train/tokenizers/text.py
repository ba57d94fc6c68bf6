"""SentencePiece BPE text tokenizer laid out as Chameleon's vocabulary.

Ids 0-3 are `<s> <pad> </s> <unk>`; every image code, both image markers and the reserved ids are
SentencePiece *control* symbols at the ids VocabLayout gives them, so no text, whatever it
contains, encodes to one of them. Byte fallback and identity normalisation make any UTF-8 text
round-trip exactly, without `<unk>`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from fusion_train.vocab import SPECIAL_NAMES, VocabLayout

log = logging.getLogger(__name__)

_TRAINER_SETTINGS = dict(
    model_type="bpe",
    byte_fallback=True,
    character_coverage=1.0,
    normalization_rule_name="identity",  # NFKC would change text: no exact round trip
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,  # a text segment after an image must not gain a leading space
    split_digits=True,
    allow_whitespace_only_pieces=True,
    hard_vocab_limit=False,  # a small corpus may not fill the vocabulary; unused ids stay unused
)


class TokenizerError(ValueError):
    pass


def fingerprint_file(path: str | Path) -> str:
    """Short content hash that shards record and the loader checks."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class _JsonlTexts:
    """The non-empty lines of every `{"text": ...}` record, with a progress bar over records, and
    counts of what was read. Lines, not whole documents: SentencePiece drops training sentences
    longer than its limit."""

    def __init__(self, paths: Iterable[str | Path]):
        self.paths = [Path(p) for p in paths]
        self.records = self.with_text = 0
        self.fields: set[str] = set()  # of records without text, to say what they have instead

    def __iter__(self) -> Iterator[str]:
        with tqdm(desc="reading text", unit=" docs", disable=None) as progress:
            for path in self.paths:
                if not path.is_file():
                    raise TokenizerError(f"input {path} not found")
                with open(path, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        yield from self._lines(line)
                        progress.update()

    def _lines(self, line: str) -> Iterator[str]:
        if not line.strip():
            return
        self.records += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return  # the shard builder reports bad records; training just needs text
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            if isinstance(record, dict) and len(self.fields) < 20:
                self.fields.update(record)
            return
        self.with_text += 1
        yield from (part for part in text.split("\n") if part.strip())

    def check(self) -> None:
        """After reading: no text at all is the user's error to fix, some records without it a warning."""
        if not self.with_text:
            found = f"; their fields: {sorted(self.fields)}" if self.fields else ""
            raise TokenizerError(
                f"none of the {self.records:,} records read from {', '.join(map(str, self.paths))} has a string "
                f'"text" field{found}: give jsonl lines like {{"text": "..."}} (rename the field, e.g. with '
                "jq -c '{text: .body}')"
            )
        if self.with_text < self.records:
            log.warning("%d of %d records have no text field (or are not JSON) and were not used",
                        self.records - self.with_text, self.records)  # fmt: skip


def train_text_tokenizer(
    jsonl_paths: Iterable[str | Path],
    model_path: str | Path,
    vocab: VocabLayout,
    *,
    max_sentences: int = 2_000_000,
    seed: int = 0,
) -> TextTokenizer:
    """Train a BPE model of vocab.text_end pieces (fewer if the corpus cannot fill them): the ids
    after the text (audio codes) are never pieces, so no text encodes to them."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    texts = _JsonlTexts(jsonl_paths)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab.text_end,
            bos_id=vocab.bos, pad_id=vocab.pad, eos_id=vocab.eos, unk_id=vocab.unk,
            bos_piece=SPECIAL_NAMES[vocab.bos], pad_piece=SPECIAL_NAMES[vocab.pad],
            eos_piece=SPECIAL_NAMES[vocab.eos], unk_piece=SPECIAL_NAMES[vocab.unk],
            control_symbols=vocab.control_token_names(),
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
            **_TRAINER_SETTINGS,
        )  # fmt: skip
    except RuntimeError:
        texts.check()  # SentencePiece's own message says only that it got no sentences
        raise
    texts.check()
    Path(model_path).parent.mkdir(parents=True, exist_ok=True)
    Path(model_path).write_bytes(model.getvalue())
    layout_path(model_path).write_text(json.dumps(dataclasses.asdict(vocab), indent=2) + "\n")
    return TextTokenizer(model_path, vocab)


def layout_path(model_path: str | Path) -> Path:
    """The vocabulary layout a model was trained for, kept beside it."""
    return Path(model_path).with_suffix(".layout.json")


class TextTokenizer:
    def __init__(self, model_path: str | Path, vocab: VocabLayout | None = None):
        """`vocab` defaults to the layout recorded beside the model when it was trained."""
        self.path = Path(model_path)
        if not self.path.is_file():
            raise TokenizerError(
                f"text tokenizer {self.path} not found: train one with `fusion-data train-text-tokenizer`"
            )
        if vocab is None:
            if not layout_path(self.path).is_file():
                raise TokenizerError(f"{layout_path(self.path)} not found: give the vocabulary layout of {self.path}")
            vocab = VocabLayout(**json.loads(layout_path(self.path).read_text()))
        self.vocab = vocab
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.fingerprint = fingerprint_file(self.path)
        self._check_layout()

    def _check_layout(self) -> None:
        expected = [SPECIAL_NAMES[i] for i in range(4)] + self.vocab.control_token_names()
        if self.sp.get_piece_size() > self.vocab.text_end:
            raise TokenizerError(
                f"{self.path} has {self.sp.get_piece_size()} pieces, more than the layout's text ids (up to id "
                f"{self.vocab.text_end - 1}{'; audio codes follow' if self.vocab.audio_ids else ''})"
            )
        actual = [self.sp.id_to_piece(i) for i in range(min(len(expected), self.sp.get_piece_size()))]
        if actual != expected:
            first = next((i for i, (a, e) in enumerate(zip(actual, expected, strict=False)) if a != e), len(actual))
            raise TokenizerError(
                f"{self.path} does not follow the vocabulary layout {self.vocab}: id {first} is "
                f"{actual[first] if first < len(actual) else 'missing'!r}, expected {expected[first]!r}"
            )

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[list[int]]) -> list[str]:
        return self.sp.decode(ids)
