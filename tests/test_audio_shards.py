"""Audio shards: audio-caption pairs from jsonl and WebDataset tars, interleaved text with audio, SFT
with audio in prompts and answers; unusable audio counted by reason; layouts without room refused."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from test_build_shards import samples

from data_pipelines.build import BuildSettings, build_shards
from data_pipelines.synthetic_audio import notes_audio, write_sound_captions
from data_pipelines.verify import verify_source
from fusion_train.commands.data import main as fusion_data
from fusion_train.data.manifest import DataError
from fusion_train.tokenizers.audio import AudioTokenizer, write_wav
from helpers import AUDIO_VOCAB as V
from helpers import write_jsonl


@pytest.fixture(scope="module")
def sounds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sounds")
    captions = write_sound_captions(folder, 12, seed=1, rate=8000)
    records = [json.loads(line) for line in captions.read_text().splitlines()]
    return folder, [{**r, "audio": str(folder / r["audio"])} for r in records]


def settings(kind, audio_tokenizers, **extra):
    codec, text_model = audio_tokenizers
    return BuildSettings(kind, str(text_model), audio_tokenizer=str(codec), **extra)


def audio_segments(tokens: np.ndarray) -> list[np.ndarray]:
    """The codes between each begin- and end-of-audio marker."""
    starts, ends = np.flatnonzero(tokens == V.begin_of_audio), np.flatnonzero(tokens == V.end_of_audio)
    return [tokens[s + 1 : e] for s, e in zip(starts, ends, strict=True)]


def test_audio_caption_pairs_with_unusable_audio_counted(audio_tokenizers, sounds, tmp_path):
    folder, records = sounds
    write_wav(tmp_path / "silent.wav", np.zeros(4000, np.float32), 8000)
    write_wav(tmp_path / "long.wav", notes_audio(["low"] * 8, 8000), 8000)  # 2.6 s
    (tmp_path / "corrupt.flac").write_bytes(b"fLaC" + bytes(300))
    bad = [{"audio": "silent.wav", "caption": "nothing"}, {"audio": "corrupt.flac", "caption": "x"},
           {"audio": "gone.wav", "caption": "x"}, {"audio": "long.wav", "caption": "eight low notes"},
           {"caption": "no audio"}]  # fmt: skip
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", records + bad)
    manifest = build_shards(settings("audio-text", audio_tokenizers, max_audio_seconds=2.0), [jsonl], tmp_path / "out")
    assert manifest.skipped == {"audio_too_long": 1, "missing_audio": 1, "missing_audio_file": 1,
                                "silent_audio": 1, "unreadable_audio": 1}  # fmt: skip
    assert manifest.fingerprints["audio"] == AudioTokenizer.load(audio_tokenizers[0]).fingerprint
    assert manifest.tokens_by_modality["audio"] > 0
    codec = AudioTokenizer.load(audio_tokenizers[0])
    built = samples(tmp_path / "out")
    first = []
    for (tokens, _), record in zip(built, records, strict=True):
        [segment] = audio_segments(tokens)
        codes = codec.encode([codec.read(record["audio"])])[0]
        assert np.array_equal(V.ids_to_audio_codes(torch.from_numpy(segment)).numpy(), codes)
        first.append(tokens[1] == V.begin_of_audio)
    assert 0 < sum(first) < len(first)  # audio first in some pairs, the caption in the others
    summary, problems = verify_source(tmp_path / "out", workers=1)
    assert problems == [] and summary["samples"] == len(records)


def test_audio_from_webdataset_tars_with_json_captions(audio_tokenizers, sounds, tmp_path):
    _, records = sounds
    tar = tmp_path / "clips.tar"
    with tarfile.open(tar, "w") as out:
        for i, record in enumerate(records[:6]):
            for name, payload in [(f"{i:04d}.flac", _flac(record["audio"])),
                                  (f"{i:04d}.json", json.dumps({"caption": record["caption"]}).encode())]:  # fmt: skip
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                out.addfile(info, io.BytesIO(payload))
    manifest = build_shards(settings("audio-text", audio_tokenizers), [tar], tmp_path / "out")
    assert manifest.samples == 6 and not manifest.skipped


def _flac(wav_path: str) -> bytes:
    import soundfile

    samples, rate = soundfile.read(wav_path, dtype="float32")
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="FLAC")
    return out.getvalue()


def test_interleaved_and_sft_carry_audio_in_order(audio_tokenizers, sounds, tmp_path):
    _, records = sounds
    documents = write_jsonl(
        tmp_path / "docs.jsonl",
        [
            {
                "segments": [
                    {"text": "Listen:"},
                    {"audio": records[0]["audio"]},
                    {"text": "and then"},
                    {"audio": records[1]["audio"]},
                ]
            }
        ],
    )
    build_shards(settings("interleaved", audio_tokenizers), [documents], tmp_path / "docs")
    [(tokens, _)] = samples(tmp_path / "docs")
    assert len(audio_segments(tokens)) == 2 and tokens[-1] == V.eos
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "audio", "audio": records[2]["audio"]}]},
        {"role": "assistant", "content": records[2]["caption"]},
        {"role": "user", "content": "Play " + records[3]["caption"] + "."},
        {"role": "assistant", "content": [{"type": "audio", "audio": records[3]["audio"]}]},
    ]}])  # fmt: skip
    build_shards(settings("sft", audio_tokenizers), [chats], tmp_path / "sft")
    [(tokens, mask)] = samples(tmp_path / "sft")
    prompt_audio, answer_audio = np.flatnonzero(tokens == V.begin_of_audio)
    assert mask[prompt_audio] == 0 and mask[answer_audio] == 1  # trained on the audio it answers with only
    assert V.modality_of(torch.from_numpy(tokens)).eq(3).sum() == sum(map(len, audio_segments(tokens)))


def test_a_vocabulary_without_room_for_the_codes_is_refused(audio_tokenizers, text_tokenizer, sounds, tmp_path, capsys):
    _, records = sounds
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", records[:2])
    code = fusion_data(["build-shards", "--kind", "audio-text", "--input", str(jsonl), "--output", str(tmp_path / "o"),
                        "--text-tokenizer", str(text_tokenizer.path), "--audio-tokenizer", str(audio_tokenizers[0])])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and "has no room for audio codes" in error and "--audio-tokenizer" in error
    with pytest.raises(DataError, match="no audio tokenizer was given"):
        build_shards(BuildSettings("audio-text", str(audio_tokenizers[1])), [jsonl], tmp_path / "o2", workers=0)
