"""Command line: convert steering vectors between a GGUF control vector and steerlib's config / vector files.

python -m steerlib.convert happy.gguf happy.yaml [--scale 0.8] [--layer-range 10 20]   # + vectors/happy.safetensors
python -m steerlib.convert steer.yaml steer.gguf [--model-hint llama]
python -m steerlib.convert vec.safetensors vec.gguf

The kind of each file is told by its suffix: ``.gguf`` (control vector), ``.yaml``/``.yml``/``.json`` (steering
config), ``.safetensors`` (steerlib vector file). ``--scale`` and ``--layer-range`` mean what llama.cpp's
``--control-vector-scaled FILE SCALE`` and ``--control-vector-layer-range START END`` mean (inclusive; a bound <= 0
is no bound). Into a config the scale becomes each ``add`` op's coefficient; into a GGUF or vector file it is
multiplied into the directions, as are the config's coefficients.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from steerlib.config import SteeringConfig
from steerlib.interchange.configs import config_to_vector, write_config
from steerlib.interchange.gguf_control import read_gguf, save_gguf
from steerlib.interchange.placement import LayerRange, select_layers
from steerlib.vectors import SteeringVector, load_vector

GGUF = (".gguf",)
CONFIG = (".yaml", ".yml", ".json")
VECTOR = (".safetensors",)
_KINDS = {"gguf": GGUF, "config": CONFIG, "vector": VECTOR}
ROUTES: tuple[tuple[str, str], ...] = (
    ("gguf", "config"),
    ("gguf", "vector"),
    ("config", "gguf"),
    ("vector", "gguf"),
    ("vector", "config"),
)


def kind_of(path: Path, where: str) -> str:
    """``gguf``, ``config`` or ``vector``, from the suffix."""
    for kind, suffixes in _KINDS.items():
        if path.suffix.lower() in suffixes:
            return kind
    allowed = ", ".join(s for suffixes in _KINDS.values() for s in suffixes)
    raise ValueError(f"{where} {str(path)!r}: unknown suffix {path.suffix!r}; allowed: {allowed}")


def convert(
    src: Path,
    dst: Path,
    *,
    scale: float = 1.0,
    layer_range: LayerRange | None = None,
    model_hint: str | None = None,
) -> list[int]:
    """Convert ``src`` into ``dst``; returns the layers written."""
    route = (kind_of(src, "IN"), kind_of(dst, "OUT"))
    if route not in ROUTES:
        allowed = "; ".join(f"{a} -> {b}" for a, b in ROUTES)
        raise ValueError(f"cannot convert {route[0]} to {route[1]}; allowed: {allowed}")
    vector = _read(src, route[0])
    if model_hint is not None:
        vector = SteeringVector(vector.by_layer, {**vector.metadata, "model_hint": model_hint})
    if route[1] == "config":
        cfg = write_config(vector, dst, scale=scale, layer_range=layer_range)
        return [op.layer for op in cfg.interventions if isinstance(op.layer, int)]
    vector = _scaled(_selected(vector, layer_range), scale)
    if route[1] == "gguf":
        save_gguf(vector, dst, model_hint=model_hint)
    else:
        vector.save(dst)
    return sorted(k for k in vector.by_layer if k is not None)


def _read(src: Path, kind: str) -> SteeringVector:
    if kind == "gguf":
        return read_gguf(src)
    if kind == "config":
        return config_to_vector(SteeringConfig.from_file(src))
    return load_vector(src)


def _selected(vector: SteeringVector, layer_range: LayerRange | None) -> SteeringVector:
    if layer_range is None:
        return vector
    if None in vector.by_layer:
        raise ValueError("--layer-range needs a per-layer vector; this one is layer-independent")
    layers = select_layers([k for k in vector.by_layer if k is not None], layer_range)
    if not layers:
        have = sorted(k for k in vector.by_layer if k is not None)
        raise ValueError(f"--layer-range {layer_range[0]} {layer_range[1]} keeps none of the layers {have}")
    return SteeringVector({k: vector.by_layer[k] for k in layers}, vector.metadata)


def _scaled(vector: SteeringVector, scale: float) -> SteeringVector:
    return SteeringVector({k: scale * v for k, v in vector.by_layer.items()}, vector.metadata)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m steerlib.convert", description=__doc__.split("\n")[0] if __doc__ else None
    )
    p.add_argument("src", type=Path, metavar="IN", help="a .gguf, config (.yaml/.yml/.json) or .safetensors file")
    p.add_argument("dst", type=Path, metavar="OUT", help="the file to write (its suffix picks the format)")
    p.add_argument("--scale", type=float, default=1.0, help="strength, as llama.cpp's --control-vector-scaled")
    p.add_argument(
        "--layer-range",
        type=int,
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="keep layers A..B inclusive, as llama.cpp's --control-vector-layer-range",
    )
    p.add_argument("--model-hint", default=None, help="controlvector.model_hint to write (e.g. 'llama')")
    return p


def main(argv: list[str] | None = None) -> int:
    """``convert IN OUT [--scale S] [--layer-range A B] [--model-hint NAME]``; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    layer_range = (args.layer_range[0], args.layer_range[1]) if args.layer_range is not None else None
    try:
        layers = convert(args.src, args.dst, scale=args.scale, layer_range=layer_range, model_hint=args.model_hint)
    except (ValueError, FileNotFoundError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} from {args.src}: layers {layers}, scale {args.scale}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
