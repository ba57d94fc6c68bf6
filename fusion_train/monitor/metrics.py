"""The metrics every run logs, monitors on or off: the losses (per target modality too), what was
read, the gradient norm and the learning rate. Each is an observer (`observer.py`)."""

from __future__ import annotations

import torch

from fusion_train.monitor.observer import LogStep, Observer, Sum
from fusion_train.vocab import LOSS_GROUPS, Modality


def modality_sums() -> dict[str, Sum]:
    """Cross-entropy, log Z and target counts per target modality, outside and inside videos (LOSS_GROUPS)."""
    return {"ce": Sum(LOSS_GROUPS), "logz": Sum(LOSS_GROUPS), "count": Sum(LOSS_GROUPS)}


def add_modality_sums(out, sums: dict) -> None:
    """Add a LossOutput's cross-entropy, log Z and target counts per modality to `sums`."""
    sums["ce"] += out.ce_sum_by_modality
    sums["logz"] += out.logz_sum_by_modality
    sums["count"] += out.count_by_modality


def modality_metrics(reduced: dict) -> dict:
    """loss/{modality} and logits/logZ_mean_{modality} of each modality with targets; where videos
    had targets, loss/video_{modality} of theirs and loss/still_image of the images outside them."""
    by_modality = {name: reduced[name][: len(Modality)] + reduced[name][len(Modality) :] for name in modality_sums()}
    metrics = {}
    for modality in Modality:
        count = by_modality["count"][modality].item()
        if count:
            metrics[f"loss/{modality.key}"] = by_modality["ce"][modality].item() / count
            metrics[f"logits/logZ_mean_{modality.key}"] = by_modality["logz"][modality].item() / count
    if reduced["count"][len(Modality) :].any():
        for modality in Modality:
            in_videos = reduced["count"][len(Modality) + modality].item()
            if in_videos:
                metrics[f"loss/video_{modality.key}"] = reduced["ce"][len(Modality) + modality].item() / in_videos
        if reduced["count"][Modality.IMAGE].item():
            metrics["loss/still_image"] = reduced["ce"][Modality.IMAGE].item() / reduced["count"][Modality.IMAGE].item()
    return metrics


class LossMetrics(Observer):
    """loss/total and loss/z (means over micro-batches), and per target modality the cross-entropy
    and mean log Z (means over its target tokens)."""

    def sums(self) -> dict[str, Sum]:
        return {"loss": Sum(), "z": Sum(), **modality_sums()}

    def micro_batch(self, batch: dict, out, sums: dict) -> None:
        sums["loss"] += out.loss.detach()
        sums["z"] += out.z
        add_modality_sums(out, sums)

    def metrics(self, reduced: dict, log: LogStep) -> dict:
        return {
            "loss/total": reduced["loss"].item() / log.micro_batches,
            "loss/z": reduced["z"].item() / log.micro_batches,
            **modality_metrics(reduced),
        }


class DataMetrics(Observer):
    """data/tokens_seen; data/skipped (corrupt samples skipped and counted); data/checksum, which
    tokens in which order (equal in two runs that read the same data); each source's share of the
    documents read; perf/data_wait_s, the longest time a rank waited for its batches per step.
    `counts`: whether this rank counts what it reads (of the ranks that share each sequence, only
    the first does, for the group)."""

    def __init__(self, source_names: list[str], device: torch.device, counts: bool = True):
        self.source_names, self.device, self.counts = source_names, device, counts

    def sums(self) -> dict[str, Sum]:
        return {"skipped": Sum(), "checksum": Sum(), "documents": Sum(len(self.source_names)),
                "data_wait_s": Sum(reduce="max")}  # fmt: skip

    def micro_batch(self, batch: dict, out, sums: dict) -> None:
        sums["data_wait_s"] += batch["data_wait_s"]
        if not self.counts:
            return
        sums["skipped"] += batch["skipped_samples"].sum().to(self.device)
        sums["documents"] += batch["documents_per_source"].sum(0).to(self.device)
        input_ids = batch["input_ids"]
        positions = torch.arange(1, input_ids.numel() + 1, device=input_ids.device, dtype=torch.float64)
        sums["checksum"] += (input_ids.flatten().double() * positions).sum() % 2**40

    def metrics(self, reduced: dict, log: LogStep) -> dict:
        documents = reduced["documents"]
        total = documents.sum().item()
        fractions = zip(self.source_names, documents.tolist(), strict=True)
        return {
            "data/tokens_seen": log.tokens_seen,
            "data/skipped": reduced["skipped"].item(),
            "data/checksum": reduced["checksum"].item(),
            **({f"data/source_{name}_frac": n / total for name, n in fractions} if total else {}),
            "perf/data_wait_s": reduced["data_wait_s"].item() / log.steps,
        }


class OptimizerMetrics(Observer):
    """grad/norm (DeepSpeed's global norm, before clipping) and optim/lr (the LR the logged step ran with)."""

    def __init__(self, engine, optimizer):
        """`optimizer`: the torch optimizer the schedule sets (a checkpoint's load replaces its param_groups)."""
        self.engine, self.optimizer = engine, optimizer
        self.lr = None

    def step_started(self, step: int, logged: bool) -> None:
        self.lr = self.optimizer.param_groups[0]["lr"]

    def metrics(self, reduced: dict, log: LogStep) -> dict:
        return {"grad/norm": float(self.engine.get_global_grad_norm() or 0.0), "optim/lr": self.lr}
