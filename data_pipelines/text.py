"""Text records: `{"text": "..."}` -> `<s> text </s>`."""

from data_pipelines.records import text_field


def parse(record: dict, images) -> str:
    return text_field(record, "text")


def assemble(draft: str, documents, index: int):
    return documents.document([draft])
