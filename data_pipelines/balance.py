"""The modality balance of an SFT mixture: what share of the answer tokens it trains on is text,
image and audio, and the source weights that reach a share asked for.

Chameleon §3.2: a mixture whose answers are mostly of one modality teaches the model an
unconditional prior for it (it answers a text question with a picture). The shares here are those
of the tokens the loss is on (the shards' loss mask), counted by the shard builder per source
(`answer_tokens_by_modality` in each manifest), weighted by how often the loader draws each
source's documents (`data.sources.*.weight`, `data.reweight`, `data.mixture_unit`). Control tokens
(`</s>`, image and audio markers) are left out of the shares.
"""

from __future__ import annotations

import dataclasses
import math

from fusion_train.data.loader import DataConfig, SourceConfig, source_weights
from fusion_train.data.manifest import DataError, Manifest
from fusion_train.vocab import Modality

MODALITIES = tuple(m.key for m in Modality if m != Modality.SPECIAL)


def answers_per_document(manifest: Manifest) -> dict[str, float]:
    return {m: manifest.answer_tokens_by_modality.get(m, 0) / max(1, manifest.samples) for m in MODALITIES}


def modality_shares(cfg: DataConfig, manifests: dict[str, Manifest]) -> dict[str, float]:
    """Each modality's share of the answer tokens the mixture trains on."""
    draws = source_weights(cfg, manifests)
    expected = {m: sum(draws[name] * answers_per_document(manifests[name])[m] for name in draws) for m in MODALITIES}
    total = sum(expected.values())
    if total == 0:
        raise DataError(
            f"the sources {sorted(manifests)} have no answer tokens counted: build them with "
            "`fusion-data build-shards --kind sft` (manifests from before the count was kept: build them again)"
        )
    return {m: value / total for m, value in expected.items()}


def with_weights(cfg: DataConfig, weights: dict[str, float]) -> DataConfig:
    """The config with these weights (in its own unit) and no reweighting."""
    sources = {name: SourceConfig(source.path, weights[name]) for name, source in cfg.sources.items()}
    return dataclasses.replace(cfg, sources=sources, reweight={})


def weights_for(cfg: DataConfig, manifests: dict[str, Manifest], target: dict[str, float],
                tolerance: float = 1e-4, rounds: int = 1000) -> dict[str, float]:  # fmt: skip
    """Source weights (summing to 1, in cfg's unit) whose mixture's answer tokens have the target
    shares: the cfg's weights scaled round by round, each source by (target / share) of its
    modalities, weighted by its own answer tokens' mix. Sources of one modality keep their
    weights' ratios; a target that no mixture of the sources reaches is an error."""
    target = _full_target(target, modality_shares(cfg, manifests))
    weights = {name: source.weight * cfg.reweight.get(name, 1.0) for name, source in cfg.sources.items()}
    mixes = {name: _mix(manifests[name]) for name in weights}
    for _ in range(rounds):
        shares = modality_shares(with_weights(cfg, weights), manifests)
        if max(abs(shares[m] - target[m]) for m in MODALITIES) < tolerance:
            total = sum(weights.values())
            return {name: w / total for name, w in weights.items()}
        for name, mix in mixes.items():
            weights[name] *= math.prod((target[m] / shares[m]) ** f for m, f in mix.items() if f and shares[m])
        if sum(weights.values()) == 0:
            break
        weights = {name: w / sum(weights.values()) for name, w in weights.items()}
    raise DataError(f"no weights of the sources {sorted(weights)} reach the shares {target}: a source mixing "
                    "modalities ties their shares together; give a target nearer the sources' own mixes")  # fmt: skip


def _mix(manifest: Manifest) -> dict[str, float]:
    """The source's answer tokens' share of each modality."""
    answers = answers_per_document(manifest)
    total = sum(answers.values()) or 1
    return {m: value / total for m, value in answers.items()}


def _full_target(target: dict[str, float], shares: dict[str, float]) -> dict[str, float]:
    """The target for every modality: those not named share what the named leave, as they share now."""
    unknown = sorted(set(target) - set(MODALITIES))
    if unknown or any(v < 0 for v in target.values()) or sum(target.values()) > 1 + 1e-9:
        raise DataError(f"--target {target}: give shares of {MODALITIES}, each at least 0, summing to at most 1")
    missing = [m for m, share in shares.items() if share == 0 and target.get(m, 0) > 0]
    if missing:
        raise DataError(f"--target asks for {missing} answers but no source has any: add a source with them")
    rest = [m for m in MODALITIES if m not in target and shares[m] > 0]
    left, now = 1 - sum(target.values()), sum(shares[m] for m in rest)
    if not rest and left > 1e-6:
        raise DataError(f"--target {target}: the shares sum to {1 - left:.3f}; they must sum to 1")
    return {m: target[m] if m in target else (left * shares[m] / now if m in rest else 0.0) for m in MODALITIES}


def balance_report(cfg: DataConfig, manifests: dict[str, Manifest], target: dict[str, float] | None = None) -> dict:
    """The mixture's answer-token shares by modality and each source's part in it; with a target,
    the weights that reach it and the overrides that set them."""
    draws = source_weights(cfg, manifests)
    report = {
        "mixture_unit": cfg.mixture_unit,
        "answer_token_shares": _rounded(modality_shares(cfg, manifests)),
        "sources": {
            name: {
                "weight": source.weight * cfg.reweight.get(name, 1.0),
                "document_draws": round(draws[name], 4),
                "answer_tokens_per_document": _rounded(answers_per_document(manifests[name]), 2),
                "answer_tokens_by_source": manifests[name].answer_tokens_by_source,
            }  # fmt: skip
            for name, source in cfg.sources.items()
        },
    }
    if target is not None:
        weights = weights_for(cfg, manifests, target)
        report["derived"] = {
            "target": target,
            "weights": _rounded(weights),
            "answer_token_shares": _rounded(modality_shares(with_weights(cfg, weights), manifests)),
            "overrides": " ".join(f"data.sources.{name}.weight={w:.4g}" for name, w in weights.items())
            + (" data.reweight={}" if cfg.reweight else ""),
        }
    return report


def _rounded(values: dict[str, float], digits: int = 4) -> dict[str, float]:
    return {key: round(value, digits) for key, value in values.items()}
