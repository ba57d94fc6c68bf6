"""Audio-caption pairs: jsonl `{"audio": path, "caption": "..."}` (paths relative to the jsonl), or
the samples of a WebDataset with a clip (flac/wav/mp3/ogg/opus/m4a) and a `txt` (or json) caption.
The audio comes first in a seeded half of the pairs (captioning and speech-to-text), after the
text in the other (generation), as image-caption pairs do."""

from data_pipelines.records import Skip, caption_of


def parse(record: dict, media):
    caption = caption_of(record)
    if not isinstance(record.get("audio"), str | bytes):
        raise Skip("missing_audio")
    return media.audio(record["audio"]), caption


def assemble(draft, documents, index: int):
    clip, caption = draft
    return documents.pair(clip.segment(), caption, index)
