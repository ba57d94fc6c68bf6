"""The VQGAN image tokenizer: Meta's checkpoint layout, HF's encoder as a peer, preprocessing, and
the small CPU trainer."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import ChameleonVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

from data_pipelines.synthetic import write_image_captions
from data_pipelines.train_image_tokenizer import train_image_tokenizer
from fusion_train.tokenizers.image import ImageTokenizer, center_crop, pad_to_square, to_rgb
from fusion_train.tokenizers.text import TokenizerError
from fusion_train.tokenizers.vqgan import VQGAN, VQGANConfig

# Meta's vqgan.yaml, as released (taming layout, with the loss config the loader ignores).
CHAMELEON_YAML = """
model:
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 8192
    ddconfig: {double_z: false, z_channels: 256, resolution: 512, in_channels: 3, out_ch: 3, ch: 128,
               ch_mult: [1, 1, 2, 2, 4], num_res_blocks: 2, attn_resolutions: [], dropout: 0.0}
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {disc_conditional: false, disc_in_channels: 3, disc_start: 250001, disc_weight: 0.8, codebook_weight: 1.0}
"""


def test_a_taming_checkpoint_of_chameleon_size_encodes_512px_to_1024_codes(tmp_path):
    torch.manual_seed(0)
    (tmp_path / "vqgan.yaml").write_text(CHAMELEON_YAML)
    model = VQGAN(VQGANConfig())
    state = {
        **model.state_dict(),
        "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4),
        "loss.logvar": torch.zeros(()),
    }
    torch.save({"state_dict": state, "global_step": 1000}, tmp_path / "vqgan.ckpt")

    tokenizer = ImageTokenizer.load(tmp_path / "vqgan.ckpt")
    image = Image.new("RGB", (700, 512), (200, 30, 30))
    pixels = tokenizer.preprocess(image)
    codes = tokenizer.encode(pixels[None])
    assert codes.shape == (1, 32, 32) and codes.dtype == np.int64
    assert 0 <= codes.min() and codes.max() < 8192
    decoded = tokenizer.decode(codes)
    assert decoded.shape == (1, 512, 512, 3) and decoded.dtype == np.uint8


def test_codes_equal_hf_chameleon_vqvae_encoder():
    torch.manual_seed(0)
    cfg = VQGANConfig(
        resolution=64,
        ch=32,
        ch_mult=[1, 1, 2],
        num_res_blocks=1,
        z_channels=32,
        embed_dim=32,
        n_embed=128,
        attn_resolutions=[32],
    )
    ours = VQGAN(cfg).eval()
    with torch.no_grad():
        for param in ours.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    hf_cfg = ChameleonVQVAEConfig(
        resolution=64, base_channels=32, channel_multiplier=[1, 1, 2], num_res_blocks=1, latent_channels=32,
        embed_dim=32, num_embeddings=128, attn_resolutions=[32],
    )  # fmt: skip
    theirs = ChameleonVQVAE(hf_cfg).eval()
    missing, unexpected = theirs.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if not k.startswith("decoder")}, strict=False
    )
    assert not missing and not unexpected  # same parameter names as Meta's checkpoint, which HF loads
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ours.encode(images).flatten(), theirs.encode(images).image_tokens.flatten())


def test_transparency_is_blended_over_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgb = np.asarray(to_rgb(rgba))
    assert tuple(rgb[1, 1]) == (255, 255, 255) and tuple(rgb[0, 0]) == (0, 0, 255)


def test_centre_crop_and_border_padding():
    wide = Image.new("RGB", (100, 50), (0, 0, 0))
    wide.paste((255, 0, 0), (0, 0, 10, 50))  # a red band on the left, well outside the centre crop
    cropped = center_crop(wide, 32)
    assert cropped.shape == (32, 32, 3) and cropped[:, :, 0].max() == 0
    padded = pad_to_square(wide, 32)
    assert padded.shape == (32, 32, 3)
    assert (padded[:7] == 255).all() and (padded[-7:] == 255).all()  # white bands above and below
    assert padded[16, 2, 0] == 255 and padded[16, 2, 1] == 0  # the red band kept, squeezed


def test_small_trainer_lowers_reconstruction_error(tmp_path):
    write_image_captions(tmp_path / "shapes", 64, seed=1)
    report = train_image_tokenizer([tmp_path / "shapes" / "images"], tmp_path / "vq", steps=40, codebook_size=64)
    assert report["final_mse"] < 0.8 * report["initial_mse"], report
    tokenizer = ImageTokenizer.load(tmp_path / "vq" / "vqgan.ckpt")
    assert tokenizer.fingerprint == report["fingerprint"]
    with Image.open(tmp_path / "shapes" / "images" / "000000.png") as image:
        assert tokenizer.encode(tokenizer.preprocess(image)[None]).shape == (1, 8, 8)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="vqgan.ckpt not found"):
        ImageTokenizer.load(tmp_path / "vqgan.ckpt")
    (tmp_path / "vqgan.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {
                    "params": {
                        "embed_dim": 8,
                        "n_embed": 16,
                        "ddconfig": {"resolution": 32, "ch": 32, "ch_mult": [1, 2]},
                    }
                }
            }
        )
    )
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}}, tmp_path / "vqgan.ckpt")
    with pytest.raises(TokenizerError, match="lacks .* VQGAN weights"):
        ImageTokenizer.load(tmp_path / "vqgan.ckpt")
