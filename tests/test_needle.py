"""Needle in a haystack (`fusion-eval needle`): haystacks of exactly the asked length with the needle
at its depth and no picture cut, scoring aligned with the answer (an oracle that reads the next
token scores 1, one a token late scores 0), the command end to end with its grid and heat map,
and the settings that cannot run refused in one message."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data_pipelines.demo import DEMO_VOCAB
from fusion_train.commands.eval import main as eval_main
from fusion_train.data.haystacks import ANSWER_CODES, Haystacks
from fusion_train.eval.needle import NeedleSettings, build_cells, evaluate
from fusion_train.model.chameleon import Chameleon
from fusion_train.model.formats.native import save_native
from fusion_train.tokenizers.text import TextTokenizer
from fusion_train.train.config import load_config


class NextTokenOracle(nn.Module):
    """Logits that put each position's mass on the token `late` positions after the next one."""

    def __init__(self, late: int = 0):
        super().__init__()
        self.late = late

    def forward(self, ids, logits_to_keep):
        following = torch.roll(ids, -1 - self.late, dims=1)[:, -logits_to_keep:]
        return nn.functional.one_hot(following, DEMO_VOCAB.vocab_size).float()


@pytest.fixture(scope="module")
def haystack_folders(demo_data):
    return [Path(demo_data["shards"]["held_out"]), Path(demo_data["shards"]["text"])]


@pytest.mark.parametrize("kind", ["text", "image"])
def test_haystacks_hold_the_needle_at_its_depth_and_scoring_reads_the_answer(kind, demo_data, haystack_folders):
    text = TextTokenizer(demo_data["text_tokenizer"])
    haystacks = Haystacks(haystack_folders, DEMO_VOCAB, tokens_needed=4096, pictures_needed=8)
    settings = NeedleSettings(kind, lengths=(600, 1500), depths=(0.0, 0.5, 1.0), trials=2, seed=3)
    cells = build_cells(settings, haystacks, text)
    assert len(cells) == 2 * 3 * 2
    block = DEMO_VOCAB.image_block_length
    for cell in cells:
        ids, answer = cell["ids"], cell["answer"]
        assert len(ids) == cell["length"] and ids[0] == DEMO_VOCAB.bos
        assert np.array_equal(ids[-len(answer) :], answer)
        starts = np.flatnonzero(ids[: -len(answer)] == DEMO_VOCAB.begin_of_image)  # the answer: a picture's start
        assert all(ids[s + block - 1] == DEMO_VOCAB.end_of_image for s in starts)  # no picture cut
        # The answer was stated once in the haystack, at the asked depth (within a picture's length).
        said = [p for p in range(1, len(ids) - 2 * len(answer)) if np.array_equal(ids[p : p + len(answer)], answer)]
        assert len(said) == 1, said
        assert abs(said[0] / cell["length"] - cell["depth"]) <= (block + 40) / cell["length"], (cell["depth"], said)
        if kind == "image":
            assert len(answer) == 1 + ANSWER_CODES and answer[0] == DEMO_VOCAB.begin_of_image
    right = evaluate(NextTokenOracle(), text, haystacks, settings, 4, torch.device("cpu"), "oracle")
    late = evaluate(NextTokenOracle(late=1), text, haystacks, settings, 4, torch.device("cpu"), "late oracle")
    assert right["mean_accuracy"] == 1.0 and late["mean_accuracy"] == 0.0


def test_fusion_eval_needle_writes_its_grid_and_heat_map_and_refuses_what_cannot_run(
    demo_data, haystack_folders, tmp_path, capsys
):
    """On the tiny model (random weights: the bench trains one): the grid, its table and its heat
    map; a haystack past the model's context only with --rope-scaling (or --extrapolate), then
    scored over the stretched positions; a needle that does not fit; a depth outside [0, 1]."""
    cfg = load_config(["model=tiny", "model.vocab_size=4608", "model.max_seq_len=1024"]).model
    model = save_native(Chameleon(cfg).state_dict(), cfg, DEMO_VOCAB, tmp_path / "model")
    common = [str(model), "--haystack", *map(str, haystack_folders), "--text-tokenizer", demo_data["text_tokenizer"],
              "--trials", "1", "--out", str(tmp_path / "report")]  # fmt: skip
    assert eval_main(["needle", *common, "--kind", "image", "--lengths", "600", "1024", "--depths", "0", "1"]) == 0
    report = tmp_path / "report"
    assert {p.name for p in report.iterdir()} == {"needle_image.json", "needle_image.md", "needle_image.png"}
    assert "| 100% |" in (report / "needle_image.md").read_text()

    assert eval_main(["needle", *common, "--lengths", "2048"]) == 2
    assert "haystack length 2,048 is longer than the model's context (1,024 positions): give --rope-scaling" in (
        capsys.readouterr().err
    )
    stretched = ["--lengths", "2048", "--depths", "0.5", "--rope-scaling", '{"rope_type": "linear", "factor": 2}']
    assert eval_main(["needle", *common, *stretched, "--name", "stretched"]) == 0
    assert "RoPE scaling" in (report / "stretched.md").read_text()

    assert eval_main(["needle", *common, "--lengths", "12"]) == 2
    assert "cannot hold them; give lengths of at least" in capsys.readouterr().err
    assert eval_main(["needle", *common, "--depths", "1.5"]) == 2
    assert "must lie in [0, 1]" in capsys.readouterr().err


def test_retrieval_shards_hold_whole_pictures_and_train_on_all_or_on_the_answer(demo_data, tmp_path):
    """data_pipelines/needle.py (what bench/needle.py trains on): text and image needles
    alternating, pictures whole (a shard holds no cut one), read without a skip; the loss on every
    token, or with answer_only on the answer alone."""
    from data_pipelines.needle import write_retrieval_shards
    from fusion_train.data.manifest import Manifest
    from fusion_train.data.stream import SourceStream

    folders = [Path(demo_data["shards"]["image_text"]), Path(demo_data["shards"]["text"])]
    for answer_only in (False, True):
        out = tmp_path / str(answer_only)
        write_retrieval_shards(folders, demo_data["text_tokenizer"], out, 6, 600, seed=1, answer_only=answer_only)
        stream = SourceStream("needle", out, Manifest.read(out), 0, 1, seed=0)
        documents = list(stream.rest_of_epoch())
        assert len(documents) == 6 and not sum(stream.skipped.values())
        assert all(len(d.tokens) == 600 for d in documents)
        if not answer_only:
            assert all(d.loss_mask is None for d in documents)
            continue
        answers = sorted(int(d.loss_mask.sum()) for d in documents)
        assert answers[-3:] == [DEMO_VOCAB.image_block_length] * 3 and max(answers[:3]) <= 4  # pictures; 4 digits
        assert all(d.loss_mask[-int(d.loss_mask.sum()) :].all() for d in documents)
