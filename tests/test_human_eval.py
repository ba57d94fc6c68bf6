"""Blind human judgements: the judging page driven in headless Chromium, and the judgements aggregated\ninto the paper's tables (counts worked by hand)."""

import json

import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from conftest import chromium
from fusion_train.commands.eval import main as fusion_eval
from fusion_train.eval.human import JudgementError, read_judgements, score
from fusion_train.generate.page import Sample, write_outputs

# item -> each rater's (order shown, ours' judgement, theirs', preference)
JUDGED = {
    "p1": [(("ours", "theirs"), "fulfils", "partially", "ours")] * 3,  # all agree: ours
    "p2": [(("theirs", "ours"), "fulfils", "fulfils", "tie"), (("ours", "theirs"), "fulfils", "fulfils", "tie"),
           (("theirs", "ours"), "partially", "fulfils", "theirs")],  # a majority: tie
    "p3": [(("ours", "theirs"), "does_not", "fulfils", "theirs"), (("theirs", "ours"), "partially", "partially", "tie"),
           (("ours", "theirs"), "fulfils", "does_not", "ours")],  # none agree
    "p4": [(("theirs", "ours"), "fulfils", "does_not", "ours")],  # one rater: not in the agreement
}  # fmt: skip


def write_raters(folder):
    files = {}
    for item, judged in JUDGED.items():
        for rater, (shown, ours, theirs, preference) in enumerate(judged):
            record = {"rater": f"r{rater}", "item": item, "shown": list(shown),
                      "absolute": {"ours": ours, "theirs": theirs}, "preference": preference}  # fmt: skip
            files.setdefault(rater, []).append(json.dumps(record))
    paths = []
    for rater, lines in files.items():
        paths.append(folder / f"rater{rater}.jsonl")
        paths[-1].write_text("\n".join(lines) + "\n")
    return paths


def test_the_judgements_aggregate_to_the_papers_table(tmp_path):
    table = score(read_judgements(write_raters(tmp_path)), "ours", "theirs", rounds=500)
    assert table["prompts"] == 4 and table["judgements"] == 10
    # ours: fulfils in p1 x3, p2 x2, p3 x1, p4 x1 = 7; partially p2, p3 = 2; does not p3 = 1
    assert table["absolute"]["ours"] == {"fulfils": 0.7, "partially": 0.2, "does_not": 0.1}
    assert table["absolute"]["theirs"] == {"fulfils": 0.4, "partially": 0.4, "does_not": 0.2}
    # preferences: ours 3 + 1 + 1 = 5, tie 2 + 1 = 3, theirs 1 + 1 = 2
    relative = table["relative"]
    assert [relative[o]["share"] for o in ("win", "tie", "loss")] == [0.5, 0.3, 0.2]
    for outcome in relative.values():
        low, high = outcome["ci95"]
        assert 0 <= low <= outcome["share"] <= high <= 1 and high > low
    assert table["agreement"] == {"all": pytest.approx(1 / 3, abs=1e-4), "majority": pytest.approx(1 / 3, abs=1e-4),
                                  "none": pytest.approx(1 / 3, abs=1e-4), "prompts": 3}  # fmt: skip
    # the first-shown answer was preferred in p1 x3, p2's third, p3's first... of the 7 non-ties:
    # p1: ours shown first x3 (yes x3); p2 r2: theirs first, theirs (yes); p3 r0: ours first, theirs (no);
    # p3 r2: ours first, ours (yes); p4: theirs first, ours (no) -> 5 of 7
    assert table["first_shown_preferred"] == round(5 / 7, 4)


def test_the_command_prints_the_table_and_names_a_bad_file(tmp_path, capsys):
    paths = [str(p) for p in write_raters(tmp_path)]
    assert fusion_eval(["human-score", *paths, "--system", "ours", "--other", "theirs", "--rounds", "100"]) == 0
    assert json.loads(capsys.readouterr().out)["relative"]["win"]["share"] == 0.5
    assert fusion_eval(["human-score", str(tmp_path / "none.jsonl"), "--system", "a", "--other", "b"]) == 2
    assert capsys.readouterr().err == f"fusion-eval: error: judgement file {tmp_path / 'none.jsonl'} not found\n"


def test_bad_judgement_files_are_one_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"rater": "a", "item": "1", "shown": ["x", "y"], "absolute": {"x": "great", "y": "fulfils"}, '
                    '"preference": "x"}\n')  # fmt: skip
    with pytest.raises(JudgementError, match=f"{path}:1: absolute judgements are"):
        read_judgements([path])
    path.write_text("not json\n")
    with pytest.raises(JudgementError, match=f"{path}:1: not a judgement record"):
        read_judgements([path])
    with pytest.raises(JudgementError, match="not found"):
        read_judgements([tmp_path / "missing.jsonl"])
    twice = write_raters(tmp_path)[0]
    twice.write_text(twice.read_text() * 2)
    with pytest.raises(JudgementError, match="rater r0 judged item p1 more than once"):
        read_judgements([twice])
    with pytest.raises(JudgementError, match="no judgements compare ours with gemini"):
        score(read_judgements(write_raters(tmp_path)), "ours", "gemini")


def fnv1a(text: str) -> int:
    """The page's order hash, written again here: FNV-1a, 32 bits."""
    value = 0x811C9DC5
    for byte in text.encode():
        value = ((value ^ byte) * 0x01000193) % 2**32
    return value


def write_generations(tmp_path, prompts):
    """Two systems' fusion-generate folders answering `prompts`: ours says "right", theirs "wrong"."""
    folders = {}
    for name, answer in (("ours", "right"), ("theirs", "wrong")):
        samples = [Sample(p["prompt"], "text", [f"{answer} answer {i}"], "eos", 4) for i, p in enumerate(prompts)]
        folders[name] = tmp_path / name
        write_outputs(folders[name], samples, tmp_path)
    return folders


def judge(browser, page_path, rater, tie_on, downloads):
    """A rater's session on the page: prefers the right answer except on `tie_on`, judges it as
    fulfilling and the wrong one as not; returns the exported records."""
    page = browser.new_page()
    page.goto(page_path.as_uri())
    page.fill("#rater", rater)
    page.click("#begin")
    for section in page.locator(".item").all():
        item = section.get_attribute("data-item")
        right = section.locator(".answer", has_text="right answer")
        wrong = section.locator(".answer", has_text="wrong answer")
        right.get_by_label("fulfils the prompt").check()
        wrong.get_by_label("does not fulfil it").check()
        (
            section.get_by_label("the two are as good")
            if item == tie_on
            else right.get_by_label("this answer is better")
        ).check()
    assert page.inner_text("#progress") == "5 of 5 judged"
    with page.expect_download() as download:
        page.click("#export")
    target = downloads / download.value.suggested_filename
    download.value.save_as(target)
    page.reload()  # judgements in progress survive a reload
    page.fill("#rater", rater)
    page.click("#begin")
    assert page.inner_text("#progress") == "5 of 5 judged"
    page.close()
    return target


def test_raters_judge_on_the_page_blind_and_the_export_aggregates(tmp_path, capsys):
    picture = tmp_path / "red.png"
    Image.new("RGB", (16, 16), (220, 30, 30)).save(picture)
    prompts = [{"prompt": [f"question {i}"]} for i in range(4)] + [{"prompt": [{"image": "red.png"}, "What colour?"]}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    folders = write_generations(tmp_path, prompts)
    page_path = tmp_path / "judge.html"
    assert fusion_eval(["human-page", str(tmp_path / "prompts.jsonl"), "--answers", f"ours={folders['ours']}",
                        "--answers", f"theirs={folders['theirs']}", "--out", str(page_path), "--seed", "3"]) == 0  # fmt: skip
    assert "data:image/png;base64," in page_path.read_text()  # the prompt's picture travels inside the page

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        exported = [judge(browser, page_path, rater, tie, tmp_path) for rater, tie in (("ana", "0002"), ("ben", None))]
        browser.close()
    assert [p.name for p in exported] == ["judgements_ana.jsonl", "judgements_ben.jsonl"]

    judgements = read_judgements(exported)
    for j in judgements:  # the order each rater saw, drawn from (seed, rater, item), is the one recorded
        drawn = ["theirs", "ours"] if fnv1a(f"3|{j.rater}|{j.item}") & 1 else ["ours", "theirs"]
        assert list(j.shown) == drawn
    orders = {(j.rater, j.item): j.shown for j in judgements}
    assert any(orders["ana", item] != orders["ben", item] for item in ("0000", "0001", "0002", "0003", "0004"))
    assert {j.shown[0] for j in judgements} == {"ours", "theirs"}

    table = score(judgements, "ours", "theirs", rounds=200)
    assert table["absolute"]["ours"]["fulfils"] == 1.0 and table["absolute"]["theirs"]["does_not"] == 1.0
    assert table["relative"]["win"]["share"] == 0.9 and table["relative"]["tie"]["share"] == 0.1
    assert table["agreement"] == {"all": 0.8, "majority": 0.0, "none": 0.2, "prompts": 5}  # two raters: all or none
    preferred = [j for j in judgements if j.preference != "tie"]
    assert table["first_shown_preferred"] == round(sum(j.shown[0] == "ours" for j in preferred) / 9, 4)


def test_a_generation_folder_for_other_prompts_is_refused_naming_it(tmp_path, capsys):
    prompts = [{"prompt": [f"question {i}"]} for i in range(3)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    folders = write_generations(tmp_path, prompts)
    (tmp_path / "other.jsonl").write_text("".join(json.dumps({"prompt": [f"other {i}"]}) + "\n" for i in range(3)))
    argv = ["human-page", str(tmp_path / "other.jsonl"), "--answers", f"ours={folders['ours']}", "--answers",
            f"theirs={folders['theirs']}", "--out", str(tmp_path / "judge.html")]  # fmt: skip
    assert fusion_eval(argv) == 2
    error = capsys.readouterr().err
    assert f"{folders['ours'] / 'outputs.jsonl'}, line 1 answers the prompt ['question 0']" in error
    assert "other.jsonl's prompt 1 is ['other 0']" in error
    assert fusion_eval([*argv[:2], "--answers", f"ours={folders['ours']}", "--out", "x.html"]) == 2
    assert "--answers NAME=DIR, twice" in capsys.readouterr().err
