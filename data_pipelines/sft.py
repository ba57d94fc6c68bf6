"""Chats for supervised fine-tuning:
`{"messages": [{"role": "system"|"user"|"assistant", "content": "..." | [{"type": "text", "text": "..."}
| {"type": "image", "image": path} | {"type": "audio", "audio": path}, ...]}, ...]}`.

System and user messages up to an assistant message form a prompt (its images resized with border
padding); the assistant message is the answer (images centre-cropped), as Chameleon §3 does.
"""

from data_pipelines.records import Skip, resolve

PROMPT_ROLES = ("system", "user")


def _content(content, media, pad: bool) -> list:
    if isinstance(content, str):
        return [content] if content else []
    if not isinstance(content, list):
        raise Skip("bad_content")
    segments = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            segments += [part["text"]] if part["text"] else []
        elif kind == "image" and isinstance(part.get("image"), str):
            segments.append(media.image(part["image"], pad=pad))
        elif kind == "audio" and isinstance(part.get("audio"), str):
            segments.append(media.audio(part["audio"]))
        else:
            raise Skip("bad_content")
    return segments


def parse(record: dict, media) -> list:
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise Skip("missing_messages")
    turns, prompt = [], []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in (*PROMPT_ROLES, "assistant"):
            raise Skip("bad_role")
        segments = _content(message.get("content"), media, pad=role in PROMPT_ROLES)
        if role in PROMPT_ROLES:
            prompt += segments
        elif not prompt or not segments:
            raise Skip("empty_turn")
        else:
            turns.append((prompt, segments))
            prompt = []
    if not turns:
        raise Skip("no_answer")
    return turns


def assemble(draft: list, documents, index: int):
    return documents.sft([(resolve(prompt), resolve(answer)) for prompt, answer in draft])
