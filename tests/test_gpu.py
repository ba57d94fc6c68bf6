"""Checks that need a CUDA GPU (`pytest -m gpu` on the GPU machine; skipped elsewhere)."""

import pytest
import torch

from fusion_train.model.loss import chunked_lm_loss, reference_lm_loss
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
