"""`fusion-generate` on a trained tiny model: its outputs, its errors, and HF transformers as a peer."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import pytest
import soundfile
import torch
from PIL import Image
from transformers import ChameleonForConditionalGeneration

from conftest import media_durations
from data_pipelines.train_audio_tokenizer import small_config as small_codec_config
from fusion_train.commands.convert import main as convert_main
from fusion_train.commands.generate import main as generate_main
from fusion_train.generate.generator import Generator, Request
from fusion_train.generate.load import load_model
from fusion_train.generate.sampling import Sampling
from fusion_train.tokenizers.audio import AudioTokenizer
from fusion_train.tokenizers.encodec import Encodec
from fusion_train.tokenizers.text import TextTokenizer


@pytest.fixture
def checkpoint(pretrained_checkpoint):
    return pretrained_checkpoint


def _outputs(folder):
    return [json.loads(line) for line in (folder / "outputs.jsonl").read_text().splitlines()]


def test_fusion_generate_writes_outputs_pictures_and_a_page(checkpoint, demo_data, tmp_path, capsys):
    picture = tmp_path / "inputs" / "shape.png"
    picture.parent.mkdir()
    shutil.copy(Path(demo_data["folder"]) / "held_out" / "images" / "000000.png", picture)
    prompts = tmp_path / "inputs" / "prompts.jsonl"
    records = [
        {"prompt": ["a big red circle on a white background"], "mode": "image"},
        {"prompt": [{"image": "shape.png"}, "This picture shows"], "mode": "text"},
        {"prompt": ["Here are two pictures. The first is"], "mode": "interleaved"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    assert generate_main([str(checkpoint), "--prompts", str(prompts), "--prompt", "This picture", "--out", str(out),
                          "--max-new-tokens", "100", "--batch-size", "3"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    outputs = _outputs(out)
    assert [o["mode"] for o in outputs] == ["text", "image", "text", "interleaved"]
    image = outputs[1]
    assert image["stop"] == "image_done" and image["new_tokens"] == 65 and len(image["output"]) == 1
    assert Image.open(out / image["output"][0]["image"]).size == (64, 64)
    assert str(out / image["output"][0]["image"]) in printed and f"page: {out / 'index.html'}" in printed
    assert all(o["stop"] in ("end_of_sequence", "max_new_tokens") for o in outputs if o["mode"] != "image")
    page = (out / "index.html").read_text()
    # Every picture inline: the prompt's own and each generated one.
    pictures = sum(1 for o in outputs for s in o["output"] if "image" in s)
    assert page.count("<img ") == 1 + pictures and "This picture shows" in page


def test_bad_input_is_a_clear_error_naming_it(checkpoint, demo_data, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    cases = [
        ([{"prompt": [{"image": "missing.png"}, "What is it?"]}], f"{prompts}, line 1: image file {tmp_path}/missing.png does not exist"),
        ([{"prompt": ["a circle"], "mode": "film"}], f"{prompts}, line 1: mode 'film' is not one of ['text', 'image', 'audio', 'video', 'interleaved']"),
        ([{"prompt": [{"video": "missing.mp4"}], "mode": "video"}], f"{prompts}, line 1: missing video: {tmp_path}/missing.mp4 does not exist"),
        ([{"prompt": ["a circle"], "mode": "video", "frames": 40}], "prompt 0: 40 video frames need 6721 tokens, and the model's context (model.max_seq_len=4096) leaves"),
        ([{"prompt": [{"audio": "missing.wav"}, "What is it?"]}], f"{prompts}, line 1: audio file {tmp_path}/missing.wav: missing audio"),
        ([{"prompt": ["word " * 5000]}], "prompt 0 has"),
        ([{"text": "no prompt key"}], f'{prompts}, line 1: expected {{"prompt": [segments], "mode": ...}}'),
    ]  # fmt: skip
    for records, message in cases:
        prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
        assert generate_main([str(checkpoint), "--prompts", str(prompts), "--out", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err
        assert f"fusion-generate: error: {message}" in error, error
    # An audio tokenizer of the right shape but other weights than the run's.
    other = AudioTokenizer(Encodec(small_codec_config(8000, [8, 5, 4], 256, 2)), 2, "").save(tmp_path / "other_codec")
    assert generate_main([str(checkpoint), "--prompt", "a", "--mode", "audio", "--audio-tokenizer", str(other)]) == 2
    assert f"audio tokenizer {other} is not the one {checkpoint} was trained with" in capsys.readouterr().err
    # A model folder does not say where its tokenizers are.
    assert convert_main(["zero-to-safetensors", str(checkpoint), str(tmp_path / "model")]) == 0
    assert generate_main([str(tmp_path / "model"), "--prompt", "a", "--out", str(tmp_path / "out")]) == 2
    assert "pass --text-tokenizer PATH" in capsys.readouterr().err
    assert generate_main([str(tmp_path / "nothing"), "--prompt", "a"]) == 2
    assert "neither a training checkpoint" in capsys.readouterr().err


def test_commands_say_only_their_own_words_and_mode_is_the_default_of_records_without_one(checkpoint, tmp_path):
    """As a user runs them (the console script, DeepSpeed left to detect its accelerator): stdout
    holds the command's own lines, DeepSpeed's words go to the log; `--mode` (and `--chat`) are what
    the prompts file's records take when they name none, not only `--prompt`'s."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    prompts = tmp_path / "prompts.jsonl"
    records = [{"prompt": ["Draw a big red circle in the centre."]}, {"prompt": ["This picture shows"], "mode": "text"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    command = [Path(sys.executable).parent / "fusion-generate", checkpoint, "--mode", "image", "--chat",
               "--prompts", prompts, "--out", out, "--max-new-tokens", "8", "--no-guidance"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    outputs = _outputs(out)
    assert [o["mode"] for o in outputs] == ["image", "text"] and outputs[0]["stop"] == "image_done"
    [picture] = sorted((out / "images").glob("*.png"))
    assert result.stdout.splitlines() == [
        f"2 prompts, 1 pictures, 0 sounds, 0 videos: {out / 'outputs.jsonl'}",
        f"  {picture}",
        f"page: {out / 'index.html'}",
    ]
    assert "Processing zero checkpoint" not in result.stdout + result.stderr  # below the log's level


def test_audio_and_video_modes_give_the_same_codes_and_files_with_and_without_the_cache_and_the_page_plays_them(
    checkpoint, demo_data, demo_videos, tmp_path
):
    """A sound asked for and a sound described; a clip of a held-out video continued by a frame and
    a clip asked for by its caption (2 frames a second, with sound). Each the same id for id and
    byte for byte whether the KV cache is used or every position recomputed; the MP4s decode again
    to their frames, duration and sound; the page's <audio> and <video> elements play in headless
    Chromium for as long as their files last."""
    clip = next((Path(demo_data["folder"]) / "held_out_sounds" / "sounds").glob("*.wav"))
    video = Path(demo_videos["held_out"]).parent / "videos" / "00000.mp4"
    prompts = tmp_path / "prompts.jsonl"
    records = [{"prompt": ["Play two low notes then a high one."], "mode": "audio"},
               {"prompt": [{"audio": str(clip)}, "This sound is"], "mode": "text"},
               {"prompt": [{"video": str(video), "frames": 1}], "mode": "video", "frames": 2},
               {"prompt": ["Show a red circle that moves right."], "mode": "video"}]  # fmt: skip
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    outs = {}
    for name, flags in (("cached", []), ("recomputed", ["--no-cache"])):
        outs[name] = tmp_path / name
        assert generate_main([str(checkpoint), "--prompts", str(prompts), "--greedy", "--max-new-tokens", "41",
                              "--video-fps", "2", "--video-frames", "1", "--out", str(outs[name]), *flags]) == 0  # fmt: skip
    cached, recomputed = _outputs(outs["cached"]), _outputs(outs["recomputed"])
    [played] = [s for s in cached[0]["output"] if "audio" in s]
    assert cached == recomputed and cached[0]["stop"] in ("audio_done", "max_new_tokens")
    frames = len(played["codes"][0])
    assert len(played["codes"]) == 2 and 1 <= frames <= 20  # two levels; at most 40 codes and <end-audio>
    wavs = [(outs[name] / played["audio"]).read_bytes() for name in outs]
    assert wavs[0] == wavs[1]
    samples, rate = soundfile.read(outs["cached"] / played["audio"])
    assert rate == 8000 and len(samples) == frames * 160

    # A frame is 66 ids, its half second of sound 52: 118 a chunk, and <end-video>.
    clips = [next(s for s in record["output"] if "video" in s) for record in cached[2:]]
    assert [(r["stop"], r["new_tokens"]) for r in cached[2:]] == [("video_done", 119)] * 2
    assert [(c["frames"], c["given_frames"], c["sound"]) for c in clips] == [(2, 1, True), (1, 0, True)]
    for made in clips:
        assert (outs["cached"] / made["video"]).read_bytes() == (outs["recomputed"] / made["video"]).read_bytes()
        with av.open(str(outs["cached"] / made["video"])) as container:
            assert len(list(container.decode(video=0))) == made["frames"]
            assert container.streams.video[0].average_rate == 2 and len(container.streams.audio) == 1
            assert container.duration / 1e6 == pytest.approx(made["frames"] / 2, abs=0.15)
        assert Image.open(outs["cached"] / made["poster"]).size == (64, 64)
    page = outs["cached"] / "index.html"
    durations = media_durations(page)
    assert durations == pytest.approx([frames * 160 / 8000, soundfile.info(clip).duration], abs=1e-3)
    with av.open(str(video)) as given:
        assert media_durations(page, "video") == pytest.approx([given.duration / 1e6, 1.0, 0.5], abs=0.15)


def test_fusion_convert_says_only_what_it_wrote_and_a_flag_that_cannot_apply_is_an_error(checkpoint, tmp_path, capsys):
    assert convert_main(["zero-to-safetensors", str(checkpoint), str(tmp_path / "model")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'model'}\n"
    assert generate_main([str(checkpoint), "--image", "x.png", "--prompts", "p.jsonl"]) == 2
    assert "--image goes before each --prompt's text, and there is no --prompt" in capsys.readouterr().err
    assert generate_main([str(checkpoint), "--prompt", "a", "--no-guidance", "--text-scale", "2"]) == 2
    assert "--image-scale and --text-scale set the guidance that --no-guidance turns off" in capsys.readouterr().err


def test_hf_transformers_generates_the_same_greedy_text_from_an_hf_export(checkpoint, demo_data, tmp_path):
    hf = tmp_path / "hf"
    assert convert_main(["to-hf", str(checkpoint), str(hf)]) == 0
    text = TextTokenizer(demo_data["text_tokenizer"])
    prompts = ["This picture shows a big", "Here are two pictures. The first is", "The"]
    out = tmp_path / "out"
    assert generate_main([str(hf), *[a for p in prompts for a in ("--prompt", p)], "--greedy", "--max-new-tokens", "20",
                          "--text-tokenizer", demo_data["text_tokenizer"], "--out", str(out)]) == 0  # fmt: skip
    ours = [o["output"][0]["text"] if o["output"] else "" for o in _outputs(out)]

    peer = ChameleonForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    loaded = load_model(hf, torch.device("cpu"), torch.float32)
    for prompt, our_text in zip(prompts, ours, strict=True):
        ids = [0, *text.encode([prompt])[0]]
        with torch.no_grad():
            theirs = peer.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids) :].tolist()
        theirs = theirs[: theirs.index(2) + 1] if 2 in theirs else theirs
        [generation] = Generator(loaded.model, loaded.trained_with.vocab).generate([Request(ids)], Sampling(), 20)
        assert generation.tokens == theirs and len(theirs) > 3
        assert our_text == text.decode([[t for t in theirs if t >= text.vocab.text_start]])[0]
