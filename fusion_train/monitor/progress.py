"""The progress bar of rank 0 in a terminal (`trainer.progress_bar`), as an observer of the loop."""

from __future__ import annotations

from tqdm import tqdm

from fusion_train.monitor.observer import Observer


class ProgressBar(Observer):
    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.bar: tqdm | None = None

    def step_started(self, step: int, logged: bool) -> None:
        if self.bar is None:  # the first step of this invocation: a resumed run starts part-way
            self.bar = tqdm(total=self.total_steps, initial=step - 1, desc="training")

    def step_ended(self, step: int, sums: dict) -> bool:
        self.bar.update()
        return False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
