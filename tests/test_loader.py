"""The streaming loader: exact resume, exactly-once epochs, unsplit images, mixture weights, and
every kind of bad input."""

import dataclasses
import io
import json
import math
import subprocess
import sys
from itertools import islice

import numpy as np
import pytest
import torch
import webdataset as wds

from conftest import REPO
from fusion_train.data.loader import DataConfig, SourceConfig, build_loader
from fusion_train.data.manifest import DataError, Manifest, sample_checksum
from fusion_train.data.stream import SourceStream
from helpers import SMALL_VOCAB as V
from helpers import document_number, numbered_documents, write_shards

SEQ_LEN = 128


def config(sources, **overrides) -> DataConfig:
    settings = dict(seq_len=SEQ_LEN, micro_batch_size=2, num_workers=2, seed=5)
    return DataConfig(
        sources={n: SourceConfig(str(p), w) for n, (p, w) in sources.items()}, **{**settings, **overrides}
    )


def take(loader, count):
    return list(islice(iter(loader), count))


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    """600 documents, every 7th with an image, in 12 shards."""
    return write_shards(tmp_path_factory.mktemp("mixed"), numbered_documents(600, image_every=7))


def assert_images_whole(input_ids):
    for row in input_ids.reshape(-1, input_ids.shape[-1]).numpy():
        inside = np.zeros(len(row), dtype=bool)
        for start in np.flatnonzero(row == V.begin_of_image):
            end = start + V.image_block_length - 1
            assert end < len(row) and row[end] == V.end_of_image, "an image block was split"
            inside[start + 1 : end] = True
        is_code = (row >= V.image_code_start) & (row < V.image_code_end)
        assert (is_code == inside).all(), "image codes outside a whole block"


def document_starts(batch) -> list[tuple[int, int]]:
    """(position, document number) of each document that starts in the batch's first sequence."""
    ids = batch["input_ids"][0].numpy()
    return [(int(p), document_number(ids[p:])) for p in np.flatnonzero(ids == V.bos) if p + 3 <= len(ids)]


def test_resume_in_a_new_process_continues_exactly(mixed_shards, tmp_path):
    cfg = config({"mixed": (mixed_shards, 1.0)})
    for rank in range(2):
        uninterrupted = take(build_loader(cfg, rank, 2), 14)

        loader = build_loader(cfg, rank, 2)
        first = take(loader, 5)
        torch.save(loader.state_dict(), tmp_path / "state.pt")
        del loader
        cfg_json = json.dumps(dataclasses.asdict(cfg))
        subprocess.run(
            [sys.executable, REPO / "tests/scripts/loader_resume.py", "--config", cfg_json, "--rank", str(rank),
             "--world-size", "2", "--state", tmp_path / "state.pt", "--batches", "9", "--out", tmp_path / "rest.pt"],
            check=True, cwd=REPO,
        )  # fmt: skip
        resumed = first + torch.load(tmp_path / "rest.pt", weights_only=True)
        for expected, got in zip(uninterrupted, resumed, strict=True):
            for key in ("input_ids", "labels", "doc_ids", "documents_per_source"):
                assert torch.equal(expected[key], got[key]), key
    assert_images_whole(torch.stack([b["input_ids"] for b in uninterrupted]))


@pytest.mark.parametrize("block", [2**18, 64])  # the whole source, and blocks that cut across shards
def test_an_epoch_over_2_ranks_x_2_workers_sees_every_sample_exactly_once(mixed_shards, block):
    """Batches alternate between a rank's 2 workers; each reader's sequences are unpacked back into
    documents, and the readers' first epochs together must be the 600 documents, once each."""
    cfg = config({"mixed": (mixed_shards, 1.0)}, micro_batch_size=1, shuffle_block_size=block)
    total, readers = 600, 4
    seen = []
    for rank in range(2):
        batches = take(build_loader(cfg, rank, 2), 2 * 150)
        for worker in range(2):
            reader = rank * 2 + worker
            stream = torch.cat([b["input_ids"][0][b["doc_ids"][0] >= 0] for b in batches[worker::2]]).numpy()
            starts = np.flatnonzero(stream == V.bos)
            documents = [stream[s:e] for s, e in zip(starts, [*starts[1:], len(stream)], strict=True)]
            per_epoch = len(range(reader, total, readers))
            assert len(documents) > per_epoch, "run longer: the reader has not finished its epoch"
            seen += [document_number(d) for d in documents[:per_epoch]]
            assert_images_whole(torch.stack([b["input_ids"] for b in batches]))
    assert sorted(seen) == list(range(total))


def test_labels_mask_padding_prompts_and_document_starts(tmp_path):
    documents = numbered_documents(40, image_every=3)
    documents[0].loss_mask = np.ones(len(documents[0].tokens), np.uint8)
    documents[0].loss_mask[:5] = 0
    folder = write_shards(tmp_path / "s", documents)
    batches = take(build_loader(config({"s": (folder, 1.0)}, num_workers=0, micro_batch_size=1)), 30)
    for batch in batches:
        ids, labels, doc_ids = batch["input_ids"][0], batch["labels"][0], batch["doc_ids"][0]
        padding = doc_ids < 0
        assert (ids[padding] == V.pad).all() and (labels[padding] == -100).all()
        assert (labels[ids == V.bos] == -100).all()
        kept = (labels != -100) & ~padding
        assert torch.equal(labels[kept], ids[kept])
    # Document 0, whose first 5 ids have loss mask 0, wherever the seeded order put it.
    batch, start = next((b, p) for b in batches for p, n in document_starts(b) if n == 0 and p + 10 < SEQ_LEN)
    labels = batch["labels"][0]
    assert (labels[start : start + 5] == -100).all() and (labels[start + 5 : start + 10] != -100).all()
    assert any((b["doc_ids"][0] < 0).any() for b in batches), "expected padding before an image that did not fit"


def test_mixture_proportions_within_2_percent(tmp_path):
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    sources = {
        n: (write_shards(tmp_path / n, numbered_documents(300, seed=i)), w) for i, (n, w) in enumerate(weights.items())
    }
    loader = build_loader(config(sources, seq_len=512, num_workers=0, micro_batch_size=8))
    counts = torch.zeros(3, dtype=torch.long)
    for batch in loader:
        counts += batch["documents_per_source"].sum(0)
        if counts.sum() >= 12_000:
            break
    observed = (counts / counts.sum()).tolist()
    assert observed == pytest.approx(list(weights.values()), abs=0.02)


def test_stage_two_reweighting(tmp_path):
    sources = {n: (write_shards(tmp_path / n, numbered_documents(200, seed=i)), 1.0) for i, n in enumerate("ab")}
    cfg = config(sources, seq_len=512, num_workers=0, micro_batch_size=8, reweight={"a": 0.5})
    counts = torch.zeros(2, dtype=torch.long)
    for batch in islice(build_loader(cfg), 120):
        counts += batch["documents_per_source"].sum(0)
    assert (counts[0] / counts.sum()).item() == pytest.approx(1 / 3, abs=0.03)
    with pytest.raises(DataError, match="reweight names sources"):
        build_loader(dataclasses.replace(cfg, reweight={"z": 0.5}))


def test_another_seed_or_a_split_without_every_rank_is_refused_unless_asked(mixed_shards, caplog):
    cfg = config({"mixed": (mixed_shards, 1.0)}, num_workers=0)
    loader = build_loader(cfg, 0, 2)
    take(loader, 3)
    state = loader.state_dict()
    with pytest.raises(
        DataError, match=r"world_size.*every old rank's position \(every_rank\), or set data.restart_data_order"
    ):
        build_loader(cfg, 0, 1).load_state_dict(state)
    with pytest.raises(DataError, match="resume with the same seed, sources and shuffle block"):
        build_loader(dataclasses.replace(cfg, seed=6), 0, 1).load_state_dict(state, every_rank=lambda: [state])
    restarted = build_loader(dataclasses.replace(cfg, restart_data_order=True), 0, 1)
    restarted.load_state_dict(state)
    assert "data order restarted" in caplog.text
    assert torch.equal(take(restarted, 1)[0]["input_ids"], take(build_loader(cfg, 0, 1), 1)[0]["input_ids"])


def test_wrong_tokenizer_fingerprint_is_refused(tmp_path):
    a = write_shards(tmp_path / "a", numbered_documents(20), fingerprints={"text": "aaaa", "image": None})
    b = write_shards(tmp_path / "b", numbered_documents(20), fingerprints={"text": "bbbb", "image": None})
    with pytest.raises(DataError, match="source b .* built with text tokenizer bbbb, but this run uses aaaa"):
        build_loader(config({"a": (a, 1.0), "b": (b, 1.0)}))
    with pytest.raises(DataError, match="source a .* built with text tokenizer aaaa, but this run uses cccc"):
        build_loader(config({"a": (a, 1.0)}), expected_fingerprints={"text": "cccc"})
    # An audio tokenizer (as an image one) must be the same in every source that used one.
    c = write_shards(tmp_path / "c", numbered_documents(20), fingerprints={"text": "aaaa", "audio": "1111-2"})
    d = write_shards(tmp_path / "d", numbered_documents(20), fingerprints={"text": "aaaa", "audio": "2222-2"})
    build_loader(config({"a": (a, 1.0), "c": (c, 1.0)}))  # text shards used none
    with pytest.raises(DataError, match="source d .* built with audio tokenizer 2222-2, but this run uses 1111-2"):
        build_loader(config({"c": (c, 1.0), "d": (d, 1.0)}))


def checksummed_sample(key: str, tokens: np.ndarray | bytes) -> dict:
    """A sample whose checksum matches what it holds, however bad that is."""
    if isinstance(tokens, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, tokens)
        tokens = buffer.getvalue()
    return {"__key__": key, "tokens.npy": tokens, "json": {"crc32": sample_checksum(tokens)}}


def test_bad_shards_and_samples_are_skipped_and_counted(tmp_path):
    folder = write_shards(tmp_path / "bad", numbered_documents(100), per_shard=25)
    # A truncated shard, and a shard holding a corrupt npy, out-of-vocabulary ids and an empty document.
    shard0 = folder / "shard-000000.tar"
    shard0.write_bytes(shard0.read_bytes()[: shard0.stat().st_size // 2])
    manifest = Manifest.read(folder)
    with wds.TarWriter(str(folder / "shard-000001.tar"), mtime=0) as writer:
        writer.write(checksummed_sample("a", b"not an npy file"))
        writer.write(checksummed_sample("b", np.array([V.bos, V.vocab_size + 5, V.eos], dtype=np.uint16)))
        writer.write(checksummed_sample("c", np.array([], dtype=np.uint16)))
        for document in numbered_documents(22, seed=9):
            writer.write(checksummed_sample(f"d{document_number(document.tokens)}", document.tokens.astype(np.uint16)))

    loader = build_loader(config({"bad": (folder, 1.0)}, num_workers=0, micro_batch_size=4))
    skipped = sum(int(b["skipped_samples"].sum()) for b in islice(loader, 60))
    reasons = loader.dataset.streams[0].skipped
    assert reasons["corrupt_sample"] >= 1 and reasons["out_of_vocab"] >= 1 and reasons["empty_document"] >= 1
    assert reasons["corrupt_shard"] >= 1
    assert skipped == sum(reasons.values())
    assert manifest.samples == 100


def test_a_missing_manifest_and_a_too_short_sequence_are_clear_errors(mixed_shards, tmp_path):
    with pytest.raises(DataError, match="manifest.json not found"):
        build_loader(config({"x": (tmp_path, 1.0)}))
    with pytest.raises(ValueError, match="cannot hold one image block"):
        build_loader(config({"m": (mixed_shards, 1.0)}, seq_len=V.image_block_length - 1))


def test_mixture_in_tokens(tmp_path):
    """Weights per token: a source of documents twice as long gets half as many documents."""
    short = write_shards(tmp_path / "short", numbered_documents(300, seed=1))
    long_documents = numbered_documents(300, seed=2)
    for document in long_documents:
        document.tokens = np.concatenate([document.tokens[:-1], document.tokens[3:]])
    long = write_shards(tmp_path / "long", long_documents)
    cfg = config(
        {"short": (short, 1.0), "long": (long, 1.0)},
        seq_len=512,
        num_workers=0,
        micro_batch_size=8,
        mixture_unit="tokens",
    )
    mean_length = torch.tensor([sum(s.tokens for s in Manifest.read(f).shards) / 300 for f in (short, long)])
    tokens = torch.zeros(2)
    for batch in islice(build_loader(cfg), 150):
        tokens += batch["documents_per_source"].sum(0) * mean_length
    assert (tokens / tokens.sum()).tolist() == pytest.approx([0.5, 0.5], abs=0.03)


def test_long_documents_upweighted_for_a_long_context_stage(mixed_shards):
    """data.long_document_weight=4: documents of at least long_document_tokens (here the longer
    half) are 4 times as likely as shorter ones to be trained on, their share rising from about 1/2
    to about 4/5."""
    lengths = {document_number(d.tokens): len(d.tokens) for d in numbered_documents(600, image_every=7)}
    threshold = int(np.median(list(lengths.values())))

    def long_share(**overrides) -> float:
        cfg = config({"text": (mixed_shards, 1.0)}, num_workers=0, micro_batch_size=1, **overrides)
        batches = take(build_loader(cfg), 121)
        return np.mean([lengths[n] >= threshold for n in documents_started(batches[:-1], batches[-1:])])

    plain, weighted = long_share(), long_share(long_document_tokens=threshold, long_document_weight=4.0)
    assert plain == pytest.approx(0.5, abs=0.08) and weighted == pytest.approx(0.8, abs=0.08), (plain, weighted)


def test_block_shuffle_mixes_shards_of_sorted_input(mixed_shards):
    """The 600 documents were written in order, 50 to a shard: a shard is a "domain". Eight readers
    read 4 documents each per global batch. A block of 200 samples spans 4 shards, and a global
    batch of 32 consecutive positions drawn from it misses one of them with probability
    C(150, 32) / C(200, 32): the threshold follows from that. Blocks of one shard's size (the order
    before blocks existed) give one or two domains per batch."""
    manifest = Manifest.read(mixed_shards)
    readers, per_reader, batches = 8, 4, 18

    def domains_per_batch(block: int) -> list[int]:
        streams = [
            SourceStream("s", mixed_shards, manifest, r, readers, seed=1, shuffle_block=block) for r in range(readers)
        ]
        return [
            len({document_number(stream.next_document().tokens) // 50 for stream in streams for _ in range(per_reader)})
            for _ in range(batches)
        ]

    window_domains, batch = 200 // 50, readers * per_reader
    expected = window_domains * (1 - math.comb(150, batch) / math.comb(200, batch))
    mixed = domains_per_batch(200)
    assert np.mean(mixed) >= expected - 0.25 and min(mixed) >= round(expected) - 1, mixed
    assert max(domains_per_batch(50)) <= 2


def documents_started(batches, lookahead=()) -> list[int]:
    """Numbers of the documents that start in the batches' sequences, in reading order; the
    batches after them (lookahead) complete the number of one cut right after its start."""
    read = torch.cat([b["input_ids"][0] for b in batches]).numpy()
    stream = np.concatenate([read, *[b["input_ids"][0].numpy() for b in lookahead]])
    return [document_number(stream[p:]) for p in np.flatnonzero(read == V.bos)]


def read_then_save(loader, count: int, workers: int = 1) -> tuple[list[int], dict]:
    """The documents started in `count` batches (alternating over the workers), and the position
    saved right after them."""
    batches = iter(loader)
    taken = list(islice(batches, count))
    state = loader.state_dict()
    lookahead = list(islice(batches, workers))
    read = [d for w in range(workers) for d in documents_started(taken[w::workers], lookahead[w : w + 1])]
    return read, state


def test_an_epoch_continues_on_any_split_and_reads_every_document_once(mixed_shards):
    """2 ranks x 1 worker read part of the epoch, 1 rank x 2 workers go on from their positions,
    then 3 ranks x 1 worker finish it: the 600 documents, each once (a document whose sequence was
    cut by a change counts as read)."""
    cfg = config({"mixed": (mixed_shards, 1.0)}, micro_batch_size=1, num_workers=0)
    read, first = [], []
    for rank in range(2):
        documents, state = read_then_save(build_loader(cfg, rank, 2), 40)
        read, first = read + documents, first + [state]

    two_workers = build_loader(dataclasses.replace(cfg, num_workers=2), 0, 1)
    two_workers.load_state_dict(first[0], every_rank=lambda: first)
    documents, second = read_then_save(two_workers, 40, workers=2)
    read += documents
    assert len(read) < 600, "the first two splits must leave part of the epoch"

    for rank in range(3):
        loader = build_loader(cfg, rank, 3)
        loader.load_state_dict(second, every_rank=lambda: [second])
        layer = loader.dataset._continued["mixed"]["layers"]["0"]
        share = len(range(rank, len(layer["holes"]) + 600 - layer["base"], 3))
        documents = documents_started(take(loader, share))
        assert len(documents) >= share
        read += documents[:share]
    assert sorted(read) == list(range(600))


def test_the_shard_index_reads_headers_as_tarfile_does(mixed_shards, tmp_path):
    """The 512-byte header walk gives tarfile's members; a tar with a pax header (a long name)
    goes through tarfile; a file of garbage has no samples; arrays parse as np.load parses them."""
    import tarfile

    from fusion_train.data.shards import ShardReader, npy_array

    shard = mixed_shards / Manifest.read(mixed_shards).shards[0].name
    reader = ShardReader(shard, V)
    with tarfile.open(shard) as tar:
        expected = {m.name: [m.offset_data, m.size] for m in tar if m.isfile()}
    extents = reader.index.extents
    indexed = {f"{reader.key(i)}.{member}": extents[i, j].tolist() for i in range(len(reader))
               for j, member in enumerate(ShardReader.MEMBERS) if extents[i, j, 0] >= 0}  # fmt: skip
    assert indexed == expected and len(reader) == 50
    again = ShardReader(shard, V, index=reader.index)  # opened again without reading the headers
    assert all(np.array_equal(again.read(i).tokens, reader.read(i).tokens) for i in range(50))

    long_key = "k" * 120
    with wds.TarWriter(str(tmp_path / "pax.tar")) as writer:
        tokens = np.array([V.bos, V.text_start, V.text_start, V.eos], dtype=np.uint16)
        writer.write({"__key__": long_key, "tokens.npy": tokens})
    pax = ShardReader(tmp_path / "pax.tar", V, verify_checksums=False)
    assert [pax.key(0)] == [long_key] and pax.read(0).tokens.tolist() == tokens.tolist()
    (tmp_path / "garbage.tar").write_bytes(b"not a tar file " * 100)
    assert len(ShardReader(tmp_path / "garbage.tar", V)) == 0  # a damaged header ends the index, not the run
    for array in (np.arange(7, dtype=np.uint16), np.ones(3, dtype=np.uint8), np.zeros((2, 2), np.int32)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        assert np.array_equal(npy_array(buffer.getvalue()), array)


def test_a_block_of_more_shards_than_stay_open_reads_each_shards_headers_once(mixed_shards, monkeypatch):
    """A block spans 12 shards and a reader keeps 3 open: each shard's index is read once, and a
    shard opened again reads only its samples (the same documents as a reader that reads no index twice)."""
    from fusion_train.data import stream as stream_module
    from fusion_train.data.shards import ShardReader

    scans = []
    scan = ShardReader._scan
    monkeypatch.setattr(ShardReader, "_scan", lambda self: scans.append(self.path.name) or scan(self))
    manifest = Manifest.read(mixed_shards)
    expected = SourceStream("s", mixed_shards, manifest, 0, 1, seed=3, shuffle_block=600)
    expected = [expected.next_document().tokens.tolist() for _ in range(1200)]
    scans.clear()
    monkeypatch.setattr(stream_module, "MAX_OPEN", 3)
    few_open = SourceStream("s", mixed_shards, manifest, 0, 1, seed=3, shuffle_block=600)
    assert [few_open.next_document().tokens.tolist() for _ in range(1200)] == expected  # two epochs
    assert sorted(scans) == sorted(shard.name for shard in manifest.shards)
