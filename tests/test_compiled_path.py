"""The optimised paths against the plain one on the CPU: regionally compiled blocks give the same
loss and gradients as eager ones, and the monitors' hooks still see every block through them."""

import copy

import pytest
import torch

from fusion_train.monitor.activations import ActivationMonitor
from fusion_train.train.config import TrainConfig
from fusion_train.train.engine import prepare_model
from helpers import SMALL_VOCAB, preset, randomized_model


def run(model, ids, vocab):
    monitor = ActivationMonitor(model.layers, torch.device("cpu"))
    monitor.sample_attention_logits(True)
    out = model(ids, labels=ids, label_modality=vocab.modality_of(ids))
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out, grads, monitor.take_block_rms(), monitor.take_qk_logit_max(), monitor.take_modality_rms()[0]


UNTIED = {"untie_modalities": ["attention", "ffn", "norms", "qk_norm"],
          "image_token_ids": [SMALL_VOCAB.image_code_start, SMALL_VOCAB.image_code_end]}  # fmt: skip


@pytest.mark.parametrize("untie", [{}, UNTIED], ids=["dense", "untied"])
def test_compiled_blocks_match_eager_and_keep_the_monitors(untie):
    vocab = SMALL_VOCAB
    model = randomized_model(preset("tiny", vocab_size=vocab.vocab_size, **untie)).train()
    ids = torch.randint(0, vocab.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig()
    cfg.trainer.compile = True
    eager = run(copy.deepcopy(model), ids, vocab)
    compiled = run(prepare_model(copy.deepcopy(model), cfg), ids, vocab)
    assert type(prepare_model(copy.deepcopy(model), cfg).layers[0]).__name__ == "OptimizedModule"
    for key in ("loss", "ce_sum_by_modality", "logz_sum_by_modality", "count_by_modality"):
        torch.testing.assert_close(compiled[0][key], eager[0][key], rtol=1e-5, atol=1e-6)
    names = {name.replace("._orig_mod", ""): grad for name, grad in compiled[1].items()}
    assert names.keys() == eager[1].keys()
    for name, grad in eager[1].items():
        torch.testing.assert_close(names[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(compiled[2], eager[2], rtol=1e-5, atol=0)  # block-output RMS, through the hooks
    torch.testing.assert_close(compiled[3], eager[3], rtol=1e-5, atol=0)  # largest attention logit
    assert torch.isfinite(eager[3]).all() and (eager[2] > 0).all()
    torch.testing.assert_close(compiled[4], eager[4], rtol=1e-5, atol=0)  # per-modality RMS of an untied model
    copies = len(model.cfg.untied_copies) if untie else 0  # text and image: the vocabulary has no audio
    assert (eager[4][:, :copies] > 0).all() and (eager[4][:, copies:] == 0).all()
