"""The image tokenizer against HF transformers' `ChameleonVQVAE`, holding the same weights: images
per second encoded (pixels to codes, batched, inference mode) at the demo's size (64 px to 8 x 8 of
512 codes) and at Chameleon's (512 px to 32 x 32 of 8,192; random weights), and decoded by ours.

Same work: both give the same codes for the same images (fp32; on a GPU when there is one).
transformers' ChameleonVQVAE has no decoder (its Chameleon generates no images), so decoding has
no peer here. It also hard-codes 32 GroupNorm groups, which the demo's own tokenizer (16-channel
layers in one group) cannot use: the demo size is compared with 32-channel layers, at the demo's
resolution, grid and codebook.
"""

from __future__ import annotations

import time

import torch
from plain_loop import device
from side_by_side import alternate, summary

from fusion_train.tokenizers.vqgan import VQGAN, VQGANConfig

CONFIGS = {  # (size, resolution) -> the VQGAN, and the batch it is timed on
    "demo": (VQGANConfig(resolution=64, ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=1, z_channels=32, embed_dim=32,
                         n_embed=512), 32),
    "chameleon": (VQGANConfig(), 2),
    "toy": (VQGANConfig(resolution=32, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32, embed_dim=32,
                        n_embed=64), 4),
}  # fmt: skip
SIZES = {"full": ("demo", "chameleon"), "toy": ("toy",)}
TIMED_SECONDS = {"full": 2.0, "toy": 0.0}  # each measurement's calls last at least this long (toy: one call)


def models(cfg: VQGANConfig):
    """Ours with random weights (the codebook spread out, so codes differ), and HF's holding them."""
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    torch.manual_seed(0)
    ours = VQGAN(cfg).eval()
    with torch.no_grad():
        ours.quantize.embedding.weight.normal_()
    theirs = ChameleonVQVAE(ChameleonVQVAEConfig(
        resolution=cfg.resolution, base_channels=cfg.ch, channel_multiplier=cfg.ch_mult,
        num_res_blocks=cfg.num_res_blocks, latent_channels=cfg.z_channels, embed_dim=cfg.embed_dim,
        num_embeddings=cfg.n_embed, attn_resolutions=cfg.attn_resolutions, in_channels=cfg.in_channels,
    )).eval()  # fmt: skip
    encoder_weights = {k: v for k, v in ours.state_dict().items() if not k.startswith("decoder.")}
    missing, unexpected = theirs.load_state_dict(encoder_weights, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ours, theirs


def images_per_second(run, batch: torch.Tensor, seconds: float) -> tuple[float, torch.Tensor]:
    """Calls after a warm-up, for at least `seconds` (one call of a small batch is too short to time)."""
    with torch.inference_mode():
        run(batch)
        synchronize()
        calls, started = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - started < seconds:
            out = run(batch)
            synchronize()
            calls += 1
        return calls * len(batch) / (time.perf_counter() - started), out


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compare_at(name: str, size: str, rounds: int) -> list[dict]:
    """Encoding by both, decoding by ours, of one batch at one configuration."""
    cfg, batch_size = CONFIGS[name]
    ours, theirs = (model.to(device()) for model in models(cfg))
    generator = torch.Generator().manual_seed(1)
    images = (torch.rand(batch_size, 3, cfg.resolution, cfg.resolution, generator=generator) * 2 - 1).to(device())
    encoders = {"fusion_train": ours.encode, "hf": lambda x: theirs.encode(x).image_tokens.view(len(x), -1)}
    codes = {}

    def encode(system: str) -> dict:
        rate, codes[system] = images_per_second(encoders[system], images, TIMED_SECONDS[size])
        return {"system": system, "images_per_s": rate}

    def decode(system: str) -> dict:
        return {"system": system, "images_per_s": images_per_second(ours.decode, codes[system], TIMED_SECONDS[size])[0]}

    encoded = alternate(("hf", "fusion_train"), encode, rounds)
    decoded = alternate(("fusion_train",), decode, rounds)
    same = torch.equal(codes["fusion_train"].flatten(), codes["hf"].flatten())
    shape = {"size": size, "config": name, "resolution": cfg.resolution, "grid": cfg.grid, "codes": cfg.n_embed,
             "batch": batch_size, "threads": torch.get_num_threads()}  # fmt: skip
    encoding = {system: [r["images_per_s"] for r in runs] for system, runs in encoded.items()}
    lines = [summary("vq_encode", system, "hf", "images/s", encoding, **shape, same_codes=same) for system in encoded]
    decoding = {"fusion_train": [r["images_per_s"] for r in decoded["fusion_train"]]}
    decoding = summary("vq_decode", "fusion_train", "fusion_train", "images/s", decoding, **shape)
    return [*lines, {**decoding, "peer": None, "ratio_to_peer": None}]  # HF's ChameleonVQVAE has no decoder


def compare(size: str, rounds: int) -> list[dict]:
    return [line for name in SIZES[size] for line in compare_at(name, size, rounds)]
