"""Loss sums by target modality, kept on the device as training and validation go and reduced
across ranks only when read: the one host sync a logged step or a validation needs."""

from __future__ import annotations

import torch
import torch.distributed as dist

from fusion_train.vocab import Modality

N_MODALITIES = len(Modality)


def add_modality_sums(out, sums: dict) -> None:
    """Add a LossOutput's cross-entropy, log Z and target counts per modality to `sums`."""
    sums["ce"] += out.ce_sum_by_modality
    sums["logz"] += out.logz_sum_by_modality
    sums["count"] += out.count_by_modality


def reduce_sums(sums: dict, op=dist.ReduceOp.SUM) -> dict:
    """Every tensor of `sums` reduced over the ranks in one collective."""
    flat = torch.cat([v.reshape(-1) for v in sums.values()])
    dist.all_reduce(flat, op=op)
    return dict(zip(sums, flat.split([v.numel() for v in sums.values()]), strict=True))


def modality_metrics(reduced: dict) -> dict:
    metrics = {}
    for modality in Modality:
        count = reduced["count"][modality].item()
        if count:
            name = modality.name.lower()
            metrics[f"loss/{name}"] = reduced["ce"][modality].item() / count
            metrics[f"logits/logZ_mean_{name}"] = reduced["logz"][modality].item() / count
    return metrics
