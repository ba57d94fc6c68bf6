"""A shard build split into parts: each part resumable after a kill -9, the merged parts equal to
the one-process build document for document, and merge errors that say what to do."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from data_pipelines.build import BuildSettings, build_shards
from data_pipelines.parts import PartProgress, merge_manifests
from fusion_train.commands.data import main as fusion_data
from fusion_train.data.manifest import DataError
from helpers import shard_documents as documents

PER_SHARD = 20


def build(text_tokenizer, inputs, out, seed=0, **options):
    settings = BuildSettings("text", str(text_tokenizer.path), seed=seed)
    return build_shards(settings, inputs, out, workers=0, max_samples_per_shard=PER_SHARD, **options)


def progress_files(folder):
    return sorted(folder.glob("part-*-of-*.json"))


def build_command(text_tokenizer, inputs, out, part, parts) -> list[str]:
    return [
        sys.executable, "-m", "fusion_train.commands.data", "build-shards", "--kind", "text", "--input", *map(str, inputs),
        "--output", str(out), "--text-tokenizer", str(text_tokenizer.path), "--workers", "1",
        "--max-samples-per-shard", str(PER_SHARD), "--part", str(part), "--parts", str(parts),
    ]  # fmt: skip


def kill_mid_shard(command: list[str], out) -> None:
    """Start the build paused in its third shard, after two complete ones, and SIGKILL it there."""
    env = {**os.environ, "FUSION_DATA_PAUSE_AFTER_SAMPLES": str(2 * PER_SHARD + 5)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = out / "part-00001-of-00002.json"
    deadline = time.time() + 120
    while not (
        list(out.glob("*.partial"))
        and progress.is_file()
        and len(json.loads(progress.read_text())["manifest"]["shards"]) == 2
    ):
        assert process.poll() is None and time.time() < deadline, process.stderr.read().decode()[-3000:]
        time.sleep(0.2)
    time.sleep(0.5)  # the paused shard is half-written
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_parts_built_apart_one_killed_mid_shard_merge_into_the_one_process_build(text_tokenizer, paragraphs, tmp_path):
    whole = build(text_tokenizer, paragraphs, tmp_path / "whole")
    out = tmp_path / "parts"
    build(text_tokenizer, paragraphs, out, part=0, parts=2)
    command = build_command(text_tokenizer, paragraphs, out, 1, 2)
    kill_mid_shard(command, out)
    assert len(list(out.glob("part-00001-shard-*.tar"))) == 2 and list(out.glob("part-00001-*.partial"))
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "part 1 of 2: resuming at record" in rerun.stderr and "2 complete shards kept" in rerun.stderr
    assert not list(out.glob("*.partial"))

    merged = merge_manifests(out)
    assert documents(out) == documents(tmp_path / "whole")
    assert merged.samples == whole.samples and merged.skipped == whole.skipped == {"missing_text": 1}
    assert merged.tokens_by_modality == whole.tokens_by_modality
    assert fusion_data(["verify", str(out)]) == 0


def test_with_fewer_files_than_parts_every_part_takes_chunks_of_each_file(text_tokenizer, paragraphs, tmp_path):
    one_file = paragraphs[1:]
    whole = build(text_tokenizer, one_file, tmp_path / "whole")
    for part in range(3):
        build(text_tokenizer, one_file, tmp_path / "parts", part=part, parts=3)
    merged = merge_manifests(tmp_path / "parts")
    assert documents(tmp_path / "parts") == documents(tmp_path / "whole")
    per_part = [
        sum(s.samples for s in PartProgress.read(p).manifest.shards) for p in progress_files(tmp_path / "parts")
    ]
    assert merged.samples == whole.samples == sum(per_part) and min(per_part) >= 64


def test_with_as_many_files_as_parts_a_part_reads_only_its_own(text_tokenizer, paragraphs, tmp_path):
    unreadable = tmp_path / "not_a.tar"
    unreadable.write_bytes(b"no tar header here " * 100)
    inputs = [paragraphs[0], unreadable]
    part = build(text_tokenizer, inputs, tmp_path / "parts", part=0, parts=2)
    assert part.samples == 350 and part.skipped == {"missing_text": 1}
    with pytest.raises(DataError, match=f"input {unreadable} cannot be read"):
        build(text_tokenizer, inputs, tmp_path / "parts", part=1, parts=2)


def test_merging_refuses_missing_unfinished_foreign_and_mixed_parts(text_tokenizer, paragraphs, tmp_path):
    out = tmp_path / "parts"
    build(text_tokenizer, paragraphs, out, part=0, parts=2)
    with pytest.raises(DataError, match=r"parts \[1\] of 2 are missing: build them with --part I --parts 2"):
        merge_manifests(out)
    build(text_tokenizer, paragraphs, out, seed=1, part=1, parts=2)
    with pytest.raises(DataError, match="part 1 was built with other seed than part 0"):
        merge_manifests(out)
    build(text_tokenizer, paragraphs, out, part=1, parts=2, overwrite=True)
    build(text_tokenizer, paragraphs, out, part=2, parts=3)
    with pytest.raises(DataError, match=r"parts of different splits \(into \[2, 3\] parts\)"):
        merge_manifests(out)
    (out / "part-00002-of-00003.json").unlink()
    progress = json.loads((out / "part-00001-of-00002.json").read_text())
    (out / "part-00001-of-00002.json").write_text(json.dumps({**progress, "complete": False}))
    with pytest.raises(DataError, match=r"parts \[1\] are unfinished: run them again"):
        merge_manifests(out)
    with pytest.raises(DataError, match="part 1 of 2 was started with other seed: pass --overwrite"):
        build(text_tokenizer, paragraphs, out, seed=5, part=1, parts=2)
    with pytest.raises(DataError, match="--part 2 --parts 2: parts are numbered 0 to parts - 1"):
        build(text_tokenizer, paragraphs, out, part=2, parts=2)
