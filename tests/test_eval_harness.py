"""`fusion-eval lm-harness`: lm-evaluation-harness tasks defined here (no network) on the trained
tiny model, our model class against the harness's own HF backend on an HF export of the weights."""

import json
from pathlib import Path

import pytest
import sentencepiece
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from transformers import ChameleonForConditionalGeneration, PreTrainedTokenizer
from wandb_records import history

from fusion_train.commands.convert import main as convert_main
from fusion_train.commands.eval import main as eval_main
from fusion_train.eval.harness import FusionLM, check_tasks, evaluate
from fusion_train.generate.generator import Request
from fusion_train.generate.sampling import Sampling

QUESTIONS = [("The big circle is", ["red", "green", "blue", "small"], 0),
             ("A picture of a square that is", ["blue", "round", "large", "yellow"], 2),
             ("The colour of the sky is", ["blue", "green"], 0),
             ("Two shapes: a circle and a", ["square", "triangle", "dog"], 1),
             ("The small red", ["circle", "square", "picture"], 2)]  # fmt: skip
TASKS = {
    "shapes_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
                 "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    "shapes_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{question}} {{choices[answer]}}'\n"
                  "metric_list:\n  - metric: word_perplexity\n",
    "shapes_gen": "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: ' {{choices[answer]}}'\n"
                  "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n",
}  # fmt: skip


def _tasks(folder: Path) -> Path:
    """The questions as a jsonl file and one lm-eval YAML task per kind of request over it."""
    folder.mkdir()
    data = folder / "shapes.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    for name, body in TASKS.items():
        source = (
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        )
        (folder / f"{name}.yaml").write_text(source + body)
    return folder


class SentencePieceForHF(PreTrainedTokenizer):
    """The run's SentencePiece model behind HF's tokenizer interface, as HF's slow Llama tokenizer
    serves one: the harness's HF backend then sees the ids fusion_train's tokenizer gives."""

    def __init__(self, path: str, **kwargs):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        super().__init__(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Special tokens as their text, as Llama's does (the harness looks for `<s>` in prompts)."""
        text, pieces = "", []
        for token in tokens:
            if token in self.all_special_tokens:
                text, pieces = text + self.sp.decode_pieces(pieces) + token, []
            else:
                pieces.append(token)
        return text + self.sp.decode_pieces(pieces)

    def build_inputs_with_special_tokens(self, ids, pair=None):
        return [self.bos_token_id, *ids, *(pair or [])]


def _responses(folder: Path, task: str) -> list:
    """Each request's response as lm-eval logged it: (log-likelihood, is greedy) or a rolling sum."""
    samples = [json.loads(line) for line in (folder / f"samples_{task}.jsonl").read_text().splitlines()]
    return [response[0] for sample in samples for response in sample["resps"]]


def test_our_model_class_scores_as_the_harness_hf_backend_does_on_an_hf_export(
    pretrained_checkpoint, demo_data, tmp_path, capsys, monkeypatch
):
    """The command on an HF export of the trained tiny model: lm-eval's JSON, its table, a W&B run;
    then the harness's own HF backend on the same export: the same log-likelihoods (multiple
    choice and rolling) and the same scores."""
    tasks = _tasks(tmp_path / "tasks")
    hf = tmp_path / "hf"
    assert convert_main(["to-hf", str(pretrained_checkpoint), str(hf)]) == 0
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "results"
    assert eval_main(["lm-harness", str(hf), "--text-tokenizer", demo_data["text_tokenizer"], "--tasks", *TASKS,
                      "--include-path", str(tasks), "--batch-size", "3", "--log-samples", "--wandb-project", "evals",
                      "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    ours = json.loads((out / "results.json").read_text())
    assert summary["examples"] == 3 * len(QUESTIONS) and summary["examples_per_s"] > 0
    assert summary["lm_harness"]["shapes_mc"]["acc"] == ours["results"]["shapes_mc"]["acc,none"]
    assert "|shapes_mc " in printed and "word_perplexity" in printed
    assert len((out / "samples_shapes_gen.jsonl").read_text().splitlines()) == len(QUESTIONS)
    [logged] = [row for row in history(out) if "shapes_mc/acc" in row]
    assert logged["shapes_mc/acc"] == summary["lm_harness"]["shapes_mc"]["acc"]

    manager = check_tasks(["shapes_mc", "shapes_ppl"], tasks)
    peer = ChameleonForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    # The backend puts `<s>` before each context when told to (the model was trained with it); its
    # rolling windows start with `<s>` by themselves, and would score a second one if told.
    for task, bos in (("shapes_mc", True), ("shapes_ppl", False)):
        backend = HFLM(pretrained=peer, tokenizer=SentencePieceForHF(demo_data["text_tokenizer"]), backend="causal",
                       batch_size=3, add_bos_token=bos)  # fmt: skip
        theirs = evaluate(backend, [task], manager, None, None, log_samples=True)
        reference = [response[0] for sample in theirs["samples"][task] for response in sample["resps"]]
        mine = _responses(out, task)
        assert (
            len(mine)
            == len(reference)
            == (sum(len(c) for _, c, _ in QUESTIONS) if task == "shapes_mc" else len(QUESTIONS))
        )
        for a, b in zip(mine, reference, strict=True):
            if task == "shapes_mc":  # (log-likelihood, whether every token is the most likely)
                assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
            else:
                assert a == pytest.approx(b, abs=1e-4)
        assert {k: v for k, v in ours["results"][task].items() if k != "alias"} == pytest.approx(
            {k: v for k, v in theirs["results"][task].items() if k != "alias"}
        )


def test_generate_until_stops_at_the_stop_string_and_leaves_it_out(pretrained_checkpoint):
    assert get_model("fusion_train") is FusionLM  # lm-eval's own entry points find it by name
    model = get_model("fusion_train").create_from_arg_string(f"pretrained={pretrained_checkpoint},batch_size=2")
    context = "The big circle is"
    [free] = model.generate_until([Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 12}), 0)])
    prompt = [model.vocab.bos, *model.tok_encode(context, add_special_tokens=False)]
    [whole] = model.generator.generate([Request(prompt)], Sampling(), 12)
    assert free == model.tok_decode(whole.tokens) and len(whole.tokens) >= 6
    stop = model.tok_decode(whole.tokens[3:5])
    assert stop
    # Generation ends as soon as the text holds the stop string, not at the budget.
    [stopped] = model.generator.generate(
        [Request(prompt)], Sampling(), 12, stop_when=lambda _, t: stop in model.tok_decode(t)
    )
    assert stopped.stop == "stop_sequence" and len(stopped.tokens) <= 5
    requests = [
        Instance("generate_until", {}, (context, {"until": ["@@", stop], "max_gen_toks": 12}), i) for i in range(3)
    ]
    assert model.generate_until(requests) == [free[: free.index(stop)]] * 3


def test_a_task_the_harness_does_not_know_is_one_clear_error(pretrained_checkpoint, tmp_path, capsys):
    assert eval_main(["lm-harness", str(pretrained_checkpoint), "--tasks", "hellaswagg"]) == 2
    error = capsys.readouterr().err
    assert "fusion-eval: error: lm-eval does not know the task 'hellaswagg' (did you mean ['hellaswag'" in error
    assert "--include-path FOLDER" in error and "Traceback" not in error
    assert (
        eval_main(["lm-harness", str(pretrained_checkpoint), "--tasks", "x", "--include-path", str(tmp_path / "no")])
        == 2
    )
    assert f"--include-path {tmp_path / 'no'} does not exist" in capsys.readouterr().err
