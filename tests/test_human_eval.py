"""Blind human judgements aggregated into the paper's tables: counts worked by hand."""

import json

import pytest

from fusion_train.commands.eval import main as fusion_eval
from fusion_train.eval.human import JudgementError, read_judgements, score

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
