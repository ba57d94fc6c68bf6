"""Shards that cannot be trained on silently: per-shard hashes, per-sample checksums checked on
every read, `fusion-data verify`, shards built before either, sources whose shards are gone."""

import io
import json
import logging
import subprocess
import sys
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from fusion_train.data.loader import DataConfig, SourceConfig, build_loader
from fusion_train.data.manifest import MANIFEST, DataError, Manifest, file_hash
from fusion_train.train.engine import SHM_COMM_OP, announce_op_builds
from helpers import SMALL_VOCAB as V
from helpers import numbered_documents, write_shards

FLIPPED_SHARD, FLIPPED_SAMPLE = "shard-000002.tar", 7


def loader_over(folder: Path, **settings):
    cfg = DataConfig(sources={"s": SourceConfig(str(folder))}, seq_len=256, num_workers=0, **settings)
    return build_loader(cfg)


def epoch_skips(folder: Path, **settings) -> dict:
    """Every sample read once (the stream's own epoch), and what was skipped."""
    loader = loader_over(folder, **settings)
    batches = iter(loader)
    next(batches)
    stream = loader.dataset.streams[0]
    while stream.epoch == 0:
        next(batches)
    return dict(stream.skipped)


def flip_one_token(shard: Path, sample: int) -> int:
    """XOR the low bit of a text id in the sample's tokens.npy, in place: still a valid id. Returns
    the sample's key."""
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".tokens.npy")][sample]
        array_bytes = tar.extractfile(member).read()
    header = len(array_bytes) - np.load(io.BytesIO(array_bytes)).nbytes
    offset = member.offset_data + header + 2 * 3  # the 4th id: random text in numbered_documents
    data = bytearray(shard.read_bytes())
    before = int.from_bytes(data[offset : offset + 2], "little")
    data[offset] ^= 1
    assert V.text_start <= (before ^ 1) < V.vocab_size
    shard.write_bytes(bytes(data))
    return member.name.split(".")[0]


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards", numbered_documents(200), per_shard=25)


def fusion_data(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "fusion-data"  # the installed console script, as a user runs it
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=120)


def test_the_manifest_hashes_every_shard_and_every_sample_carries_a_checksum(shards):
    manifest = Manifest.read(shards)
    assert manifest.sample_checksums == "crc32"
    assert all(s.content_hash == file_hash(shards / s.name) for s in manifest.shards)
    assert epoch_skips(shards) == {}


def test_a_flipped_byte_in_a_valid_token_is_a_counted_skip_and_verify_names_it(shards, caplog):
    key = flip_one_token(shards / FLIPPED_SHARD, FLIPPED_SAMPLE)
    with caplog.at_level(logging.WARNING):
        assert epoch_skips(shards) == {"checksum_mismatch": 1}
    assert f"checksum_mismatch), first in {FLIPPED_SHARD}" in caplog.text
    # Without verification the altered sample is trained on, as before this existed.
    assert epoch_skips(shards, verify_checksums=False) == {}

    result = fusion_data("verify", str(shards), "--workers", "2")
    assert result.returncode == 1, result.stderr
    assert f"{FLIPPED_SHARD}: hash mismatch" in result.stderr
    assert f"{FLIPPED_SHARD}: sample {FLIPPED_SAMPLE} (key {key}): checksum_mismatch" in result.stderr
    summary = json.loads(result.stdout)
    assert (summary["shards"], summary["shards_ok"], summary["bad_samples"]) == (8, 7, 1)


def test_verify_passes_a_clean_source_and_reports_missing_and_truncated_shards(shards):
    result = fusion_data("verify", str(shards))
    assert result.returncode == 0 and json.loads(result.stdout)["shards_ok"] == 8, result.stderr
    (shards / "shard-000003.tar").unlink()
    truncated = shards / "shard-000005.tar"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    result = fusion_data("verify", str(shards))
    assert result.returncode == 1
    assert "shard-000003.tar: missing" in result.stderr
    assert "shard-000005.tar: hash mismatch" in result.stderr and "readable samples, manifest says 25" in result.stderr


def test_shards_from_before_checksums_still_load_and_say_so_once(shards, caplog):
    record = json.loads((shards / MANIFEST).read_text())
    del record["sample_checksums"]
    for shard in record["shards"]:
        del shard["content_hash"]
    (shards / MANIFEST).write_text(json.dumps(record))
    flip_one_token(shards / FLIPPED_SHARD, FLIPPED_SAMPLE)
    with caplog.at_level(logging.WARNING):
        assert epoch_skips(shards) == {}  # unchecked: nothing to compare with
    assert caplog.text.count("built before samples carried checksums") == 1
    result = fusion_data("verify", str(shards))
    summary = json.loads(result.stdout)
    assert result.returncode == 0 and summary["shards_without_hash"] == 8 and summary["sample_checksums"] is None


def test_a_source_whose_shards_are_all_missing_is_an_error_at_start(shards, caplog):
    (shards / "shard-000000.tar").unlink()
    with caplog.at_level(logging.WARNING):
        loader_over(shards)
    assert "1 of 8 shards missing" in caplog.text
    for shard in shards.glob("*.tar"):
        shard.unlink()
    with pytest.raises(
        DataError, match="source s: none of the 8 shards its manifest lists is in .*were the shards moved"
    ):
        loader_over(shards)


def test_a_loader_epoch_reads_each_sample_once_with_verification(shards):
    """Verification reads the json member too; the data order and content are unchanged."""
    checked, unchecked = (
        [b["input_ids"] for b in islice(loader_over(shards, verify_checksums=v), 20)] for v in (True, False)
    )
    assert all((a == b).all() for a, b in zip(checked, unchecked, strict=True))


def test_the_first_launch_says_it_compiles_deepspeeds_cpu_op(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    with caplog.at_level(logging.WARNING):
        announce_op_builds()
    assert f"DeepSpeed compiles its CPU communication op {SHM_COMM_OP}" in caplog.text
    # Built by this environment's DeepSpeed: nothing to say.
    import deepspeed

    build = tmp_path / SHM_COMM_OP
    build.mkdir(exist_ok=True)  # the first call made it
    (build / f"{SHM_COMM_OP}.so").write_bytes(b"")
    (build / "build.ninja").write_text(f"build shm.o: compile {Path(deepspeed.__file__).parent}/csrc/shm.cpp\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        announce_op_builds()
    assert "compiles" not in caplog.text
