"""The SFT kind: chats (in any of chat_formats' formats) into samples with the loss on answers only.

A chat longer than the length limit (`--max-tokens`, the training's data.seq_len) is split between
turns into samples that each fit, every one after the first opening with the images and clips the
conversation showed before it (without them its questions would be about nothing), or dropped
(`over_length`), as `--over-length` says; a turn too long even alone is left out and counted.
Chats asking a question of an evaluation set (`--exclude`) are left out (`excluded_question`).
"""

from __future__ import annotations

from data_pipelines.chat_formats import FORMATS, Chat
from data_pipelines.exclusion import normalised_question
from data_pipelines.records import Skip, resolve
from fusion_train.tokenizers.multimodal import TokenizedDocument

OVER_LENGTH = ("split", "drop")


class Chats:
    """A source kind (the `parse`/`assemble` pair build.py calls) for chats in `format`."""

    def __init__(
        self, format: str, max_tokens: int | None, over_length: str, excluded_questions: frozenset = frozenset()
    ):
        self.read, self.max_tokens, self.over_length = FORMATS[format], max_tokens, over_length
        self.excluded_questions = excluded_questions

    def parse(self, record: dict, media) -> Chat:
        chat = self.read(record, media)
        if self.excluded_questions and any(
            normalised_question(prompt) in self.excluded_questions for prompt, _ in chat.turns
        ):
            raise Skip("excluded_question")
        return chat

    def assemble(self, chat: Chat, documents, index) -> list[TokenizedDocument]:
        turns = [(resolve(prompt), resolve(answer)) for prompt, answer in chat.turns]
        whole = documents.sft(turns)
        if self.max_tokens is None or len(whole.tokens) <= self.max_tokens:
            whole.metadata = dict(chat.metadata)
            return [whole]
        if self.over_length == "drop":
            raise Skip("over_length")
        pieces, dropped = self._pieces(turns, documents)
        if not pieces:
            raise Skip("over_length")
        for number, piece in enumerate(pieces):
            piece.metadata = {**chat.metadata, "piece": number, "pieces": len(pieces)}
        pieces[0].metadata["turns_dropped"] = dropped  # counted once per chat, with its first piece
        return pieces

    def _pieces(self, turns: list, documents) -> tuple[list[TokenizedDocument], int]:
        """Runs of consecutive turns that fit, each after the first opening with the media shown
        before it; and the number of turns too long to fit even so, alone."""
        pieces, current, shown, dropped = [], [], [], 0
        for prompt, answer in turns:
            opening = documents.sft_turn(shown + prompt, answer)  # the turn as the first of a piece
            turn = documents.sft_turn(prompt, answer) if current else opening
            if 1 + sum(len(t.tokens) for t in current) + len(turn.tokens) <= self.max_tokens:
                current.append(turn)
            elif 1 + len(opening.tokens) > self.max_tokens:
                dropped += 1
            else:
                pieces += [documents.sft_document(current)] if current else []
                current = [opening]
            shown += [segment for segment in prompt if not isinstance(segment, str)]
        if current:
            pieces.append(documents.sft_document(current))
        return pieces, dropped
