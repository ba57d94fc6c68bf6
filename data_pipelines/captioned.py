"""Media-caption pairs, one kind per medium: jsonl `{"image": path, "caption": "..."}`,
`{"audio": path, ...}` or `{"video": path, ...}` (paths relative to the jsonl), or the samples of
a WebDataset with an image (jpg/jpeg/png/webp), a clip (flac/wav/mp3/ogg/opus/m4a) or a video
(mp4/webm/mkv/mov/avi) and a `txt` (or json) caption. The media come first in a seeded half of
the pairs (captioning, speech-to-text, video description), after the caption in the other
(generation)."""

from data_pipelines.records import Skip, caption_of


class CaptionedMedia:
    """A source kind (the `parse`/`assemble` pair build.py calls) for captions of `medium`."""

    def __init__(self, medium: str):
        self.medium = medium  # the record's field, and the MediaLoader method that loads it

    def parse(self, record: dict, media):
        caption = caption_of(record)
        if not isinstance(record.get(self.medium), str | bytes):
            raise Skip(f"missing_{self.medium}")
        return getattr(media, self.medium)(record[self.medium]), caption

    def assemble(self, draft, documents, index: int):
        loaded, caption = draft
        return documents.pair(loaded.segment(), caption, index)
