"""Image-caption pairs: jsonl `{"image": path, "caption": "..."}` (paths relative to the jsonl),
or the samples of a WebDataset with an image (jpg/jpeg/png/webp) and a `txt` (or json) caption."""

from data_pipelines.records import Skip, caption_of


def parse(record: dict, media):
    caption = caption_of(record)
    if not isinstance(record.get("image"), str | bytes):
        raise Skip("missing_image")
    return media.image(record["image"]), caption


def assemble(draft, documents, index: int):
    image, caption = draft
    return documents.pair(image.segment(), caption, index)
