"""Document masking: FlexAttention's block mask, SDPA's dense mask and each document run alone give
the same logits and gradients (fp32, on the CPU; tests/test_gpu.py repeats it with compiled flex on
CUDA), and the monitors' attention-logit sampler looks only where the mask lets attention look."""

import copy
import dataclasses

import pytest
import torch

from fusion_train.model.chameleon import block_mask, document_causal_mask
from fusion_train.monitor.activations import largest_attention_logit
from fusion_train.train.config import ConfigError, load_config, validate
from helpers import SMALL_VOCAB, randomized_model, small_config

# Two rows of 256 positions (two FlexAttention blocks of 128): documents that cross the block
# boundary, one shorter than a block, and padding (-1) at the end of the first row.
DOCUMENT_LENGTHS = [[70, 20, 100, 40, -26], [150, 106]]
UNTIED = {"untie_modalities": ["attention", "ffn", "norms", "qk_norm"],
          "image_token_ids": [SMALL_VOCAB.image_code_start, SMALL_VOCAB.image_code_end]}  # fmt: skip
CONFIGS = {"prenorm_gqa": {}, "swin_untied": {"block_style": "swin", **UNTIED}}


def doc_ids_of(lengths: list[list[int]]) -> torch.Tensor:
    """A negative length is padding."""
    rows = [sum(([i if n > 0 else -1] * abs(n) for i, n in enumerate(row)), []) for row in lengths]
    return torch.tensor(rows)


def segments(row: torch.Tensor) -> list[slice]:
    """The contiguous runs of one document id in a row."""
    edges = [0, *(torch.nonzero(row[1:] != row[:-1]).flatten() + 1).tolist(), len(row)]
    return [slice(a, b) for a, b in zip(edges, edges[1:], strict=False)]


def logits_and_grads(model, ids, doc_ids, weights, separately: bool = False):
    """The logits, and the gradients of sum(logits * weights): of the packed batch, or of each
    document run alone with its logits put back in place."""
    model.zero_grad()
    if separately:
        logits = torch.zeros_like(weights)
        for row in range(ids.shape[0]):
            for span in segments(doc_ids[row]):
                logits[row, span] = model(ids[row : row + 1, span])[0]
    else:
        logits = model(ids, doc_ids=doc_ids)
    (logits * weights).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_flex_the_dense_mask_and_documents_alone_agree_in_logits_and_gradients(config):
    cfg = small_config(vocab_size=SMALL_VOCAB.vocab_size, max_seq_len=256, **config)
    sdpa = randomized_model(cfg).train()
    flex = copy.deepcopy(sdpa)
    flex.cfg = dataclasses.replace(cfg, attention="flex")
    doc_ids = doc_ids_of(DOCUMENT_LENGTHS)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, doc_ids.shape, generator=generator)
    weights = torch.randn(*doc_ids.shape, cfg.vocab_size, generator=generator)

    alone = logits_and_grads(sdpa, ids, doc_ids, weights, separately=True)
    dense = logits_and_grads(sdpa, ids, doc_ids, weights)
    with torch.no_grad():  # FlexAttention itself: its CPU kernel has no backward
        flex_logits = flex(ids, doc_ids=doc_ids)
    flex_trained = logits_and_grads(flex, ids, doc_ids, weights)  # on a CPU: its mask function, as a dense mask
    for logits in (dense[0], flex_logits, flex_trained[0]):
        torch.testing.assert_close(logits, alone[0], rtol=1e-4, atol=1e-4)
    for name, grad in alone[1].items():  # to fp32's summation error, relative to the gradient's scale
        atol = 1e-5 * grad.abs().max().item()
        torch.testing.assert_close(dense[1][name], grad, rtol=1e-4, atol=atol, msg=name)
        torch.testing.assert_close(flex_trained[1][name], grad, rtol=1e-4, atol=atol, msg=name)
    # Without the mask, documents see their neighbours.
    with torch.no_grad():
        assert not torch.allclose(sdpa(ids)[0, 70:90], alone[0][0, 70:90], rtol=1e-3, atol=1e-3)


def test_the_attention_logit_sampler_sees_only_what_the_mask_allows():
    generator = torch.Generator().manual_seed(0)
    doc_ids = doc_ids_of(DOCUMENT_LENGTHS)
    q = torch.randn(2, 4, 256, 16, generator=generator)
    k = torch.randn(2, 2, 256, 16, generator=generator)
    q[0, 0, 80], k[0, 0, 10] = 0.0, 0.0  # document 0's key at 10 aligned with document 1's query at 80
    q[0, 0, 80, 0], k[0, 0, 10, 0] = 30.0, 30.0
    same_document = document_causal_mask(doc_ids).expand(-1, 4, -1, -1)
    logits = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) / 4.0
    expected = logits.masked_fill(~same_document, -torch.inf).amax()
    causal = largest_attention_logit(q, k, None)
    assert causal == logits[0, 0, 80, 10] and causal > 5 * expected
    torch.testing.assert_close(largest_attention_logit(q, k, document_causal_mask(doc_ids)), expected)
    torch.testing.assert_close(largest_attention_logit(q, k, block_mask(doc_ids, 256, q.device)), expected)
    torch.testing.assert_close(largest_attention_logit(q, k, block_mask(None, 256, q.device)), causal)


def test_document_masking_is_set_once_for_training_and_validation():
    assert load_config([]).data.document_mask is False and load_config([]).model.attention == "sdpa"
    with pytest.raises(ConfigError, match="held-out data is attended as training's is; set data.document_mask"):
        validate(load_config(["eval_data.document_mask=true"]))
    with pytest.raises(ValueError, match="attention must be one of"):
        load_config(["model.attention=flash"])
