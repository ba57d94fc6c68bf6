"""What `fusion-train --help` lists after its usage: the config groups with their options (the
default marked), and the top-level keys with their fields, read from the config folders and the
schema, so that the list cannot go stale."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

from fusion_train.train.config import CONFIG_DIR, TrainConfig, compose_config


def group_options(config_dirs: list[Path]) -> dict[str, list[str]]:
    """Each group folder's options, across our conf/ and the user's folders."""
    groups: dict[str, set[str]] = {}
    for folder in config_dirs:
        for option in folder.glob("*/*.yaml"):
            groups.setdefault(option.parent.name, set()).add(option.stem)
    return {group: sorted(options) for group, options in sorted(groups.items())}


def describe(user_config_dirs: list[str | Path] = ()) -> str:
    choices = compose_config([], user_config_dirs, hydra_node=True).hydra.runtime.choices
    lines = ["Config groups (GROUP=OPTION picks one; * marks the default; +GROUP=OPTION adds an optional one):"]
    for group, options in group_options([CONFIG_DIR, *map(Path, user_config_dirs)]).items():
        listed = ", ".join(f"{o}*" if o == choices.get(group) else o for o in options)
        lines.append(f"  {group + ('' if group in choices else ' (optional)'):<24}{listed}")
    lines += ["", "Top-level keys (KEY.FIELD=VALUE overrides one; --cfg job prints them all with their values):"]
    for key in dataclasses.fields(TrainConfig):
        fields = ", ".join(f.name for f in dataclasses.fields(key.default_factory()))
        lines += textwrap.wrap(fields, 100, initial_indent=f"  {key.name:<14}", subsequent_indent=" " * 16)
    return "\n".join(lines)
