"""Next-token cross-entropy plus z-loss, computed through the output projection in chunks.

The logits of a batch are [positions, vocab]: at 8 x 4096 positions and 65,536 ids that is 8 GiB in
fp32, more than the rest of a 1B model's activations. So the output projection, the softmax and
their gradients are computed a chunk of positions at a time, inside one autograd Function that
keeps only the gradients for backward (the approach of liger-kernel's fused linear cross-entropy).
Since the loss is a scalar, those gradients are exact up to the scale that backward applies.

z-loss (Chameleon §2.3, PaLM): coefficient * log²Z with Z the softmax partition function, which
keeps the final softmax's logits from drifting; 1e-5 in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusion_train.vocab import LOSS_GROUPS

IGNORE_INDEX = -100


class LossOutput(dict):
    """The loss and its parts, readable as attributes. A dict so that DeepSpeed's ZeRO-3 hooks find
    the tensors in it (as in HF's ModelOutput):

    loss: to backpropagate, (sum CE + z_loss * sum log²Z) / positions with a label
    ce, z, logz_mean: mean cross-entropy, z_loss * mean log²Z, mean log Z (detached)
    n_tokens: positions with a label
    loss_sum: the loss before the division (differentiable); sums: [sum CE, z_loss * sum log²Z,
        sum log Z, n_tokens] (detached). What the loss of a sequence split over ranks is made of.
    ce_sum_by_modality, logz_sum_by_modality, count_by_modality: sums per target modality, indexed
        by the label modalities the caller gives (LOSS_GROUPS of them: a modality, or a modality in a
        video); present only when it gives them
    """

    __setattr__ = dict.__setitem__

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def chunked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    z_loss: float,
    chunk_size: int,
    label_modality: torch.Tensor | None = None,
    shifted: bool = False,
) -> LossOutput:
    """Loss of predicting labels[:, t+1] from hidden[:, t]; labels == -100 carry no loss.

    hidden: [B, T, dim] final-normed states; weight: [vocab, dim] output projection;
    labels and label_modality: [B, T], aligned with the input ids (this function shifts them), or
    with `shifted` already the targets: labels[:, t] is the token after position t (a part of a
    sequence split over ranks, whose last target lies in the next part).
    """
    dim = hidden.shape[-1]
    if not shifted:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
        label_modality = None if label_modality is None else label_modality[:, 1:]
    inputs = hidden.reshape(-1, dim)
    targets = labels.reshape(-1)
    valid = targets != IGNORE_INDEX
    if torch.is_grad_enabled() and (inputs.requires_grad or weight.requires_grad):
        total, ce, logz = _LinearCrossEntropyZLoss.apply(inputs, weight, targets, z_loss, chunk_size)
    else:
        ce, logz, _, _ = _chunked_forward(inputs, weight, targets, z_loss, chunk_size, with_grads=False)
        total = ce.sum() + z_loss * logz.square().sum()

    sums = torch.stack([ce.sum(), z_loss * logz.square().sum(), logz.sum(), valid.sum().float()])
    out = loss_from_sums(total, sums)
    if label_modality is not None:
        modality = label_modality.reshape(-1).long()
        out.ce_sum_by_modality = _sum_by_modality(ce, modality)
        out.logz_sum_by_modality = _sum_by_modality(logz, modality)
        out.count_by_modality = _sum_by_modality(valid.float(), modality)
    return out


def loss_from_sums(loss_sum: torch.Tensor, sums: torch.Tensor) -> LossOutput:
    """The LossOutput of a differentiable loss sum and the detached [CE, z, log Z, count] sums."""
    ce_sum, z_sum, logz_sum, count = sums
    normalizer = count.clamp(min=1)
    return LossOutput(
        loss=loss_sum / normalizer,
        ce=ce_sum / normalizer,
        z=z_sum / normalizer,
        logz_mean=logz_sum / normalizer,
        n_tokens=count.long(),
        loss_sum=loss_sum,
        sums=sums,
    )


def reference_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, z_loss: float
) -> torch.Tensor:
    """The same loss from the full fp32 logits at once: what chunked_lm_loss must equal (tests)
    and must beat on memory (bench/chunked_loss.py)."""
    logits = (hidden[:, :-1] @ weight.t()).float()
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    ce_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    z_sum = z_loss * (logits.logsumexp(-1).square() * valid).sum()
    return (ce_sum + z_sum) / valid.sum().clamp(min=1)


def _sum_by_modality(values: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    sums = torch.zeros(LOSS_GROUPS, dtype=torch.float32, device=values.device)
    return sums.index_add_(0, modality, values.float())


class _LinearCrossEntropyZLoss(torch.autograd.Function):
    """Returns (sum of CE + z_loss * log²Z, per-position CE, per-position log Z) for 2-D inputs."""

    @staticmethod
    def forward(ctx, inputs, weight, targets, z_loss, chunk_size):
        ce, logz, grad_inputs, grad_weight = _chunked_forward(
            inputs, weight, targets, z_loss, chunk_size, with_grads=True
        )
        ctx.save_for_backward(grad_inputs, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce, logz)
        return ce.sum() + z_loss * logz.square().sum(), ce, logz

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_logz):
        # Scaled in place: backward runs once, and fresh [vocab, dim] copies would cost their size again.
        grad_inputs, grad_weight = ctx.saved_tensors
        scale = grad_total.float()
        return grad_inputs.mul_(scale), grad_weight.mul_(scale).to(ctx.weight_dtype), None, None, None


def _chunked_forward(inputs, weight, targets, z_loss, chunk_size, *, with_grads):
    """Per-position CE and log Z (0 where there is no label) and, if asked, the loss gradients."""
    n = inputs.shape[0]
    ce = torch.zeros(n, dtype=torch.float32, device=inputs.device)
    logz = torch.zeros_like(ce)
    grad_inputs = torch.empty_like(inputs) if with_grads else None
    grad_weight = None  # [vocab, dim], accumulated over chunks in fp32 whatever the weight's dtype
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        x, target = inputs[rows], targets[rows]
        valid = target != IGNORE_INDEX
        safe_target = torch.where(valid, target, 0).unsqueeze(1)
        logits = (x @ weight.t()).float()
        target_logit = logits.gather(1, safe_target).squeeze(1)
        # log Z = max + log sum exp(logits - max), as logsumexp computes it, but with the softmax's
        # numerators made in the logits' place: one pass over [positions, vocab] fewer, no temporaries.
        row_max = logits.amax(1, keepdim=True)
        numerators = logits.sub_(row_max).exp_()
        sum_exp = numerators.sum(1)
        chunk_logz = row_max.squeeze(1) + sum_exp.log()
        ce[rows] = torch.where(valid, chunk_logz - target_logit, 0.0)
        logz[rows] = torch.where(valid, chunk_logz, 0.0)
        if not with_grads:
            continue
        # d/dlogits of CE + z*logZ² is softmax * (1 + 2z logZ) - onehot(target), 0 on rows without a
        # label: one scale per row, then the one-hot, in place.
        row_scale = torch.where(valid, (1.0 + 2.0 * z_loss * chunk_logz) / sum_exp, 0.0)
        grad_logits = numerators.mul_(row_scale.unsqueeze(1))
        grad_logits.scatter_add_(1, safe_target, -valid.float().unsqueeze(1))
        grad_logits = grad_logits.to(inputs.dtype)
        torch.mm(grad_logits, weight, out=grad_inputs[rows])
        chunk_grad_weight = grad_logits.t() @ x
        if grad_weight is None:
            grad_weight = chunk_grad_weight.float()
        else:
            grad_weight += chunk_grad_weight
    return ce, logz, grad_inputs, grad_weight
