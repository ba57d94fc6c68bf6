"""What `fusion-generate` writes: `outputs.jsonl` (one record per prompt), the pictures as PNG files
under `images/`, and `index.html`, the prompts beside their outputs with the pictures inline (the
page embeds them, so it can be moved or mailed on its own)."""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fusion_train.generate.documents import Segment

THUMBNAIL = 256  # px on the page; the PNG files keep the decoder's resolution


@dataclass
class Sample:
    prompt: list  # the prompt's segments as given: text, or {"image": PATH}
    mode: str
    output: list[Segment]
    stop: str
    new_tokens: int


def as_text(segments: list) -> str:
    """Segments in one line: text as it is, pictures as [image] or [image PATH]."""
    return " ".join(
        "[image]" if isinstance(s, np.ndarray) else f"[image {s['image']}]" if isinstance(s, dict) and "image" in s
        else s["text"] if isinstance(s, dict) else s
        for s in segments
    )  # fmt: skip


def save_output(sample: Sample, folder: Path, stem: str, relative_to: Path) -> dict:
    """The sample as a JSON record, its pictures written as `folder/STEM_K.png` (paths relative to `relative_to`)."""
    folder.mkdir(parents=True, exist_ok=True)
    output = []
    for segment in sample.output:
        if isinstance(segment, np.ndarray):
            path = folder / f"{stem}_{len(output)}.png"
            Image.fromarray(segment).save(path)
            output.append({"image": str(path.relative_to(relative_to))})
        else:
            output.append({"text": segment})
    return {"prompt": sample.prompt, "mode": sample.mode, "output": output, "stop": sample.stop,
            "new_tokens": sample.new_tokens}  # fmt: skip


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def inline_image(png: bytes, alt: str, size: int = THUMBNAIL) -> str:
    return (
        f'<img alt="{html.escape(alt)}" width="{size}" style="image-rendering: pixelated" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
    )


def segments_html(segments: list, base: Path = Path(), size: int = THUMBNAIL) -> str:
    """Text escaped, pictures (arrays, or {"image": PATH} relative to `base`) inline."""
    parts = []
    for segment in segments:
        if isinstance(segment, np.ndarray):
            parts.append(inline_image(png_bytes(segment), "generated image", size))
        elif isinstance(segment, dict) and "image" in segment:
            path = base / segment["image"]
            if not path.is_file():
                parts.append(html.escape(f"[image {path}: missing]"))
                continue
            with Image.open(path) as image:
                parts.append(inline_image(png_bytes(np.asarray(image.convert("RGB"))), segment["image"], size))
        else:
            text = segment["text"] if isinstance(segment, dict) else segment
            parts.append(f'<span style="white-space: pre-wrap">{html.escape(text)}</span>')
    return "<br>".join(parts)


def write_outputs(out_dir: str | Path, samples: list[Sample], prompt_base: Path = Path()) -> Path:
    """The jsonl, the PNGs and the page; returns the page's path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for old in (out_dir / "images").glob("*.png"):  # a previous run's, which this page would not show
        old.unlink()
    rows = []
    with open(out_dir / "outputs.jsonl", "w") as records:
        for index, sample in enumerate(samples):
            record = {"index": index, **save_output(sample, out_dir / "images", f"{index:04d}", out_dir)}
            records.write(json.dumps(record) + "\n")
            rows.append(
                f"<tr><td>{index}</td><td>{html.escape(sample.mode)}</td><td>{segments_html(sample.prompt, prompt_base)}"
                f"</td><td>{segments_html(sample.output)}</td><td>{html.escape(sample.stop)}, {sample.new_tokens} tokens</td></tr>"
            )
    page = out_dir / "index.html"
    page.write_text(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fusion-generate: {html.escape(str(out_dir))}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 6px; vertical-align: top; }}
</style></head><body>
<h1>fusion-generate</h1>
<table><tr><th>#</th><th>mode</th><th>prompt</th><th>output</th><th>stop</th></tr>
{"".join(rows)}
</table></body></html>
""")
    return page
