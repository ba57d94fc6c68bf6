"""Checks that need a CUDA GPU (`pytest -m gpu` on the GPU machine; skipped elsewhere)."""

import copy
import dataclasses

import pytest
import torch
from test_document_mask import DOCUMENT_LENGTHS, doc_ids_of, logits_and_grads

from fusion_train.model.loss import chunked_lm_loss, reference_lm_loss
from fusion_train.train.config import TrainConfig
from fusion_train.train.engine import prepare_model
from helpers import preset, randomized_model

pytestmark = pytest.mark.gpu


def test_chunked_loss_on_gpu_in_bf16_matches_fp32_full_logits():
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 1024, 256, device="cuda", generator=generator)
    weight = torch.randn(65536, 256, device="cuda", generator=generator) * 0.05
    labels = torch.randint(0, 65536, (2, 1024), device="cuda", generator=generator)
    reference = reference_lm_loss(hidden, weight, labels, z_loss=1e-5)
    out = chunked_lm_loss(hidden.bfloat16(), weight.bfloat16(), labels, z_loss=1e-5, chunk_size=512)
    torch.testing.assert_close(out.loss.float(), reference, rtol=1e-2, atol=1e-2)


def test_model_in_bf16_on_gpu_tracks_fp32_on_cpu():
    """The flash/efficient SDPA kernels with GQA, in bf16, against the fp32 CPU path."""
    cfg = preset("tiny", vocab_size=4096)
    model = randomized_model(cfg)
    ids = torch.randint(0, 4096, (2, 256))
    with torch.no_grad():
        expected = model(ids)
        got = model.cuda().bfloat16()(ids.cuda()).float().cpu()
    relative = (got - expected).norm() / expected.norm()
    assert relative < 2e-2


def test_compiled_flex_attention_on_gpu_matches_the_dense_mask_and_documents_alone():
    """FlexAttention's own CUDA kernels, forward and backward, compiled inside compiled blocks."""
    cfg = preset("tiny", vocab_size=4096, max_seq_len=256)
    sdpa = randomized_model(cfg).cuda().train()
    train_cfg = TrainConfig()
    train_cfg.trainer.compile = True
    flex = prepare_model(copy.deepcopy(sdpa), train_cfg)
    flex.cfg = dataclasses.replace(cfg, attention="flex")
    doc_ids = doc_ids_of(DOCUMENT_LENGTHS).cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, doc_ids.shape, device="cuda", generator=generator)
    weights = torch.randn(*doc_ids.shape, cfg.vocab_size, device="cuda", generator=generator)
    alone = logits_and_grads(sdpa, ids, doc_ids, weights, separately=True)
    compiled = logits_and_grads(flex, ids, doc_ids, weights)
    torch.testing.assert_close(compiled[0], alone[0], rtol=1e-3, atol=1e-3)
    for name, grad in compiled[1].items():
        reference = alone[1][name.replace("._orig_mod", "")]
        torch.testing.assert_close(grad, reference, rtol=1e-3, atol=1e-4 * reference.abs().max().item(), msg=name)
