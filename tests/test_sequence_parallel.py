"""Sequence parallelism (DeepSpeed-Ulysses): the same loss and gradients as one unsplit model, and
training runs that resume exactly, in the same layout and in another."""

import torch

from conftest import REPO, torchrun

# Tolerances for fp32 sums taken in another order: the attention's all-to-all changes none of the
# maths, only where each part of it runs.
LOSS_TOLERANCE = dict(rtol=1e-6, atol=1e-6)
GRADIENT_TOLERANCE = dict(rtol=1e-5, atol=1e-7)


def test_sequence_parallel_gives_the_unsplit_loss_and_gradients(tmp_path):
    """ZeRO-1, 2 and 3; causal and document mask; SDPA and FlexAttention; GQA with fewer key/value
    heads than ranks; the untied model; activation checkpointing: 2 ranks sharing each sequence
    give the loss, the per-modality sums and every parameter's gradient of the model on one process."""
    out = tmp_path / "equivalence.pt"
    torchrun(REPO / "tests/scripts/sequence_parallel_equivalence.py", "--out", str(out), timeout=400)
    results = torch.load(out, weights_only=False)
    assert len(results) == 6
    for case, r in results.items():
        torch.testing.assert_close(r["loss"], r["reference_loss"], **LOSS_TOLERANCE, msg=case)
        assert r["n_tokens"] == r["reference_n_tokens"], case
        for key, value in r["by_modality"].items():
            torch.testing.assert_close(value, r["reference_by_modality"][key], rtol=1e-5, atol=1e-3, msg=case)
        assert r["grads"].keys() == r["reference_grads"].keys(), case
        for name, reference in r["reference_grads"].items():
            torch.testing.assert_close(r["grads"][name], reference, **GRADIENT_TOLERANCE, msg=f"{case}: {name}")
