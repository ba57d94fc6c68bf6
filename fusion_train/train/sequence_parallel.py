"""Sequence parallelism, DeepSpeed-Ulysses (arXiv 2309.14509): each group of N contiguous ranks
shares one sequence, each rank holding seq_len / N positions of it; data parallelism is world / N.

Everything but attention works on a rank's own positions. Attention is wrapped from outside the
model: DeepSpeed's `DistributedAttention` exchanges q, k and v all-to-all so that each rank sees
the whole sequence for n_heads / N of the heads, runs the model's own kernel (SDPA or FlexAttention,
with the whole sequence's mask), and exchanges the output back: 4 all-to-alls per layer forward.

The groups are DeepSpeed's (`parallel_state_sp`), but the engine and ZeRO are not given them as
the `mpu`: to them every rank is a data-parallel rank, so ZeRO partitions over data x sequence ranks
and averages gradients over all of them, and a checkpoint's files are those of any run on as many
ranks, whatever N. Handing DeepSpeed 0.19.8 the mpu would buy nothing and costs two of its bugs:
its checkpoints then record N as the tensor-parallel degree (the mpu aliases model parallelism to
sequence parallelism, the family of DeepSpeed PR #8226), which the universal conversion that
carries a checkpoint to another number of ranks refuses ("model-state file count 1 does not match
tp_degree=2"); and ZeRO-3's reduce-scatter averages gradients over all ranks while ZeRO-1/2 sum
them over the sequence ranks, so the same loss would need two scalings.

Each rank's loss is its part's loss sum over the group's label count, times N: DeepSpeed's mean
over the N ranks of a group is then the group's sum, the gradient of the sequence's loss. The
loss's value is the sequence's (the other parts' sums added as a constant), the same on every rank
of the group. tests/test_sequence_parallel.py compares the gradients with an unsplit model's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fusion_train.model.chameleon import Chameleon, ChameleonConfig, ScaledDotProductAttention, SequencePart
from fusion_train.model.loss import IGNORE_INDEX, LossOutput, loss_from_sums


class SequenceParallelError(ValueError):
    pass


def check_layout(size: int, world_size: int, model: ChameleonConfig, seq_lens: dict[str, int]) -> None:
    """Refuse a layout Ulysses cannot run, saying what to change. `seq_lens`: setting -> length of
    the sequences to split (the training data's, the held-out data's)."""
    if size < 1:
        raise SequenceParallelError(f"trainer.sequence_parallel={size}: it must be at least 1")
    problems = [
        (world_size % size == 0, f"the {world_size} ranks must be a multiple of it"),
        *((length % size == 0, f"{setting}={length} must be a multiple of it") for setting, length in seq_lens.items()),
        (model.n_heads % size == 0, f"model.n_heads={model.n_heads} must be a multiple of it (each rank attends "
                                    "with n_heads / N heads)"),
        (model.n_kv_heads % size == 0 or size % model.n_kv_heads == 0,
         f"model.n_kv_heads={model.n_kv_heads} must divide it or be a multiple of it (fewer key/value heads than "
         "ranks are replicated, which needs whole copies)"),
        (size == 1 or not model.experts, "model.experts cannot share a sequence over ranks yet (each rank's router "
                                         "losses would need combining over the group): train experts at 1"),
    ]  # fmt: skip
    for ok, problem in problems:
        if not ok:
            raise SequenceParallelError(f"trainer.sequence_parallel={size}: {problem}")


class HeadsSecond(nn.Module):
    """The model's kernel ([B, heads, T, head_dim]) in DistributedAttention's layout ([B, T, heads, head_dim])."""

    def __init__(self, kernel: ScaledDotProductAttention):
        super().__init__()
        self.kernel = kernel

    def forward(self, q, k, v, attn_mask=None):
        out = self.kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask)
        return out.transpose(1, 2)


class UlyssesAttention(nn.Module):
    """Takes the model kernel's place: q, k, v of this rank's positions, all heads, in; its positions'
    attention output over the whole sequence out. With fewer key/value heads than ranks (GQA), each
    is copied to N / n_kv_heads ranks, which keeps every query head beside its own key/value head."""

    def __init__(self, kernel: ScaledDotProductAttention, group, size: int, n_kv_heads: int):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self.kv_copies = size // n_kv_heads if n_kv_heads < size else 1
        self.distributed = DistributedAttention(HeadsSecond(kernel), group, scatter_idx=2, gather_idx=1)
        self.enabled = True

    def forward(self, q, k, v, attn_mask=None):  # [B, heads, T / N, head_dim]
        kernel = self.distributed.local_attn.kernel
        if not self.enabled:
            return kernel(q, k, v, attn_mask)
        if self.kv_copies > 1:
            k, v = k.repeat_interleave(self.kv_copies, dim=1), v.repeat_interleave(self.kv_copies, dim=1)
        out = self.distributed(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, attn_mask)
        return out.transpose(1, 2)


@dataclass
class SequenceParallel:
    """This rank's place in the layout: `size` ranks per sequence, this rank the `rank`-th of its
    `group` (None when size is 1)."""

    size: int = 1
    rank: int = 0
    group: object = None

    @classmethod
    def start(cls, size: int, model: ChameleonConfig, seq_lens: dict[str, int]) -> SequenceParallel:
        """The layout of `size` ranks per sequence; its process groups are made here (every rank)."""
        check_layout(size, dist.get_world_size(), model, seq_lens)
        if size == 1:
            return cls()
        import deepspeed.runtime.sequence_parallel.parallel_state_sp as groups

        groups.initialize_sequence_parallel(size)
        return cls(size, groups.get_sequence_parallel_rank(), groups.get_sequence_parallel_group())

    def data_rank(self, rank: int) -> int:
        """The data-parallel rank of global `rank`: which stream of batches its group reads."""
        return rank // self.size

    def data_ranks(self, world_size: int) -> int:
        return world_size // self.size

    @property
    def counts_data(self) -> bool:
        """Whether this rank reports its group's data counters (each group reads its batches once)."""
        return self.rank == 0

    def wrap_attention(self, model: Chameleon) -> None:
        """Every block's attention kernel in a UlyssesAttention (before checkpointing and compiling)."""
        if self.size == 1:
            return
        for block in model.layers:
            attention = block.attention
            attention.attend = UlyssesAttention(attention.attend, self.group, self.size, model.cfg.n_kv_heads)

    @contextlib.contextmanager
    def unsharded(self, model: Chameleon):
        """Whole sequences on every rank, the attention kernels unwrapped: for generation, whose
        prompts and KV cache are not split (each rank that generates runs the whole model)."""
        wrapped = [m for m in model.modules() if isinstance(m, UlyssesAttention)]
        for module in wrapped:
            module.enabled = False
        try:
            yield
        finally:
            for module in wrapped:
                module.enabled = True

    def model_inputs(self, input_ids, labels, doc_ids, label_modality) -> dict:
        """The model's keyword arguments for this rank's part of a batch of whole sequences: its
        positions of the ids, the labels shifted before slicing (the target of the part's last
        position is in the next part), the whole sequence's doc_ids (attention sees all of it)."""
        inputs = {"labels": labels, "doc_ids": doc_ids, "label_modality": label_modality}
        if self.size == 1:
            return {"input_ids": input_ids, **inputs}
        length = input_ids.shape[1]
        part = SequencePart(self.rank * length // self.size, length)
        mine = slice(part.start, part.start + length // self.size)
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        modality = None
        if label_modality is not None:
            modality = torch.cat([label_modality[:, 1:], label_modality[:, :1]], dim=1)[:, mine]
        return {"input_ids": input_ids[:, mine], "labels": targets[:, mine], "doc_ids": doc_ids,
                "label_modality": modality, "part": part}  # fmt: skip

    def sequence_loss(self, out: LossOutput) -> LossOutput:
        """The whole sequences' loss from this rank's part (see the module's docstring); the
        per-modality sums stay this part's, which the metrics add over all ranks."""
        if self.size == 1:
            return out
        group_sums = out.sums.clone()
        dist.all_reduce(group_sums, group=self.group)
        part = out.loss_sum * self.size  # DeepSpeed averages over the group's ranks
        others = group_sums[0] + group_sums[1] - part.detach()  # a constant: the value becomes the group's
        combined = loss_from_sums(part + others, group_sums)
        for key in ("ce_sum_by_modality", "logz_sum_by_modality", "count_by_modality"):
            if key in out:
                combined[key] = out[key]
        return combined
