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
  limeify analyze ./smollm2-lime --text notes.txt --out ./analysis
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


def _analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from transformers import AutoTokenizer

    from .conversion import _source, from_pretrained, load_pretrained_base, saved_router_tensors
    from .injection import limeify
    from .persistence import CONFIG_NAME
    from .report import analyze

    path = Path(args.model)
    if (path / CONFIG_NAME).is_file() or (path.is_dir() and saved_router_tensors(path)):
        model = from_pretrained(path)
    else:
        model = limeify(load_pretrained_base(path), LimeConfig(mechanism=args.mechanism))
    directory, extra = _source(path)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **extra)
    text = Path(args.text).read_text()
    summary = analyze(model, tokenizer, text, args.out, seq_len=args.seq_len, max_chunks=args.max_chunks,
                      probe_words=args.probe_words.split(","))
    print(f"wrote {Path(args.out) / 'report.md'}")
    for key, value in summary.items():
        print(f"  {key}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="limeify",
        description="Retrofit Layer-Integrated Memory (LIMe) onto pretrained transformers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
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
    ana = sub.add_parser(
        "analyze",
        help="router heatmaps, entropy, probes and depthwise circuits on a text",
        description="Run a limeified checkpoint (from `limeify convert`, or any checkpoint, which is "
        "then limeified with --mechanism) and its base model over a text and write to OUT: "
        "report.md (opens with a summary table), router_heatmap.png (mean |weight| per layer and "
        "source layer, normalized per layer; for dynamic routers averaged over the text's tokens), "
        "entropy.png (per-layer matrix Renyi entropy, alpha 0.5), probe.png (linear-probe "
        "separability of --probe-words), circuits.md (dynamic mechanism: top tokens per layer, "
        "source depth and head) and analysis.json.",
        epilog="example: limeify analyze ./smollm2-lime --text notes.txt --out ./analysis",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ana.add_argument("model", help="checkpoint directory (limeified or not) or .gguf file")
    ana.add_argument("--text", required=True, help="UTF-8 text file to run the model on")
    ana.add_argument("--out", required=True, help="output directory for the report")
    ana.add_argument("--mechanism", default="static", choices=available_mechanisms(),
                     help="mechanism used when MODEL is not limeified yet (default: static)")
    ana.add_argument("--seq-len", type=int, default=128, help="tokens per chunk (default: 128)")
    ana.add_argument("--max-chunks", type=int, default=8, help="chunks of the text to analyse (default: 8)")
    ana.add_argument("--probe-words", default="is,are,was,were",
                     help="comma-separated words whose tokens the probe separates (default: is,are,was,were)")
    ana.set_defaults(func=_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("limeify: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, LimeError):
            message = str(exc)
        else:
            first = str(exc).splitlines()[0] if str(exc) else ""
            message = f"{type(exc).__name__}: {first} (run `limeify --debug {args.command} ...` for the traceback)"
        print(f"limeify: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
