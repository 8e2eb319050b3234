"""The ``cicada`` command line.

Every failure a user can cause (a bad path, a pack that does not validate, a
missing extra) ends in one clear line on stderr and a non-zero exit code, never
a traceback. ``CICADA_DEBUG=1`` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import pack as packfmt

if TYPE_CHECKING:
    from engine.app import RunOptions

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


def _run_options(args: argparse.Namespace) -> RunOptions:
    from engine.app import RunOptions

    return RunOptions(
        pack=args.pack,
        preset=args.preset,
        prompt=args.prompt,
        seed=args.seed,
        compute=args.compute,
        latency_ms=getattr(args, "latency", 60.0),
        ceiling_db=args.ceiling,
        device=getattr(args, "device", None),
        connect=getattr(args, "connect", None),
        rate=args.rate,
        null_sink=getattr(args, "null", False),
        osc_host=getattr(args, "osc_host", "127.0.0.1"),
        osc_port=getattr(args, "osc_port", 0),
        oscquery_port=getattr(args, "oscquery_port", None),
        osc_allow=getattr(args, "osc_allow", None),
        midi_in=getattr(args, "midi_in", None),
        midi_virtual=getattr(args, "midi_virtual", None),
    )


def _app_errors(fn):
    """Turn AppError into UserError (one line, exit 1)."""

    def run(args: argparse.Namespace) -> int:
        from engine.app import AppError

        try:
            return fn(args)
        except AppError as exc:
            raise UserError(str(exc)) from None

    return run


@_app_errors
def _cmd_render(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from engine.app import render

    opts = _run_options(args)
    with Progress(TextColumn("render"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn(),
                  transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("render", total=args.seconds)
        summary = render(opts, args.seconds, args.out,
                         progress=lambda done, total: bar.update(task, completed=args.seconds * done / total))
    print(f"wrote {args.out}: {args.seconds:g} s at {summary['rate']} Hz in {summary['wall_s']:.1f} s "
          f"({summary['speed']:.1f}x real time)")
    return 0


@_app_errors
def _cmd_play(args: argparse.Namespace) -> int:
    from engine.app import run_live

    opts = _run_options(args)
    if args.out is not None:
        return _cmd_render(args) if args.seconds else _fail("--out needs --seconds (how much to render)")
    fallback = Path("out") / "cicada-play.wav"
    return run_live(opts, seconds=args.seconds, status_every=10.0,
                    on_status=lambda line: print(line, flush=True), fallback_file=fallback)


def _fail(msg: str) -> int:
    raise UserError(msg)


@_app_errors
def _cmd_serve(args: argparse.Namespace) -> int:
    from logging.handlers import RotatingFileHandler

    from engine.app import run_live

    if args.log is not None:
        try:
            args.log.parent.mkdir(parents=True, exist_ok=True)
            handler = RotatingFileHandler(args.log, maxBytes=args.log_max_mb * 2**20, backupCount=args.log_keep)
        except OSError as exc:
            raise UserError(f"cannot write the log {args.log}: {exc.strerror}") from None
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    opts = _run_options(args)
    logging.getLogger("cicada").info("serving %s (latency %g ms)", opts.pack or "the default pack", opts.latency_ms)
    return run_live(opts, seconds=args.seconds, status_every=args.status_every)


def _cmd_devices(args: argparse.Namespace) -> int:
    from engine.audio import AudioError, list_devices

    try:
        print(list_devices())
    except AudioError as exc:
        raise UserError(str(exc)) from None
    from engine.control.midi import MidiError, list_ports

    try:
        ports = list_ports()
        print("MIDI inputs (--midi-in NAME):" if ports else "MIDI inputs: none")
        for name in ports:
            print(f"  {name}")
    except MidiError as exc:
        print(f"MIDI inputs: {exc}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    import json

    from engine import presets

    rows = []
    for name in presets.names():
        try:
            pre = presets.load(name)
            rows.append({"name": name, "path": str(pre.path), "description": pre.description, "prompt": pre.prompt,
                         "prompt_b": pre.prompt_b})
        except presets.PresetError as exc:
            rows.append({"name": name, "error": str(exc)})
    if args.json:
        print(json.dumps({"user_folder": str(presets.user_dir()), "presets": rows}, indent=2))
        return 0
    for i, r in enumerate(rows):
        text = r.get("error") or r["description"] or r["prompt"]
        user = " (saved)" if "path" in r and Path(r["path"]).parent == presets.user_dir() else ""
        print(f"{i:3d}  {r['name']}{user}: {text}")
    print(f"saved presets go to {presets.user_dir()} (the number is the MIDI program change that loads it)")
    return 0


def _cmd_gui(args: argparse.Namespace) -> int:
    try:
        from gui.app import main as gui_main
    except ImportError as exc:
        raise UserError(f"the panel needs PyQt6: pip install -e '.[gui]' ({exc})") from None
    rest = list(args.gui_args)
    return int(gui_main(rest[1:] if rest[:1] == ["--"] else rest) or 0)


@_app_errors
def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from engine.app import pack_path
    from engine.bench import run

    result = run(pack_path(args.pack), steps=args.steps, latency_ms=args.latency, compare=not args.no_compare,
                 transformers=not args.no_transformers, threads=2, rounds=args.rounds)
    if args.json:
        print(json.dumps(result, indent=None if args.compact else 2, default=float))
    else:
        for k, v in result.items():
            if k != "reference":
                print(f"{k:28s} {v:.2f}" if isinstance(v, float) else f"{k:28s} {v}")
    return 0


EVAL_EXTRAS = "cicada eval needs the export extras: pip install -e '.[export]'"


@_app_errors
def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    try:
        import matplotlib  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        print(f"cicada: {EVAL_EXTRAS}", file=sys.stderr)
        return EXIT_USAGE
    from engine.app import pack_path
    from export.evaluate import evaluate, pack_reconstructor

    pack = pack_path(args.pack)
    packfmt.load(pack, check_graphs=False)  # a bad pack fails here, in one line, before the classifier is fitted
    result = evaluate(pack, clips_per_prompt=args.clips, seconds=args.seconds, seed=args.seed, out_dir=args.out,
                      codec=pack_reconstructor(pack), progress=sys.stderr.isatty(), preset=args.preset)
    if args.json:
        print(json.dumps(result, default=float))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"text match: {Path(result['pack']).name}, {result['clips_per_prompt']} x "
                        f"{result['seconds']:g} s per prompt (seed {result['seed']})")
    table.add_column("#", justify="right")
    table.add_column("prompt")
    table.add_column("match", justify="right")
    table.add_column("heard as", justify="right")
    names = result["prompts"]
    for prompt, acc in result["per_prompt"].items():
        row = result["confusion"][names.index(prompt)]
        style = "green" if acc >= 0.999 else ("red" if acc <= 0.001 else "yellow")
        table.add_row(str(names.index(prompt)), prompt, f"[{style}]{acc:.0%}[/{style}]",
                      str(max(range(len(row)), key=row.__getitem__)))
    console = Console()
    console.print(table)

    def fmt(v: float | None, unit: str) -> str:
        return "n/a" if v is None else f"{v:.2f} {unit}"

    console.print(f"text match   mean {result['text_match_mean']:.1%}   min {result['text_match_min']:.1%}   "
                  f"(mean probability of the asked prompt {result['text_match_prob_mean']:.1%})")
    console.print(f"classifier   held-out accuracy {result['classifier_heldout_accuracy']:.1%} on the procedural corpus")
    console.print(f"codec        SI-SNR {fmt(result['si_snr_db'], 'dB')}   mel distance {fmt(result['mel_distance'], 'dB')}"
                  + ("   (the pack has no encoder.onnx)" if result["codec"] is None else ""))
    if result["codec"] is not None:
        console.print(f"codec ceiling {result['codec_recognised']:.1%} of the codec's own reconstructions of "
                      f"held-out clips are heard as their prompt; the LM's clips are heard like them "
                      f"{result['lm_agrees_with_codec']:.1%} of the time")
    console.print(f"confusion    {result['confusion_png']}")
    console.print(f"took         {result['seconds_taken']:.1f} s")
    return 0


def _number(kind: type, ok: Callable[[Any], bool], rule: str) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` where ``ok`` holds, else an error saying ``must be {rule}``."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return v

    return parse


def _positive(kind: type) -> Callable[[str], Any]:
    return _number(kind, lambda v: v > 0, "> 0")


_fraction = _number(float, lambda v: 0 <= v < 1, "at least 0 and below 1")
_nonnegative = _number(float, lambda v: v >= 0, ">= 0")
_phase_lock = _number(int, lambda v: 0 <= v <= 8, "0..8 (bins to a peak; 0 is off)")


def _prompt_numbers(text: str) -> tuple[int, ...]:
    """``"2,16, 7"`` -> ``(2, 16, 7)``: prompt numbers as prompts.txt counts its lines (the trainer checks the
    range)."""
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected prompt numbers separated by commas, like 2,16,7; got {text!r}") from None


def _prompt_pairs(text: str) -> tuple[tuple[int, int], ...]:
    """``"5:14, 2:4"`` -> ``((5, 14), (2, 4))``: pairs of prompt numbers (the trainer checks the range)."""
    try:
        pairs = tuple(tuple(int(v) for v in pair.split(":")) for pair in text.replace(" ", "").split(",") if pair)
    except ValueError:
        pairs = ((),)
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(
            f"expected pairs of prompt numbers like 5:14,2:4 (a prompt and the one its clips are heard as); "
            f"got {text!r}")
    return pairs  # type: ignore[return-value]


def _cmd_train(args: argparse.Namespace) -> int:
    _need_export_extra()
    from export import train

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # the stage's loop saves its checkpoint on the way out, then exit 130

    # a service manager, a CI runner or `kill` stops a long run with SIGTERM (a background job ignores SIGINT)
    main_thread = threading.current_thread() is threading.main_thread()  # (signals can only be set there)
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        return train.run_cli(args)
    except (train.TrainError, FileExistsError) as exc:
        raise UserError(str(exc)) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


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

    # ---- running: play / serve / render share the generator options
    gen = argparse.ArgumentParser(add_help=False)
    gen.add_argument("--pack", type=Path, default=None, help="pack folder (default: packs/default or $CICADA_PACK)")
    gen.add_argument("--preset", default="default", help="preset name in presets/ or a .toml path (default: default)")
    gen.add_argument("--prompt", default=None, help="text prompt (overrides the preset's)")
    gen.add_argument("--seed", type=int, default=None, help="random seed (same seed, same sound)")
    gen.add_argument("--compute", choices=["cpu", "cuda", "auto"], default="cpu", help="ONNX Runtime device")
    gen.add_argument("--ceiling", type=float, default=-1.0, help="limiter ceiling in dBFS (default -1)")
    gen.add_argument("--rate", type=_positive(int), default=None,
                     help="output sample rate; resampled from the pack's when different")

    live = argparse.ArgumentParser(add_help=False)
    live.add_argument("--device", default=None, help="output device: index or part of its name (see `cicada devices`)")
    live.add_argument("--latency", type=_positive(float), default=60.0,
                      help="target buffer in ms between generation and the device (default 60)")
    live.add_argument("--connect", nargs="+", default=None, metavar="PORT",
                      help="JACK ports to connect to, by name (e.g. system:playback_1 system:playback_2)")
    live.add_argument("--seconds", type=_positive(float), default=None, help="stop after this long (default: run)")
    live.add_argument("--null", action="store_true",
                      help="no sound device: generate in real time into a null sink (remote control, monitoring, tests)")
    ctl = live.add_argument_group("control (OSC, OSCQuery, MIDI)")
    ctl.add_argument("--osc-port", type=int, default=None, metavar="N",
                     help="OSC UDP port (default 9000; 0 = no OSC). See docs/osc.md for the addresses")
    ctl.add_argument("--oscquery-port", type=int, default=None, metavar="M",
                     help="OSCQuery HTTP port for controllers that discover parameters (default 9001)")
    ctl.add_argument("--osc-host", default="127.0.0.1", metavar="ADDR",
                     help="interface to listen on (default 127.0.0.1, this machine only; 0.0.0.0 = all, "
                          "needs --osc-allow)")
    ctl.add_argument("--osc-allow", nargs="+", default=None, metavar="ADDR",
                     help="client addresses or networks allowed to send OSC (e.g. 192.168.1.20 10.0.0.0/24)")
    ctl.add_argument("--midi-in", default=None, metavar="NAME",
                     help="MIDI input port to open (part of its name; see `cicada devices`)")
    ctl.add_argument("--midi-virtual", default=None, metavar="NAME",
                     help="create a virtual MIDI input with this name (ALSA, or JACK when there is no ALSA sequencer)")

    p = sub.add_parser("play", parents=[gen, live], help="play the default pack and preset now")
    p.add_argument("--out", type=Path, default=None, help="render into this WAV/FLAC file instead (needs --seconds)")
    p.set_defaults(func=_cmd_play)

    p = sub.add_parser("serve", parents=[gen, live], help="run headless for installations (logs, status, watchdog)")
    p.add_argument("--log", type=Path, default=None, help="log file, rotated (default: stderr only)")
    p.add_argument("--log-max-mb", type=_positive(int), default=10, help="rotate the log at this size (default 10)")
    p.add_argument("--log-keep", type=_positive(int), default=5, help="rotated logs to keep (default 5)")
    p.add_argument("--status-every", type=_positive(float), default=60.0, help="seconds between status lines")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("render", parents=[gen], help="render to a WAV/FLAC file, faster than real time")
    p.add_argument("--seconds", type=_positive(float), required=True, help="length to render")
    p.add_argument("--out", type=Path, required=True, help="output file (.wav or .flac)")
    p.set_defaults(func=_cmd_render)

    tr = sub.add_parser("train", help="train cicada's own codec and LM on the procedural corpus, then pack them")
    trs = tr.add_subparsers(dest="stage", required=True, metavar="STAGE")
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--steps", type=_positive(int), default=None, help="optimizer steps (default: the stage's)")
    run.add_argument("--minutes", type=_positive(float), default=None, help="wall-clock cap for the stage (default: codec 50, LM 70, "
                                                                               "decoder 35, LM focus 35, decoder focus 45)")
    run.add_argument("--batch", type=_positive(int), default=None, help="batch size (default: the stage's)")
    run.add_argument("--lr", type=_positive(float), default=None, help="peak learning rate")
    run.add_argument("--seed", type=int, default=0, help="seed for weights, corpus and batches (default 0)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="torch device (default auto)")
    run.add_argument("--fresh", action="store_true", help="start over instead of resuming the checkpoint")
    run.add_argument("--threads", type=_positive(int), default=None,
                     help="CPU threads for torch (default: all cores; 1 is faster on a busy machine)")
    root = Path("out/train")
    kind = argparse.ArgumentParser(add_help=False)
    kind.add_argument("--kind", choices=["spectral", "seanet"], default="spectral",
                      help="codec: spectral (the shipped pack's frame-rate STFT codec) or seanet (causal "
                           "SEANet; see docs/training.md); a resumed run keeps its checkpoint's kind")
    p = trs.add_parser("codec", parents=[run, kind], help="the causal stereo codec (resumable)")
    p.add_argument("--out", type=Path, default=root / "codec", help="run folder (default out/train/codec)")
    p.add_argument("--peak-weight", type=_nonnegative, default=None,
                   help="spectral codec: weight of where each partial under 1 kHz lies inside its 25-Hz bin "
                        "(see `cicada train decoder --peak-weight`; default 0)")
    p.set_defaults(func=_cmd_train)
    p = trs.add_parser("codebooks", help="re-fit a trained codec's codebooks by k-means on latents of every prompt "
                                         "(new tokens: train the LM and decoder on them next)")
    p.add_argument("--codec", type=Path, required=True,
                   help="codec checkpoint, or a pack folder whose codec is read back from its graphs")
    p.add_argument("--out", type=Path, default=root / "codebooks", help="run folder (default out/train/codebooks)")
    p.add_argument("--draws", type=_positive(int), default=None, help="draws of every prompt to fit on (default 16)")
    p.add_argument("--iterations", type=_positive(int), default=None,
                   help="k-means iterations per codebook (default 12)")
    p.add_argument("--seconds", type=_positive(float), default=None, help="length of each draw (default 4)")
    p.add_argument("--keep", type=int, default=None,
                   help="leading codebooks kept as trained (default 0; 1 keeps codebook 0's codes, so an LM's "
                        "surest codebook keeps its meaning)")
    p.add_argument("--held-out-draws", type=_positive(int), default=None,
                   help="held-out draws of every prompt the error is measured on (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    p.add_argument("--threads", type=_positive(int), default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument("--force", action="store_true", help="replace --out's checkpoint if it exists")
    p.set_defaults(func=_cmd_train)
    p = trs.add_parser("lm", parents=[run], help="the LM and text encoder on the codec's tokens (resumable)")
    p.add_argument("--out", type=Path, default=root / "lm", help="run folder (default out/train/lm)")
    p.add_argument("--codec", type=Path, default=root / "codec" / "checkpoint.pt",
                   help="codec checkpoint, or a pack folder whose encoder.onnx makes the tokens (e.g. packs/default)")
    p.add_argument("--context", type=_positive(int), default=None, help="ring-cache frames of the pack (default 150)")
    p.add_argument("--corpus-clips", type=_positive(int), default=None,
                   help="corpus clips of 8 s per prompt, encoded once and cached (default 512; the record's "
                        "held_out says how much of them the LM learned by heart)")
    p.add_argument("--hysteresis", type=_fraction, default=None,
                   help="encode the corpus keeping a frame's previous code while it is this near, as a fraction "
                        "of the residual's energy (default 0: always the nearest code; see docs/training.md)")
    p.add_argument("--context-noise", type=_fraction, default=None,
                   help="replace this fraction of the LM's input codes by random ones while training, so that it "
                        "leans on the prompt more than on its own context (default 0.1)")
    p.add_argument("--self-feed", type=_fraction, default=None,
                   help="replace this fraction of the LM's input codes by its own samples from a first pass "
                        "(parallel scheduled sampling; one more forward pass per step; default 0)")
    p.add_argument("--cfg-dropout", type=_fraction, default=None,
                   help="train this fraction of sequences without their prompt, for guidance (default 0.1)")
    p.add_argument("--init", type=Path, default=None,
                   help="start a fresh run from this LM checkpoint's weights, or a pack folder's LM (e.g. the LM "
                        "of the codec before `cicada train codebooks`, or packs/default), with a new optimizer "
                        "and schedule")
    p.add_argument("--focus", type=_prompt_numbers, default=None, metavar="N,N,...",
                   help="prompt numbers (1-based, as in prompts.txt) to draw more often: the prompts whose clips "
                        "`cicada eval` hears as another; with --focus-weight (default: none, every prompt equally)")
    p.add_argument("--focus-weight", type=_positive(float), default=None,
                   help="how many times as often the --focus prompts are drawn (default 1)")
    p.add_argument("--contrast", type=_prompt_pairs, default=None, metavar="A:B,...",
                   help="pairs of prompts the LM must tell apart by their text (a prompt and the one `cicada eval` "
                        "hears its clips as): each pair's clips are scored under the other prompt too, and must "
                        "cost --contrast-margin nats a code more there (one more forward pass of those clips; "
                        "default: none; it did not raise text match where measured: docs/training.md)")
    p.add_argument("--contrast-weight", type=_nonnegative, default=None,
                   help="weight of the --contrast hinge against the cross-entropy (default 1)")
    p.add_argument("--contrast-margin", type=_positive(float), default=None,
                   help="the --contrast margin, nats a code (default 0.25)")
    p.add_argument("--text-input", action=argparse.BooleanOptionalAction, default=None,
                   help="add the pooled prompt to every frame's input, besides cross-attention (default on)")
    p.set_defaults(func=_cmd_train)
    p = trs.add_parser("decoder", parents=[run],
                       help="fine-tune the codec's decoder on its frozen tokens (the LM stays valid)")
    p.add_argument("--out", type=Path, default=root / "decoder", help="run folder (default out/train/decoder)")
    p.add_argument("--codec", type=Path, default=root / "codec" / "checkpoint.pt",
                   help="codec checkpoint, or a pack folder whose codec is read back from its graphs and whose "
                        "decoder is fine-tuned from where the pack has it (e.g. packs/default)")
    p.add_argument("--code-noise", type=_fraction, default=None,
                   help="replace this fraction of the decoder's input codes by random ones while training, so "
                        "that it renders an LM's less certain codes as their family (default 0)")
    p.add_argument("--focus", type=_prompt_numbers, default=None, metavar="N,N,...",
                   help="prompt numbers (1-based, as in prompts.txt) to draw more often: the families the codec "
                        "renders worst (`cicada eval` prints them); with --focus-weight (default 2,16,3: the FM hum, "
                        "the sci-fi sizzle and the deep rumble; --focus '' draws every prompt equally)")
    p.add_argument("--focus-weight", type=_positive(float), default=None,
                   help="how many times as often the --focus prompts are drawn (default 4; 1 draws all equally)")
    p.add_argument("--flux-weight", type=_nonnegative, default=None,
                   help="weight of how much each band's frame loudness changes against the target's: a steady "
                        "hum must come out steady (default 3)")
    p.add_argument("--envelope-weight", type=_nonnegative, default=None,
                   help="the same on the audio after the overlap-add, in 4-ms frames (default 3)")
    p.add_argument("--init", type=Path, default=None,
                   help="start a fresh run from this decoder checkpoint's weights (one made for the same codec "
                        "with the same decoder options, e.g. train all's runs/decoder), with a new optimizer "
                        "and schedule")
    p.add_argument("--peak-weight", type=_nonnegative, default=None,
                   help="weight of where each partial under 1 kHz lies inside its 25-Hz bin (the magnitude tilt "
                        "across its peak against the target's), so a glide does not come out in steps (default 0)")
    p.add_argument("--phase-start", choices=["zero", "alternate"], default=None,
                   help="where the decoder's bins start their accumulated phase: alternate (pi in every odd "
                        "bin, which brings a low steady tone back at its level; the default) or zero (the "
                        "codec stage's)")
    p.add_argument("--phase-lock", type=_phase_lock, default=None, metavar="N",
                   help="lock every bin's phase to the loudest bin within N bins (identity phase locking, as "
                        "phase vocoders do), so the bins of one partial turn together and a steady tone stays "
                        "steady; 0 lets every bin keep its own phase (default 3)")
    p.add_argument("--magnitude-gate", action=argparse.BooleanOptionalAction, default=None,
                   help="give the decoder a learned per-bin gate that holds part of each bin's last magnitude, "
                        "so a steady sound can come out steady while attacks pass (a new head, started almost "
                        "shut; on by default)")
    p.add_argument("--learned-lock", action=argparse.BooleanOptionalAction, default=None,
                   help="with --phase-lock: let the decoder learn, bin by bin, how far each phase follows its "
                        "peak's, so a hum's partials lock while noise keeps its own phases (a new head, "
                        "started almost fully locked; on by default, and off with --phase-lock 0)")
    p.set_defaults(func=_cmd_train)
    p = trs.add_parser("pack", help="export the trained codec and LM as a pack")
    p.add_argument("--out", type=Path, default=Path("packs/default"), help="pack folder (default packs/default)")
    p.add_argument("--codec", type=Path, default=root / "codec" / "checkpoint.pt",
                   help="codec checkpoint, or the pack folder the LM or decoder was trained on (what is not "
                        "replaced is kept; --out may be that folder, with --force)")
    p.add_argument("--lm", type=Path, default=None,
                   help="LM checkpoint (default out/train/lm/checkpoint.pt; with --codec PACK and --decoder, "
                        "leaving it out keeps the pack's LM)")
    p.add_argument("--decoder", type=Path, default=None,
                   help="a `cicada train decoder` checkpoint whose decoder replaces the codec's (or the pack's)")
    p.add_argument("--quantize", choices=["none", "int8"], default="int8", help="LM weights (default int8)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_cmd_train)
    p = trs.add_parser("all", parents=[run, kind],
                       help="codec, LM, decoder fine-tune, a probe of what they confuse, the LM's and the "
                            "decoder's fine-tunes aimed at it, then the pack, each at its defaults (--steps, "
                            "--minutes, --batch, --lr and --seed apply to every stage)")
    p.add_argument("--runs", type=Path, default=root,
                   help="folder for the stages' run folders: codec, lm, decoder, probe, lm_focus, decoder_focus "
                        "(default out/train)")
    p.add_argument("--out", type=Path, default=Path("packs/default"), help="pack folder (default packs/default)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--peak-weight", type=_nonnegative, default=None,
                   help="the peak term (where each partial under 1 kHz lies inside its 25-Hz bin) in the codec "
                        "stage and both decoder fine-tunes (default 0; see docs/training.md)")
    p.add_argument("--rounds", type=_positive(int), default=1,
                   help="rounds of the probe and the two focus fine-tunes, each round from the one before "
                        "(default 1; round N's folders are probeN, lm_focusN, decoder_focusN)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("devices", help="list sound devices, JACK ports and MIDI inputs")
    p.set_defaults(func=_cmd_devices)

    p = sub.add_parser("presets", help="list the presets (shipped and saved) with their prompts")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("gui", help="the control panel (connects to a running engine, or starts one)", add_help=False)
    p.add_argument("gui_args", nargs=argparse.REMAINDER, help="panel options (cicada gui --help)")
    p.set_defaults(func=_cmd_gui)

    p = sub.add_parser("bench", help="time a pack: steps, frames, control latency, memory, reference ratios")
    p.add_argument("--pack", type=Path, default=None, help="pack folder (default: the default pack)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--compact", action="store_true", help="JSON on one line")
    p.add_argument("--steps", type=_positive(int), default=300, help="steps to time (default 300)")
    p.add_argument("--latency", type=_positive(float), default=60.0, help="latency setting for the control test")
    p.add_argument("--no-compare", action="store_true", help="skip the PyTorch / transformers reference runs")
    p.add_argument("--no-transformers", action="store_true", help="skip only the transformers reference")
    p.add_argument("--rounds", type=_positive(int), default=5,
                   help="paired rounds (cicada, then eager, back to back) for the eager ratio (default 5)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("eval", help="how well a pack follows its prompts (text-sound match) and its codec metrics")
    p.add_argument("--pack", type=Path, default=None, help="pack folder (default: packs/default or $CICADA_PACK)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--clips", type=_positive(int), default=2, help="clips per prompt (default 2)")
    p.add_argument("--seconds", type=_positive(float), default=10.0, help="length of each clip (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first clip of each prompt (default 0)")
    p.add_argument("--preset", default="default",
                   help="preset whose sampling settings (temperature, top-k, top-p, guidance) render the clips "
                        "(name or path; default: default)")
    p.add_argument("--out", type=Path, default=Path("out") / "eval",
                   help="folder for confusion.png and the cached classifier (default out/eval)")
    p.set_defaults(func=_cmd_eval)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gui"]:  # the panel parses its own options (argparse cannot pass "--x" through)
        argv = ["gui", "--", *argv[1:]]
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
