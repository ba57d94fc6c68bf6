"""fusion_train side by side with its peers, each comparison alternating the systems in one run:

    train     the training step on one process: HF transformers' Chameleon in a plain loop
              (bench/peer_train_step.py)
    sharded   two ranks: ZeRO-3 against FSDP2, ZeRO-1 and ZeRO-2 against DDP (bench/peer_sharded.py)
    loader    the loader against MosaicML Streaming on the demo's documents (bench/peer_loader.py)
    vq        the image tokenizer against HF's ChameleonVQVAE (bench/peer_vq.py)

    python bench/peers.py [COMPARISON ...] [--size full|toy] [--rounds N] [--demo DIR]

prints one JSON line per system: the median of its runs, its ratio to its peer's median and the
check that the systems did the same work (equal losses, the same documents, the same codes).
`--size toy` runs everything in about a minute: the test that keeps these from rotting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

# DeepSpeed binds its logger to the stdout of the moment it is first imported: here, stderr, so
# that stdout holds the JSON lines alone.
with contextlib.redirect_stdout(sys.stderr):
    import deepspeed  # noqa: F401

import peer_loader  # noqa: E402
import peer_sharded  # noqa: E402
import peer_train_step  # noqa: E402
import peer_vq  # noqa: E402
from side_by_side import MeasurementFailed  # noqa: E402

from fusion_train.data.manifest import DataError  # noqa: E402

COMPARISONS = {
    "train": peer_train_step.compare,
    "sharded": peer_sharded.compare,
    "loader": peer_loader.compare,
    "vq": peer_vq.compare,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("comparisons", nargs="*", metavar="COMPARISON", help=f"{', '.join(COMPARISONS)} (default: all)")
    parser.add_argument("--size", choices=("full", "toy"), default="full")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each system, alternating")
    parser.add_argument("--demo", type=Path, help="the loader's demo data: a folder make_demo_data built")
    args = parser.parse_args()
    unknown = set(args.comparisons) - set(COMPARISONS)
    if unknown:
        parser.error(f"unknown comparisons {sorted(unknown)}: choose among {list(COMPARISONS)}")
    for name in args.comparisons or COMPARISONS:
        extra = {"demo": args.demo} if name == "loader" else {}
        try:
            for line in COMPARISONS[name](args.size, args.rounds, **extra):
                print(json.dumps(line), flush=True)
        except (DataError, MeasurementFailed) as err:
            sys.exit(f"peers.py: error: {name}: {err}")


if __name__ == "__main__":
    main()
