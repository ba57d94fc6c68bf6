"""trainer.init_from refuses weights that cannot be this run's, saying which setting differs."""

import dataclasses

import pytest

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


def test_a_path_that_holds_no_weights_and_mismatched_names_are_clear_errors(saved, tmp_path):
    folder, _ = saved
    with pytest.raises(ConfigError, match="neither a fusion_train model folder .* nor a training checkpoint"):
        model_folder(tmp_path / "empty", tmp_path / "run", rank=0)
    with pytest.raises(ConfigError, match=r"missing \['extra.weight'\], unexpected \[\]"):
        pretrained_values(folder, [name for name, _ in Chameleon(small_config()).named_parameters()] + ["extra.weight"])
