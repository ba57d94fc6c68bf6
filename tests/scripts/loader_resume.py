"""Resume a loader from a saved position in a fresh process and write the next batches."""

import argparse
import json

import torch

from fusion_train.data.loader import DataConfig, SourceConfig, build_loader


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="DataConfig as JSON")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--batches", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    config = json.loads(args.config)
    config["sources"] = {name: SourceConfig(**source) for name, source in config["sources"].items()}
    loader = build_loader(DataConfig(**config), args.rank, args.world_size)
    loader.load_state_dict(torch.load(args.state, weights_only=True))
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == args.batches:
            break
    torch.save(batches, args.out)


if __name__ == "__main__":
    main()
