"""Interleaved documents: `{"segments": [{"text": "..."} | {"image": path} | {"audio": path} |
{"video": path}, ...]}`, kept in order."""

from data_pipelines.records import Skip, resolve


def parse(record: dict, media) -> list:
    segments = record.get("segments")
    if not isinstance(segments, list):
        raise Skip("missing_segments")
    parsed = []
    for segment in segments:
        if isinstance(segment, dict) and isinstance(segment.get("text"), str):
            if segment["text"]:
                parsed.append(segment["text"])
        elif isinstance(segment, dict) and isinstance(segment.get("image"), str):
            parsed.append(media.image(segment["image"]))
        elif isinstance(segment, dict) and isinstance(segment.get("audio"), str):
            parsed.append(media.audio(segment["audio"]))
        elif isinstance(segment, dict) and isinstance(segment.get("video"), str):
            parsed.append(media.video(segment["video"]))
        else:
            raise Skip("bad_segment")
    if not parsed:
        raise Skip("empty_document")
    return parsed


def assemble(draft: list, documents, index: int):
    return documents.document(resolve(draft))
