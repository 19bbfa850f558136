"""Package a finished training run as a small release folder: the SAE in bf16, xz-compressed, beside its config.

    python -m sae_train.release RUN_DIR DEST [--dtype bfloat16|float32] [--no-compress] [--eval EVAL.json]

``RUN_DIR`` is a ``run.out_dir`` of ``python -m sae_train``. ``DEST`` receives ``cfg.json`` +
``sae.safetensors.xz`` (steerlib's format, read by ``steerlib.load_sae``; a bf16 SAE runs at the model's precision),
``train_config.json`` and ``eval.json`` (the held-out metrics; ``--eval`` takes them from another file, e.g. metrics
measured on the released bf16 weights). This is how the reference SAE shipped in ``servers/presets/saes`` was made:
bf16 keeps a 4608-latent SAE of a 576-wide model at 10.6 MB, and xz brings it to about 7.7 MB.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from steerlib.sae import load_sae, save_sae

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def release(run_dir: Path, dest: Path, *, dtype: str = "bfloat16", compress: bool = True,
            eval_file: Path | None = None) -> Path:  # fmt: skip
    """Write the release folder ``dest`` (which must not exist) from ``run_dir``; returns ``dest``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; choose one of {sorted(DTYPES)}")
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; remove it or choose another destination")
    metrics = eval_file or run_dir / "eval.json"
    for needed in (run_dir / "sae", run_dir / "train_config.json", metrics):
        if not needed.exists():
            raise FileNotFoundError(f"{needed} is missing: is {run_dir} a finished sae_train run?")
    sae = load_sae(run_dir / "sae").to(DTYPES[dtype])
    with tempfile.TemporaryDirectory(dir=dest.parent if dest.parent.exists() else None) as tmp:
        staged = save_sae(sae, Path(tmp) / "sae", compress=compress)
        shutil.copyfile(run_dir / "train_config.json", staged / "train_config.json")
        shutil.copyfile(metrics, staged / "eval.json")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), dest)
    log.info("released %s -> %s (%s%s)", run_dir, dest, dtype, ", xz" if compress else "")
    return dest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="out_dir of a finished python -m sae_train run")
    p.add_argument("dest", type=Path, help="release folder to create")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--no-compress", action="store_true", help="write sae.safetensors instead of sae.safetensors.xz")
    p.add_argument("--eval", type=Path, default=None, help="held-out metrics to ship (default RUN_DIR/eval.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    release(args.run_dir, args.dest, dtype=args.dtype, compress=not args.no_compress, eval_file=args.eval)


if __name__ == "__main__":
    main()
