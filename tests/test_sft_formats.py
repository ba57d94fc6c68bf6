"""Instruction data as it is published, into SFT shards: the Cauldron's parquet, LLaVA's JSON and
ShareGPT's chats; chats longer than the training's sequences; evaluation sets left out; the
modality balance of a mixture."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipelines import inputs
from data_pipelines.balance import modality_shares, weights_for, with_weights
from data_pipelines.build import BuildSettings, build_shards
from data_pipelines.demo import DEMO_VOCAB
from data_pipelines.inputs import read_blocks
from data_pipelines.parts import merge_manifests
from data_pipelines.verify import verify_source
from fusion_train.commands.data import main as fusion_data
from fusion_train.data.loader import DataConfig
from fusion_train.data.manifest import DataError, Manifest
from fusion_train.tokenizers.image import ImageTokenizer, preprocess
from fusion_train.tokenizers.multimodal import DocumentTokenizer
from fusion_train.vocab import Modality
from helpers import SMALL_VOCAB as V
from helpers import write_jsonl

CAULDRON = pa.schema([
    ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
    ("texts", pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]))),
])  # fmt: skip


def picture(colour: str, size=(40, 30), format="PNG") -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, colour)
    image.paste("white", (0, 0, size[0] // 2, size[1] // 2))  # quarters that differ
    image.save(buffer, format=format)
    return buffer.getvalue()


def turn(user: str, assistant: str, source: str = "NLVR2") -> dict:
    return {"user": user, "assistant": assistant, "source": source}


def write_cauldron(path, rows: list[dict], row_group_size: int = 2):
    """A parquet file with the Cauldron's schema, as HF publishes its subsets (SUBSET/train-*.parquet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=CAULDRON)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def settings(tokenizers, **options):
    text_tokenizer, image_tokenizer = tokenizers
    return BuildSettings("sft", str(text_tokenizer.path), str(image_tokenizer), **options)


def samples(folder):
    """(tokens, mask, metadata) of every sample, in shard order."""
    found = []
    for shard in Manifest.read(folder).shards:
        for sample in wds.WebDataset(str(folder / shard.name), shardshuffle=False).decode():
            found.append((sample["tokens.npy"].astype(np.int64), sample["mask.npy"], sample["json"]))
    return found


def expected_chat(tokenizers, turns, images=(), split_images=False):
    """The sample a chat should become, its prompt images (in the order given) encoded in one batch
    as the builder's chunk encodes them; in `turns`, an int is the i-th image's codes."""
    text_tokenizer, image_tokenizer = tokenizers
    tokenizer = ImageTokenizer.load(image_tokenizer, device="cpu")
    codes = tokenizer.encode(np.stack([preprocess(Image.open(io.BytesIO(b)), tokenizer.resolution, pad=True)
                                       for b in images])) if images else []  # fmt: skip
    resolved = [([codes[s] if isinstance(s, int) else s for s in prompt], answer) for prompt, answer in turns]
    return DocumentTokenizer(text_tokenizer, text_tokenizer.vocab).sft(resolved)


@pytest.fixture(scope="module")
def tokenizers(text_tokenizer, image_tokenizer_path):
    return text_tokenizer, image_tokenizer_path


def cauldron_rows(red, blue, green):
    return [
        {"images": [{"bytes": red, "path": "left.png"}, {"bytes": blue, "path": "right.jpg"}],
         "texts": [turn("Is the left one redder?", "Yes.")]},
        {"images": [{"bytes": green, "path": None}],
         "texts": [turn("What colour?", "Green."), turn("Which corner is white?", "The top left."),
                   turn("Is it square?", "No, wider than tall.")]},
        {"images": [], "texts": [turn("What is two and two?", "Four.", "text-only")]},
        {"images": [{"bytes": red, "path": None}], "texts": [turn("Anything?", " ")]},
    ]  # fmt: skip


def test_a_cauldron_subset_builds_chats_with_its_images_first_and_the_loss_on_answers(tokenizers, tmp_path):
    red, blue, green = picture("red"), picture("blue", format="JPEG"), picture("green", (30, 40))
    parquet = write_cauldron(tmp_path / "the_cauldron" / "nlvr2" / "train-00000-of-00001.parquet",
                             cauldron_rows(red, blue, green))  # fmt: skip
    manifest = build_shards(settings(tokenizers, format="cauldron"), [parquet], tmp_path / "out", workers=0)
    assert manifest.skipped == {"empty_answer": 1}
    built = samples(tmp_path / "out")
    expected = [
        expected_chat(tokenizers, [([0, 1, "Is the left one redder?"], ["Yes."])], [red, blue]),
        expected_chat(
            tokenizers,
            [
                ([0, "What colour?"], ["Green."]),
                (["Which corner is white?"], ["The top left."]),
                (["Is it square?"], ["No, wider than tall."]),
            ],
            [green],
        ),  # fmt: skip
        expected_chat(tokenizers, [(["What is two and two?"], ["Four."])]),
    ]
    for (tokens, mask, _), chat in zip(built, expected, strict=True):
        assert tokens.tolist() == chat.tokens.tolist() and mask.tolist() == chat.loss_mask.tolist()
    assert [m["subset"] for _, _, m in built] == ["nlvr2"] * 3
    assert [m["source"] for _, _, m in built] == ["NLVR2", "NLVR2", "text-only"]
    answers = {m.key: 0 for m in Modality}
    for tokens, mask, _ in built:
        for m in Modality:
            answers[m.key] += int((V.modality_of(torch.from_numpy(tokens[mask == 1])) == m).sum())
    assert manifest.answer_tokens_by_modality == answers and manifest.answer_tokens_by_source == {"nlvr2": answers}
    assert manifest.options == {"format": "cauldron"}
    summary, problems = verify_source(tmp_path / "out", workers=1)
    assert not problems and summary["samples"] == 3

    # --part/--parts share the row groups out: a part reads only its own, and the parts merge into the whole
    assert [first for first, _ in read_blocks(parquet, lambda group: group == 1)] == [2]
    for part in (0, 1):
        build_shards(settings(tokenizers, format="cauldron"), [parquet], tmp_path / "parts", workers=0, part=part,
                     parts=2)  # fmt: skip
    merged = merge_manifests(tmp_path / "parts")
    assert sorted(t.tolist() for t, _, _ in samples(tmp_path / "parts")) == sorted(t.tolist() for t, _, _ in built)
    assert merged.answer_tokens_by_modality == answers and merged.skipped == manifest.skipped


def test_llava_json_and_sharegpt_chats_build_through_the_same_path_with_bad_chats_counted(tokenizers, tmp_path):
    images = tmp_path / "coco"
    images.mkdir()
    red, blue = picture("red"), picture("blue")
    (images / "red.png").write_bytes(red)
    (images / "blue.png").write_bytes(blue)
    llava = [
        {"id": "1", "image": "coco/red.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "2", "image": ["coco/red.png", "coco/blue.png"], "conversations": [
            {"from": "human", "value": "Compare <image> with <image>."}, {"from": "gpt", "value": "Red, then blue."}]},
        {"id": "3", "image": "coco/red.png", "conversations": [
            {"from": "human", "value": "No placeholder."}, {"from": "gpt", "value": "Red."}]},
        {"id": "4", "conversations": [{"from": "human", "value": "Hi"}, {"from": "bing", "value": "Hello"}]},
        {"id": "5", "image": "coco/blue.png", "conversations": [
            {"from": "human", "value": "<image> Colour?"}, {"from": "gpt", "value": ""}]},
    ]  # fmt: skip
    (tmp_path / "llava.json").write_text(json.dumps(llava, indent=1))
    manifest = build_shards(settings(tokenizers, format="llava", media_root=str(tmp_path)), [tmp_path / "llava.json"],
                            tmp_path / "llava", workers=0)  # fmt: skip
    assert manifest.skipped == {"image_placeholder_mismatch": 1, "unknown_role": 1, "empty_answer": 1}
    built = samples(tmp_path / "llava")
    expected = [expected_chat(tokenizers, [([0, "What colour is this?"], ["Red."])], [red]),
                expected_chat(tokenizers, [(["Compare", 0, "with", 1, "."], ["Red, then blue."])], [red, blue])]  # fmt: skip
    for (tokens, mask, _), chat in zip(built, expected, strict=True):
        assert tokens.tolist() == chat.tokens.tolist() and mask.tolist() == chat.loss_mask.tolist()

    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of France?"},
                           {"from": "gpt", "value": "Paris."}, {"from": "human", "value": "And Italy?"},
                           {"from": "gpt", "value": "Rome."}]},
        {"conversations": [{"from": "human", "value": "Draw <image>"}, {"from": "gpt", "value": "No."}]},
        {"conversations": [{"from": "gpt", "value": "I start."}, {"from": "human", "value": "Hm."}]},
    ])  # fmt: skip
    manifest = build_shards(settings(tokenizers, format="sharegpt"), [sharegpt], tmp_path / "sharegpt", workers=0)
    assert manifest.skipped == {"image_placeholder_mismatch": 1, "answer_without_prompt": 1}
    ((tokens, mask, _),) = samples(tmp_path / "sharegpt")
    chat = expected_chat(tokenizers, [(["Be brief.", "Capital of France?"], ["Paris."]), (["And Italy?"], ["Rome."])])
    assert tokens.tolist() == chat.tokens.tolist() and mask.tolist() == chat.loss_mask.tolist()

    # Idefics2's image splitting: a prompt image becomes its four quarters, then itself
    build_shards(settings(tokenizers, format="llava", media_root=str(tmp_path), split_images=True),
                 [tmp_path / "llava.json"], tmp_path / "split", workers=0)  # fmt: skip
    first, second = samples(tmp_path / "split")[:2]
    assert (first[0] == V.begin_of_image).sum() == 5 and (second[0] == V.begin_of_image).sum() == 10
    quarters = first[0][first[0] >= V.image_code_start][: 4 * V.image_grid**2]
    assert len({tuple(q) for q in quarters.reshape(4, -1)}) > 1  # the quarters differ: the picture's corner is white


def test_a_chat_too_long_is_split_between_turns_repeating_its_images_or_dropped(tokenizers, tmp_path):
    red, blue, green = picture("red"), picture("blue"), picture("green")
    rows = cauldron_rows(red, blue, green)[:3]
    rows.append({"images": [{"bytes": green, "path": None}],
                 "texts": [turn("Colour?", "Green."), turn("Tell a story.", "Once upon a time " * 40), turn("Wide?", "Yes.")]})  # fmt: skip
    parquet = write_cauldron(tmp_path / "mimic_cgd" / "train.parquet", rows)
    build_shards(settings(tokenizers, format="cauldron"), [parquet], tmp_path / "whole", workers=0)
    whole = samples(tmp_path / "whole")
    limit = len(whole[1][0]) - 4  # the 3-turn chat no longer fits; the two before fit, the story does not
    manifest = build_shards(settings(tokenizers, format="cauldron", max_tokens=limit), [parquet], tmp_path / "split",
                            workers=0)  # fmt: skip
    assert manifest.over_length == {"records": 2, "samples": 3, "turns_dropped": 1} and not manifest.skipped
    built = samples(tmp_path / "split")
    assert all(len(tokens) <= limit for tokens, _, _ in built)
    pieces = [s for s in built if s[2]["record"] == 1]
    assert [s[2]["piece"] for s in pieces] == [0, 1]
    image = whole[1][0][1 : 1 + V.image_block_length]
    for tokens, _, _ in pieces:  # each piece opens with the picture
        assert tokens[1 : 1 + V.image_block_length].tolist() == image.tolist()
    answers = lambda found: [tokens[mask == 1].tolist() for tokens, mask, _ in found]  # noqa: E731
    assert sum(answers(pieces), []) == answers([whole[1]])[0]  # every answer, once, in order
    ((story_chat, story_mask, story_metadata),) = [s for s in built if s[2]["record"] == 3]
    assert story_metadata["turns_dropped"] == 1 and (story_chat == V.sft_separator).sum() == 2  # Colour? and Wide?

    manifest = build_shards(settings(tokenizers, format="cauldron", max_tokens=limit, over_length="drop"), [parquet],
                            tmp_path / "drop", workers=0)  # fmt: skip
    assert manifest.skipped == {"over_length": 2} and manifest.samples == 2 and not manifest.over_length


def test_evaluation_sets_leave_out_exactly_the_planted_duplicates(tokenizers, tmp_path):
    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    pictures = {c: picture(c) for c in colours}
    train = write_cauldron(tmp_path / "train" / "vqav2" / "train.parquet", [
        {"images": [{"bytes": pictures["red"], "path": None}], "texts": [turn("What is in this picture?", "Red.")]},
        {"images": [{"bytes": pictures["blue"], "path": None}], "texts": [turn("What is in this picture?", "Blue.")]},
        {"images": [{"bytes": pictures["green"], "path": None}],
         "texts": [turn("How many WHITE corners are there", "One.")]},
        {"images": [{"bytes": pictures["yellow"], "path": None}], "texts": [turn("Is it bright?", "Yes.")]},
        {"images": [], "texts": [turn("What is two and two?", "Four.")]},
    ])  # fmt: skip
    evaluation = write_cauldron(tmp_path / "eval" / "vqav2_val" / "val.parquet", [
        # the template question: asked of several evaluation items, not matched
        {"images": [{"bytes": pictures["purple"], "path": None}], "texts": [turn("What is in this picture?", "P.")]},
        {"images": [{"bytes": pictures["orange"], "path": None}], "texts": [turn("What is in this picture?", "O.")]},
        # a planted question (another case and punctuation) about a picture the training data lacks
        {"images": [{"bytes": picture("black"), "path": None}], "texts": [turn("how many white corners are there?", "1")]},
    ])  # fmt: skip
    held_out_images = tmp_path / "eval_images"
    held_out_images.mkdir()
    (held_out_images / "planted.png").write_bytes(pictures["yellow"])  # a planted image, the same bytes
    manifest = build_shards(settings(tokenizers, format="cauldron", exclude=(str(evaluation), str(held_out_images))),
                            [train], tmp_path / "out", workers=0)  # fmt: skip
    assert manifest.skipped == {"excluded_question": 1, "excluded_image": 1}
    assert sorted(s[2]["record"] for s in samples(tmp_path / "out")) == [0, 1, 4]
    assert manifest.options["exclude"] == (str(evaluation), str(held_out_images))

    llava_eval = tmp_path / "eval" / "llava_bench.json"
    (tmp_path / "eval" / "blue.png").write_bytes(pictures["blue"])
    llava_eval.write_text(json.dumps([{"image": "blue.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "Blue."}]}]))  # fmt: skip
    manifest = build_shards(settings(tokenizers, format="cauldron", exclude=(str(llava_eval),)), [train],
                            tmp_path / "out2", workers=0)  # fmt: skip
    assert manifest.skipped == {"excluded_image": 1}
    with pytest.raises(DataError, match="--exclude .*missing.parquet"):
        build_shards(settings(tokenizers, format="cauldron", exclude=(str(tmp_path / "missing.parquet"),)), [train],
                     tmp_path / "out3", workers=0)  # fmt: skip


def test_the_balance_report_equals_a_count_over_the_shards_and_derived_weights_reach_the_target(demo_data, capsys):
    shards = demo_data["shards"]
    names = ("text", "visual_chat", "image_generation", "sound")
    counted = {}
    for name in names:
        totals, documents = dict.fromkeys(("text", "image", "audio"), 0), 0
        for tokens, mask, _ in samples(Path(shards[f"sft_{name}"])):
            modality = DEMO_VOCAB.modality_of(torch.from_numpy(tokens[mask == 1]))
            for m in ("text", "image", "audio"):
                totals[m] += int((modality == Modality[m.upper()]).sum())
            documents += 1
        counted[name] = (totals, documents)
    weights = {"text": 0.1, "visual_chat": 0.2, "image_generation": 0.6, "sound": 0.1}
    cfg = DataConfig(sources={n: {"path": shards[f"sft_{n}"], "weight": w} for n, w in weights.items()})
    manifests = {n: Manifest.read(shards[f"sft_{n}"]) for n in names}
    expected = {
        m: sum(weights[n] * counted[n][0][m] / counted[n][1] for n in names) for m in ("text", "image", "audio")
    }
    total = sum(expected.values())
    shares = modality_shares(cfg, manifests)
    assert shares == pytest.approx({m: v / total for m, v in expected.items()}, abs=1e-12)

    target = {"text": 0.5, "image": 0.3, "audio": 0.2}
    derived = weights_for(cfg, manifests, target)
    assert modality_shares(with_weights(cfg, derived), manifests) == pytest.approx(target, abs=1e-3)
    assert derived["visual_chat"] / derived["text"] == pytest.approx(2)  # both answer in text: their ratio stays
    overrides = [f"data.sources.{n}.path={shards[f'sft_{n}']}" for n in names]
    assert fusion_data(["sft-balance", "data=demo_sft", *overrides, "--target", "text=0.5", "image=0.3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["derived"]["answer_token_shares"]["audio"] == pytest.approx(0.2, abs=2e-3)  # the rest: audio
    assert "data.sources.sound.weight=" in report["derived"]["overrides"]
    assert fusion_data(["sft-balance", "data=demo_sft", *overrides, "--target", "text=0.9", "image=0.9"]) == 2
    assert capsys.readouterr().err.startswith("fusion-data sft-balance: error: --target {'text': 0.9, 'image': 0.9}")


def test_a_json_array_is_read_as_it_streams_and_a_broken_one_is_one_error(tmp_path, monkeypatch):
    records = [{"id": i, "conversations": [{"from": "human", "value": "x" * (i * 7)}]} for i in range(50)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=2))
    monkeypatch.setattr(inputs, "JSON_READ", 100)  # many refills, elements cut across them
    assert list(inputs.read_input(path)) == records
    path.write_text(json.dumps(records)[:-40])
    with pytest.raises(DataError, match=f"input {path}: not a JSON array from character"):
        list(inputs.read_input(path))
    path.write_text('{"not": "an array"}')
    with pytest.raises(DataError, match="must hold one JSON array"):
        list(inputs.read_input(path))
