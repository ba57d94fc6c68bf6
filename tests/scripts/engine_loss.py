"""Resume a run's engine from its latest checkpoint and write the loss it gives on one batch
(rank 0), with the batch, for comparison with consolidated weights."""

import argparse
import sys

import torch

from fusion_train.cli import _single_process_environment
from fusion_train.train.config import load_config
from fusion_train.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args, overrides = parser.parse_known_args()
    _single_process_environment()
    trainer = Trainer(load_config(overrides))
    batch = next(iter(trainer.loader))
    trainer.engine.eval()
    with torch.no_grad():
        loss = trainer.engine(batch["input_ids"], labels=batch["labels"]).loss
    if trainer.rank == 0:
        torch.save({"input_ids": batch["input_ids"], "labels": batch["labels"], "loss": loss}, args.out)
    trainer.close()


if __name__ == "__main__":
    sys.exit(main())
