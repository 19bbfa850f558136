"""``python -m sae_train CONFIG.yaml``: train, evaluate and save an SAE as the config says (see sae_train.config)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from sae_train.config import TrainConfig
from sae_train.pipeline import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_train", description=__doc__)
    parser.add_argument("config", type=Path, help="YAML or JSON training config")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.from_file(args.config)
    try:
        result = run(cfg, args.config.resolve().parent)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if result.metrics:
        print(json.dumps({name: m._asdict() for name, m in result.metrics.items()}, indent=2))
    print(f"SAE written to {result.out_dir / 'sae'} (trained in {result.train_seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
