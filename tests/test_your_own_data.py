"""The README's "Your own data" commands, run as written, on a small generated set."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, read_metrics
from data_pipelines.synthetic import write_image_captions
from helpers import english_documents


def readme_walkthrough() -> str:
    section = (REPO / "README.md").read_text().split("## Your own data", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def write_raw_data(folder: Path) -> None:
    """What the README asks for: pairs.jsonl and held_out.jsonl with image paths relative to them,
    and text.jsonl."""
    for name, count, seed in [("pairs", 64, 0), ("held_out", 12, 1)]:
        captions = write_image_captions(folder / name, count, seed=seed)
        lines = [json.loads(line) for line in captions.read_text().splitlines()]
        with open(folder / f"{name}.jsonl", "w") as f:
            for line in lines:
                f.write(json.dumps({**line, "image": f"{name}/{line['image']}"}) + "\n")
    texts = english_documents() + [json.loads(line)["caption"] for line in (folder / "pairs.jsonl").open()]
    (folder / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_the_readme_walkthrough_trains_and_validates_on_your_own_data(tmp_path):
    write_raw_data(tmp_path / "my_data")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_walkthrough()],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "validation of held-out source pairs: one full pass, 12 samples" in result.stderr
    image_report = json.loads((tmp_path / "my_tok/vq/training_report.json").read_text())
    assert image_report["images"] == 64 and image_report["excluded"] == 0  # the held-out images are other files
    metrics = read_metrics(tmp_path / "runs/mine")
    evaluations = [m for m in metrics if "eval/loss" in m]
    assert [m["step"] for m in evaluations] == [20, 40]
    assert {"eval/pairs/loss", "eval/pairs/loss_image", "eval/pairs/loss_text", "eval/loss_image"} <= set(
        evaluations[0]
    )
    assert evaluations[1]["eval/pairs/loss"] < evaluations[0]["eval/pairs/loss"]
    assert (tmp_path / "runs/mine/report/held_out.png").is_file()
