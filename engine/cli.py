"""The ``cicada`` command line.

Every failure a user can cause (a bad path, a pack that does not validate, a
missing extra) ends in one clear line on stderr and a non-zero exit code, never
a traceback. ``CICADA_DEBUG=1`` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from engine import pack as packfmt

EXIT_USAGE = 2
EXIT_FAILED = 1


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def _need_export_extra() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UserError(
            "this command needs PyTorch and the export extra: "
            "pip install torch==2.13.0 && pip install -e '.[export]'"
        ) from None


def _cmd_info(args: argparse.Namespace) -> int:
    p = packfmt.load(args.pack)
    a, cb, lm = p.audio, p.codebooks, p.lm
    print(f"pack        {p.name}  ({p.path})")
    if p.description:
        print(f"            {p.description}")
    print(f"audio       {a.sample_rate} Hz, {a.channels} ch, {a.frame_rate:g} frames/s (hop {a.hop_length})")
    print(f"codebooks   {cb.count} x {cb.cardinality}, delays {list(cb.delays)}")
    print(
        f"lm          {lm['layers']} layers, dim {lm['dim']}, {lm['heads']} heads, {lm['positions']} positions, "
        f"context {lm['context']} frames, {'int8' if lm['quantization'] == 'int8' else 'fp32'} weights"
    )
    print(
        f"decoder     {p.decoder['frames_per_step']} frame(s) per step, lookahead "
        f"{p.decoder['lookahead_samples']} samples ({p.decoder_latency_ms:.1f} ms)"
    )
    print(f"prompts     {len(p.prompts)} known" if p.prompts else "prompts     free text")
    print("ok: every graph matches the manifest")
    return 0


def _cmd_export_huggingface(args: argparse.Namespace) -> int:
    _need_export_extra()
    from export.huggingface import ConversionError, convert

    try:
        pack = convert(
            args.model,
            args.out,
            frames_per_step=args.frames_per_step,
            context=args.context,
            text_len=args.text_tokens,
            quantize=args.quantize,
            tokenizer=args.tokenizer,
            overwrite=args.force,
        )
    except (ConversionError, FileExistsError) as exc:
        raise UserError(str(exc)) from None
    print(f"wrote {pack.path}: {pack.lm['layers']}-layer LM, lookahead {pack.decoder['lookahead_samples']} samples")
    return 0


def _cmd_export_random(args: argparse.Namespace) -> int:
    _need_export_extra()
    from export.architectures import SHAPES, random_pack

    if args.shape not in SHAPES:
        raise UserError(f"--shape {args.shape}: choose one of {', '.join(SHAPES)}")
    try:
        pack = random_pack(
            args.shape, args.out, seed=args.seed, quantize=args.quantize,
            frames_per_step=args.frames_per_step, overwrite=args.force,
        )
    except FileExistsError as exc:
        raise UserError(str(exc)) from None
    print(f"wrote {pack.path} (random weights, shape {args.shape})")
    return 0


def _positive(kind: type):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cicada", description="Real-time host for generative audio token models.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="validate a pack and describe it")
    p.add_argument("pack", type=Path, help="pack folder (holds manifest.toml)")
    p.set_defaults(func=_cmd_info)

    ex = sub.add_parser("export", help="build packs from PyTorch / Hugging Face models")
    exs = ex.add_subparsers(dest="source", required=True, metavar="SOURCE")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, required=True, help="pack folder to write")
    common.add_argument("--quantize", choices=["none", "int8"], default="none", help="int8 dynamic quantization of the LM")
    common.add_argument("--frames-per-step", type=_positive(int), default=1, help="frames per decoder call (default 1)")
    common.add_argument("--force", action="store_true", help="replace --out if it exists")

    hf = exs.add_parser("huggingface", parents=[common], help="convert a saved MusicgenForConditionalGeneration")
    hf.add_argument("--model", type=Path, required=True, help="folder written by save_pretrained")
    hf.add_argument("--context", type=_positive(int), default=None,
                    help="self-attention context in frames (default: min(1500, max positions))")
    hf.add_argument("--text-tokens", type=_positive(int), default=64, help="text token slots (default 64)")
    hf.add_argument("--tokenizer", type=Path, default=None,
                    help="tokenizer.json or a folder with the T5 tokenizer (default: look in --model)")
    hf.set_defaults(func=_cmd_export_huggingface)

    rnd = exs.add_parser("random", parents=[common], help="a random-weight pack of a known shape (tests, benchmarks)")
    rnd.add_argument("--shape", default="tiny", help="tiny (our default architecture) or musicgen-small")
    rnd.add_argument("--seed", type=int, default=0)
    rnd.set_defaults(func=_cmd_export_random)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (UserError, packfmt.PackError) as exc:
        print(f"cicada: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("cicada: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: one line, not a traceback
        if os.environ.get("CICADA_DEBUG"):
            raise
        print(f"cicada: unexpected error: {type(exc).__name__}: {exc} (set CICADA_DEBUG=1 for details)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
