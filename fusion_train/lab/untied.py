"""The dense-against-untied comparison (`conf/experiment/untied.yaml`, docs/untied.md; with experts,
`conf/experiment/experts.yaml`, docs/experts.md), from a sweep's run folders: each arm's held-out
loss per modality against training FLOPs, and the Mixture-of-Transformers paper's metric, the share
of the dense run's steps (FLOPs, at equal FLOPs per token) and of its wall-clock time an arm needs
to reach the dense run's final held-out loss of each modality.

    fusion-report --untied runs/untied [--out DIR]   # DIR/untied.md and untied.png
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from fusion_train.lab.report import markdown  # noqa: E402
from fusion_train.lab.stability import ended_points  # noqa: E402
from fusion_train.lab.sweep import POINT_RECORD  # noqa: E402
from fusion_train.model.chameleon import UNTIED_COPIES, ChameleonConfig  # noqa: E402
from fusion_train.model.size import flops_per_token, parameter_counts  # noqa: E402
from fusion_train.monitor.report import read_run  # noqa: E402

DENSE = "dense"


@dataclass
class Arm:
    name: str  # the `untie` option
    parameters: int
    flops_per_step: float
    eval_steps: np.ndarray
    eval_loss: dict[str, np.ndarray]  # by modality, at eval_steps
    step_time_s: float  # mean over the logged windows after the first

    def steps_to(self, modality: str, target: float) -> int | None:
        """The first validated step whose held-out loss of `modality` is at most `target`."""
        reached = self.eval_loss[modality] <= target
        return int(self.eval_steps[reached.argmax()]) if reached.any() else None


def read_arm(folder: Path) -> Arm:
    config = yaml.safe_load((folder / "config.yaml").read_text())
    model = ChameleonConfig(**config["model"])
    run = read_run(folder)
    source = next(iter(config["eval_data"]["sources"]))
    evals = [r for r in run.evals if f"eval/{source}/loss_text" in r]
    times = [r["perf/step_time_s"] for r in run.kept if "perf/step_time_s" in r][1:]
    arms = ("arm=", "untie=")  # the sweep's choice (conf/arm/), or an untie option as older sweeps swept it
    name = next((o.split("=", 1)[1] for o in config_overrides(folder) if o.lstrip("+").startswith(arms)), DENSE)
    return Arm(
        name=name,
        parameters=parameter_counts(model).total,
        flops_per_step=flops_per_token(model, config["data"]["seq_len"]) * config["trainer"]["global_batch_tokens"],
        eval_steps=np.array([r["step"] for r in evals]),
        eval_loss={
            m: np.array([r[f"eval/{source}/loss_{m}"] for r in evals])
            for m in UNTIED_COPIES
            if evals and f"eval/{source}/loss_{m}" in evals[0]
        },  # the data's modalities
        step_time_s=float(np.mean(times)) if times else float("nan"),
    )


def config_overrides(folder: Path) -> list[str]:
    return json.loads((folder / POINT_RECORD).read_text())["overrides"]


def comparison_rows(arms: list[Arm]) -> list[dict]:
    dense = next((a for a in arms if a.name == DENSE), None)
    if dense is None:
        raise SystemExit("the sweep has no dense arm (+arm=dense) to compare with")
    rows = []
    for arm in arms:
        row = {
            "arm": arm.name,
            "parameters": f"{arm.parameters:,}",
            "GFLOPs per step": f"{arm.flops_per_step / 1e9:.1f}",
        }
        for m in dense.eval_loss:
            row[f"final {m} loss"] = f"{arm.eval_loss[m][-1]:.3f}"
            reached = arm.steps_to(m, dense.eval_loss[m][-1])
            share = reached / dense.eval_steps[-1] if reached is not None else None
            row[f"steps to dense {m} loss"] = "not reached" if share is None else f"{reached} ({share:.0%})"
            wall = share * arm.step_time_s / dense.step_time_s if share is not None else None
            row[f"wall-clock to dense {m} loss"] = "" if wall is None else f"{wall:.0%}"
        row["s per step"] = f"{arm.step_time_s:.3f}"
        rows.append(row)
    return rows


def loss_plot(arms: list[Arm]):
    modalities = list(arms[0].eval_loss)
    figure, axes = plt.subplots(1, len(modalities), figsize=(5 * len(modalities), 3.8))
    for ax, m in zip(axes, modalities, strict=True):
        for arm in arms:
            ax.plot(arm.eval_steps * arm.flops_per_step / 1e12, arm.eval_loss[m], "o-", markersize=3, label=arm.name)
        ax.set_title(f"held-out {m} loss")
        ax.set_xlabel("training TFLOPs")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[1].legend()
    figure.tight_layout()
    return figure


def write_untied_report(sweep: Path, out: Path | None = None) -> tuple[Path, str]:
    """OUT (default SWEEP/report)/untied.md and untied.png; returns the folder and the table."""
    arms = [read_arm(folder) for folder in ended_points(sweep)]
    out = out or sweep / "report"
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(comparison_rows(arms))
    (out / "untied.md").write_text(table)
    loss_plot(arms).savefig(out / "untied.png", dpi=100)
    return out, table
