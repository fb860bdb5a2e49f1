"""The ``limeify`` command line: convert checkpoints, inspect attention sites."""

from __future__ import annotations

import argparse
import sys

from .config import LimeConfig
from .errors import LimeError
from .routers import available_mechanisms

EPILOG = """examples:
  limeify convert ./SmolLM2-135M ./smollm2-lime
  limeify convert model.Q4_1.gguf ./smollm2-lime --dtype float32 --force
  limeify sites ./smollm2-lime
then in Python:  model = limeify.from_pretrained("./smollm2-lime")
"""


def _convert(args: argparse.Namespace) -> int:
    from .conversion import convert

    config = LimeConfig(mechanism=args.mechanism, init=args.init)
    convert(args.src, args.dst, config=config, dtype=args.dtype, force=args.force)
    return 0


def _sites(args: argparse.Namespace) -> int:
    from .conversion import load_pretrained_base
    from .discovery import discover_sites
    from .sites import format_sites

    print(format_sites(discover_sites(load_pretrained_base(args.model))))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="limeify",
        description="Retrofit Layer-Integrated Memory (LIMe) onto pretrained transformers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser(
        "convert",
        help="write a limeified copy of a checkpoint",
        description="Load SRC, add LIMe routers, check function preservation on a probe batch "
        "(prints the max abs logit difference), and write DST: base weights in safetensors "
        "(plain AutoModel*.from_pretrained(DST) still loads the base model), "
        "lime_config.json and lime_routers.safetensors. DST is written to a temporary "
        "directory beside it and renamed at the end; SRC is never modified.",
        epilog="example: limeify convert ./SmolLM2-135M ./smollm2-lime --init identity",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conv.add_argument("src", help="transformers checkpoint directory (with config.json) or a .gguf file")
    conv.add_argument("dst", help="output directory (must not exist unless --force)")
    conv.add_argument("--mechanism", default="static", choices=available_mechanisms(),
                      help="lookup mechanism (default: static, the paper's cross-head lookup)")
    conv.add_argument("--init", default="identity", choices=["identity", "paper"],
                      help="identity: outputs unchanged until routers train (default); "
                      "paper: the official from-scratch init (changes outputs)")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                      help="dtype to load and save the weights in (default: float32)")
    conv.add_argument("--force", action="store_true", help="replace DST if it exists")
    conv.set_defaults(func=_convert)
    sites = sub.add_parser("sites", help="print the attention sites discovery finds in a checkpoint",
                           description="Trace the model once and print each attention site: layer, "
                           "the modules (and slices) producing K and V, heads and head size.")
    sites.add_argument("model", help="transformers checkpoint directory or .gguf file")
    sites.set_defaults(func=_sites)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LimeError as exc:
        print(f"limeify: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
