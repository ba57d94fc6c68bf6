"""Weights interop, checked against the real HF transformers implementation."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import ChameleonConfig as HFChameleonConfig
from transformers import ChameleonForConditionalGeneration

from fusion_train.commands.convert import main as convert_main
from fusion_train.model.chameleon import Chameleon
from fusion_train.model.formats import ConversionError
from fusion_train.model.formats.hf import configs_from_hf, export_hf, from_hf_state_dict, hf_config, to_hf_state_dict
from fusion_train.model.formats.meta import export_meta, import_meta, meta_params, read_meta, to_meta_shards
from fusion_train.model.formats.native import load_native, save_native
from fusion_train.model.formats.vocab_sizes import VocabSizes
from fusion_train.vocab import VocabLayout
from helpers import randomized_model, small_config

VOCAB = VocabLayout(image_codebook_size=256, image_grid=4, vocab_size=1024, n_reserved=600)
# A small VQ so that building HF's model (which always holds one) stays cheap in a test.
TINY_VQ = dict(base_channels=32, channel_multiplier=[1], resolution=8, num_res_blocks=1,
               latent_channels=32, embed_dim=32, num_embeddings=256)  # fmt: skip

ARCHITECTURES = {
    "prenorm-mha": dict(block_style="prenorm", n_kv_heads=4),
    "prenorm-gqa": dict(block_style="prenorm", n_kv_heads=2),
    "swin-mha": dict(block_style="swin", n_kv_heads=4),
    "swin-gqa": dict(block_style="swin", n_kv_heads=2),
    "swin-gqa-qknorm-per-shard": dict(block_style="swin", n_kv_heads=2, qk_norm_groups=2),
}


def hf_model(cfg, state_dict, **config_overrides):
    config = {**hf_config(cfg, VOCAB, torch.float32), **config_overrides}
    for key in ("architectures", "model_type", "dtype"):
        config.pop(key)
    hf_cfg = HFChameleonConfig(**config, vq_config=TINY_VQ)
    hf_cfg._attn_implementation = "eager"  # an attention path independent of ours (SDPA)
    model = ChameleonForConditionalGeneration(hf_cfg).eval()
    missing, unexpected = model.load_state_dict(to_hf_state_dict(state_dict, cfg), strict=False)
    assert not unexpected
    assert missing and all(k.startswith("model.vqmodel.") for k in missing)
    return model


def relative_error(ours, theirs, keep):
    return ((ours[..., keep] - theirs[..., keep]).abs().max() / ours[..., keep].abs().max()).item()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hf_gives_the_same_logits_and_imports_back_bit_identical(arch):
    cfg = small_config(vocab_size=VOCAB.vocab_size, **ARCHITECTURES[arch])
    model = randomized_model(cfg)
    theirs_model = hf_model(cfg, model.state_dict())
    # HF's Chameleon masks image-code logits to -inf: compare every other id.
    assert theirs_model.model.vocabulary_mapping.image_tokens == list(range(4, 4 + VOCAB.image_codebook_size))
    keep = ~VOCAB.modality_mask(0 + 1)  # Modality.IMAGE

    ids = torch.randint(0, VOCAB.vocab_size, (2, 40))
    with torch.no_grad():
        ours, theirs = model(ids), theirs_model(input_ids=ids).logits
    assert relative_error(ours, theirs, keep) <= 1e-4

    back = from_hf_state_dict(to_hf_state_dict(model.state_dict(), cfg), cfg)
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_hf_loss_equals_ours():
    """Same next-token shift and -100 convention as HF. Its image-logit mask would change the
    softmax's normaliser, so this HF model is given no image names and masks nothing."""
    cfg = small_config(vocab_size=VOCAB.vocab_size, z_loss=0.0)
    model = randomized_model(cfg)
    theirs_model = hf_model(cfg, model.state_dict(), vocabulary_map={"<image>": VOCAB.sft_separator + 1})
    assert theirs_model.model.vocabulary_mapping.image_tokens == []
    ids = torch.randint(0, VOCAB.vocab_size, (2, 40))
    labels = ids.clone()
    labels[:, :7] = -100
    with torch.no_grad():
        ours = model(ids, labels=labels).loss
        theirs = theirs_model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _assert_same_native(a, b, **expected_config_changes):
    (state_a, cfg_a, vocab_a), (state_b, cfg_b, vocab_b) = load_native(a), load_native(b)
    assert (dataclasses.replace(cfg_a, **expected_config_changes), vocab_a) == (cfg_b, vocab_b)
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_cli_round_trip_through_hf_files(tmp_path):
    cfg = small_config(vocab_size=VOCAB.vocab_size, block_style="swin", qk_norm_groups=2)
    model = randomized_model(cfg)
    native = save_native(model.state_dict(), cfg, VOCAB, tmp_path / "native")

    # The installed console script, as a user runs it.
    console_script = Path(sys.executable).parent / "fusion-convert"
    result = subprocess.run([console_script, "to-hf", native, tmp_path / "hf"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    hf_dir = tmp_path / "hf"
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_parallel_size"] == 2 and config["swin_norm"] is True

    theirs_model = ChameleonForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB.vocab_size, (1, 30))
    with torch.no_grad():
        ours, theirs = model(ids), theirs_model(input_ids=ids).logits
    assert relative_error(ours, theirs, ~VOCAB.modality_mask(1)) <= 1e-4

    # The export records the whole layout: nothing to say on the command line.
    assert config["fusion_train_vocab"] == dataclasses.asdict(VOCAB)
    assert convert_main(["from-hf", str(hf_dir), str(tmp_path / "back")]) == 0
    _assert_same_native(native, tmp_path / "back")


def test_hf_import_infers_or_asks_for_the_layout_and_never_guesses(tmp_path, capsys):
    cfg = small_config(vocab_size=VOCAB.vocab_size)
    native = save_native(randomized_model(cfg).state_dict(), cfg, VOCAB, tmp_path / "native")
    hf_dir = export_hf(native, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    del config["fusion_train_vocab"]  # as transformers' own converter, or an older fusion_train, writes it
    (hf_dir / "config.json").write_text(json.dumps(config))

    # The codebook and the reserved count follow from the vocabulary map's names; the grid cannot.
    assert convert_main(["from-hf", str(hf_dir), str(tmp_path / "guess")]) == 2
    message = capsys.readouterr().err
    assert "does not record its vocabulary layout" in message and "pass --image-grid as it was trained" in message
    assert "--n-reserved" not in message
    assert convert_main(["from-hf", str(hf_dir), str(tmp_path / "back"), "--image-grid", "4"]) == 0
    _assert_same_native(native, tmp_path / "back")

    # A fusion_train model folder is not an HF export.
    assert convert_main(["from-hf", str(native), str(tmp_path / "x")]) == 2
    assert "is a fusion_train model folder, not an HF export" in capsys.readouterr().err
    # Meta's format records no layout; an impossible one names the flags to change.
    export_meta(native, tmp_path / "meta")
    assert convert_main(["from-meta", str(tmp_path / "meta"), str(tmp_path / "y")]) == 2
    message = capsys.readouterr().err
    assert (
        "the checkpoint's vocab_size=1024 leaves no room" in message
        and "--image-codebook-size / --n-reserved" in message
    )


@pytest.mark.parametrize("arch, shards", [("prenorm-mha", 1), ("swin-gqa-qknorm-per-shard", 2)])
def test_meta_round_trip_is_bit_identical(tmp_path, arch, shards):
    cfg = small_config(vocab_size=VOCAB.vocab_size, **ARCHITECTURES[arch])
    native = save_native(randomized_model(cfg).state_dict(), cfg, VOCAB, tmp_path / "native")

    args = ["--image-codebook-size", "256", "--image-grid", "4", "--n-reserved", "600"]
    assert convert_main(["to-meta", str(native), str(tmp_path / "meta")]) == 0
    files = sorted(p.name for p in (tmp_path / "meta").glob("*.pth"))
    assert files == (["consolidated.pth"] if shards == 1 else ["consolidated.00.pth", "consolidated.01.pth"])
    assert json.loads((tmp_path / "meta" / "params.json").read_text())["model_parallel_size"] == shards
    assert convert_main(["from-meta", str(tmp_path / "meta"), str(tmp_path / "back"), *args]) == 0
    # params.json records no context length: an import takes Chameleon's.
    _assert_same_native(native, tmp_path / "back", max_seq_len=4096)


def test_meta_shards_with_their_own_qk_norm_import_per_shard(tmp_path):
    """As in the released 30B: 2 model-parallel shards, each with different QK-norm values shared
    by its heads, plus Meta's unused rope.freqs buffer and a nested params.json."""
    cfg = small_config(vocab_size=VOCAB.vocab_size, block_style="swin", n_kv_heads=2, qk_norm_groups=2)
    state = randomized_model(cfg).state_dict()
    shards = to_meta_shards(state, cfg, 2)
    assert shards[0]["layers.0.attention.wq.weight"].shape == (2 * cfg.head_dim, cfg.dim)
    assert shards[0]["layers.0.attention.q_normalization.weight"].shape == (cfg.head_dim,)
    assert not torch.equal(
        shards[0]["layers.0.attention.q_normalization.weight"], shards[1]["layers.0.attention.q_normalization.weight"]
    )
    folder = tmp_path / "30b-like"
    folder.mkdir()
    for i, shard in enumerate(shards):
        torch.save({**shard, "rope.freqs": torch.ones(cfg.head_dim // 2)}, folder / f"consolidated.{i:02d}.pth")
    params = meta_params(cfg, 2)
    (folder / "params.json").write_text(json.dumps({"model": params["model"]}))
    (folder / "consolidate_params.json").write_text(json.dumps({"model_parallel_size": 2}))

    import_meta(folder, tmp_path / "native", VocabSizes(256, 4, 600))
    imported, imported_cfg, _ = load_native(tmp_path / "native")
    assert imported_cfg.qk_norm_groups == 2
    for s in range(2):
        assert torch.equal(
            imported["layers.1.attention.k_normalization.bias"][s], shards[s]["layers.1.attention.k_normalization.bias"]
        )
    assert all(torch.equal(imported[k], v) for k, v in state.items())


def test_conversion_errors_name_the_problem(tmp_path):
    cfg = small_config(vocab_size=VOCAB.vocab_size, qk_norm_groups=2)
    state = randomized_model(cfg).state_dict()

    with pytest.raises(ConversionError, match="params.json not found"):
        read_meta(tmp_path)
    with pytest.raises(ConversionError, match="exports to 2 Meta shards"):
        to_meta_shards(state, cfg, 4)

    hf_state = to_hf_state_dict(state, cfg)
    one_group = small_config(vocab_size=VOCAB.vocab_size, qk_norm_groups=1)
    with pytest.raises(ConversionError, match="q_norm.weight: QK-norm values differ between heads"):
        from_hf_state_dict(hf_state, one_group)
    with pytest.raises(ConversionError, match="missing"):
        from_hf_state_dict({}, cfg)
    with pytest.raises(ConversionError, match="always applies QK-norm"):
        to_hf_state_dict(Chameleon(small_config(qk_norm=False)).state_dict(), small_config(qk_norm=False))

    native = save_native(state, cfg, VOCAB, tmp_path / "native")
    meta = export_meta(native, tmp_path / "meta")
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, "model_parallel_size": 4}))
    with pytest.raises(ConversionError, match="declares model_parallel_size=4 but .* holds 2 shard files"):
        read_meta(meta)
    assert convert_main(["to-hf", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2


def test_a_damaged_config_is_an_error_naming_the_file(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model": {"dim": 6')  # cut short by a full disk
    assert convert_main(["to-hf", str(tmp_path / "model"), str(tmp_path / "hf")]) == 2
    assert f"error: {tmp_path / 'model' / 'config.json'} is not valid JSON" in capsys.readouterr().err


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
}  # fmt: skip


@pytest.mark.parametrize("scaling", ROPE_SCALINGS)
def test_rope_scaling_is_transformers_and_travels_through_an_hf_export(scaling):
    """The scaled frequencies are transformers' for the same settings (head_dim 64, theta 500,000:
    LLaMA-3's; llama3's original context at 32 positions so that all three of its bands occur);
    an export carries the scaling, transformers gives our logits at positions past the original
    context, and the import reads it back."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from fusion_train.model.chameleon import rope_frequencies

    settings = ROPE_SCALINGS[scaling]
    hf_rope = LlamaConfig(hidden_size=512, num_attention_heads=8, rope_parameters={"rope_theta": 500000.0, **settings})
    theirs, _ = ROPE_INIT_FUNCTIONS[scaling](hf_rope, "cpu")
    ours = rope_frequencies(64, 500000.0, settings)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert not torch.equal(ours, rope_frequencies(64, 500000.0))

    cfg = small_config(vocab_size=VOCAB.vocab_size, rope_theta=500000.0, rope_scaling=settings, max_seq_len=128)
    model = randomized_model(cfg)
    ids = torch.randint(0, VOCAB.vocab_size, (1, 96))
    with torch.no_grad():
        ours_logits, theirs_logits = model(ids), hf_model(cfg, model.state_dict())(input_ids=ids).logits
    assert relative_error(ours_logits, theirs_logits, ~VOCAB.modality_mask(1)) <= 1e-4
    imported, _ = configs_from_hf(hf_config(cfg, VOCAB, torch.float32))
    assert imported.rope_scaling == settings and imported.rope_theta == 500000.0
