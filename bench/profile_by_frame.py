"""Where a traced step's time goes, by the code that spent it: each operator's self time in a
torch.profiler trace recorded with Python stacks, grouped by the innermost frames around it that
belong to fusion_train, DeepSpeed, torch.optim, transformers or the benchmark (so that
`aten::copy_` splits into DeepSpeed's gradient buckets, its norm, our loss...).

    python bench/profile_by_frame.py TRACE_DIR [--rows 40]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

OURS = ("fusion_train/", "deepspeed/", "torch/optim/", "transformers/", "bench/", "torch/nn/utils/")


def _nested(events: list[dict]):
    """Each event with the events that enclose it on its thread (a stack: spans nest), in time order."""
    stack: list[dict] = []
    for event in sorted(events, key=lambda e: (e["tid"], e["ts"], -e["dur"])):
        while stack and (stack[-1]["tid"] != event["tid"] or stack[-1]["ts"] + stack[-1]["dur"] <= event["ts"]):
            stack.pop()
        yield event, stack
        stack.append(event)


def by_frame(folder: Path, depth: int = 3) -> list[tuple[float, str, str]]:
    """(milliseconds of self time, operator, its `depth` innermost frames of interest), largest first.
    Self time: an operator's duration less that of the operators it called."""
    (trace,) = Path(folder).glob("*.pt.trace.json")
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    kept = [e for e in events if e.get("cat") == "cpu_op" or (
        e.get("cat") == "python_function" and any(part in e["name"] for part in OURS))]  # fmt: skip
    where, children = {}, Counter()
    for event, enclosing in _nested(kept):
        if event.get("cat") != "cpu_op":
            continue
        callers = [e for e in enclosing if e.get("cat") == "cpu_op"]
        if callers:
            children[id(callers[-1])] += event["dur"]
        frames = [e["name"].split("/")[-1] for e in enclosing if e.get("cat") == "python_function"]
        where[id(event)] = (event, " < ".join(reversed(frames[-depth:])))
    totals = Counter()
    for key, (event, frames) in where.items():
        totals[event["name"], frames] += event["dur"] - children[key]
    return [(microseconds / 1000, name, frames) for (name, frames), microseconds in totals.most_common()]


def table(folder: Path, rows: int = 40) -> str:
    lines = [f"{ms:9.1f} ms  {name}  [{where}]" for ms, name, where in by_frame(folder)[:rows]]
    return "self time by operator and the code around it (innermost first):\n" + "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace_dir", type=Path)
    parser.add_argument("--rows", type=int, default=40)
    args = parser.parse_args()
    print(table(args.trace_dir, args.rows))
