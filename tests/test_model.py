import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from fusion_train.model.chameleon import Chameleon
from fusion_train.model.size import flops_per_token, parameter_counts
from helpers import PRESETS, preset, randomized_model, small_config


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESETS.glob("*.yaml")))
def test_every_preset_is_a_valid_config(name):
    cfg = preset(name)
    assert cfg.vocab_size == 65536 and cfg.max_seq_len == 4096


def test_preset_sizes_match_the_paper():
    assert parameter_counts(preset("1b")).total == pytest.approx(1.09e9, rel=0.01)
    assert parameter_counts(preset("7b")).total == pytest.approx(7.0e9, rel=0.01)
    assert parameter_counts(preset("34b")).total == pytest.approx(34.3e9, rel=0.01)
    seven_b, thirty_four_b = preset("7b"), preset("34b")
    assert (seven_b.block_style, seven_b.dropout, seven_b.n_kv_heads) == ("prenorm", 0.1, 32)
    assert (thirty_four_b.block_style, thirty_four_b.dropout, thirty_four_b.n_kv_heads) == ("swin", 0.0, 8)


@pytest.mark.parametrize("overrides", [{}, {"block_style": "swin", "qk_norm_groups": 2}, {"qk_norm": False}])
def test_counted_parameters_equal_the_built_model(overrides):
    cfg = preset("tiny", **overrides)
    model = Chameleon(cfg)
    assert parameter_counts(cfg).total == sum(p.numel() for p in model.parameters())
    assert parameter_counts(cfg).embedding == model.tok_embeddings.weight.numel()


def test_flops_per_token_formula():
    cfg = preset("1b")
    expected = 6 * (parameter_counts(cfg).total - 65536 * 2048) + 12 * 16 * 2048 * 4096
    assert flops_per_token(cfg, 4096) == expected


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"block_style": "postnorm"}, "block_style"),
        ({"n_heads": 3}, "divisible by n_heads"),
        ({"n_kv_heads": 3}, "divisible by n_kv_heads"),
        ({"qk_norm_groups": 4}, "qk_norm_groups"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_configs_are_refused_with_the_setting_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


@pytest.mark.parametrize("block_style", ["prenorm", "swin"])
def test_attention_is_causal(block_style):
    model = randomized_model(small_config(block_style=block_style))
    ids = torch.randint(0, 1024, (2, 24))
    changed = ids.clone()
    changed[:, 16:] = torch.randint(0, 1024, (2, 8))
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :16], after[:, :16])
    assert not torch.allclose(before[:, 16:], after[:, 16:])


def test_document_mask_isolates_packed_documents():
    """With doc_ids, a document packed after another gives the logits it gives alone (RoPE is
    relative, so its offset in the sequence does not matter)."""
    model = randomized_model(small_config())
    first, second = torch.randint(0, 1024, (1, 10)), torch.randint(0, 1024, (1, 14))
    packed = torch.cat([first, second], dim=1)
    doc_ids = torch.tensor([[0] * 10 + [1] * 14])
    with torch.no_grad():
        masked = model(packed, doc_ids=doc_ids)
        alone = model(second)
        unmasked = model(packed)
    torch.testing.assert_close(masked[:, 10:], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unmasked[:, 10:], alone, rtol=1e-4, atol=1e-4)


def test_block_styles_differ():
    ids = torch.randint(0, 1024, (1, 12))
    prenorm = randomized_model(small_config(block_style="prenorm"))
    swin = randomized_model(small_config(block_style="swin"))
    with torch.no_grad():
        assert not torch.allclose(prenorm(ids), swin(ids))


def test_residual_dropout_only_in_training():
    model = randomized_model(small_config(dropout=0.5))
    ids = torch.randint(0, 1024, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), model(ids))
        model.train()
        assert not torch.allclose(model(ids), model(ids))


def test_activation_checkpointing_applied_from_outside_keeps_gradients():
    torch.manual_seed(0)
    ids = torch.randint(0, 1024, (2, 16))
    plain = randomized_model(small_config())
    checkpointed = randomized_model(small_config())
    for i, block in enumerate(checkpointed.layers):
        checkpointed.layers[i] = checkpoint_wrapper(block)
    for model in (plain, checkpointed):
        model(ids, labels=ids).loss.backward()
    plain_grads = dict(plain.named_parameters())
    for name, param in checkpointed.named_parameters():
        reference = plain_grads[name.replace("._checkpoint_wrapped_module", "")].grad
        torch.testing.assert_close(param.grad, reference)


def test_loss_decreases_when_training_on_one_batch():
    model = Chameleon(preset("tiny", vocab_size=512))
    ids = torch.randint(0, 512, (4, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_too_long_sequence_is_a_clear_error():
    model = Chameleon(small_config(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
