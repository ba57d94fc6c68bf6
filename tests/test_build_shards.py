"""`fusion-data build-shards` for each kind: real images and tokenizers, bad records counted,
deterministic output whatever the number of workers."""

import dataclasses
import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import small_file_system
from data_pipelines.build import BuildSettings, build_shards
from data_pipelines.parts import merge_manifests
from data_pipelines.synthetic import write_image_captions
from fusion_train.commands.data import main as fusion_data
from fusion_train.data.loader import DataConfig, SourceConfig, build_loader
from fusion_train.data.manifest import DataError, Manifest
from helpers import SMALL_VOCAB as V
from helpers import english_documents, shard_documents, write_jsonl


def samples(folder):
    """(tokens, mask or None) of every sample, in shard order."""
    found = []
    for shard in Manifest.read(folder).shards:
        for sample in wds.WebDataset(str(folder / shard.name), shardshuffle=False).decode():
            found.append((sample["tokens.npy"].astype(np.int64), sample.get("mask.npy")))
    return found


def image_blocks(tokens):
    return int((tokens == V.begin_of_image).sum())


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    captions = write_image_captions(folder, 40, seed=3)
    records = [json.loads(line) for line in captions.read_text().splitlines()]
    return folder, [{**r, "image": str(folder / r["image"])} for r in records]  # usable from any jsonl


def settings(kind, text_tokenizer, image_tokenizer_path=None, seed=0):
    return BuildSettings(
        kind, str(text_tokenizer.path), str(image_tokenizer_path) if image_tokenizer_path else None, seed
    )


def test_text_shards_with_bad_records_counted(text_tokenizer, tmp_path):
    docs = english_documents(30)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in docs] + [{"text": "  "}, {"title": "x"}, [1, 2]])
    with open(path, "ab") as f:
        f.write(b"{not json\n" + b'{"text": "\xff\xfe"}\n')
    manifest = build_shards(settings("text", text_tokenizer), [path], tmp_path / "out", max_samples_per_shard=8)
    assert manifest.skipped == {"empty_text": 1, "invalid_json": 2, "invalid_utf8": 1, "missing_text": 1}
    assert manifest.samples == 30 and len(manifest.shards) == 4
    assert manifest.fingerprints == {"text": text_tokenizer.fingerprint, "image": None, "audio": None}
    built = samples(tmp_path / "out")
    assert [text_tokenizer.decode([t[1:-1].tolist()])[0] for t, _ in built] == docs
    assert manifest.tokens_by_modality["special"] == 60 and manifest.tokens_by_modality["image"] == 0


def test_image_text_from_jsonl_with_bad_records(text_tokenizer, image_tokenizer_path, shapes, tmp_path):
    folder, records = shapes
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad = [{"image": str(tmp_path / "gone.png"), "caption": "x"}, {"image": str(tmp_path / "broken.png"), "caption": "y"},
           {"image": records[0]["image"], "caption": ""}]  # fmt: skip
    path = write_jsonl(tmp_path / "pairs.jsonl", records + bad)
    manifest = build_shards(
        settings("image-text", text_tokenizer, image_tokenizer_path, seed=11), [path], tmp_path / "out"
    )
    assert manifest.skipped == {"empty_text": 1, "missing_image_file": 1, "undecodable_image": 1}
    built = samples(tmp_path / "out")
    assert len(built) == 40 and all(image_blocks(t) == 1 for t, _ in built)
    image_first = [t[1] == V.begin_of_image for t, _ in built]
    assert 0 < sum(image_first) < 40
    assert manifest.tokens_by_modality["image"] == 40 * V.image_tokens


def test_image_text_from_img2dataset_tars(text_tokenizer, image_tokenizer_path, shapes, tmp_path):
    """As img2dataset writes them: KEY.jpg/.png/.webp, KEY.txt, KEY.json; several tars per build and
    per part of a build."""
    _, records = shapes
    tars = [tmp_path / f"{number:05d}.tar" for number in range(4)]
    for number, part in enumerate([records[:3], records[3:6], records[6:8], records[8:10]]):
        with wds.TarWriter(str(tars[number])) as writer:
            for i, record in enumerate(part):
                image = Image.open(record["image"]).convert("RGB")
                encoded = io.BytesIO()
                extension = ["jpg", "png", "webp"][i % 3]
                image.save(encoded, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[extension])
                metadata = {
                    "url": f"https://example.com/{i}.{extension}",
                    "caption": record["caption"],
                    "status": "success",
                }
                writer.write({"__key__": f"{number:05d}{i:04d}", extension: encoded.getvalue(), "txt": record["caption"],
                              "json": metadata})  # fmt: skip
            if number == 0:
                writer.write({"__key__": "0000nocaption", "png": open(records[0]["image"], "rb").read(), "json": {}})
                writer.write({"__key__": "0000corrupt", "jpg": b"\xff\xd8 not really a jpeg", "txt": "a caption"})
    build = settings("image-text", text_tokenizer, image_tokenizer_path)
    manifest = build_shards(build, tars, tmp_path / "out")
    assert manifest.samples == 10 and manifest.skipped == {"missing_caption": 1, "undecodable_image": 1}
    for part in range(2):  # tars 0 and 2, then 1 and 3
        build_shards(build, tars, tmp_path / "parts", part=part, parts=2)
    merged = merge_manifests(tmp_path / "parts")
    assert merged.skipped == manifest.skipped and shard_documents(tmp_path / "parts") == shard_documents(
        tmp_path / "out"
    )


def test_interleaved_keeps_order(text_tokenizer, image_tokenizer_path, shapes, tmp_path):
    _, records = shapes
    doc = {
        "segments": [
            {"text": "First"},
            {"image": records[0]["image"]},
            {"text": "then"},
            {"image": records[1]["image"]},
        ]
    }
    path = write_jsonl(tmp_path / "docs.jsonl", [doc, {"segments": []}, {"segments": [{"hologram": "x"}]}])
    manifest = build_shards(settings("interleaved", text_tokenizer, image_tokenizer_path), [path], tmp_path / "out")
    assert manifest.skipped == {"bad_segment": 1, "empty_document": 1}
    ((tokens, _),) = samples(tmp_path / "out")
    first, then = text_tokenizer.encode(["First", "then"])
    assert tokens[1 : 1 + len(first)].tolist() == first
    assert tokens[1 + len(first)] == V.begin_of_image
    after_image = 1 + len(first) + V.image_block_length
    assert tokens[after_image : after_image + len(then)].tolist() == then
    assert image_blocks(tokens) == 2


def test_sft_chats_mask_the_prompts(text_tokenizer, image_tokenizer_path, shapes, tmp_path):
    _, records = shapes
    chat = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image", "image": records[2]["image"]}]},
        {"role": "assistant", "content": "A shape."},
        {"role": "user", "content": "Draw one."},
        {"role": "assistant", "content": [{"type": "image", "image": records[3]["image"]}]},
    ]}  # fmt: skip
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            chat,
            {"messages": [{"role": "assistant", "content": "hi"}]},
            {"messages": [{"role": "robot", "content": "x"}]},
        ],
    )
    manifest = build_shards(settings("sft", text_tokenizer, image_tokenizer_path), [path], tmp_path / "out")
    assert manifest.skipped == {"unknown_role": 1, "answer_without_prompt": 1}
    ((tokens, mask),) = samples(tmp_path / "out")
    separators = np.flatnonzero(tokens == V.sft_separator)
    assert len(separators) == 2 and mask is not None
    assert mask[: separators[0] + 1].sum() == 0  # system + first prompt and its separator
    answer = text_tokenizer.encode(["A shape."])[0]
    assert tokens[separators[0] + 1 : separators[0] + 1 + len(answer)].tolist() == answer
    assert mask[separators[0] + 1 : separators[0] + 2 + len(answer)].all()  # the answer and its </s>
    assert mask[separators[1] + 1 :].all() and image_blocks(tokens[separators[1] :]) == 1


def test_output_does_not_depend_on_the_number_of_workers(text_tokenizer, image_tokenizer_path, shapes, tmp_path):
    folder, records = shapes
    path = write_jsonl(tmp_path / "pairs.jsonl", records * 4)  # several chunks of records
    build = settings("image-text", text_tokenizer, image_tokenizer_path, seed=2)
    build_shards(build, [path], tmp_path / "serial", workers=0, max_samples_per_shard=50)
    assert fusion_data(["build-shards", "--kind", "image-text", "--input", str(path), "--output", str(tmp_path / "parallel"),
                        "--text-tokenizer", build.text_tokenizer, "--image-tokenizer", build.image_tokenizer, "--seed", "2",
                        "--workers", "2", "--max-samples-per-shard", "50"]) == 0  # fmt: skip
    serial, parallel = Manifest.read(tmp_path / "serial"), Manifest.read(tmp_path / "parallel")
    assert (
        [s.name for s in serial.shards]
        == [s.name for s in parallel.shards]
        == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]
    )
    for shard in serial.shards:
        assert (tmp_path / "serial" / shard.name).read_bytes() == (tmp_path / "parallel" / shard.name).read_bytes()


@pytest.mark.parametrize("kind", ["image-text", "interleaved", "sft"])
def test_images_encoded_in_the_main_process_give_the_same_shards(
    kind, text_tokenizer, image_tokenizer_path, shapes, tmp_path
):
    """--encode-in main (the GPU layout: workers decode, one process encodes batches gathered over
    chunks) writes the same bytes as encoding in each worker, on the CPU in fp32."""
    _, records = shapes
    rows = {
        "image-text": records,
        "interleaved": [{"segments": [{"text": r["caption"]}, {"image": r["image"]}]} for r in records]
        + [{"segments": [{"text": "no image here"}]}],
        "sft": [{"messages": [{"role": "user", "content": [{"type": "image", "image": r["image"]}]},
                              {"role": "assistant", "content": r["caption"]}]} for r in records],
    }[kind] * 5  # fmt: skip
    path = write_jsonl(tmp_path / "in.jsonl", rows + [{"segments": 3}, {"caption": "no image"}])
    built = {}
    for encode_in in ("workers", "main"):
        build = dataclasses.replace(settings(kind, text_tokenizer, image_tokenizer_path), encode_in=encode_in)
        built[encode_in] = build_shards(build, [path], tmp_path / encode_in, workers=2, max_samples_per_shard=60)
    assert built["main"].samples == built["workers"].samples and built["main"].skipped == built["workers"].skipped
    for shard in built["workers"].shards:
        assert (tmp_path / "main" / shard.name).read_bytes() == (tmp_path / "workers" / shard.name).read_bytes()


def test_built_shards_feed_the_loader(text_tokenizer, image_tokenizer_path, shapes, tmp_path):
    _, records = shapes
    build_shards(
        settings("image-text", text_tokenizer, image_tokenizer_path),
        [write_jsonl(tmp_path / "p.jsonl", records)],
        tmp_path / "pairs",
    )
    cfg = DataConfig(
        sources={"pairs": SourceConfig(str(tmp_path / "pairs"))}, seq_len=64, micro_batch_size=2, num_workers=0
    )
    loader = build_loader(cfg, expected_fingerprints={"text": text_tokenizer.fingerprint})
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 64) and (batch["input_ids"] == V.begin_of_image).any()


def test_clear_errors(text_tokenizer, image_tokenizer_path, tmp_path):
    with pytest.raises(DataError, match="missing.jsonl not found"):
        build_shards(settings("text", text_tokenizer), [tmp_path / "missing.jsonl"], tmp_path / "out")
    good = write_jsonl(tmp_path / "ok.jsonl", [{"text": "hello"}])
    build_shards(settings("text", text_tokenizer), [good], tmp_path / "out")
    with pytest.raises(DataError, match="already holds shards"):
        build_shards(settings("text", text_tokenizer), [good], tmp_path / "out")
    build_shards(settings("text", text_tokenizer), [good], tmp_path / "out", overwrite=True)
    (tmp_path / "bad.tar").write_bytes(b"\x00" * 100 + b"garbage")
    with pytest.raises(DataError, match="bad.tar cannot be read"):
        build_shards(
            settings("image-text", text_tokenizer, image_tokenizer_path), [tmp_path / "bad.tar"], tmp_path / "o2"
        )
    assert fusion_data(["build-shards", "--kind", "text", "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o3"),
                        "--text-tokenizer", str(text_tokenizer.path)]) == 2  # fmt: skip


def test_tokenizer_training_commands(shapes, tmp_path):
    folder, _ = shapes
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in english_documents(40)])
    assert fusion_data(["train-text-tokenizer", "--input", str(corpus), "--output", str(tmp_path / "t.model"),
                        "--vocab-size", "2048", "--image-codebook-size", "64", "--image-grid", "8", "--n-reserved", "513"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "t.layout.json").read_text())["image_grid"] == 8
    assert fusion_data(["train-image-tokenizer", "--images", str(folder / "images"), "--output", str(tmp_path / "vq"),
                        "--codebook-size", "64", "--steps", "3", "--batch-size", "4"]) == 0  # fmt: skip
    assert (tmp_path / "vq" / "vqgan.ckpt").is_file() and (tmp_path / "vq" / "vqgan.yaml").is_file()
    assert (
        fusion_data(["train-image-tokenizer", "--images", str(tmp_path / "nothing"), "--output", str(tmp_path / "vq2")])
        == 2
    )


def test_a_full_disk_keeps_the_complete_shards_and_the_same_command_resumes(
    text_tokenizer, paragraphs, tmp_path, capsys
):
    """`fusion-data build-shards` onto a file system that fills up: one error line (where, why,
    the shards kept), and once there is room the same command finishes the build, byte for byte
    the shards of a build that never stopped."""
    command = ["build-shards", "--kind", "text", "--text-tokenizer", str(text_tokenizer.path),
               "--max-samples-per-shard", "40", "--workers", "1"]  # fmt: skip
    for path in paragraphs:
        command += ["--input", str(path)]
    assert fusion_data([*command, "--output", str(tmp_path / "whole")]) == 0
    capsys.readouterr()
    with small_file_system(tmp_path / "disk", 96 * 1024) as resize:
        output = tmp_path / "disk" / "shards"
        assert fusion_data([*command, "--output", str(output)]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()[-1:]
        assert line.startswith(f"fusion-data build-shards: error: the shards could not be written to {output}: "
                               "No space left on device (ENOSPC); the file system has ")  # fmt: skip
        kept = int(line.split(". The ")[1].split(" complete shards are kept")[0])
        assert kept > 0 and line.endswith("To go on, make room or move --output. "
                                          f"The {kept} complete shards are kept: the same command resumes after them")  # fmt: skip
        resize(16 * 2**20)
        assert fusion_data([*command, "--output", str(output)]) == 0
        assert shard_documents(output) == shard_documents(tmp_path / "whole")
        assert Manifest.read(output).shards == Manifest.read(tmp_path / "whole").shards
