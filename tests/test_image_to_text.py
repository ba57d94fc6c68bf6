"""`fusion-eval caption` and `vqa`: the scores on cases worked out here, and the commands on the
trained tiny model with COCO- and VQAv2-format files made from the demo's held-out pictures."""

import json
from pathlib import Path

import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from fusion_train.commands.eval import main as eval_main
from fusion_train.eval.image_to_text import caption_scores
from fusion_train.eval.vqa_answers import normalize_answer, vqa_accuracy

REFERENCES = {"1": ["A big red circle on a white background.", "a red circle"],
              "2": ["two blue squares", "Blue squares on green"]}  # fmt: skip
PREDICTIONS = {"1": "a big red circle on a black background", "2": "Two blue squares."}


def test_cider_is_the_toolkits_and_bleu4_is_worked_by_hand():
    scores = caption_scores(PREDICTIONS, REFERENCES)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in PREDICTIONS.items()})
    cider, _ = Cider().compute_score(gts, res)
    assert scores["cider"] == pytest.approx(100 * cider) and scores["cider"] > 0
    # Clipped n-gram matches over the two captions (lower case, punctuation gone), 1- to 4-grams:
    # image 1 has 7/8, 5/7, 4/6, 3/5 ("a" twice in the first reference; "black" nowhere), image 2
    # 3/3, 2/2, 1/1, 0/0; each candidate as long as its closest reference, so no brevity penalty.
    precisions = [(7 + 3) / (8 + 3), (5 + 2) / (7 + 2), (4 + 1) / (6 + 1), 3 / 5]
    bleu4 = (precisions[0] * precisions[1] * precisions[2] * precisions[3]) ** 0.25
    assert scores["bleu4"] == pytest.approx(100 * bleu4, abs=1e-6)


def test_vqa_accuracy_normalises_answers_and_averages_over_left_out_annotators():
    answers = ["two", "2", "3", "three", "Three.", "four", "4", "a dog", "the dog", "dogs"]
    # "2": two annotators said it. Leaving out one of them, 1 of the other nine agrees (1/3);
    # leaving out any of the other eight, 2 agree (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert vqa_accuracy("2", answers) == pytest.approx(0.6)
    assert vqa_accuracy("Two!", answers) == pytest.approx(0.6)
    # "3" ("three", "Three." once normalised): (3 * 2/3 + 7 * 1) / 10 = 0.9.
    assert vqa_accuracy("three", answers) == pytest.approx(0.9)
    # Articles go, so "the dog" is "dog" (two annotators); "dogs" is another answer.
    assert vqa_accuracy("The dog.", answers) == pytest.approx(0.6)
    assert vqa_accuracy("cat", answers) == 0.0
    assert vqa_accuracy("red", ["red"] * 10) == 1.0
    assert normalize_answer("1,000") == "1000" and normalize_answer("3.5") == "3.5"
    assert normalize_answer("dont know") == "don't know" and normalize_answer("black-and-white") == "black and white"


@pytest.fixture
def annotations(demo_data, tmp_path):
    """The demo's held-out pictures as a COCO captions file and VQAv2 question/answer files."""
    folder = Path(demo_data["folder"]) / "held_out"
    rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()][:6]
    images = [{"id": 100 + i, "file_name": Path(r["image"]).name} for i, r in enumerate(rows)]
    captions = [{"id": i, "image_id": 100 + i, "caption": r["caption"]} for i, r in enumerate(rows)]
    questions = [{"question_id": i, "image_id": 100 + i, "question": "What colour is the shape?"} for i in range(6)]
    answers = [{"question_id": i, "answers": [{"answer": r["caption"].split()[2]}] * 10} for i, r in enumerate(rows)]
    files = {"captions": {"images": images, "annotations": captions}, "questions": {"questions": questions},
             "answers": {"annotations": answers}}  # fmt: skip
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return {"folder": folder / "images", **{name: tmp_path / f"{name}.json" for name in files}}


def test_caption_and_vqa_commands_answer_every_example_and_score_what_they_wrote(
    pretrained_checkpoint, annotations, tmp_path, capsys
):
    images = str(annotations["folder"])
    caption = ["caption", str(pretrained_checkpoint), "--annotations", str(annotations["captions"]), "--images", images]
    assert eval_main([*caption, "--shots", "2", "--limit", "4", "--batch-size", "3", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["caption"]
    written = [json.loads(line) for line in (tmp_path / "caption.jsonl").read_text().splitlines()]
    assert [w["key"] for w in written] == ["100", "101", "102", "103"] and summary["examples"] == 4
    assert summary["shots"] == 2 and summary["examples_per_s"] > 0
    predictions = {w["key"]: w["prediction"] for w in written}
    assert all("\n" not in p for p in predictions.values())
    assert summary["cider"] == pytest.approx(
        caption_scores(predictions, {w["key"]: w["references"] for w in written})["cider"]
    )

    vqa = ["vqa", str(pretrained_checkpoint), "--questions", str(annotations["questions"]), "--annotations",
           str(annotations["answers"]), "--images", images, "--image-name", "{image_id:06d}.png"]  # fmt: skip
    # The demo's files are 000000.png...: image ids 100.. are not, so the first question's picture is missing.
    assert eval_main([*vqa, "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"{annotations['questions']}: questions[0]: image {images}/000100.png does not exist" in error
    assert "Traceback" not in error
    renamed = [
        {**q, "image_id": q["image_id"] - 100} for q in json.loads(annotations["questions"].read_text())["questions"]
    ]
    annotations["questions"].write_text(json.dumps({"questions": renamed}))
    capsys.readouterr()
    assert eval_main([*vqa, "--shots", "1", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["vqa"]
    written = [json.loads(line) for line in (tmp_path / "vqa.jsonl").read_text().splitlines()]
    assert len(written) == 6 and written[0]["question"] == "What colour is the shape?"
    expected = 100 * sum(vqa_accuracy(w["prediction"], w["references"]) for w in written) / 6
    assert summary["accuracy"] == pytest.approx(expected)


def test_annotations_that_cannot_be_evaluated_are_one_error_naming_the_file(
    pretrained_checkpoint, annotations, tmp_path, capsys
):
    coco = json.loads(annotations["captions"].read_text())
    coco["images"][1]["file_name"] = "missing.png"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(coco))
    caption = ["caption", str(pretrained_checkpoint), "--images", str(annotations["folder"])]
    cases = [
        (["--annotations", str(broken)], f"{broken}: images[1]: image {annotations['folder']}/missing.png does not exist"),
        (["--annotations", str(tmp_path / "none.json")], f"{tmp_path / 'none.json'} does not exist"),
        (["--annotations", str(annotations["questions"])], f"{annotations['questions']} has no ['images', 'annotations']"),
        (["--annotations", str(annotations["captions"]), "--shots", "9"], "9-shot prompts need 9 other examples; there are 5"),
    ]  # fmt: skip
    for extra, message in cases:
        assert eval_main([*caption, *extra, "--out", str(tmp_path)]) == 2
        error = capsys.readouterr().err
        assert f"fusion-eval: error: {message}" in error and "Traceback" not in error, error
