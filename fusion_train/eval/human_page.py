"""The page raters judge two systems' answers on, blind: one self-contained HTML file showing each
prompt with the two answers (text, pictures, sounds inline) in an order drawn per item and per
rater, asking of each answer whether it fulfils the prompt (fully, partially, not) and which answer
is better (or a tie), and exporting the rater's judgements as the JSONL `fusion-eval human-score`
reads (fusion_train/eval/human.py).

The inputs are the prompts file given to `fusion-generate` and the folders it wrote for each
system (`outputs.jsonl` + media): any system's outputs in that format can be compared. The order is
drawn in the browser from a hash of (page seed, rater, item), so a rater who reloads sees the same
order, two raters see different ones, and each judgement records the order it was made in
(`shown`); judgements name systems, never positions. Answers carry no system name on screen;
judgements in progress are kept in the browser's local storage until exported.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from fusion_train.eval.human import ABSOLUTE, TIE
from fusion_train.generate.documents import PromptError, read_prompt_records
from fusion_train.generate.page import segments_html

LABELS = {"fulfils": "fulfils the prompt", "partially": "partially fulfils it", "does_not": "does not fulfil it"}


class HumanPageError(ValueError):
    """Inputs the page cannot be made from; the message names the file and record."""


@dataclass(frozen=True)
class System:
    name: str
    folder: Path
    outputs: list[dict]  # outputs.jsonl's records, in prompt order


def read_prompts(path: Path) -> list[dict]:
    """The prompt records of a `fusion-generate` prompts file, each with its item id ("id", or its
    line's rank as 0000, 0001, …)."""
    try:
        numbered = read_prompt_records(path)
    except PromptError as error:
        raise HumanPageError(str(error)) from None
    records = [{**record, "id": str(record.get("id", f"{rank:04d}"))} for rank, (_, record) in enumerate(numbered)]
    if not records:
        raise HumanPageError(f"prompts file {path} holds no prompts")
    return records


def read_system(name: str, folder: Path, prompts: list[dict], prompts_path: Path) -> System:
    """A system's generation folder, checked to answer exactly `prompts`, in their order."""
    path = folder / "outputs.jsonl"
    if not path.is_file():
        raise HumanPageError(f"system {name}: {path} not found (a folder fusion-generate wrote)")
    outputs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(outputs) != len(prompts):
        raise HumanPageError(f"system {name}: {path} answers {len(outputs)} prompts, {prompts_path} holds "
                             f"{len(prompts)}: generate from that prompts file")  # fmt: skip
    for number, (output, prompt) in enumerate(zip(outputs, prompts, strict=True), 1):
        if output.get("prompt") != prompt["prompt"]:
            raise HumanPageError(f"system {name}: {path}, line {number} answers the prompt {output.get('prompt')!r}, "
                                 f"but {prompts_path}'s prompt {number} is {prompt['prompt']!r}")  # fmt: skip
    return System(name, folder, outputs)


def write_page(prompts_path: Path, systems: tuple[System, System], out: Path, seed: int = 0) -> Path:
    """The judging page at `out`, media embedded (it can be mailed or hosted as one file)."""
    if systems[0].name == systems[1].name or TIE in (systems[0].name, systems[1].name):
        raise HumanPageError(f"the two systems need distinct names other than {TIE!r}")
    prompts = read_prompts(prompts_path)
    items = "\n".join(_item(prompt, index, prompts_path.parent, systems) for index, prompt in enumerate(prompts))
    out.parent.mkdir(parents=True, exist_ok=True)
    config = json.dumps({"seed": seed, "page": out.stem, "absolute": ABSOLUTE, "tie": TIE})
    out.write_text(_PAGE.format(title=html.escape(out.stem), items=items, count=len(prompts), config=config,
                                script=_SCRIPT))  # fmt: skip
    return out


def _item(prompt: dict, index: int, base: Path, systems: tuple[System, System]) -> str:
    item = html.escape(prompt["id"])
    answers = "".join(_answer(item, system, system.outputs[index]["output"]) for system in systems)
    return f"""<section class="item" data-item="{item}">
<h2>Prompt {index + 1}</h2><div class="prompt">{segments_html(prompt["prompt"], base)}</div>
<div class="answers">{answers}</div>
<p class="tie"><label><input type="radio" name="pref-{item}" value="{TIE}"> the two are as good</label></p>
</section>"""


def _answer(item: str, system: System, output: list) -> str:
    name = html.escape(system.name)
    choices = "".join(
        f'<label><input type="radio" name="abs-{item}-{name}" value="{value}"> {label}</label> '
        for value, label in LABELS.items()
    )
    return f"""<div class="answer" data-system="{name}"><h3 class="position"></h3>
<div class="output">{segments_html(output, system.folder)}</div>
<p class="absolute">{choices}</p>
<p><label><input type="radio" name="pref-{item}" value="{name}"> this answer is better</label></p></div>"""


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Judge the answers: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
.item {{ border-top: 2px solid #888; padding: 1em 0; }} .item.done {{ background: #f3f9f3; }}
.answers {{ display: flex; gap: 1em; }} .answer {{ flex: 1; border: 1px solid #ccc; padding: 0.5em; }}
.output {{ min-height: 3em; }} label {{ margin-right: 0.8em; white-space: nowrap; }}
#judging {{ display: none; }} #bar {{ position: sticky; top: 0; background: #fff; padding: 0.5em 0; }}
</style></head><body>
<h1>Which answer is better?</h1>
<p>For each prompt, say of each answer whether it fulfils the prompt, then which of the two is better
(or that they are as good). The answers come from two systems, in an order drawn for you.</p>
<div id="start"><label>Your name: <input id="rater" autocomplete="off"></label>
<button id="begin">Begin</button></div>
<div id="judging">
<div id="bar"><span id="progress"></span> <button id="export">Export judgements</button>
<span id="exported"></span></div>
{items}
</div>
<script>const CONFIG = {config}; const ITEMS = {count};</script>
<script>{script}</script>
</body></html>
"""

# The order of each item's answers: bit 0 of FNV-1a over "seed|rater|item", stable across reloads.
_SCRIPT = """
function fnv1a(text) {
  let hash = 0x811c9dc5;
  for (const byte of new TextEncoder().encode(text)) hash = Math.imul(hash ^ byte, 0x01000193) >>> 0;
  return hash;
}
let rater = null;
const storageKey = () => `fusion-eval:${CONFIG.page}:${rater}`;

function order(item) {
  const answers = [...item.querySelectorAll(".answer")];
  if (fnv1a(`${CONFIG.seed}|${rater}|${item.dataset.item}`) & 1) answers.reverse();
  answers.forEach((answer, i) => {
    item.querySelector(".answers").appendChild(answer);
    answer.querySelector(".position").textContent = `Answer ${i + 1}`;
  });
  return answers.map(answer => answer.dataset.system);
}

function judgement(item) {
  const shown = [...item.querySelectorAll(".answer")].map(answer => answer.dataset.system);
  const checked = name => item.querySelector(`input[name="${CSS.escape(name)}"]:checked`)?.value;
  const absolute = Object.fromEntries(shown.map(s => [s, checked(`abs-${item.dataset.item}-${s}`)]));
  const preference = checked(`pref-${item.dataset.item}`);
  if (!preference || Object.values(absolute).some(v => !v)) return null;
  return {rater, item: item.dataset.item, shown, absolute, preference};
}

function update() {
  const items = [...document.querySelectorAll(".item")];
  const saved = {};
  let done = 0;
  for (const item of items) {
    const record = judgement(item);
    item.classList.toggle("done", record !== null);
    if (record) { saved[record.item] = record; done += 1; }
  }
  localStorage.setItem(storageKey(), JSON.stringify(saved));
  document.getElementById("progress").textContent = `${done} of ${ITEMS} judged`;
  return Object.values(saved);
}

function restore() {
  const saved = JSON.parse(localStorage.getItem(storageKey()) || "{}");
  for (const record of Object.values(saved)) {
    const item = document.querySelector(`.item[data-item="${CSS.escape(record.item)}"]`);
    if (!item) continue;
    const tick = (name, value) => {
      const input = item.querySelector(`input[name="${CSS.escape(name)}"][value="${CSS.escape(value)}"]`);
      if (input) input.checked = true;
    };
    for (const [system, value] of Object.entries(record.absolute)) tick(`abs-${record.item}-${system}`, value);
    tick(`pref-${record.item}`, record.preference);
  }
}

document.getElementById("begin").addEventListener("click", () => {
  rater = document.getElementById("rater").value.trim();
  if (!rater) { alert("Write your name first: it keeps your judgements apart from other raters'."); return; }
  document.querySelectorAll(".item").forEach(order);
  restore();
  document.getElementById("start").style.display = "none";
  document.getElementById("judging").style.display = "block";
  update();
});
document.addEventListener("change", () => { if (rater) update(); });
document.getElementById("export").addEventListener("click", () => {
  const records = update();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob(records.map(r => JSON.stringify(r) + "\\n"), {type: "application/jsonl"}));
  link.download = `judgements_${rater.replace(/[^A-Za-z0-9_.-]+/g, "_")}.jsonl`;
  link.click();
  document.getElementById("exported").textContent =
    `${records.length} exported` + (records.length < ITEMS ? `; ${ITEMS - records.length} not yet judged` : "");
});
"""
