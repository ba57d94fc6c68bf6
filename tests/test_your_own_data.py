"""Bringing your own data: the README's "Your own data" commands run as written on a small
generated set, config folders and sources of your own, and the tools' messages on bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from conftest import REPO, read_metrics
from data_pipelines.synthetic import write_image_captions
from fusion_train.commands.data import main as fusion_data
from fusion_train.commands.train import main as train_main
from fusion_train.data.loader import SourceConfig
from fusion_train.data.manifest import DataError
from fusion_train.train.config import ConfigError, load_config
from helpers import english_documents, write_jsonl


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


# --- configs of your own ----------------------------------------------------------------------


def test_sources_are_added_and_replaced_from_the_command_line():
    cfg = load_config(["+data.sources.extra.path=/shards/extra", "+data.sources.extra.weight=0.2"])
    assert list(cfg.data.sources) == ["text", "image_text", "interleaved", "audio_text", "extra"]
    assert cfg.data.sources["extra"] == SourceConfig("/shards/extra", 0.2)
    only = load_config(["~data", "+data.sources.only.path=/shards/only", "+eval_data.sources.held.path=/h"])
    assert list(only.data.sources) == ["only"] and list(only.eval_data.sources) == ["held"]
    with pytest.raises(DataError, match=r"data source 'extra' is \{'wieght': 2\}.*\+data.sources.extra.path=FOLDER"):
        load_config(["+data.sources.extra.wieght=2"])


def test_a_config_folder_of_your_own_adds_options_and_may_not_shadow_ours(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "my_mix.yaml").write_text("sources:\n  mine: {path: /shards/mine}\nseq_len: 512\n")
    cfg = load_config(["data=my_mix"], [tmp_path])
    assert list(cfg.data.sources) == ["mine"] and cfg.data.seq_len == 512
    (tmp_path / "data" / "demo.yaml").write_text("sources: {}\n")
    with pytest.raises(ConfigError, match="data/demo.yaml has the name of a fusion_train option"):
        load_config(["data=my_mix"], [tmp_path])


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["data.sources.new.path=/p"], ["Could not override 'data.sources.new.path'", "+data.sources.new.path=/p",
                                         "because: Key 'new' is not in struct"]),
        (["model=nonesuch"], ["Could not find 'model/nonesuch'", "Available options", "1b"]),
        (["--config-dir", "/no/such/folder", "data=mine"], ["--config-dir /no/such/folder: no such folder"]),
    ],
)  # fmt: skip
def test_fusion_train_errors_keep_the_underlying_cause(capsys, arguments, expected):
    assert train_main(arguments) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusion-train: error:") and "Traceback" not in err
    assert all(part in err for part in expected), err


# --- tokenizer tools ----------------------------------------------------------------------------


def fusion_data_error(capsys, arguments: list[str]) -> str:
    """The one error line of a failing `fusion-data` command (exit 2, no traceback)."""
    assert fusion_data(arguments) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_text_tokenizer_training_names_the_missing_field(capsys, tmp_path):
    corpus = tmp_path / "posts.jsonl"
    corpus.write_text('{"body": "one"}\n{"body": "two", "id": 2}\nnot json\n')
    line = fusion_data_error(
        capsys, ["train-text-tokenizer", "--input", str(corpus), "--output", str(tmp_path / "t.model")]
    )
    assert "none of the 3 records read from" in line and '"text" field' in line and "['body', 'id']" in line


def test_one_image_tokenizer_drives_the_layout_and_mismatches_name_the_flags(capsys, tmp_path):
    captions = write_image_captions(tmp_path / "shapes", 24, seed=2)
    records = [json.loads(line) for line in captions.read_text().splitlines()]
    held_out = tmp_path / "shapes" / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in records[:6]))
    with wds.TarWriter(str(tmp_path / "more.tar")) as writer:
        for i, record in enumerate(records[:4]):
            writer.write({"__key__": f"s{i}", "png": (captions.parent / record["image"]).read_bytes(), "txt": "x"})
    vq = tmp_path / "vq"
    assert fusion_data(["train-image-tokenizer", "--images", str(captions), str(tmp_path / "more.tar"), "--exclude",
                        str(held_out), "--output", str(vq), "--codebook-size", "64", "--steps", "2"]) == 0  # fmt: skip
    report = json.loads((vq / "training_report.json").read_text())
    assert (report["images"], report["excluded"]) == (24 + 4 - 6 - 4, 6 + 4)  # the tar repeats 4 held-out images

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in english_documents(40)])
    text = ["train-text-tokenizer", "--input", str(corpus), "--vocab-size", "2048", "--n-reserved", "513"]
    assert fusion_data([*text, "--image-tokenizer", str(vq / "vqgan.ckpt"), "--output", str(tmp_path / "t.model")]) == 0
    layout = json.loads((tmp_path / "t.layout.json").read_text())
    assert (layout["image_codebook_size"], layout["image_grid"]) == (64, 8)
    line = fusion_data_error(capsys, [*text, "--image-tokenizer", str(vq / "vqgan.ckpt"), "--image-grid", "4",
                                      "--output", str(tmp_path / "u.model")])  # fmt: skip
    assert "--image-grid 4 contradicts --image-tokenizer" in line and "image_grid is 8" in line
    line = fusion_data_error(capsys, [*text, "--output", str(tmp_path / "v.model")])
    assert "leaves no room for text" in line and "--vocab-size 2048" in line and "--image-codebook-size" in line

    # A text tokenizer laid out for other image codes: build-shards says how to make them agree.
    assert (
        fusion_data([*text, "--image-codebook-size", "32", "--image-grid", "4", "--output", str(tmp_path / "w.model")])
        == 0
    )
    line = fusion_data_error(capsys, ["build-shards", "--kind", "image-text", "--input", str(captions), "--output",
                                      str(tmp_path / "shards"), "--text-tokenizer", str(tmp_path / "w.model"),
                                      "--image-tokenizer", str(vq / "vqgan.ckpt")])  # fmt: skip
    assert "8x8 grid of 64 codes" in line and "trained for 4x4 of 32" in line
    assert f"train-text-tokenizer ... --image-tokenizer {vq / 'vqgan.ckpt'}" in line
    line = fusion_data_error(capsys, ["train-image-tokenizer", "--images", str(tmp_path / "nope"), "--output", str(vq)])
    assert "image input" in line and "nope not found" in line
