"""trainer.init_from refuses weights that cannot be this run's, saying which setting differs."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from fusion_train.model.chameleon import Chameleon
from fusion_train.model.formats.native import save_native
from fusion_train.train.config import ConfigError
from fusion_train.train.init_from import check_compatible, model_folder, pretrained_values
from helpers import SMALL_VOCAB, small_config


@pytest.fixture
def saved(tmp_path):
    cfg = small_config(vocab_size=SMALL_VOCAB.vocab_size)
    return save_native(
        Chameleon(cfg).state_dict(), cfg, SMALL_VOCAB, tmp_path / "model", {"text": "t1", "image": "i1"}
    ), cfg


def test_another_architecture_vocabulary_or_tokenizer_is_refused(saved):
    folder, cfg = saved
    check_compatible(folder, dataclasses.replace(cfg, dropout=0.1), SMALL_VOCAB, {"text": "t1", "image": "i1"})
    with pytest.raises(ConfigError, match=r"another architecture: model.dim=64 \(this run: 128\), model.n_layers=2"):
        check_compatible(folder, dataclasses.replace(cfg, dim=128, n_layers=3), SMALL_VOCAB, {})
    with pytest.raises(ConfigError, match="another vocabulary layout than the shards'"):
        check_compatible(folder, cfg, dataclasses.replace(SMALL_VOCAB, image_grid=8), {})
    with pytest.raises(ConfigError, match="other image tokenizers than the shards were built with"):
        check_compatible(folder, cfg, SMALL_VOCAB, {"text": "t1", "image": "other"})


def test_a_change_the_stage_means_is_information_any_other_a_warning(saved, caplog):
    folder, cfg = saved
    with caplog.at_level("INFO", logger="fusion_train.train.init_from"):
        check_compatible(folder, dataclasses.replace(cfg, dropout=0.05, z_loss=1e-4), SMALL_VOCAB, {}, ["dropout"])
    (expected,) = [r for r in caplog.records if "dropout" in r.getMessage()]
    (unexpected,) = [r for r in caplog.records if "z_loss" in r.getMessage()]
    assert expected.levelname == "INFO" and "as its stage means to" in expected.getMessage()
    assert unexpected.levelname == "WARNING" and "dropout" not in unexpected.getMessage()


def test_a_path_that_holds_no_weights_and_mismatched_names_are_clear_errors(saved, tmp_path):
    folder, _ = saved
    with pytest.raises(ConfigError, match="neither a fusion_train model folder .* nor a training checkpoint"):
        model_folder(tmp_path / "empty", tmp_path / "run", rank=0)
    with pytest.raises(ConfigError, match=r"missing \['extra.weight'\], unexpected \[\]"):
        pretrained_values(folder, [name for name, _ in Chameleon(small_config()).named_parameters()] + ["extra.weight"])


def test_a_vocabulary_with_audio_appended_extends_the_model(saved):
    """Old rows as saved, each new row the old rows' mean, and on text-only input the logits over
    the old ids exactly the saved model's; any other change of layout is still refused."""
    folder, cfg = saved
    extended = dataclasses.replace(SMALL_VOCAB, vocab_size=SMALL_VOCAB.vocab_size + 2 * 16, audio_codebook_size=16,
                                   audio_levels=2)  # fmt: skip
    grown = dataclasses.replace(cfg, vocab_size=extended.vocab_size)
    check_compatible(folder, grown, extended, {"text": "t1", "image": "i1", "audio": "a1"})
    model = Chameleon(grown, seed=None)
    values = pretrained_values(folder, [name for name, _ in model.named_parameters()])
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(values(name, param.shape))
    old = Chameleon(cfg, seed=None)
    old.load_state_dict(load_file(folder / "model.safetensors"))
    for name in ("tok_embeddings.weight", "output.weight"):
        rows = model.state_dict()[name]
        assert torch.equal(rows[: SMALL_VOCAB.vocab_size], old.state_dict()[name])
        assert torch.allclose(rows[SMALL_VOCAB.vocab_size :], old.state_dict()[name].mean(0).expand(32, -1))
    text = torch.randint(SMALL_VOCAB.text_start, SMALL_VOCAB.vocab_size, (2, 12))
    with torch.no_grad():
        new_logits, old_logits = model(text), old(text)
    assert torch.equal(new_logits[..., : SMALL_VOCAB.vocab_size], old_logits)
    assert torch.allclose(new_logits[..., SMALL_VOCAB.vocab_size :], old_logits.mean(-1, keepdim=True).expand(-1, -1, 32),
                          atol=1e-5)  # fmt: skip
    other = dataclasses.replace(extended, n_reserved=600)  # moves the text ids: not an extension
    with pytest.raises(ConfigError, match="may only add audio codes after the model's last id"):
        check_compatible(folder, dataclasses.replace(cfg, vocab_size=other.vocab_size), other, {})
