"""Train a small EnCodec audio tokenizer on a folder, jsonl or WebDataset of audio, on the CPU in
minutes: for users without Meta's weights (or who want another rate or token budget), and for the
demo.

Objective, EnCodec's without its discriminators: L1 on the waveform, L1 + L2 between mel
spectrograms at three window sizes (`mel_loss`), and the commitment term that keeps the encoder
near its codes.
Each level's codebook learns as EnCodec's does, by exponential moving averages of the vectors
assigned to its codes (decay 0.99), starting from encoder outputs; codes that fall out of use are
restarted on fresh ones. The adversarial loss is left out: on the demo's tones the reconstruction
keeps pitch and timing without it (the report measures both); for speech and music at 24 kHz,
Meta's discriminator-trained weights are the ones to load.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_pipelines.inputs import AUDIO_EXTENSIONS, parse_record, read_input
from data_pipelines.records import Skip
from fusion_train.data.manifest import DataError
from fusion_train.tokenizers.audio import AudioError, AudioTokenizer, read_audio
from fusion_train.tokenizers.audio_quality import mel_distance, mel_loss, pitch, semitones, si_snr
from fusion_train.tokenizers.encodec import Encodec, EncodecConfig, EncodecResidualVectorQuantizer

EMA_DECAY = 0.99
DEAD_CODE = 0.5  # a code whose moving count of vectors falls below this is restarted
HELD_OUT_SECONDS = 4.0  # each held-out clip is scored on its first seconds
PITCH_WINDOW = 0.05  # seconds: short enough for one note, long enough for several periods of 220 Hz

log = logging.getLogger(__name__)


def small_config(sampling_rate: int, ratios: list[int], codebook_size: int, levels: int) -> EncodecConfig:
    """A narrow EnCodec (8 filters, 32-dim codes, one LSTM layer) holding exactly `levels` levels:
    a step of 16 half-second clips at 8 kHz takes about 0.1 s on 2 CPU cores."""
    frame_rate = math.ceil(sampling_rate / math.prod(ratios))
    bandwidth = levels * math.log2(codebook_size) * frame_rate / 1000
    cfg = EncodecConfig(sampling_rate=sampling_rate, target_bandwidths=[bandwidth], hidden_size=32, num_filters=8,
                        upsampling_ratios=ratios, codebook_size=codebook_size, num_lstm_layers=1)  # fmt: skip
    assert cfg.num_quantizers == levels, (cfg.num_quantizers, levels)
    return cfg


def _audio_file(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS


def audio_sources(inputs: list[str | Path]) -> Iterator[str | Path | bytes | None]:
    """Every clip of the inputs: files in folders (recursively), `{"audio": path}` records of a
    .jsonl (relative to it), the audio of WebDataset .tar samples; None for a record without any."""
    for item in map(Path, inputs):
        if item.is_dir():
            yield from sorted(p for p in item.rglob("*") if _audio_file(p))
        elif item.suffix in (".jsonl", ".tar") and item.is_file():
            for payload in read_input(item):
                try:
                    audio = parse_record(payload).get("audio")
                except Skip:
                    audio = None
                yield item.parent / audio if isinstance(audio, str) else audio if isinstance(audio, bytes) else None
        elif not item.exists():
            raise DataError(f"audio input {item} not found")
        else:
            raise DataError(f'audio input {item}: give a folder of audio files, a .jsonl of {{"audio": path}} records '
                            "or a WebDataset .tar")  # fmt: skip


def load_clips(inputs: list[str | Path], sampling_rate: int) -> tuple[list[np.ndarray], dict]:
    """The readable clips at `sampling_rate`, and counts of those skipped, by reason."""
    clips, skipped = [], Counter()
    for source in audio_sources(inputs):
        try:
            if source is None:
                raise AudioError("no audio", "the record names no audio")
            clips.append(read_audio(source, sampling_rate))
        except AudioError as err:
            skipped[err.reason] += 1
    if skipped:
        log.warning("audio skipped: %s", dict(skipped))
    if not clips:
        raise DataError(f"no readable audio ({', '.join(AUDIO_EXTENSIONS)}) in {', '.join(map(str, inputs))}")
    return clips, dict(skipped)


def _segments(clips: list[np.ndarray], length: int, count: int, rng: np.random.Generator) -> torch.Tensor:
    """`count` random crops of `length` samples ([count, 1, length]), short clips zero-padded."""
    batch = np.zeros((count, 1, length), np.float32)
    for row, clip in zip(batch, rng.choice(len(clips), count), strict=True):
        clip = clips[clip]
        start = rng.integers(0, max(1, len(clip) - length + 1))
        piece = clip[start : start + length]
        row[0, : len(piece)] = piece
    return torch.from_numpy(batch)


class CodebookLearning:
    """EnCodec's codebook training around a residual quantizer: nearest codes, a straight-through
    estimate for the encoder's gradient, the commitment loss, moving-average codebook updates and
    restarts of unused codes."""

    def __init__(self, quantizer: EncodecResidualVectorQuantizer, levels: int, generator: torch.Generator):
        self.levels = quantizer.layers[:levels]
        self.generator = generator

    @torch.no_grad()
    def start(self, latents: torch.Tensor) -> None:
        """Each level's codes drawn from the residuals it will quantize."""
        residual = latents.transpose(1, 2).flatten(0, 1)
        for layer in self.levels:
            book = layer.codebook
            book.embed.copy_(residual[torch.randint(len(residual), (len(book.embed),), generator=self.generator)])
            book.embed_avg.copy_(book.embed)
            book.cluster_size.fill_(1.0)
            residual = residual - book.embed[book.nearest(residual)]

    def __call__(self, latents: torch.Tensor, update: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [B, dim, T] -> (the quantized latents, straight-through, and the commitment loss)."""
        residual, quantized, commitment = latents, torch.zeros_like(latents), latents.new_zeros(())
        for layer in self.levels:
            codes = layer.encode(residual.detach())
            chosen = layer.decode(codes)
            commitment = commitment + F.mse_loss(residual, chosen.detach())
            if update:
                self._update(layer.codebook, residual.detach(), codes)
            quantized = quantized + chosen
            residual = residual - chosen.detach()
        return latents + (quantized - latents).detach(), commitment

    @torch.no_grad()
    def _update(self, book, residual: torch.Tensor, codes: torch.Tensor) -> None:
        vectors, codes = residual.transpose(1, 2).flatten(0, 1), codes.flatten()
        counts = torch.bincount(codes, minlength=len(book.embed)).float()
        sums = torch.zeros_like(book.embed).index_add_(0, codes, vectors)
        book.cluster_size.mul_(EMA_DECAY).add_(counts, alpha=1 - EMA_DECAY)
        book.embed_avg.mul_(EMA_DECAY).add_(sums, alpha=1 - EMA_DECAY)
        total = book.cluster_size.sum()
        smoothed = (book.cluster_size + 1e-5) / (total + len(book.embed) * 1e-5) * total  # Laplace smoothing
        book.embed.copy_(book.embed_avg / smoothed.unsqueeze(1))
        dead = (book.cluster_size < DEAD_CODE).nonzero().flatten()
        if len(dead):
            fresh = vectors[torch.randint(len(vectors), (len(dead),), generator=self.generator)]
            book.embed[dead], book.embed_avg[dead], book.cluster_size[dead] = fresh, fresh, 1.0


def pitch_pairs(clip: np.ndarray, decoded: np.ndarray, rate: int) -> list[tuple[float, float | None]]:
    """(the clip's pitch, the reconstruction's) in each PITCH_WINDOW where the clip has a clear one."""
    window = int(PITCH_WINDOW * rate)
    pairs = []
    for start in range(0, len(clip) - window + 1, window):
        want = pitch(clip[start : start + window], rate)
        if want is not None:
            pairs.append((want, pitch(decoded[start : start + window], rate)))
    return pairs


def quality(tokenizer: AudioTokenizer, clips: list[np.ndarray]) -> dict:
    """Held-out reconstruction: mean SI-SNR (dB) and log-mel distance, and over the windows where a
    clip has a clear pitch, the fraction whose reconstruction keeps it within a semitone."""
    rate = tokenizer.sampling_rate
    clips = [clip[: int(HELD_OUT_SECONDS * rate)] for clip in clips]
    decoded = [tokenizer.decode(codes)[: len(clip)] for clip, codes in zip(clips, tokenizer.encode(clips), strict=True)]
    pairs = [pair for clip, out in zip(clips, decoded, strict=True) for pair in pitch_pairs(clip, out, rate)]
    kept = [got is not None and abs(semitones(got, want)) <= 1 for want, got in pairs]
    mel = [mel_distance(torch.from_numpy(out), torch.from_numpy(clip), rate).item()
           for clip, out in zip(clips, decoded, strict=True)]  # fmt: skip
    return {
        "si_snr_db": round(float(np.mean([si_snr(out, clip) for clip, out in zip(clips, decoded, strict=True)])), 2),
        "mel_distance": round(float(np.mean(mel)), 4),
        "tonal_windows": len(pairs),
        "pitch_kept": round(float(np.mean(kept)), 3) if kept else None,
    }


def train_audio_tokenizer(
    inputs: list[str | Path],
    out_folder: str | Path,
    *,
    sampling_rate: int = 8000,
    ratios: tuple[int, ...] = (8, 5, 4),
    codebook_size: int = 256,
    levels: int = 2,
    steps: int = 600,
    batch_size: int = 16,
    segment_seconds: float = 0.5,
    lr: float = 3e-3,
    mel_weight: float = 0.05,
    seed: int = 0,
) -> dict:
    """Returns (and writes beside the tokenizer) a report of held-out quality before and after.
    `mel_weight`: of the spectral loss beside the waveform L1 (EnCodec weighs it 10x the waveform's,
    beside its discriminators; without them a strong phase-blind term keeps the decoder from
    learning the waveform at all)."""
    torch.manual_seed(seed)
    generator, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    clips, skipped = load_clips(inputs, sampling_rate)
    order = list(range(len(clips)))
    random.Random(seed).shuffle(order)
    held_out = [clips[i] for i in order[: max(1, len(order) // 10)]]
    train = [clips[i] for i in order[len(held_out) :]] or clips
    model = Encodec(small_config(sampling_rate, list(ratios), codebook_size, levels))
    tokenizer = AudioTokenizer(model, levels, fingerprint="", device="cpu")
    codebooks = CodebookLearning(model.quantizer, levels, generator)
    segment = int(segment_seconds * sampling_rate)
    with torch.no_grad():
        codebooks.start(model.encoder(_segments(train, segment, 4 * batch_size, rng)))
    initial = quality(tokenizer, held_out)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    on_terminal = sys.stderr.isatty()
    for step in tqdm(range(steps), desc="training audio tokenizer", disable=None):
        audio = _segments(train, segment, batch_size, rng)
        quantized, commitment = codebooks(model.encoder(audio), update=True)
        reconstruction = model.decoder(quantized)[..., :segment]
        spectral = mel_loss(reconstruction, audio, sampling_rate)
        loss = F.l1_loss(reconstruction, audio) + mel_weight * spectral + commitment
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if not on_terminal and ((step + 1) % max(1, steps // 10) == 0 or step + 1 == steps):
            log.info("audio tokenizer step %d/%d: loss %.4f", step + 1, steps, loss.item())
    model.eval()
    tokenizer.save(out_folder)
    report = {
        "clips": len(clips),
        "held_out_clips": len(held_out),
        "skipped": skipped,
        "sampling_rate": sampling_rate,
        "frame_rate": model.cfg.frame_rate,
        "levels": levels,
        "codebook_size": codebook_size,
        "tokens_per_second": tokenizer.tokens_per_second,
        "steps": steps,
        "initial": initial,
        "final": quality(tokenizer, held_out),
        "fingerprint": tokenizer.fingerprint,
    }
    (Path(out_folder) / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
