"""Instruction data as it is published, read into chats: turns of (prompt, answer) segments.

- `messages` (ours, OpenAI-style): `{"messages": [{"role": "system"|"user"|"assistant", "content":
  "..." | [{"type": "text", "text": "..."} | {"type": "image", "image": path} | {"type": "audio",
  "audio": path} | {"type": "video", "video": path}, ...]}, ...]}`: a question about a video in a
  prompt, a clip generated from a caption in an answer.
- `llava` and `sharegpt` (one schema): `{"conversations": [{"from": "human"|"gpt"|"system", "value":
  "..."}, ...], "image": path or [paths]}`; each `<image>` in a value is the next image, in order.
  ShareGPT's chats are the same without images. An image may also be an HF image struct
  ({"bytes", "path"}), as parquet exports of LLaVA data hold them.
- `cauldron` (HuggingFaceM4/the_cauldron's parquet): `{"images": [{"bytes", "path"}, ...], "texts":
  [{"user", "assistant", "source"}, ...]}`. The texts carry no image placeholders: as Idefics2 does,
  all the row's images open the first user turn, in list order, before its text.

Prompt images are padded to a square (and split into quarters with --split-images); answer images
are centre-cropped, as Chameleon §3 does. A record that cannot be a chat is a counted skip:
`unknown_role`, `image_placeholder_mismatch` (placeholders and images differ in number),
`empty_answer`, `answer_without_prompt`, `no_answer`, `bad_content`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from data_pipelines.records import Skip

IMAGE_PLACEHOLDER = "<image>"
PROMPT = "prompt"
ANSWER = "answer"
ROLES = {"system": PROMPT, "user": PROMPT, "human": PROMPT, "assistant": ANSWER, "gpt": ANSWER}


@dataclass
class Chat:
    turns: list[tuple[list, list]]  # (prompt segments, answer segments), images and clips still pending
    metadata: dict = field(default_factory=dict)  # goes into every sample made from it (a Cauldron subset, ...)


def turns_of(messages: Iterable[tuple[str, list]]) -> list[tuple[list, list]]:
    """Messages (PROMPT or ANSWER, segments) as turns: the prompt messages before an answer form its
    prompt; prompt messages after the last answer are left out (nothing to learn from them)."""
    turns, prompt = [], []
    for role, segments in messages:
        if role == PROMPT:
            prompt += segments
        elif not segments:
            raise Skip("empty_answer")
        elif not prompt:
            raise Skip("answer_without_prompt")
        else:
            turns.append((prompt, segments))
            prompt = []
    if not turns:
        raise Skip("no_answer")
    return turns


def _role(name) -> str:
    if name not in ROLES:
        raise Skip("unknown_role")
    return ROLES[name]


def _text(text: str) -> list:
    return [text] if text.strip() else []


def messages(record: dict, media) -> Chat:
    listed = record.get("messages")
    if not isinstance(listed, list):
        raise Skip("missing_messages")
    read = []
    for message in listed:
        role = _role(message.get("role") if isinstance(message, dict) else None)
        read.append((role, _message_content(message.get("content"), media, role)))
    return Chat(turns_of(read))


def _message_content(content, media, role: str) -> list:
    if isinstance(content, str):
        return _text(content)
    if not isinstance(content, list):
        raise Skip("bad_content")
    segments = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            segments += _text(part["text"])
        elif kind == "image" and isinstance(part.get("image"), str):
            segments += _image(media, part["image"], role)
        elif kind in ("audio", "video") and isinstance(part.get(kind), str):
            segments.append(getattr(media, kind)(part[kind]))
        else:
            raise Skip("bad_content")
    return segments


def _image(media, source, role: str) -> list:
    return media.prompt_images(source) if role == PROMPT else [media.image(source)]


def conversations(record: dict, media) -> Chat:
    """LLaVA's and ShareGPT's `conversations`."""
    listed = record.get("conversations")
    if not isinstance(listed, list) or not all(isinstance(m, dict) and isinstance(m.get("value"), str) for m in listed):
        raise Skip("missing_conversations")
    images = record.get("image", record.get("images")) or []
    images = images if isinstance(images, list) else [images]
    if sum(m["value"].count(IMAGE_PLACEHOLDER) for m in listed) != len(images):
        raise Skip("image_placeholder_mismatch")
    remaining = iter(images)
    read = []
    for message in listed:
        role = _role(message.get("from"))
        texts = message["value"].split(IMAGE_PLACEHOLDER)
        segments = _text(texts[0].strip())
        for text in texts[1:]:
            segments += _image(media, next(remaining), role) + _text(text.strip())
        read.append((role, segments))
    metadata = {"source": record["source"]} if isinstance(record.get("source"), str) else {}
    return Chat(turns_of(read), metadata)


def cauldron(record: dict, media) -> Chat:
    """A row of the Cauldron: its images open the first user turn (Idefics2's placement)."""
    texts, images = record.get("texts"), record.get("images") or []
    if not isinstance(texts, list) or not texts or not isinstance(images, list):
        raise Skip("missing_texts")
    if not all(isinstance(t, dict) and isinstance(t.get("user"), str) and isinstance(t.get("assistant"), str)
               for t in texts):  # fmt: skip
        raise Skip("bad_content")
    shown = [pending for image in images for pending in media.prompt_images(image)]
    read = []
    for number, turn in enumerate(texts):
        read += [(PROMPT, (shown if number == 0 else []) + _text(turn["user"])), (ANSWER, _text(turn["assistant"]))]
    sources = sorted({t["source"] for t in texts if isinstance(t.get("source"), str)})
    return Chat(turns_of(read), {"subset": media.input.parent.name, "source": ", ".join(sources)})


FORMATS = {"messages": messages, "llava": conversations, "sharegpt": conversations, "cauldron": cauldron}
