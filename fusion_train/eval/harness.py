"""lm-evaluation-harness on fusion_train models: `FusionLM`, registered with lm-eval as
"fusion_train", scores and generates with a Chameleon model from any source fusion_train opens.

Log-likelihoods (eval/scoring.py): context + continuation, batches longest first, one forward
each, image codes masked as HF's Chameleon masks them; the continuation's log-probabilities summed,
and whether each of its tokens was the most likely (lm-eval's `is_greedy`). Rolling log-likelihoods (perplexity tasks): lm-eval's disjoint windows of the
model's context. Generation: text mode (no image or audio ids), batched on the KV cache
(fusion_train.generate), each row ending at `</s>`, at one of the task's `until` strings or after
its `max_gen_toks`.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window, make_table
from tqdm import tqdm

from fusion_train.data.trained_with import load_tokenizers
from fusion_train.eval.scoring import continuation_scores
from fusion_train.generate.generator import Generator, Request
from fusion_train.generate.load import load_model
from fusion_train.generate.sampling import Sampling

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HarnessError(ValueError):
    """A setting lm-eval cannot run with; the message names it."""


@register_model("fusion_train")
class FusionLM(TemplateLM):
    def __init__(self, pretrained: str, text_tokenizer: str | None = None, batch_size: int | str = 8,
                 device: str | None = None, dtype: str | None = None, chat: bool = False,
                 max_gen_toks: int = 256):  # fmt: skip
        """`pretrained`: a training checkpoint (any ZeRO stage), model folder, HF export or Meta
        checkpoint. `chat`: generation prompts end with the end-of-prompt id the SFT shards put
        between prompt and answer (a model after SFT). dtype: bfloat16 on a GPU, float32 on a CPU
        unless given."""
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise HarnessError(f"batch_size={batch_size!r}: give a number of sequences (no 'auto' here)")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is not None and dtype not in DTYPES:
            raise HarnessError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
        default = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        loaded = load_model(pretrained, self._device, DTYPES[dtype] if dtype else default)
        self.model, self.vocab = loaded.model, loaded.trained_with.vocab
        self.text, *_ = load_tokenizers(loaded.trained_with, text_tokenizer, None, self._device, str(pretrained))
        self.batch_size, self.chat, self.max_gen_toks = (
            int(batch_size),
            chat in (True, "True", "true"),
            int(max_gen_toks),
        )
        self.context = self.model.cfg.max_seq_len
        self.generator = Generator(self.model, self.vocab)

    @property
    def eot_token_id(self) -> int:
        return self.vocab.eos

    @property
    def prefix_token_id(self) -> int:
        return self.vocab.bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.text.encode([string])[0]
        return ids if add_special_tokens is False else [self.vocab.bos, *ids]

    def tok_decode(self, ids: list[int]) -> str:
        known = self.text.sp.get_piece_size()
        return self.text.decode([[i for i in ids if self.vocab.text_start <= i < known]])[0]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids)."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        with tqdm(total=len(requests), desc="log-likelihoods", disable=disable_tqdm) as progress:
            for batch in _chunks(order, self.batch_size):
                scored = continuation_scores(self.model, self.vocab, [(requests[i][1], requests[i][2]) for i in batch])
                for i, result in zip(batch, scored, strict=True):
                    results[i] = result
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
                progress.update(len(batch))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            for window in get_rolling_token_windows(self.tok_encode(string, add_special_tokens=False),
                                                    self.prefix_token_id, self.context, 1):  # fmt: skip
                windows.append((None, *make_disjoint_window(window)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += log_prob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests that share generation settings are batched together."""
        results: list[str] = [""] * len(requests)
        by_settings: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_settings.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        with tqdm(total=len(requests), desc="generating", disable=disable_tqdm) as progress:
            for indices in by_settings.values():
                until, max_new, sampling = self._generation_settings(requests[indices[0]].args[1])
                for batch in _chunks(indices, self.batch_size):
                    contexts = [requests[i].args[0] for i in batch]
                    for i, text in zip(batch, self._generate(contexts, until, max_new, sampling), strict=True):
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    progress.update(len(batch))
        return results

    def _generation_settings(self, settings: dict) -> tuple[list[str], int, Sampling]:
        until = settings.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(settings.get("temperature", 0.0)) if settings.get("do_sample") else 0.0
        sampling = Sampling(temperature, float(settings.get("top_p") or 1.0), int(settings.get("top_k") or 0))
        return until, int(settings.get("max_gen_toks", self.max_gen_toks)), sampling

    def _generate(self, contexts: list[str], until: list[str], max_new: int, sampling: Sampling) -> list[str]:
        room = self.context - min(max_new, self.context // 2)  # the context is cut from the left to leave room
        prompts = []
        for context in contexts:
            ids = self.tok_encode(context, add_special_tokens=False) + ([self.vocab.sft_separator] if self.chat else [])
            prompts.append([self.vocab.bos, *ids[-(room - 1) :]])

        def reached_a_stop_string(_: int, tokens: list[int]) -> bool:
            return any(stop in self.tok_decode(tokens) for stop in until)

        generations = self.generator.generate([Request(p) for p in prompts], sampling, max_new,
                                              stop_when=reached_a_stop_string if until else None)  # fmt: skip
        return [_cut_at_first(self.tok_decode(g.tokens), until) for g in generations]


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _cut_at_first(text: str, stops: list[str]) -> str:
    ends = [text.index(stop) for stop in stops if stop and stop in text]
    return text[: min(ends)] if ends else text


def check_tasks(tasks: list[str], include_path: Path | None) -> TaskManager:
    """The harness's task index (with a folder of one's own YAML tasks); a name it does not know is
    one error naming it and the nearest names it does."""
    if include_path is not None and not include_path.exists():
        raise HarnessError(f"--include-path {include_path} does not exist")
    if include_path is not None:  # one's own folder alone is indexed in a moment; lm-eval's 14,000 tasks take seconds
        own = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(own.all_tasks):
            return own
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            near = difflib.get_close_matches(task, known, n=3)
            raise HarnessError(
                f"lm-eval does not know the task {task!r}{f' (did you mean {near}?)' if near else ''}: "
                "`lm-eval list tasks` lists its tasks; for a task of your own, put its YAML in a folder "
                "and pass --include-path FOLDER"
            )
    return manager


def evaluate(model: FusionLM, tasks: list[str], manager: TaskManager, num_fewshot: int | None,
             limit: float | None, log_samples: bool, seed: int = 0) -> dict:  # fmt: skip
    """lm-eval's results dictionary (the same JSON `lm-eval` writes)."""
    return simple_evaluate(model=model, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                           log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                           torch_random_seed=seed, fewshot_random_seed=seed)  # fmt: skip


def write_results(results: dict, out: Path) -> tuple[Path, str]:
    """OUT/results.json (and each task's samples, when logged) and the harness's table."""
    out.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None) or {}
    for task, records in samples.items():
        lines = (json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in records)
        (out / f"samples_{task}.jsonl").write_text("".join(lines))
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    results["samples"] = samples
    return path, make_table(results)


def scores(results: dict) -> dict[str, dict[str, float]]:
    """Each task's metrics by name (`acc`, `acc_norm`, `exact_match`, ...), without their stderr."""
    return {task: {key.split(",")[0]: value for key, value in metrics.items()
                   if "," in key and "_stderr" not in key and isinstance(value, int | float)}
            for task, metrics in results["results"].items()}  # fmt: skip


def log_to_wandb(results: dict, project: str, out: Path) -> None:
    """lm-eval's own W&B layout: each metric, the results table and its samples, in one run."""
    import wandb
    from lm_eval.loggers import WandbLogger

    logger = WandbLogger(init_args={"project": project, "dir": str(out), "job_type": "lm-harness"})
    logger.post_init(results)
    logger.log_eval_result()
    if results.get("samples"):
        logger.log_eval_samples(results["samples"])
    wandb.finish()
