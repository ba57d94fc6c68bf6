"""Image-to-text benchmarks as Chameleon's paper reports them (§5.2): captioning on COCO-format
annotations scored by CIDEr(-D) and BLEU-4 as the COCO caption toolkit computes them
(pycocoevalcap, its PTB tokenizer run on Java), and VQAv2 accuracy (fusion_train/eval/vqa_answers.py).

Each answer is generated in text mode (no image or audio ids) with the picture in the prompt,
greedily, batched on the KV cache, up to the first line break. Few-shot prompts put K other
examples (picture, then its reference caption or most common answer, then a line break) before the
one asked about, drawn per example with the seed (the paper used 2-shot); with `chat`, a model
after SFT, the prompt ends with its end-of-prompt id instead.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fusion_train.eval.vqa_answers import vqa_accuracy
from fusion_train.generate.constraints import Mode
from fusion_train.generate.documents import Codec
from fusion_train.generate.generator import Generator, Request
from fusion_train.generate.sampling import Sampling

CAPTION_PROMPT = ""  # a picture followed by its caption is how image-text pairs are pretrained
VQA_PROMPT = "Question: {question} Short answer:"


class ImageTextError(ValueError):
    """Annotations that cannot be evaluated; the message names the file and record."""


@dataclass
class Example:
    key: str  # the image id (captions) or question id (VQA)
    image: Path
    references: list[str]  # the reference captions, or the annotators' answers
    question: str = ""

    @property
    def shot_answer(self) -> str:
        """What a few-shot prompt shows after this example's picture: the first reference caption,
        or the answer most annotators gave."""
        return Counter(self.references).most_common(1)[0][0] if self.question else self.references[0]


def _load(path: Path, keys: tuple[str, ...]) -> dict:
    try:
        loaded = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ImageTextError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ImageTextError(f"{path} is not JSON ({error})") from None
    missing = [key for key in keys if not isinstance(loaded, dict) or key not in loaded]
    if missing:
        raise ImageTextError(f"{path} has no {missing}: expected a COCO-format file with {list(keys)}")
    return loaded


def _image(folder: Path, name: str, where: str) -> Path:
    path = Path(folder) / name
    if not path.is_file():
        raise ImageTextError(
            f"{where}: image {path} does not exist (is --images the folder of the annotations' images?)"
        )
    return path


def read_captions(annotations: Path, images: Path) -> list[Example]:
    """COCO captions: `images` [{id, file_name}] and `annotations` [{image_id, caption}]; one
    example per image that has captions, in the file's image order."""
    loaded = _load(annotations, ("images", "annotations"))
    captions: dict = {}
    for index, record in enumerate(loaded["annotations"]):
        if not isinstance(record, dict) or "image_id" not in record or not isinstance(record.get("caption"), str):
            raise ImageTextError(f"{annotations}: annotations[{index}] is not {{image_id, caption}}: {record!r}")
        captions.setdefault(record["image_id"], []).append(record["caption"])
    examples = []
    for index, image in enumerate(loaded["images"]):
        where = f"{annotations}: images[{index}]"
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise ImageTextError(f"{where} is not {{id, file_name}}: {image!r}")
        if image["id"] in captions:
            examples.append(Example(str(image["id"]), _image(images, image["file_name"], where), captions[image["id"]]))
    if not examples:
        raise ImageTextError(f"{annotations}: no image has a caption")
    return examples


def read_vqa(questions: Path, annotations: Path, images: Path, image_name: str) -> list[Example]:
    """VQAv2: `questions` [{question_id, image_id, question}] and `annotations` [{question_id,
    answers: [{answer}]}]; `image_name` the image file of an image id, e.g.
    "COCO_val2014_{image_id:012d}.jpg"."""
    asked = _load(questions, ("questions",))["questions"]
    answered = {}
    for index, record in enumerate(_load(annotations, ("annotations",))["annotations"]):
        answers = record.get("answers") if isinstance(record, dict) else None
        if not isinstance(answers, list) or not answers or "question_id" not in record:
            raise ImageTextError(f"{annotations}: annotations[{index}] is not {{question_id, answers: [...]}}")
        answered[record["question_id"]] = [a["answer"] if isinstance(a, dict) else str(a) for a in answers]
    examples = []
    for index, record in enumerate(asked):
        where = f"{questions}: questions[{index}]"
        if not isinstance(record, dict) or not {"question_id", "image_id", "question"} <= record.keys():
            raise ImageTextError(f"{where} is not {{question_id, image_id, question}}: {record!r}")
        if record["question_id"] not in answered:
            raise ImageTextError(f"{where}: question {record['question_id']} has no answers in {annotations}")
        name = image_name.format(image_id=record["image_id"])
        examples.append(Example(str(record["question_id"]), _image(images, name, where),
                                answered[record["question_id"]], record["question"]))  # fmt: skip
    return examples


@dataclass
class Prompting:
    template: str  # the text after the picture; "{question}" is the example's question
    shots: int = 0
    chat: bool = False
    seed: int = 0

    def segments(self, example: Example, pool: list[Example]) -> list:
        """The prompt as fusion_train.generate takes it: pictures and text."""
        others = [e for e in pool if e.key != example.key]
        if self.shots > len(others):
            raise ImageTextError(f"{self.shots}-shot prompts need {self.shots} other examples; there are {len(others)}")
        shots = random.Random(f"{self.seed}:{example.key}").sample(others, self.shots)
        segments: list = []
        for shot in shots:
            segments += [{"image": str(shot.image)}, f"{self._text(shot)} {shot.shot_answer}\n".lstrip()]
        return [*segments, {"image": str(example.image)}, *([self._text(example)] if self._text(example) else [])]

    def _text(self, example: Example) -> str:
        return self.template.format(question=example.question)


def prompt_ids(codec: Codec, examples: list[Example], prompting: Prompting, pool: list[Example]) -> list[list[int]]:
    """Each example's prompt as ids; `pool`: where few-shot examples come from."""
    return [codec.prompt_ids(prompting.segments(e, pool), Mode.TEXT, prompting.chat, f"example {e.key}")
            for e in examples]  # fmt: skip


def answer(generator: Generator, codec: Codec, prompts: list[list[int]], batch_size: int,
           max_new_tokens: int) -> list[str]:  # fmt: skip
    """Each prompt's generated text up to its first line break."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        requests = [Request(p) for p in prompts[start : start + batch_size]]
        generations = generator.generate(requests, Sampling(), max_new_tokens,
                                         stop_when=lambda _, tokens: "\n" in _text(codec, tokens))  # fmt: skip
        answers += [_text(codec, generation.tokens).split("\n", 1)[0].strip() for generation in generations]
    return answers


def _text(codec: Codec, tokens: list[int]) -> str:
    return "".join(segment for segment in codec.decode(tokens, Mode.TEXT) if isinstance(segment, str))


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """CIDEr(-D) and BLEU-4 of the COCO caption toolkit, x100 as papers report them (the toolkit's
    1.202 is the paper's 120.2); both texts through its PTB tokenizer first."""
    if shutil.which("java") is None:
        raise ImageTextError("the COCO caption toolkit's PTB tokenizer runs on Java, which is not installed: "
                             "apt-get install default-jre-headless (or any Java 8+)")  # fmt: skip
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    keys = sorted(predictions)
    gts = tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in keys})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in keys})
    if len(res) != len(keys) or any(len(gts[k]) != len(references[k]) for k in keys):
        raise ImageTextError(
            "the PTB tokenizer (Java) returned fewer captions than it was given: check `java -version`"
        )
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": 100 * float(cider), "bleu4": 100 * float(bleu[3])}


def vqa_score(predictions: dict[str, str], examples: list[Example]) -> dict[str, float]:
    """Mean VQA accuracy x100, as the VQAv2 leaderboard reports it."""
    return {"accuracy": 100 * sum(vqa_accuracy(predictions[e.key], e.references) for e in examples) / len(examples)}


def write_answers(examples: list[Example], predictions: dict[str, str], scores: dict, out: Path, name: str) -> Path:
    """OUT/NAME.jsonl (each example's answer and references) and OUT/NAME_scores.json."""
    out.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"key": e.key, "image": str(e.image), **({"question": e.question} if e.question else {}),
                         "prediction": predictions[e.key], "references": e.references}) + "\n" for e in examples)  # fmt: skip
    (out / f"{name}.jsonl").write_text("".join(lines))
    path = out / f"{name}_scores.json"
    path.write_text(json.dumps(scores, indent=2))
    return path
