"""Activation statistics read by forward hooks: observed, never changed.

- The RMS of each block's output, summed on the device over micro-batches. The paper's predictor
  of a late divergence is the slow growth of the last one (Chameleon §2.3, Fig. 5a). In a
  modality-untied model, also over the text, image and audio tokens apart: each through its own copies.
- Each layer's largest pre-softmax attention logit q·k/√d, the quantity QK-norm bounds. It costs
  another q kᵀ product, so it is measured only while `sample_attention_logits` is on: as an
  observer of the loop, the monitor turns it on for the first micro-batch of each logged step.

Logged: norms/block_{i}_out, norms/final_out (the last block's: the guard reads it every step),
norms/block_{i}_out_{text,image,audio} of an untied model, attn/qk_logit_max_{i} and attn/qk_logit_max.

Hooks sit on the modules in `model.layers` (an activation-checkpoint wrapper, when there is one,
runs its forward once) and on each attention's `attend` module, whose recomputation in backward
repeats a maximum and so changes nothing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fusion_train.model.chameleon import (
    UNTIED_COPIES,
    ModalityRouting,
    ScaledDotProductAttention,
    allowed_pairs,
    causal,
)
from fusion_train.monitor.observer import LogStep, Observer, Sum

QUERY_CHUNK = 256  # query positions per q kᵀ block: bounds the extra memory to [B, heads, 256, T]


def largest_attention_logit(q: torch.Tensor, k: torch.Tensor, attn_mask) -> torch.Tensor:
    """max over batch, heads and allowed (query, key) pairs of q·k/√d; q [B, H, T, D], k [B, H_kv, T, D],
    attn_mask as the attention took it: None (causal), boolean [B, 1, T, T] or a FlexAttention block mask."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    seq_len, scale = q.shape[2], 1.0 / math.sqrt(q.shape[-1])
    positions = torch.arange(seq_len, device=q.device)
    largest = torch.full((), -math.inf, device=q.device)
    for start in range(0, seq_len, QUERY_CHUNK):
        end = min(start + QUERY_CHUNK, seq_len)
        logits = torch.matmul(q[:, :, start:end].float(), k[:, :, :end].float().transpose(-1, -2)) * scale
        if isinstance(attn_mask, torch.Tensor):
            allowed = attn_mask[:, :, start:end, :end]
        else:
            mask_mod = causal if attn_mask is None else attn_mask.mask_mod
            allowed = allowed_pairs(mask_mod, q.shape[0], positions[start:end], positions[:end])
        largest = torch.maximum(largest, logits.masked_fill(~allowed, -math.inf).amax())
    return largest


def rms(x: torch.Tensor) -> torch.Tensor:
    # vector_norm in fp32 without a fp32 copy of the [B, T, dim] output
    return torch.linalg.vector_norm(x, dtype=torch.float32) / math.sqrt(x.numel())


class ActivationMonitor(Observer):
    def __init__(self, layers: nn.ModuleList, device: torch.device, attention_logits: bool = True,
                 untied: bool = False):  # fmt: skip
        """`untied`: the blocks are untied by modality, and their copies' outputs are logged apart."""
        n_layers = len(layers)
        self.device, self.attention_logits, self.untied = device, attention_logits, untied
        self.rms_sum = torch.zeros(n_layers, dtype=torch.float64, device=device)
        self.micro_batches = 0
        self.modality_rms_sum = torch.zeros(n_layers, len(UNTIED_COPIES), dtype=torch.float64, device=device)
        self.modality_micro_batches = torch.zeros(len(UNTIED_COPIES), dtype=torch.float64, device=device)
        self.final_norm: torch.Tensor | None = None  # the last block's output RMS of the last step, on the device
        self.qk_logit_max = torch.full((n_layers,), -math.inf, device=device)
        self.sampling = False
        self.handles = [block.register_forward_hook(self._block_hook(i)) for i, block in enumerate(layers)]
        if attention_logits:
            # The kernels themselves: under sequence parallelism they sit inside a wrapper and see the whole sequence.
            attends = [m for block in layers for m in block.modules() if isinstance(m, ScaledDotProductAttention)]
            self.handles += [m.register_forward_hook(self._attention_hook(i)) for i, m in enumerate(attends)]

    def _block_hook(self, index: int):
        def hook(module, inputs, output):
            if not module.training:
                return  # validation batches are not training's activations
            with torch.no_grad():
                self.rms_sum[index] += rms(output).double()
                if index == 0:
                    self.micro_batches += 1
                if inputs and isinstance(inputs[-1], ModalityRouting):
                    self._modality_rms(index, output, inputs[-1].counts)

        return hook

    def _modality_rms(self, index: int, output: torch.Tensor, counts: list[int]) -> None:
        """`output` holds the tokens grouped by modality, `counts` of each in UNTIED_COPIES' order."""
        for modality, part in enumerate(output.split(counts)):
            if part.numel():
                self.modality_rms_sum[index, modality] += rms(part).double()
                if index == 0:
                    self.modality_micro_batches[modality] += 1

    def _attention_hook(self, index: int):
        def hook(module, inputs, output):
            if not (self.sampling and module.training):
                return
            q, k, _v, *mask = inputs
            with torch.no_grad():
                value = largest_attention_logit(q.detach(), k.detach(), mask[0] if mask else None)
                self.qk_logit_max[index] = torch.maximum(self.qk_logit_max[index], value)

        return hook

    def sample_attention_logits(self, on: bool) -> None:
        self.sampling = on

    def take_block_rms(self) -> torch.Tensor:
        """Each block's output RMS averaged over the micro-batches since the last call (on the device)."""
        mean = self.rms_sum / max(self.micro_batches, 1)
        self.rms_sum = torch.zeros_like(self.rms_sum)
        self.micro_batches = 0
        return mean

    def take_modality_rms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sums of each block's output RMS per modality [layers, UNTIED_COPIES] and the
        micro-batches that had tokens of each modality, since the last call (on the device)."""
        sums, counts = self.modality_rms_sum, self.modality_micro_batches
        self.modality_rms_sum, self.modality_micro_batches = torch.zeros_like(sums), torch.zeros_like(counts)
        return sums, counts

    def take_qk_logit_max(self) -> torch.Tensor:
        largest = self.qk_logit_max
        self.qk_logit_max = torch.full_like(largest, -math.inf)
        return largest

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    # --- as an observer of the loop -------------------------------------------------------------

    def sums(self) -> dict[str, Sum]:
        n_layers = len(self.rms_sum)
        sums = {"block_rms": Sum(n_layers)}
        if self.attention_logits:
            sums["qk_logit_max"] = Sum(n_layers, reduce="max", start=-math.inf)  # -inf: not sampled
        if self.untied:
            sums["modality_rms"] = Sum(n_layers * len(UNTIED_COPIES))
            sums["modality_micro_batches"] = Sum(len(UNTIED_COPIES))
        return sums

    def step_started(self, step: int, logged: bool) -> None:
        self.sample_attention_logits(logged)

    def micro_batch(self, batch: dict, out, sums: dict) -> None:
        self.sample_attention_logits(False)  # the first micro-batch of a step is the sample

    def step_ended(self, step: int, sums: dict) -> bool:
        block_rms = self.take_block_rms()
        sums["block_rms"] += block_rms
        self.final_norm = block_rms[-1]
        if self.attention_logits:
            torch.maximum(sums["qk_logit_max"], self.take_qk_logit_max().double(), out=sums["qk_logit_max"])
        if self.untied:
            modality_rms, micro_batches = self.take_modality_rms()
            sums["modality_rms"] += modality_rms.flatten()
            sums["modality_micro_batches"] += micro_batches
        return False

    def metrics(self, reduced: dict, log: LogStep) -> dict:
        block_rms = (reduced["block_rms"] / (log.steps * log.world_size)).tolist()
        metrics = {f"norms/block_{i}_out": v for i, v in enumerate(block_rms)}
        metrics["norms/final_out"] = block_rms[-1]
        if self.untied:
            metrics.update(modality_norms(reduced["modality_rms"], reduced["modality_micro_batches"]))
        largest = reduced["qk_logit_max"].tolist() if self.attention_logits else []
        if largest and all(math.isfinite(v) for v in largest):  # sampled on this step
            metrics.update({f"attn/qk_logit_max_{i}": v for i, v in enumerate(largest)})
            metrics["attn/qk_logit_max"] = max(largest)
        return metrics


def modality_norms(sums: torch.Tensor, micro_batches: torch.Tensor) -> dict:
    """norms/block_{i}_out_{text,image,audio} of an untied model: each modality's copies' output RMS."""
    means = (sums.view(-1, len(UNTIED_COPIES)) / micro_batches.clamp(min=1)).tolist()
    counts = micro_batches.tolist()
    return {
        f"norms/block_{i}_out_{modality}": row[m]
        for i, row in enumerate(means)
        for m, modality in enumerate(UNTIED_COPIES)
        if counts[m] > 0
    }
