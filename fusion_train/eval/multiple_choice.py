"""Multiple-choice questions scored by log-likelihood, as lm-eval scores its multiple-choice tasks:
each choice's log-probability after the context (a space between them); `acc` counts the questions
whose answer scores highest, `acc_norm` those whose answer scores highest per character of the
choice (lm-eval's normalisation, which stops long choices losing by their length alone). A question
may open with a picture (`"image"`, a path from the file's folder): its codes come before the
context, as an image-text pair's do."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fusion_train.eval.scoring import encode_pair
from fusion_train.generate.constraints import Mode
from fusion_train.generate.documents import Codec


class QuestionsError(ValueError):
    """A questions file that cannot be scored; the message names the file and line."""


@dataclass
class Question:
    context: str
    choices: list[str]
    answer: int  # the index of the right choice
    image: Path | None = None

    def pairs(self, codec: Codec) -> list[tuple[list[int], list[int]]]:
        """Each choice as (context ids from `<s>`, the choice's ids)."""
        opening = [codec.vocab.bos]
        if self.image is not None:
            opening = codec.prompt_ids([{"image": str(self.image)}], Mode.TEXT, False, f"question image {self.image}")
        pairs = [encode_pair(codec.text, self.context, " " + choice) for choice in self.choices]
        return [(opening + context[1:], choice) for context, choice in pairs]


def read_questions(path: Path, limit: int | None = None) -> list[Question]:
    """The first `limit` questions of a JSONL file of {"context", "choices": [...], "answer": index}
    and optionally "image"."""
    questions = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise QuestionsError(f"{path} does not exist") from None
    for number, line in enumerate(lines, 1):
        if limit is not None and len(questions) == limit:
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image = Path(path).parent / record["image"] if record.get("image") else None
            question = Question(str(record["context"]), [str(c) for c in record["choices"]], int(record["answer"]),
                                image)  # fmt: skip
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise QuestionsError(f'{path}, line {number}: expected {{"context": ..., "choices": [...], "answer": '
                                 f'index, optionally "image": PATH}}, got {line[:120]!r}') from None  # fmt: skip
        if image is not None and not image.is_file():
            raise QuestionsError(f"{path}, line {number}: image {image} does not exist")
        if len(question.choices) < 2 or not 0 <= question.answer < len(question.choices):
            raise QuestionsError(f"{path}, line {number}: needs two choices or more and an answer index among them")
        questions.append(question)
    if not questions:
        raise QuestionsError(f"{path} has no questions")
    return questions


def right_answers(question: Question, log_likelihoods: list[float]) -> tuple[bool, bool]:
    """Whether the answer scores highest (acc), and highest per character (acc_norm)."""
    per_character = [score / len(choice) for score, choice in zip(log_likelihoods, question.choices, strict=True)]
    best = max(range(len(log_likelihoods)), key=log_likelihoods.__getitem__)
    best_normalised = max(range(len(per_character)), key=per_character.__getitem__)
    return best == question.answer, best_normalised == question.answer
