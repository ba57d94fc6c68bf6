"""What `fusion-generate` writes: `outputs.jsonl` (one record per prompt), the pictures as PNG files
under `images/`, the sounds as WAV files under `sounds/`, the videos as MP4 files (H.264, AAC) with
a PNG poster frame under `videos/`, and `index.html`, the prompts beside their outputs with the
pictures, sounds and videos inline (`<audio>` and `<video>` elements play them; the page embeds
them, so it can be moved or mailed on its own)."""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fusion_train.generate.documents import Clip, Segment, Sound
from fusion_train.tokenizers.audio import write_wav
from fusion_train.tokenizers.video import write_mp4

THUMBNAIL = 256  # px on the page; the PNG files keep the decoder's resolution


@dataclass
class Sample:
    prompt: list  # the prompt's segments as given: text, or {"image": PATH}
    mode: str
    output: list[Segment]
    stop: str
    new_tokens: int


def as_text(segments: list) -> str:
    """Segments in one line: text as it is, pictures as [image] or [image PATH], sounds as [audio ...]."""
    return " ".join(
        "[image]" if isinstance(s, np.ndarray) else "[audio]" if isinstance(s, Sound) else "[video]" if isinstance(s, Clip)
        else next((f"[{kind} {s[kind]}]" for kind in ("image", "audio", "video") if isinstance(s, dict) and kind in s),
                  None)
        or (s["text"] if isinstance(s, dict) else s)
        for s in segments
    )  # fmt: skip


def save_output(sample: Sample, folder: Path, stem: str, relative_to: Path, sound_folder: Path | None = None,
                video_folder: Path | None = None) -> dict:  # fmt: skip
    """The sample as a JSON record, its pictures written as `folder/STEM_K.png`, its sounds as
    `sound_folder/STEM_K.wav` and its videos as `video_folder/STEM_K.mp4` with their first frame as
    `STEM_K.png` beside (default: beside the pictures; paths relative to `relative_to`)."""
    sound_folder, video_folder = sound_folder or folder, video_folder or folder
    output = []
    for segment in sample.output:
        if isinstance(segment, Clip):
            video_folder.mkdir(parents=True, exist_ok=True)
            path, poster = video_folder / f"{stem}_{len(output)}.mp4", video_folder / f"{stem}_{len(output)}.png"
            write_mp4(path, segment.frames, segment.frames_per_second, segment.sound, segment.rate)
            Image.fromarray(segment.frames[0]).save(poster)
            output.append({"video": str(path.relative_to(relative_to)), "poster": str(poster.relative_to(relative_to)),
                           "frames": len(segment.frames), "given_frames": segment.given_frames,
                           "sound": segment.sound is not None})  # fmt: skip
            continue
        if isinstance(segment, np.ndarray):
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{stem}_{len(output)}.png"
            Image.fromarray(segment).save(path)
            output.append({"image": str(path.relative_to(relative_to))})
        elif isinstance(segment, Sound):
            sound_folder.mkdir(parents=True, exist_ok=True)
            path = write_wav(sound_folder / f"{stem}_{len(output)}.wav", segment.samples, segment.rate)
            output.append({"audio": str(path.relative_to(relative_to)), "codes": segment.codes.tolist()})
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


def inline_audio(wav: bytes, title: str) -> str:
    return f'<audio controls title="{html.escape(title)}" src="data:audio/wav;base64,{base64.b64encode(wav).decode()}"></audio>'


def inline_video(mp4: bytes, poster: bytes | None, title: str, size: int = THUMBNAIL) -> str:
    poster_attribute = f'poster="data:image/png;base64,{base64.b64encode(poster).decode()}" ' if poster else ""
    return (f'<video controls width="{size}" title="{html.escape(title)}" style="image-rendering: pixelated" '
            f'{poster_attribute}src="data:video/mp4;base64,{base64.b64encode(mp4).decode()}"></video>')  # fmt: skip


def mp4_bytes(clip: Clip) -> bytes:
    buffer = io.BytesIO()
    write_mp4(buffer, clip.frames, clip.frames_per_second, clip.sound, clip.rate)
    return buffer.getvalue()


def wav_bytes(sound: Sound) -> bytes:
    buffer = io.BytesIO()
    write_wav(buffer, sound.samples, sound.rate)
    return buffer.getvalue()


def segments_html(segments: list, base: Path = Path(), size: int = THUMBNAIL) -> str:
    """Text escaped, pictures (arrays, or {"image": PATH} relative to `base`) and sounds (Sound, or
    {"audio": PATH}) inline."""
    parts = []
    for segment in segments:
        if isinstance(segment, np.ndarray):
            parts.append(inline_image(png_bytes(segment), "generated image", size))
        elif isinstance(segment, Sound):
            parts.append(inline_audio(wav_bytes(segment), "generated sound"))
        elif isinstance(segment, Clip):
            parts.append(inline_video(mp4_bytes(segment), png_bytes(segment.frames[0]), "generated video", size))
        elif isinstance(segment, dict) and "video" in segment:
            path = base / segment["video"]
            parts.append(inline_video(path.read_bytes(), None, segment["video"], size) if path.is_file()
                         else html.escape(f"[video {path}: missing]"))  # fmt: skip
        elif isinstance(segment, dict) and "audio" in segment:
            path = base / segment["audio"]
            parts.append(inline_audio(path.read_bytes(), segment["audio"]) if path.is_file()
                         else html.escape(f"[audio {path}: missing]"))  # fmt: skip
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
    """The jsonl, the PNGs and WAVs and the page; returns the page's path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for old in [*(out_dir / "images").glob("*.png"), *(out_dir / "sounds").glob("*.wav"),
                *(out_dir / "videos").glob("*.*")]:  # a previous run's  # fmt: skip
        old.unlink()
    rows = []
    with open(out_dir / "outputs.jsonl", "w") as records:
        for index, sample in enumerate(samples):
            record = {"index": index, **save_output(sample, out_dir / "images", f"{index:04d}", out_dir,
                                                    out_dir / "sounds", out_dir / "videos")}  # fmt: skip
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
