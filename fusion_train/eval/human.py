"""Blind human judgements of two systems' answers, aggregated into the tables Chameleon's paper
reports for its mixed-modal prompts (§4.2): per system, the share of answers that fulfil the
prompt, partially fulfil it or do not; between the two, win / tie / loss with bootstrap confidence
intervals; and how often the raters agree.

A judgement file is JSONL, one record per rater and prompt:

    {"rater": "r1", "item": "0007", "shown": ["ours", "theirs"],
     "absolute": {"ours": "fulfils", "theirs": "partially"}, "preference": "ours"}

`shown` is the order the rater saw the two answers in (randomised per item and rater); the
judgements name systems, never positions, so the order only serves to measure position bias
(how often the answer shown first is preferred). `preference` is a system's name or "tie".
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

ABSOLUTE = ("fulfils", "partially", "does_not")
TIE = "tie"


class JudgementError(ValueError):
    """A judgement file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Judgement:
    rater: str
    item: str
    shown: tuple[str, str]
    absolute: dict[str, str]
    preference: str


def read_judgements(paths: list[str | Path]) -> list[Judgement]:
    """Every rater's judgements; a record that is not one is an error naming its file and line."""
    judgements = []
    for path in map(Path, paths):
        if not path.is_file():
            raise JudgementError(f"judgement file {path} not found")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                judgements.append(_judgement(line, f"{path}:{number}"))
    seen = Counter((j.rater, j.item) for j in judgements)
    twice = [key for key, count in seen.items() if count > 1]
    if twice:
        raise JudgementError(f"rater {twice[0][0]} judged item {twice[0][1]} more than once: keep one record each")
    return judgements


def _judgement(line: str, where: str) -> Judgement:
    try:
        record = json.loads(line)
        judgement = Judgement(str(record["rater"]), str(record["item"]), tuple(record["shown"]),
                              dict(record["absolute"]), str(record["preference"]))  # fmt: skip
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise JudgementError(f"{where}: not a judgement record ({err!r}); see fusion_train/eval/human.py") from None
    systems = set(judgement.shown)
    if len(judgement.shown) != 2 or len(systems) != 2 or set(judgement.absolute) != systems:
        raise JudgementError(f"{where}: `shown` must name two systems and `absolute` judge each of them")
    if not set(judgement.absolute.values()) <= set(ABSOLUTE) or judgement.preference not in systems | {TIE}:
        raise JudgementError(f"{where}: absolute judgements are {ABSOLUTE}; the preference a system's name or {TIE!r}")
    return judgement


def score(judgements: list[Judgement], system: str, other: str, rounds: int = 2000, seed: int = 0) -> dict:
    """`system` against `other`: absolute shares per system, win/tie/loss of `system` with 95%
    bootstrap intervals (prompts resampled with all their raters' judgements), rater agreement on
    the preference, and the first-shown answer's share of the preferences."""
    pairs = [j for j in judgements if set(j.shown) == {system, other}]
    if not pairs:
        raise JudgementError(f"no judgements compare {system} with {other}")
    by_item: dict[str, list[Judgement]] = defaultdict(list)
    for judgement in pairs:
        by_item[judgement.item].append(judgement)
    items = sorted(by_item)
    rng = random.Random(seed)
    resampled = [_outcomes([j for item in rng.choices(items, k=len(items)) for j in by_item[item]], system)
                 for _ in range(rounds)]  # fmt: skip
    outcomes = _outcomes(pairs, system)
    preferred = [j for j in pairs if j.preference != TIE]
    return {
        "prompts": len(items),
        "judgements": len(pairs),
        "absolute": {name: _shares(Counter(j.absolute[name] for j in pairs), ABSOLUTE) for name in (system, other)},
        "relative": {
            outcome: {"share": round(outcomes[outcome], 4), "ci95": _interval([r[outcome] for r in resampled])}
            for outcome in ("win", "tie", "loss")
        },
        "agreement": _agreement(by_item),
        "first_shown_preferred": round(sum(j.preference == j.shown[0] for j in preferred) / max(1, len(preferred)), 4),
    }


def _outcomes(judgements: list[Judgement], system: str) -> dict[str, float]:
    counted = Counter("tie" if j.preference == TIE else "win" if j.preference == system else "loss" for j in judgements)
    return {outcome: counted[outcome] / len(judgements) for outcome in ("win", "tie", "loss")}


def _shares(counts: Counter, labels: tuple[str, ...]) -> dict[str, float]:
    total = sum(counts.values())
    return {label: round(counts[label] / total, 4) for label in labels}


def _interval(values: list[float]) -> list[float]:
    ordered = sorted(values)
    return [round(ordered[int(0.025 * (len(ordered) - 1))], 4), round(ordered[int(0.975 * (len(ordered) - 1))], 4)]


def _agreement(by_item: dict[str, list[Judgement]]) -> dict[str, float]:
    """Of the prompts judged by at least two raters: all agree on the preference, a majority
    (more than half, not all) agrees, or none does."""
    kinds = Counter()
    for judgements in by_item.values():
        if len(judgements) < 2:
            continue
        largest = Counter(j.preference for j in judgements).most_common(1)[0][1]
        kinds["all"] += largest == len(judgements)
        kinds["majority"] += len(judgements) / 2 < largest < len(judgements)
        kinds["none"] += largest <= len(judgements) / 2
    return {**_shares(kinds, ("all", "majority", "none")), "prompts": sum(kinds.values())} if kinds else {}
