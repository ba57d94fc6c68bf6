import pytest
import torch
import torch.nn.functional as F

from fusion_train.model.loss import chunked_lm_loss, reference_lm_loss
from fusion_train.vocab import Modality, VocabLayout

VOCAB = VocabLayout(image_codebook_size=64, image_grid=4, vocab_size=1000, n_reserved=513)


def full_logits(hidden, weight, labels):
    logits = (hidden[:, :-1] @ weight.t()).float()
    targets = labels[:, 1:]
    return logits, logits.logsumexp(-1), targets != -100


def inputs(seed=0, batch=3, seq=37, dim=32, ignore_fraction=0.3):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, dim, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB.vocab_size, dim, generator=generator).mul(0.3).requires_grad_()
    labels = torch.randint(0, VOCAB.vocab_size, (batch, seq), generator=generator)
    labels[torch.rand(batch, seq, generator=generator) < ignore_fraction] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("z_loss", [0.0, 1e-5, 1e-2])
@pytest.mark.parametrize("chunk_size", [7, 64, 4096])
def test_chunked_loss_and_gradients_equal_the_full_logits_computation(z_loss, chunk_size):
    hidden, weight, labels = inputs()
    reference = reference_lm_loss(hidden, weight, labels, z_loss=z_loss)
    reference_grads = torch.autograd.grad(reference, (hidden, weight))

    out = chunked_lm_loss(hidden, weight, labels, z_loss=z_loss, chunk_size=chunk_size)
    grads = torch.autograd.grad(out.loss, (hidden, weight))

    torch.testing.assert_close(out.loss, reference, rtol=1e-6, atol=1e-6)
    for got, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_gradients_scale_with_the_upstream_gradient():
    """Backward multiplies the gradients kept from forward by the incoming gradient."""
    hidden, weight, labels = inputs()
    reference = reference_lm_loss(hidden, weight, labels, z_loss=1e-4)
    expected = torch.autograd.grad(3.5 * reference, (hidden, weight))
    out = chunked_lm_loss(hidden, weight, labels, z_loss=1e-4, chunk_size=16)
    for got, want in zip(torch.autograd.grad(3.5 * out.loss, (hidden, weight)), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_reported_parts_and_modality_statistics():
    hidden, weight, labels = inputs(seed=1)
    labels[0, 5:15] = torch.arange(VOCAB.image_code_start, VOCAB.image_code_start + 10)  # image targets
    labels[1, 3] = VOCAB.begin_of_image
    z_loss = 1e-3
    logits, logz, valid = full_logits(hidden, weight, labels)
    targets = labels[:, 1:]
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp(min=0), reduction="none").view_as(targets)

    out = chunked_lm_loss(
        hidden, weight, labels, z_loss=z_loss, chunk_size=10, label_modality=VOCAB.modality_of(labels)
    )

    assert out.n_tokens == valid.sum()
    torch.testing.assert_close(out.ce, ce[valid].mean())
    torch.testing.assert_close(out.z, z_loss * logz[valid].square().mean())
    torch.testing.assert_close(out.logz_mean, logz[valid].mean())
    target_modality = VOCAB.modality_of(targets)
    for modality in Modality:
        selected = valid & (target_modality == int(modality))
        assert out.count_by_modality[modality] == selected.sum()
        torch.testing.assert_close(out.ce_sum_by_modality[modality], ce[selected].sum())
        torch.testing.assert_close(out.logz_sum_by_modality[modality], logz[selected].sum())
    assert out.count_by_modality[Modality.IMAGE] >= 9
    assert out.count_by_modality.sum() == out.n_tokens


def test_no_grad_path_gives_the_same_numbers():
    hidden, weight, labels = inputs(seed=2)
    with_grad = chunked_lm_loss(hidden, weight, labels, z_loss=1e-5, chunk_size=8)
    with torch.no_grad():
        without = chunked_lm_loss(hidden, weight, labels, z_loss=1e-5, chunk_size=8)
    assert without.loss.grad_fn is None
    torch.testing.assert_close(without.loss, with_grad.loss.detach())


def test_all_labels_ignored_gives_zero_not_nan():
    hidden, weight, labels = inputs(seed=3)
    labels.fill_(-100)
    out = chunked_lm_loss(hidden, weight, labels, z_loss=1e-5, chunk_size=8)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.n_tokens.item() == 0
    assert hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_bf16_inputs_stay_close_to_fp32():
    hidden, weight, labels = inputs(seed=4)
    reference = reference_lm_loss(hidden, weight, labels, z_loss=1e-5)
    hidden_bf16 = hidden.detach().bfloat16().requires_grad_()
    weight_bf16 = weight.detach().bfloat16().requires_grad_()
    out = chunked_lm_loss(hidden_bf16, weight_bf16, labels, z_loss=1e-5, chunk_size=16)
    out.loss.backward()
    assert hidden_bf16.grad.dtype == weight_bf16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss, reference.detach(), rtol=2e-2, atol=2e-2)
