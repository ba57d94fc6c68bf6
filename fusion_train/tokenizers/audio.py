"""Audio to codes and back: reading any common audio file as mono samples at the codec's rate, and
the EnCodec tokenizer that turns windows of them into residual-quantizer codes.

Reading: soundfile (libsndfile: wav, flac, ogg/vorbis, mp3) first, PyAV (FFmpeg) for the rest
(m4a/aac, opus, webm); channels averaged to mono; resampled with soxr at its high-quality setting
(a band-limited polyphase resampler: no aliasing of the kind naive interpolation adds). Audio that
cannot be decoded, has no samples or is silent raises AudioError with the reason, which shard
builders count as a skip.

A tokenizer folder is transformers' layout of an `EncodecModel` (`config.json` + `model.safetensors`),
so `EncodecModel.from_pretrained` opens ours and a downloaded `facebook/encodec_24khz` works here
as is; `fusion_train_levels` in the config says how many residual levels the tokens keep.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fusion_train.tokenizers.encodec import Encodec, EncodecConfig, from_meta_names, from_weight_norm_names
from fusion_train.tokenizers.text import TokenizerError, fingerprint_file

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
LEVELS_KEY = "fusion_train_levels"
SILENCE = 1e-4  # peak amplitude (of 1.0 full scale) below which a clip holds nothing to learn
WINDOW_SECONDS = 30.0  # longer clips are encoded in windows of about this length


class AudioError(ValueError):
    """Audio that cannot be used; `reason` is the skip counter's key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def read_audio(source: str | Path | bytes, sampling_rate: int) -> np.ndarray:
    """A file (path or its bytes) as float32 mono samples in [-1, 1] at `sampling_rate`."""
    samples, rate = _decode(source)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.size == 0:
        raise AudioError("empty audio", f"{_name(source)} has no samples")
    if rate != sampling_rate:
        samples = soxr.resample(samples, rate, sampling_rate, quality="HQ")
    if not np.isfinite(samples).all():
        raise AudioError("corrupt audio", f"{_name(source)} decodes to non-finite samples")
    if np.abs(samples).max() < SILENCE:
        raise AudioError("silent audio", f"{_name(source)} is silent (peak below {SILENCE})")
    return samples.astype(np.float32)


def _name(source: str | Path | bytes) -> str:
    return f"{len(source)} bytes of audio" if isinstance(source, bytes) else str(source)


def _decode(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """[samples] or [samples, channels] float32, and the rate."""
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise AudioError("missing audio", f"{source} does not exist")
    try:
        with soundfile.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else source) as f:
            return f.read(dtype="float32", always_2d=True), f.samplerate
    except soundfile.LibsndfileError:
        pass  # not a format libsndfile knows: FFmpeg's turn
    return _decode_with_pyav(source)


def _decode_with_pyav(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    import av  # FFmpeg's libraries load only when needed

    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            if not container.streams.audio:
                raise AudioError("no audio stream", f"{_name(source)} has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono")  # packed float32, channels averaged
            chunks = [frame.to_ndarray().reshape(-1) for decoded in container.decode(stream)
                      for frame in resampler.resample(decoded)]  # fmt: skip
            chunks += [frame.to_ndarray().reshape(-1) for frame in resampler.resample(None)]
            return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), stream.rate
    except av.error.FFmpegError as err:
        raise AudioError("unreadable audio", f"{_name(source)} cannot be decoded ({err})") from None


def windows(samples: np.ndarray, length: int, shortest: int = 1) -> list[np.ndarray]:
    """A long clip cut into consecutive windows of `length` samples (the last one kept if it has at
    least `shortest` samples)."""
    cuts = [samples[start : start + length] for start in range(0, len(samples), length)]
    return [cut for cut in cuts if len(cut) >= shortest]


def _meta_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a single-file checkpoint (Meta's `encodec_24khz-*.th`)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises whatever its unpickler meets in a file that is not one
        raise TokenizerError(
            f"audio tokenizer {path} is not a PyTorch checkpoint ({type(err).__name__}): give "
            "Meta's EnCodec .th file or a folder with config.json and model.safetensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TokenizerError(f"audio tokenizer {path} holds no state dict of tensors: is it an EnCodec checkpoint?")
    return state


def audio_config(path: str | Path) -> EncodecConfig:
    """A tokenizer folder's codec config, without its weights (Meta's .th file: the 24 kHz model's)."""
    path = Path(path)
    if path.is_file():
        return EncodecConfig()
    if not (path / CONFIG_FILE).is_file():
        raise TokenizerError(f"audio tokenizer {path} not found: a folder with {CONFIG_FILE} and {WEIGHTS_FILE} "
                             "(transformers' EncodecModel layout) or Meta's .th checkpoint")  # fmt: skip
    return EncodecConfig.from_dict(_config_json(path))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as err:
        raise TokenizerError(f"audio tokenizer weights {path} cannot be read ({err}): copy the file again") from None


def _config_json(folder: Path) -> dict:
    try:
        return json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"audio tokenizer config {folder / CONFIG_FILE} is not JSON ({err})") from None


class AudioTokenizer:
    def __init__(self, model: Encodec, levels: int, fingerprint: str, device: str | torch.device | None = None,
                 batch_size: int = 16):  # fmt: skip
        if not 1 <= levels <= model.cfg.num_quantizers:
            raise TokenizerError(f"audio tokenizer: levels={levels}, the codec has 1..{model.cfg.num_quantizers}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.levels, self.fingerprint, self.batch_size = levels, fingerprint, batch_size

    @property
    def cfg(self) -> EncodecConfig:
        return self.model.cfg

    @property
    def sampling_rate(self) -> int:
        return self.cfg.sampling_rate

    @property
    def tokens_per_second(self) -> float:
        return self.cfg.frame_rate * self.levels

    def layout(self) -> dict[str, int]:
        """The vocabulary sizes its codes need."""
        return {"audio_codebook_size": self.cfg.codebook_size, "audio_levels": self.levels}

    @classmethod
    def load(cls, path: str | Path, levels: int | None = None, bandwidth: float | None = None,
             **kwargs) -> AudioTokenizer:  # fmt: skip
        """A folder in transformers' layout, or Meta's single `.th` file (the 24 kHz model's
        config). `levels` (or `bandwidth` in kbps) defaults to the folder's recorded levels, else the
        lowest target bandwidth's, as EnCodec defaults."""
        path = Path(path)
        if path.is_file():
            cfg, state = EncodecConfig(), from_meta_names(_meta_checkpoint(path))
            saved_levels, fingerprint_of = None, path
        elif (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
            config = _config_json(path)
            cfg, state = EncodecConfig.from_dict(config), _weights(path / WEIGHTS_FILE)
            saved_levels, fingerprint_of = config.get(LEVELS_KEY), path / WEIGHTS_FILE
        else:
            raise TokenizerError(f"audio tokenizer {path} not found: a folder with {CONFIG_FILE} and {WEIGHTS_FILE} "
                                 "(transformers' EncodecModel layout) or Meta's .th checkpoint")  # fmt: skip
        model = Encodec(cfg)
        state = from_weight_norm_names(state)
        missing = sorted(model.state_dict().keys() - state.keys())
        if missing:
            raise TokenizerError(f"{path} lacks {len(missing)} EnCodec weights, e.g. {missing[:3]}: is it an EnCodec "
                                 "checkpoint of this config?")  # fmt: skip
        shapes = [k for k, v in model.state_dict().items() if v.shape != state[k].shape]
        if shapes:
            raise TokenizerError(f"{path}: {len(shapes)} weights, e.g. {shapes[0]}, do not have the shapes its config "
                                 f"gives ({path / CONFIG_FILE if path.is_dir() else 'the 24 kHz model'})")  # fmt: skip
        model.load_state_dict({k: state[k] for k in model.state_dict()})
        levels = (
            levels
            or (cfg.levels_for(bandwidth) if bandwidth else saved_levels)
            or cfg.levels_for(min(cfg.target_bandwidths))
        )
        return cls(model, levels, f"{fingerprint_file(fingerprint_of)}-{levels}", **kwargs)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"model_type": "encodec", "architectures": ["EncodecModel"], **dataclasses.asdict(self.cfg),
                  LEVELS_KEY: self.levels}  # fmt: skip
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, folder / WEIGHTS_FILE)
        self.fingerprint = f"{fingerprint_file(folder / WEIGHTS_FILE)}-{self.levels}"
        return folder

    def read(self, source: str | Path | bytes) -> np.ndarray:
        return read_audio(source, self.sampling_rate)

    def encode(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """float32 mono clips -> int64 codes [levels, ceil(samples / hop)] each. A clip longer than
        WINDOW_SECONDS is encoded window by window (each a whole number of frames) and its codes
        joined, so memory stays bounded whatever its length."""
        window = round(WINDOW_SECONDS * self.sampling_rate / self.cfg.hop_length) * self.cfg.hop_length
        pieces = [windows(clip, window) or [clip] for clip in clips]
        codes = iter(self._encode([piece for clip_pieces in pieces for piece in clip_pieces]))
        return [np.concatenate([next(codes) for _ in clip_pieces], axis=1) for clip_pieces in pieces]

    @torch.inference_mode()
    def _encode(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """Clips of one length batched together on the tokenizer's device."""
        codes: list[np.ndarray | None] = [None] * len(clips)
        by_length: dict[int, list[int]] = {}
        for i, clip in enumerate(clips):
            by_length.setdefault(len(clip), []).append(i)
        for indices in by_length.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                audio = torch.from_numpy(np.stack([clips[i] for i in batch])).float().unsqueeze(1).to(self.device)
                for i, clip_codes in zip(batch, self.model.encode(audio, self.levels).cpu().numpy(), strict=True):
                    codes[i] = clip_codes
        return codes  # type: ignore[return-value]

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int codes [levels, frames] -> float32 mono samples [frames * hop], clipped to [-1, 1]."""
        batch = torch.from_numpy(np.asarray(codes, dtype=np.int64)).unsqueeze(0).to(self.device)
        return self.model.decode(batch)[0, 0].clamp(-1, 1).float().cpu().numpy()


def write_wav(target: str | Path | io.BytesIO, samples: np.ndarray, sampling_rate: int) -> Path | io.BytesIO:
    """16-bit PCM WAV (a file, or into a buffer), which every browser's <audio> element plays."""
    soundfile.write(target if isinstance(target, io.BytesIO) else str(target), samples, sampling_rate,
                    subtype="PCM_16", format="WAV")  # fmt: skip
    return target if isinstance(target, io.BytesIO) else Path(target)
