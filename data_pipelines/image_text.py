"""Image-caption pairs: jsonl `{"image": path, "caption": "..."}` (paths relative to the jsonl),
or the samples of a WebDataset with an image (jpg/jpeg/png/webp) and a `txt` caption."""

from data_pipelines.records import Skip, text_field


def parse(record: dict, images):
    if "caption_bytes" in record:  # from a WebDataset sample
        if record["caption_bytes"] is None:
            raise Skip("missing_caption")
        try:
            record = {**record, "caption": record["caption_bytes"].decode("utf-8")}
        except UnicodeDecodeError:
            raise Skip("invalid_utf8") from None
    caption = text_field(record, "caption")
    if not isinstance(record.get("image"), str | bytes):
        raise Skip("missing_image")
    return images(record["image"]), caption


def assemble(draft, documents, index: int):
    image, caption = draft
    return documents.image_text(image.codes, caption, index)
