"""The audio tokenizer: EnCodec parity with transformers' EncodecModel (the oracle), checkpoints in
transformers' and Meta's layouts, and audio reading with its counted failures."""

import io
import json
import random

import av
import numpy as np
import pytest
import soundfile
import torch
import transformers

from data_pipelines.synthetic_audio import random_sound, render
from data_pipelines.train_audio_tokenizer import train_audio_tokenizer
from fusion_train.commands.data import main as fusion_data
from fusion_train.tokenizers.audio import AudioError, AudioTokenizer, read_audio, windows, write_wav
from fusion_train.tokenizers.encodec import Encodec, EncodecConfig, from_meta_names
from fusion_train.tokenizers.text import TokenizerError

SMALL = dict(sampling_rate=8000, target_bandwidths=[5.0, 15.0], hidden_size=16, num_filters=4, upsampling_ratios=[4, 2],
             codebook_size=32, num_lstm_layers=1, num_residual_layers=2)  # fmt: skip


def random_hf_model(**settings) -> transformers.EncodecModel:
    """transformers' model with every float tensor random and each level's codebook drawn from
    encoder outputs, halved per level as residuals shrink (its own init leaves codebooks zero, and
    random ones of the wrong scale would make every code the same: the check would be empty)."""
    model = transformers.EncodecModel(transformers.EncodecConfig(**SMALL, **settings)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
        outputs = model.encoder(torch.randn(4, 1, 4000, generator=generator)).transpose(1, 2).flatten(0, 1)
        for level, layer in enumerate(model.quantizer.layers):
            chosen = torch.randperm(len(outputs), generator=generator)[: SMALL["codebook_size"]]
            layer.codebook.embed.copy_(outputs[chosen] * 0.5**level)
    return model


@pytest.mark.parametrize("settings", [{}, {"use_causal_conv": False, "norm_type": "time_group_norm"}],
                         ids=["causal-weight-norm", "non-causal-group-norm"])  # fmt: skip
def test_codes_and_audio_equal_transformers_encodec(settings, tmp_path):
    hf = random_hf_model(**settings)
    hf.save_pretrained(tmp_path / "hf")  # transformers' own layout, loaded as it is
    audio = torch.randn(3, 1, 1001, generator=torch.Generator().manual_seed(1))
    for bandwidth, levels in [(5.0, 1), (15.0, 3)]:
        tokenizer = AudioTokenizer.load(tmp_path / "hf", bandwidth=bandwidth, device="cpu")
        assert tokenizer.levels == levels
        with torch.no_grad():
            expected = hf.encode(audio, bandwidth=bandwidth).audio_codes[0]
            expected_audio = hf.decode(expected[None], [None]).audio_values
        codes = tokenizer.encode(list(audio[:, 0].numpy()))
        assert all(np.array_equal(c, e) for c, e in zip(codes, expected.numpy(), strict=True))
        assert expected.unique().numel() > 8  # the check compares real choices, not one code
        decoded = np.stack([tokenizer.decode(c) for c in codes])
        assert np.allclose(decoded, expected_audio[:, 0].clamp(-1, 1).numpy(), atol=1e-5)


def test_the_24khz_layout_and_meta_names_are_transformers_own(tmp_path):
    """The full 24 kHz model's parameter names and shapes are transformers'; Meta's names (as its
    `encodec` package's 24 kHz model spells them: SConv1d > NormConv1d > Conv1d, SConvTranspose1d,
    `model`, `vq`, `_codebook`) rename onto them."""
    ours = Encodec(EncodecConfig()).state_dict()
    theirs = transformers.EncodecModel(transformers.EncodecConfig()).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert EncodecConfig().num_quantizers == 32 and EncodecConfig().levels_for(1.5) == 2
    meta = ["encoder.model.1.block.3.conv.conv.weight_g", "encoder.model.13.lstm.weight_ih_l1",
            "decoder.model.3.convtr.convtr.weight_v", "decoder.model.13.shortcut.conv.conv.bias",
            "quantizer.vq.layers.7._codebook.embed_avg"]  # fmt: skip
    assert list(from_meta_names(dict.fromkeys(meta))) == [
        "encoder.layers.1.block.3.conv.weight_g", "encoder.layers.13.lstm.weight_ih_l1",
        "decoder.layers.3.conv.weight_v", "decoder.layers.13.shortcut.conv.bias",
        "quantizer.layers.7.codebook.embed_avg",
    ]  # fmt: skip


def test_our_folder_opens_in_transformers_and_a_wrong_checkpoint_is_named(tmp_path):
    tokenizer = AudioTokenizer(Encodec(EncodecConfig(**SMALL)), levels=2, fingerprint="", device="cpu")
    tokenizer.save(tmp_path / "ours")
    assert transformers.EncodecModel.from_pretrained(tmp_path / "ours").config.codebook_size == 32
    assert AudioTokenizer.load(tmp_path / "ours").levels == 2  # recorded beside the weights
    with pytest.raises(TokenizerError, match="not found"):
        AudioTokenizer.load(tmp_path / "nothing")
    write_wav(tmp_path / "clip.wav", np.zeros(80, np.float32), 8000)  # a sound given where the codec goes
    with pytest.raises(TokenizerError, match="clip.wav is not a PyTorch checkpoint"):
        AudioTokenizer.load(tmp_path / "clip.wav")
    other = dict(SMALL, num_filters=8)
    AudioTokenizer(Encodec(EncodecConfig(**other)), levels=1, fingerprint="").save(tmp_path / "other")
    (tmp_path / "ours" / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(TokenizerError, match="do not have the shapes its config gives"):
        AudioTokenizer.load(tmp_path / "ours")
    weights = tmp_path / "other" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    with pytest.raises(TokenizerError, match="model.safetensors cannot be read"):
        AudioTokenizer.load(tmp_path / "other")
    with pytest.raises(ValueError, match="unsupported normalize=True"):
        EncodecConfig(normalize=True)


def tone(frequency: float, rate: int, seconds: float = 0.5) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * frequency * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def peak_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def encoded_with_pyav(samples: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format=container) as f:
        stream = f.add_stream(codec, rate=rate, layout="stereo")
        interleaved = np.stack([samples, samples], 1).astype(np.float32).reshape(1, -1)  # packed: L R L R ...
        frame = av.AudioFrame.from_ndarray(interleaved, format="flt", layout="stereo")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            f.mux(packet)
    return out.getvalue()


@pytest.mark.parametrize("kind", ["wav", "flac", "ogg", "mp3", "m4a", "opus"])
def test_every_common_format_reads_as_mono_at_the_codec_rate_with_its_pitch(kind, tmp_path):
    rate = 48000 if kind == "opus" else 44100
    samples = tone(440.0, rate)
    path = tmp_path / f"clip.{kind}"
    if kind in ("m4a", "opus"):  # written by FFmpeg's encoders, read back by PyAV
        path.write_bytes(encoded_with_pyav(samples, rate, "mp4" if kind == "m4a" else "ogg",
                                           "aac" if kind == "m4a" else "libopus"))  # fmt: skip
    else:
        soundfile.write(path, np.stack([samples, samples], 1), rate, format=kind.upper() if kind != "ogg" else "OGG")
    read = read_audio(path, 8000)
    assert read.dtype == np.float32 and read.ndim == 1
    assert abs(len(read) - 4000) < 1200  # encoders add priming samples
    assert abs(peak_frequency(read, 8000) - 440.0) < 5


def test_unusable_audio_is_an_error_with_its_reason(tmp_path):
    write_wav(tmp_path / "silent.wav", np.zeros(800, np.float32), 8000)
    write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32), 8000)
    (tmp_path / "corrupt.mp3").write_bytes(b"ID3" + bytes(range(256)) * 4)
    for name, reason in [("silent.wav", "silent audio"), ("empty.wav", "empty audio"),
                         ("corrupt.mp3", "unreadable audio"), ("absent.wav", "missing audio")]:  # fmt: skip
        with pytest.raises(AudioError, match=reason) as caught:
            read_audio(tmp_path / name, 8000)
        assert caught.value.reason == reason


def test_long_clips_are_cut_into_windows():
    cuts = windows(np.arange(10.0), 4, shortest=2)
    assert [len(c) for c in cuts] == [4, 4, 2]
    assert [len(c) for c in windows(np.arange(9.0), 4, shortest=2)] == [4, 4]


def test_a_small_codec_trained_here_keeps_the_pitch_of_held_out_tones(tmp_path, capsys):
    """fusion-data train-audio-tokenizer on 60 generated clips (notes and sweeps), 800 steps of 8
    quarter-second crops: the held-out clips' pitch survives the round trip in at least 60% of the
    50 ms windows that have one (75% measured; 17% after 300 steps, none before). Deterministic for a seed."""
    rng = random.Random(0)
    (tmp_path / "clips").mkdir()
    for i in range(60):
        write_wav(tmp_path / "clips" / f"{i:03d}.wav", render(random_sound(rng), 8000), 8000)
    report = train_audio_tokenizer([tmp_path / "clips"], tmp_path / "codec", steps=800, batch_size=8,
                                   segment_seconds=0.25)  # fmt: skip
    assert report["initial"]["pitch_kept"] < 0.1 and report["final"]["pitch_kept"] >= 0.6, report
    assert report["tokens_per_second"] == 100 and report["held_out_clips"] == 6
    assert json.loads((tmp_path / "codec" / "training_report.json").read_text()) == report
    again = [train_audio_tokenizer([tmp_path / "clips"], tmp_path / f"short{i}", steps=10, batch_size=4)["fingerprint"]
             for i in range(2)]  # fmt: skip
    assert again[0] == again[1]
    assert (
        fusion_data(["train-audio-tokenizer", "--audio", str(tmp_path / "nothing"), "--output", str(tmp_path / "x")])
        == 2
    )
    assert "fusion-data train-audio-tokenizer: error: audio input" in capsys.readouterr().err


def test_a_long_clip_is_encoded_in_windows_of_whole_frames(monkeypatch):
    tokenizer = AudioTokenizer(Encodec(EncodecConfig(**SMALL)), levels=1, fingerprint="", device="cpu")
    clip = np.random.default_rng(0).uniform(-0.5, 0.5, 8000 * 3 + 5).astype(np.float32)
    whole = tokenizer.encode([clip])[0]
    monkeypatch.setattr("fusion_train.tokenizers.audio.WINDOW_SECONDS", 1.0)
    windowed = tokenizer.encode([clip])[0]
    assert windowed.shape == whole.shape == (1, 3001)  # hop 8: 1,000 frames a second, one more for the 5 samples
    assert np.array_equal(windowed[:, :900], whole[:, :900])  # the first window alone sees no difference
