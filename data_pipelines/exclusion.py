"""`--exclude`: evaluation sets whose items the training data must not hold (decontamination).

An evaluation set is a Cauldron-format parquet file, a LLaVA or ShareGPT `.json`/`.jsonl`, a
`{"messages": ...}` jsonl, or a folder of images. A training record is left out when one of its
images has the bytes of an evaluation image (XXH3-128, as train-image-tokenizer's --exclude
matches them: `excluded_image`) or one of its prompts, normalised (NFKC, lower case, `<image>`,
punctuation and runs of spaces dropped), is an evaluation question (`excluded_question`). A
question that several evaluation items ask ("What is in this picture?") is the task's template, not
an item's content: it is not matched (the items' images still are), and the templates are counted.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from xxhash import xxh3_128_hexdigest

from data_pipelines.chat_formats import IMAGE_PLACEHOLDER, cauldron, conversations, messages
from data_pipelines.inputs import IMAGE_EXTENSIONS, parse_record, read_input
from data_pipelines.records import Skip, media_bytes
from fusion_train.data.manifest import DataError

log = logging.getLogger(__name__)


def normalised_question(prompt: list | str) -> str:
    """A prompt's text (its text segments, joined) in the form questions are compared in."""
    text = prompt if isinstance(prompt, str) else " ".join(s for s in prompt if isinstance(s, str))
    text = unicodedata.normalize("NFKC", text.replace(IMAGE_PLACEHOLDER, " ")).lower()
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


@dataclass(frozen=True)
class Exclusions:
    image_hashes: frozenset[str] = frozenset()
    questions: frozenset[str] = frozenset()


class _Fingerprints:
    """Stands in for build.py's MediaLoader while an evaluation set is read: an image is noted by
    its bytes' hash, never decoded."""

    def __init__(self):
        self.hashes: set[str] = set()
        self.input = Path(".")

    def image(self, source, pad: bool = False) -> None:
        self.hashes.add(xxh3_128_hexdigest(media_bytes(source, self.input.parent, "image")))

    def prompt_images(self, source) -> list[None]:
        return [self.image(source)]

    def audio(self, source) -> None:
        return None


def load_exclusions(paths: list[str | Path]) -> Exclusions:
    """The images and questions of the evaluation sets at `paths`."""
    media, asked, unread = _Fingerprints(), Counter(), Counter()
    for path in map(Path, paths):
        if path.is_dir():
            media.hashes |= {xxh3_128_hexdigest(f.read_bytes()) for f in sorted(path.rglob("*"))
                             if f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS}  # fmt: skip
        elif path.suffix in (".parquet", ".json", ".jsonl") and path.is_file():
            media.input = path
            for payload in read_input(path):
                try:
                    chat = _read_item(parse_record(payload), media, path)
                except Skip as skip:
                    unread[skip.reason] += 1
                    continue
                asked.update({normalised_question(prompt) for prompt, _ in chat.turns} - {""})
        else:
            raise DataError(
                f"--exclude {path}: give a Cauldron-format .parquet, a LLaVA/ShareGPT .json or .jsonl, a "
                '{"messages": ...} .jsonl or a folder of images' + ("" if path.exists() else " (it does not exist)")
            )
    if unread:
        log.warning("--exclude: %d evaluation items could not be read and are not matched: %s", sum(unread.values()),
                    dict(unread))  # fmt: skip
    templates = [question for question, items in asked.items() if items > 1]
    log.info("--exclude: %d evaluation images, %d questions (%d asked of several items, not matched: templates)",
             len(media.hashes), len(asked) - len(templates), len(templates))  # fmt: skip
    return Exclusions(frozenset(media.hashes), frozenset(q for q, items in asked.items() if items == 1))


def _read_item(record: dict, media: _Fingerprints, path: Path):
    if path.suffix == ".parquet":
        return cauldron(record, media)
    return conversations(record, media) if "conversations" in record else messages(record, media)
