"""Train cicada's own codec and LM on the procedural food-sound corpus, in bounded time.

Four stages, each resumable from the checkpoint it leaves in its folder::

    cicada train codec   out/train/codec/checkpoint.pt   causal stereo codec, spectral + waveform losses
    cicada train lm      out/train/lm/checkpoint.pt      rotary LM + text encoder on the codec's tokens
    cicada train decoder out/train/decoder/checkpoint.pt the codec's decoder fine-tuned on its frozen tokens
    cicada train pack    packs/default                   ONNX pack, with the training record

``cicada train all`` runs codec, LM and decoder, then probes them (:mod:`export.probe`: a quick eval that
hears which prompts the LM confuses and which the codec loses), then fine-tunes each from its checkpoint,
aimed at those prompts: the LM in ``out/train/lm_focus`` (:meth:`LMTrainConfig.focus_tune`), the decoder
in ``out/train/decoder_focus`` (:meth:`DecoderTrainConfig.focus_tune`); the pack takes both. This is how
the shipped pack's fine-tunes were aimed, by hand, at the prompts its models of the day confused.

(``cicada train codebooks``, :mod:`export.codebooks`, re-fits a trained codec's codebooks by k-means: a
tool, not one of the stages ``train all`` runs.)

Training is step-based (so a seed gives the same models on the same device)
with a wall-clock cap per stage as a safety net; a stage stopped by its cap, by
Ctrl-C or by a crash resumes from its last checkpoint when run again. The
audio comes from :mod:`export.data`: codec batches are drawn fresh from the
synthesizer every step (seeded by step), the LM trains on a fixed corpus the
finished codec has encoded once (cached next to the LM checkpoint).

Shapes: audio ``[B, C, T]``, codes ``[B, K, F]`` (``K`` codebooks, ``F``
frames), delayed LM grid ``[B, K, F + max(delays)]``, logits ``[B, K, F, card]``.

CUDA is used when present (``--device auto``); the record says which device
trained each stage.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.pack import write_atomic
from export import data
from export.codec import Codec, CodecConfig, QuantizerOutput
from export.conditioner import TextEncoder, TextEncoderConfig, WordTokenizer, split_words
from export.evaluate import mel_filterbank
from export.lm import LM, LMConfig, apply_delay
from export.spectral import SpectralCodec, SpectralCodecConfig, direct_loss, floored_log, flux_l1

log = logging.getLogger("cicada.train")

CHECKPOINT = "checkpoint.pt"
DEFAULT_ROOT = Path("out/train")


class TrainError(Exception):
    """A training run that cannot go on; the message says what to do."""


# --------------------------------------------------------------------------- configs


@dataclass
class CodecTrainConfig:
    """Codec training at the defaults: the frame-rate spectral codec the shipped pack uses
    (:mod:`export.spectral`), 3600 steps of 0.8 s examples, 15-48 minutes on 2 CPU cores.

    Every frame gets per-bin targets (log magnitude and phase advance,
    ``magnitude_weight`` / ``phase_weight``) besides the audio losses. This
    stage is the recipe of the shipped codec, whose channels accumulate their
    phases independently (``stereo_phase = "independent"``, no mid/side
    term): :func:`train_decoder` then links them. ``stereo_phase = "linked"``
    in ``codec`` with a ``stereo_weight`` trains linked from the start; with the
    encoder's ``stereo_features`` too, one 50-minute run (3078 steps) was no
    better than this recipe (docs/training.md, "What it would take").
    :meth:`seanet` is the causal SEANet (``cicada train codec --kind seanet``,
    about 25 minutes), which uses only the audio losses; it is sized for the
    engine first (decoder step well under 3 ms per frame on 2 cores):
    n_filters 24, one LSTM layer, 4 x 1024 codes at 50 Hz.
    """

    seed: int = 0
    steps: int = 3600
    minutes: float = 50.0  # wall-clock cap for this stage (with the LM's 70: two hours at most)
    batch: int = 8
    segment: float = 0.8  # seconds per training example
    lr: float = 1e-3
    warmup: int = 100
    wave_weight: float = 0.1
    commit_weight: float = 0.1
    magnitude_weight: float = 0.5  # spectral codec only: per-bin log-magnitude L1
    phase_weight: float = 2.0  # spectral codec only: per-bin phase-advance (and inter-channel phase) loss
    stereo_weight: float = 0.0  # mid/side log-mel L1 (see spectral_loss)
    peak_weight: float = 0.0  # spectral codec only: where each low partial lies inside its bin (spectral.peak_loss)
    vq_warmup: int = 300  # steps trained as a plain autoencoder before the codebooks start
    dead_code_every: int = 10
    codec: dict[str, Any] = field(
        default_factory=lambda: dict(
            kind="spectral", sample_rate=data.SAMPLE_RATE, channels=data.CHANNELS, hop=640, hidden=512,
            dimension=128, encoder_blocks=3, decoder_blocks=4, kernel_size=3, n_codebooks=4, codebook_size=1024,
            stereo_phase="independent",  # the shipped codec's; `cicada train decoder` links it
            phase_start="zero",  # the shipped codec's; `cicada train decoder` moves it to "alternate"
        )
    )

    @classmethod
    def seanet(cls, **overrides: Any) -> CodecTrainConfig:
        """The causal SEANet's defaults: 2400 steps of 0.4 s examples (about 25 minutes on 2 cores)."""
        codec = dict(sample_rate=data.SAMPLE_RATE, channels=data.CHANNELS, n_filters=24, ratios=[8, 5, 4, 4],
                     dimension=128, lstm_layers=1, causal=True, pad_mode="constant", conv_shortcut=False,
                     n_codebooks=4, codebook_size=1024)
        return cls(**{"steps": 2400, "segment": 0.4, "codec": codec, **overrides})


CODEC_KINDS = {"spectral": CodecTrainConfig, "seanet": CodecTrainConfig.seanet}

LEGACY_DEFAULTS: dict[str, dict[str, Any]] = {
    "lm": {"context_noise": 0.0, "self_feed": 0.0, "contrast": (), "contrast_weight": 1.0, "contrast_margin": 0.25},
    "decoder": {"stereo_weight": 0.0, "stereo_phase": "independent", "band_weight": 0.0, "flux_weight": 0.0,
                "envelope_weight": 0.0, "code_noise": 0.0, "phase_start": "zero", "focus": (), "focus_weight": 1.0,
                "phase_lock": 0, "magnitude_gate": False, "learned_lock": False, "peak_weight": 0.0},
}
"""What a stage's saved config meant for fields it predates: a run resumes and loads as it was trained."""


def saved_config(stage: str, config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config dict with :data:`LEGACY_DEFAULTS` filled in where it predates a field."""
    return {**LEGACY_DEFAULTS.get(stage, {}), **config}


@dataclass
class DecoderTrainConfig:
    """Decoder fine-tuning on a trained codec: encoder and codebooks frozen, so the tokens (and the LM
    trained on them) stay valid while the sound gets better. ``train all`` runs it after the LM.

    A spectral codec trained with independent channel phases gets a linked decoder here
    (:func:`link_stereo_phase`): that is how the shipped pack's centred sounds stopped coming out wide.
    A decoder whose phases start at 0 gets the ``"alternate"`` start (:func:`export.spectral.start_phase`),
    with which steady tones come back at their level: the shipped pack's decoder since 2026-11-23.
    The defaults are the shipped decoder's recipe in one run: the band and envelope flux terms at 3, prompts
    2, 16 and 3 drawn 4 times as often (docs/training.md, "Why the codec loses prompts 2 and 16"), phase
    locking over 3 climbs with a magnitude gate and a learned lock (docs/training.md, "A learned lock"; the
    shipped decoder got there in four fine-tunes; one fine-tune from its predecessor scored 165 of 176 against 168).
    """

    seed: int = 0
    steps: int = 4000
    minutes: float = 35.0  # 4000 steps take about 28 minutes on 2 idle cores
    batch: int = 8
    segment: float = 0.4
    lr: float = 3e-4
    warmup: int = 100
    wave_weight: float = 0.1
    magnitude_weight: float = 0.5  # spectral codec only (see CodecTrainConfig)
    phase_weight: float = 2.0
    stereo_weight: float = 1.0  # mid/side log-mel L1 (see spectral_loss)
    band_weight: float = 0.5  # spectral codec only: mel-band loudness of each frame (see spectral.band_losses)
    flux_weight: float = 3.0  # spectral codec only: how much each band's loudness changes frame to frame
    envelope_weight: float = 3.0  # the same on the audio after overlap-add (see envelope_flux_loss)
    stereo_phase: str = "linked"  # spectral codec only: how the fine-tuned decoder phases its channels
    phase_start: str = "alternate"  # spectral codec only: where its bins' phases start (spectral.start_phase;
    #                                 the codec stage's recipe starts at 0, and the fine-tune moves it)
    phase_lock: int = 3  # spectral codec only: climbs to each bin's peak whose phase it takes
    #                      (spectral.locked_phases; 0 keeps every bin's own accumulated phase)
    magnitude_gate: bool = True  # spectral codec only: a learned per-bin hold of the last frame's magnitude
    #                              (spectral.gated_magnitudes; a new head, started almost shut)
    learned_lock: bool = True  # spectral codec with phase_lock only: a learned per-bin share of the peak's
    #                            phase (spectral.locked_phases; a new head, started almost fully locked)
    lock_weight: float = 1.0  # weight of its per-bin target (spectral.lock_targets) with learned_lock
    peak_weight: float = 0.0  # spectral codec only: where each low partial lies inside its bin (spectral.peak_loss)
    code_noise: float = 0.0  # fraction of the decoder's input codes replaced by random ones (the targets stay
    #                          the clean audio), so that it renders an LM's less certain codes as their family
    focus: tuple[int, ...] = (2, 16, 3)  # prompt numbers (1-based, as in prompts.txt) drawn focus_weight times as
    focus_weight: float = 4.0  # often (prompt_weights): the FM hum and the sci-fi sizzle, which the codec renders
    #                            worst (docs/training.md, "Why the codec loses prompts 2 and 16")
    batch_offset: int = 1_000_000  # batches the codec stage never saw

    @classmethod
    def focus_tune(cls, focus: Sequence[int], **overrides: Any) -> DecoderTrainConfig:
        """``train all``'s second decoder fine-tune, from the decoder stage's checkpoint (``init``): 8000 steps
        (about 21 minutes on 2 idle cores), drawing the prompts the probe heard the codec lose
        (:mod:`export.probe`) four times as often, as each of the shipped decoder's later fine-tunes did with
        the prompts of its day. Twice the decoder stage's steps since session 31: the shipped decoder had
        six fine-tunes of 4000 steps, and a second 4000 on a from-scratch run's decoder focus lifted it from
        158 to 161 of 176 clips (docs/training.md, "A longer decoder focus")."""
        return cls(**{**dict(focus=tuple(focus), focus_weight=4.0, steps=8000, minutes=45.0), **overrides})


@dataclass
class LMTrainConfig:
    """LM training at the defaults: about 80 minutes on 2 CPU cores (7 to encode the corpus, 70 to train;
    4800 steps took 68-73 min here, and the cap stops a slower machine's run at 70).

    The LM is half the depth of the ``tiny`` shape (8 layers of 256), and sees a
    ring of ``context`` frames at run time; training sequences are longer than
    the ring and use the same sliding window, so what it learned is what the
    engine's ring cache shows it.
    """

    seed: int = 0
    steps: int = 4800  # the shipped LM: 2400, then resumed to 4800 (docs/training.md, "Text at every frame")
    minutes: float = 70.0  # wall-clock cap of the training steps (the corpus encoding comes before them)
    batch: int = 12
    frames: int = 192  # frames per training sequence
    context: int = 150  # the pack's ring-cache length (frames of self-attention)
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.05
    cfg_dropout: float = 0.1  # fraction of sequences trained unconditioned (for guidance)
    context_noise: float = 0.1  # fraction of the input tokens replaced by random codes (targets stay clean):
    # the LM learns not to trust one odd token of its own context, and to lean on the prompt
    self_feed: float = 0.0  # fraction of the input codes replaced by the LM's own samples (see lm_loss)
    text_variation: float = 0.5  # fraction of prompts reworded (order, a dropped word)
    corpus_clips: int = 512  # per prompt: 16 let the LM learn its clips by heart (cross-entropy 0.1); at 128
    # it still did (held-out 0.51 nats a code above its training clips, 0.07 at 512: docs/training.md,
    # "A larger LM corpus")
    corpus_seconds: float = 8.0
    hysteresis: float = 0.0  # the quantiser's code hysteresis when encoding the corpus (ResidualVQ.encode;
    # 0.15 steadied the codes but did not raise text match: docs/training.md, "Held codes")
    text_len: int = 24
    held_out_clips: int = 4  # per prompt, never trained on: their cross-entropy is measured as the LM trains
    held_out_every: int = 1200  # steps between those measurements (and one at the end); 0: only at the end
    focus: tuple[int, ...] = ()  # prompt numbers (1-based, as in prompts.txt) drawn focus_weight times as often
    focus_weight: float = 1.0  # (prompt_weights): for a fine-tune (--init) on the prompts the LM confuses
    contrast: tuple[tuple[int, int], ...] = ()  # prompt pairs (1-based) the LM must tell apart by their text:
    # each pair's clips are also scored under the other prompt, and a hinge asks for contrast_margin nats a
    # code more there than under their own (text_margin_loss; both ways round). Not in train all: 5:14 at margin
    # 0.5 opened the gap to 1 nat a code and left the free-running clips as they were (docs/training.md,
    # "Telling 5 from 14 by the text")
    contrast_weight: float = 1.0
    contrast_margin: float = 0.25
    lm: dict[str, Any] = field(
        default_factory=lambda: dict(dim=256, layers=8, heads=8, ffn_dim=1024, positions="rotary",
                                     text_input=True)
    )
    text: dict[str, Any] = field(default_factory=lambda: dict(dim=256, layers=1, heads=4, ffn_dim=512))

    @classmethod
    def focus_tune(cls, **overrides: Any) -> LMTrainConfig:
        """The shipped LM's last stage: 1000 steps at a tenth of the learning rate, drawing prompts 5 and 7
        (the two the shipped LM confused most) three times as often; about 28 minutes on 2 cores
        (docs/training.md, "An LM fine-tune aimed at prompts 5 and 7": 168 of 176 clips before it, 169
        after, lowest prompt 0.625 before, 0.75 after). ``train all`` runs it from the LM stage's
        checkpoint (``--init``) with the prompts its probe heard that LM confuse (``focus=``)."""
        return cls(**{**dict(steps=1000, lr=1e-4, minutes=35.0, focus=(5, 7), focus_weight=3.0), **overrides})


# --------------------------------------------------------------------------- plumbing


def make_codec(config: dict[str, Any]) -> Codec | SpectralCodec:
    """A fresh codec from its config dict: ``kind = "spectral"`` gives a :class:`SpectralCodec`, no ``kind``
    the SEANet :class:`Codec`."""
    if config.get("kind") == "spectral":
        return SpectralCodec(SpectralCodecConfig.from_dict(config))
    return Codec(CodecConfig(**config))


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else CPU. ``cuda`` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: torch sees no CUDA GPU (install a CUDA build of torch, or use --device cpu)")
    if name not in ("cpu", "cuda"):
        raise TrainError(f"--device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)


def device_record(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save ``obj`` to ``path`` atomically (temporary sibling, fsync, rename)."""
    write_atomic(path, lambda fh: torch.save(obj, fh))


def load_checkpoint(path: Path, stage: str | None = None) -> dict[str, Any]:
    if stage and not path.is_file():
        raise TrainError(f"{path}: no {stage} checkpoint; run `cicada train {stage}` first (or pass its path)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise TrainError(f"{path}: cannot read the checkpoint ({exc}); delete it or pass --fresh to start over") from None


def git_commit() -> str | None:
    """The code's commit for a training record, ``<hash>-dirty`` when tracked files differ from it (None
    outside a git checkout)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7", "--exclude", "*"],
                             capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def resumed(saved: Any, asked: Any | None) -> Any:
    """The config of a resumed run: everything from the checkpoint except ``steps`` and ``minutes``,
    which the caller may raise (train longer) or lower (stop sooner)."""
    if asked is not None:
        saved.steps, saved.minutes = asked.steps, asked.minutes
    return saved


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


SCHEDULE_TIMED_STEPS = 50
"""Steps a run times before :meth:`Loop.schedule` may end the learning-rate schedule at the time cap."""
SCHEDULE_SLACK = 0.02
"""The share of a stage's steps its time cap may cut before :meth:`Loop.schedule` shortens the schedule."""


class Progress:
    """A rich progress bar with the running losses and ETA (plain log lines when not a terminal)."""

    def __init__(self, title: str, total: int, start: int, quiet: bool = False) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.quiet = quiet
        self.total = total
        self.last_log = 0.0
        self.bar = RichProgress(
            TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[losses]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=quiet,
        )
        self.task = self.bar.add_task(title, total=total, completed=start, losses="")
        self.bar.start()

    def update(self, step: int, losses: dict[str, float]) -> None:
        text = " ".join(f"{k} {v:.3f}" for k, v in losses.items())
        self.bar.update(self.task, completed=step, losses=text)
        now = time.monotonic()
        if (self.quiet or not self.bar.console.is_terminal) and now - self.last_log > 30:
            self.last_log = now
            log.info("step %d/%d  %s", step, self.total, text)

    def close(self) -> None:
        self.bar.stop()


class Smoothed:
    """Exponential moving averages of named losses (for display and the record)."""

    def __init__(self, beta: float = 0.98) -> None:
        self.beta = beta
        self.values: dict[str, float] = {}

    def add(self, **losses: float) -> dict[str, float]:
        for k, v in losses.items():
            old = self.values.get(k)
            self.values[k] = v if old is None else self.beta * old + (1 - self.beta) * v
        return dict(self.values)


# --------------------------------------------------------------------------- the loop both stages share


StepFn = Callable[[int], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Loop:
    """Where a stage stands (saved in its checkpoint) and the optimisation loop both stages run.

    ``step_fn(step) -> (loss, losses to show)`` builds the batch of ``step``
    and its loss; ``after(step)`` runs after the optimizer step (e.g. dead-code
    replacement); ``checkpoint()`` saves the stage, every two minutes and at the
    end, however the loop ends (done, the time cap, Ctrl-C, an error). A resumed
    stage that takes no step (it was done, or its cap was spent) leaves its
    checkpoint file as it was, byte for byte: the LM and the decoder name the
    codec they were trained on by that file's digest, so re-running ``train all``
    must not make a finished codec look like another one.
    """

    stage: str
    step: int = 0
    elapsed: float = 0.0  # seconds trained, over all runs of this stage
    smooth: Smoothed = field(default_factory=Smoothed)
    schedule_end: int = 0  # the step the learning rate's cosine ends at in this run (see schedule)
    clock: Callable[[], float] = time.monotonic

    def schedule(self, cfg: Any, steps_timed: int, seconds_timed: float) -> int:
        """Where the learning-rate schedule ends: at ``cfg.steps``, or, when the wall-clock cap will stop the
        stage first, at the step it will stop at, so that the rate has annealed by then on a slow machine.

        The step time is this run's average after :data:`SCHEDULE_TIMED_STEPS` steps (before that the
        schedule ends at ``cfg.steps``). A cap that cuts less than 2% of the steps leaves the schedule as it
        is (its last 2% hardly change the rate), so a run that fits is step-for-step deterministic. The end
        only ever moves earlier within a run: a machine that speeds up again does not raise the rate back.
        """
        end = self.schedule_end or cfg.steps
        if steps_timed < SCHEDULE_TIMED_STEPS:
            return end
        reach = self.step + (cfg.minutes * 60 - self.elapsed) * steps_timed / max(seconds_timed, 1e-9)
        if reach >= (1 - SCHEDULE_SLACK) * cfg.steps:
            return end
        return min(end, max(self.step + 1, int(reach)))

    def summary(self) -> dict[str, Any]:
        """What a stage's record says of its training: steps, minutes, smoothed losses, schedule end."""
        return dict(step=self.step, elapsed_minutes=round(self.elapsed / 60, 2), losses=self.smooth.values,
                    schedule_steps=self.schedule_end)

    def run(self, cfg: Any, opt: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float,
            step_fn: StepFn, checkpoint: Callable[[], None], quiet: bool,
            after: Callable[[int], None] | None = None) -> bool:
        """Train to ``cfg.steps`` (or the cap); returns whether it saved the checkpoint (not when it took no step
        from a resumed one: the caller's record is then the saved one's)."""
        bar = Progress(self.stage, cfg.steps, self.step, quiet)
        t0, last_ckpt = self.clock() - self.elapsed, self.clock()
        first_step, run_t0 = self.step, self.clock()
        self.schedule_end = cfg.steps
        try:
            while self.step < cfg.steps:
                if self.elapsed > cfg.minutes * 60:
                    log.warning("%s: the %.0f-minute cap stopped training at step %d of %d",
                                self.stage, cfg.minutes, self.step, cfg.steps)
                    break
                end = self.schedule(cfg, self.step - first_step, self.clock() - run_t0)
                if end < self.schedule_end:
                    if self.schedule_end == cfg.steps:
                        log.warning("%s: at this speed the %.0f-minute cap stops training near step %d of %d; "
                                    "the learning rate now anneals by then (more --minutes trains them all)",
                                    self.stage, cfg.minutes, end, cfg.steps)
                    self.schedule_end = end
                for g in opt.param_groups:
                    g["lr"] = lr_at(self.step, self.schedule_end, cfg.lr, cfg.warmup)
                loss, losses = step_fn(self.step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, max_norm)
                opt.step()
                if not math.isfinite(float(loss.detach())):
                    raise TrainError(f"{self.stage}: the loss became {float(loss.detach())} at step {self.step}; "
                                     "resume from the last checkpoint with a lower --lr")
                self.step += 1
                if after is not None:
                    after(self.step)
                bar.update(self.step, self.smooth.add(**losses))
                self.elapsed = self.clock() - t0
                if self.clock() - last_ckpt > 120:
                    checkpoint()
                    last_ckpt = self.clock()
        finally:
            bar.close()
            saved = self.step > first_step or first_step == 0
            if saved:
                self.elapsed = self.clock() - t0
                checkpoint()
        log.info("%s: %d steps in %.1f min, losses %s", self.stage, self.step, self.elapsed / 60, self.smooth.values)
        return saved


# --------------------------------------------------------------------------- codec


def stft(x: torch.Tensor, n_fft: int) -> torch.Tensor:
    """``x [N, T]`` -> complex spectra ``[N, n_fft // 2 + 1, frames]`` (Hann window, hop n_fft / 4)."""
    window = torch.hann_window(n_fft, device=x.device)
    return torch.stft(x, n_fft, hop_length=n_fft // 4, window=window, return_complex=True)


@functools.lru_cache(maxsize=32)
def mel_matrix(n_fft: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """``cicada eval``'s mel filters over the whole band (0 Hz to Nyquist) as a float32 tensor."""
    return torch.from_numpy(mel_filterbank(sample_rate, n_fft, n_mels, 0.0, sample_rate / 2).astype(np.float32))


MEL_SCALES: tuple[tuple[int, int], ...] = ((2048, 80), (1024, 64), (512, 40), (256, 20), (128, 10), (64, 5))
"""(n_fft, mel bands) of the spectral loss: long windows resolve pitch, short ones transients."""


def _log_mel_l1(fb: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """L1 between log10 mel energies (floor 1e-5) of complex spectra ``X``, ``Y [..., bins, frames]``."""
    ex, ey = fb @ (X.real.square() + X.imag.square()), fb @ (Y.real.square() + Y.imag.square())
    return (ex.clamp_min(1e-5).log10() - ey.clamp_min(1e-5).log10()).abs().mean()


def spectral_loss(x: torch.Tensor, y: torch.Tensor, sample_rate: int = data.SAMPLE_RATE,
                  stereo_weight: float = 0.0) -> torch.Tensor:
    """Multi-resolution spectral loss between reference ``x`` and estimate ``y`` (``[B, C, T]``).

    Per scale and channel: L1 between log10 mel energies (floor 1e-5, so
    inaudible detail costs nothing) plus spectral convergence of the linear
    magnitudes ``||X - Y||_F / ||X||_F``; averaged over scales. Channels are
    compared separately, so a wrong stereo balance costs as much as a wrong
    spectrum. Mel bands put as much weight below 500 Hz as above 4 kHz, which
    is where a young codec's errors (low rumble, missing air) hide.

    Comparing the channels separately leaves the phase between them free: a
    centred sound decoded with uncorrelated channels sounds wide and diffuse
    and costs nothing. With two channels and ``stereo_weight``, the log-mel L1
    of the mid ``(L + R) / 2`` and side ``(L - R) / 2`` signals is added with
    that weight (taken from the same STFTs, so it is nearly free).
    """
    b, c = x.shape[:2]
    stereo = c == 2 and stereo_weight > 0.0
    total = x.new_zeros(())
    for n_fft, n_mels in MEL_SCALES:
        X, Y = stft(x.flatten(0, 1), n_fft), stft(y.flatten(0, 1), n_fft)
        mx, my = X.abs().clamp_min(1e-7), Y.abs().clamp_min(1e-7)
        fb = mel_matrix(n_fft, n_mels, sample_rate).to(x.device)
        total = total + _log_mel_l1(fb, X, Y)
        total = total + torch.linalg.vector_norm(mx - my) / torch.linalg.vector_norm(mx).clamp_min(1e-7)
        if stereo:
            X, Y = X.unflatten(0, (b, c)), Y.unflatten(0, (b, c))
            mid_side = [(s[:, 0] + sign * s[:, 1]) * 0.5 for s in (X, Y) for sign in (1.0, -1.0)]
            total = total + stereo_weight * 0.5 * (_log_mel_l1(fb, mid_side[0], mid_side[2])
                                                   + _log_mel_l1(fb, mid_side[1], mid_side[3]))
    return total / len(MEL_SCALES)


ENVELOPE_SCALE = (512, 16)
"""(n_fft, mel bands) of :func:`envelope_flux_loss`: 4 ms frames."""


def envelope_flux_loss(x: torch.Tensor, y: torch.Tensor, sample_rate: int = data.SAMPLE_RATE) -> torch.Tensor:
    """How much the loudness of each mel band of ``y`` flutters, against ``x`` (both ``[B, C, T]``).

    Per channel and band: the mean frame-to-frame change of the log mel energy (4 ms frames, floored
    70 dB under the example's loudest band), compared as an L1 between ``x`` and ``y``. Like the
    ``"flux"`` of :func:`export.spectral.band_losses` but on the audio, after the overlap-add: two frames
    whose phases disagree partly cancel where they overlap, and a steady tone comes out pulsing. A
    statistic, so noise need only flutter as much as the reference, not in step with it.
    """
    n_fft, n_mels = ENVELOPE_SCALE
    fb = mel_matrix(n_fft, n_mels, sample_rate).to(x.device)

    def log_energy(a: torch.Tensor) -> torch.Tensor:
        X = stft(a.flatten(0, 1), n_fft)
        return floored_log(fb @ (X.real.square() + X.imag.square()), dims=(1, 2))  # [B*C, M, frames]

    return flux_l1(log_energy(y), log_energy(x), dim=-1)


@dataclass
class LossWeights:
    """Weights of :func:`reconstruction_losses`' terms (the spectral loss has weight 1)."""

    wave: float = 0.1
    magnitude: float = 0.5
    phase: float = 2.0
    stereo: float = 0.0
    band: float = 0.0
    flux: float = 0.0
    envelope: float = 0.0
    lock: float = 0.0
    peak: float = 0.0

    @classmethod
    def of(cls, cfg: Any) -> LossWeights:
        """The weights a codec or decoder training config says."""
        return cls(cfg.wave_weight, cfg.magnitude_weight, cfg.phase_weight, cfg.stereo_weight,
                   getattr(cfg, "band_weight", 0.0), getattr(cfg, "flux_weight", 0.0),
                   getattr(cfg, "envelope_weight", 0.0), getattr(cfg, "lock_weight", 0.0),
                   getattr(cfg, "peak_weight", 0.0))


def reconstruction_losses(codec: Codec | SpectralCodec, x: torch.Tensor, latent: torch.Tensor, w: LossWeights
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decode ``latent`` and compare with ``x`` (``[B, C, T]``): the decoded audio ``[B, C, T]`` and the
    losses, with their weighted sum as ``"total"``.

    A spectral codec's first block fades in (it has no frame before it), so its audio losses start one hop
    in, and it adds the per-bin frame targets of :func:`export.spectral.direct_loss` (the inter-channel
    phase of linked stereo with ``w.phase``); its decoder network runs once for both.
    """
    out: dict[str, torch.Tensor] = {}
    if isinstance(codec, SpectralCodec):
        hop = codec.cfg.hop_length
        spectrum = codec.decoder.spectrum(latent)
        y = codec.decoder.synthesize(*spectrum)[..., : x.shape[-1]]
        out.update(direct_loss(codec.decoder, latent, x, spectrum, bands=bool(w.band or w.flux), peaks=bool(w.peak)))
        xa, ya = x[..., hop:], y[..., hop:]
    else:
        y = codec.decoder(latent)[..., : x.shape[-1]]
        xa, ya = x, y
    out["spectral"] = spectral_loss(xa, ya, codec.cfg.sample_rate, w.stereo)
    out["wave"] = (xa - ya).abs().mean()
    if w.envelope:
        out["envelope"] = envelope_flux_loss(xa, ya, codec.cfg.sample_rate)
    zero = x.new_zeros(())
    out["total"] = (out["spectral"] + w.wave * out["wave"] + w.magnitude * out.get("magnitude", zero)
                    + w.phase * (out.get("phase", zero) + out.get("ipd", zero)) + w.band * out.get("band", zero)
                    + w.flux * out.get("flux", zero) + w.envelope * out.get("envelope", zero)
                    + w.lock * out.get("lock", zero) + w.peak * out.get("peak", zero))
    for name in ("band", "flux"):  # reported only where they are trained on
        if not getattr(w, name):
            out.pop(name, None)
    return y, out


def codec_batch(step: int, seed: int, batch: int, seconds: float, sample_rate: int,
                weights: np.ndarray | None = None) -> np.ndarray:
    """``[B, 2, seconds * sr]`` float32: random prompts, random crops of fresh draws (seeded by step).

    ``weights [P]`` (summing to 1) draws prompt ``i`` with probability ``weights[i]``; without them every
    prompt is equally likely (and the draws are those of every run before weights existed).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7, step]))
    n = round(seconds * sample_rate)
    out = np.empty((batch, data.CHANNELS, n), np.float32)
    count = len(data.prompts())
    for b in range(batch):
        idx = int(rng.integers(count)) if weights is None else int(rng.choice(count, p=weights))
        clip = data.synth(idx, seconds + 0.5, seed=seed + 1000, n=step * batch + b, sample_rate=sample_rate)
        start = int(rng.integers(sample_rate // 50, clip.shape[1] - n))
        out[b] = clip[:, start : start + n] * float(rng.uniform(0.5, 1.2))
    return dither(out, rng)


def prompt_weights(focus: Sequence[int], weight: float, count: int | None = None) -> np.ndarray | None:
    """Each prompt's share of the examples, ``[P]`` summing to 1: the prompts numbered in ``focus`` (1-based,
    as in prompts.txt) count ``weight`` times, the rest once. None (all equal) when there is nothing to focus."""
    count = count if count is not None else len(data.prompts())
    bad = [i for i in focus if not 1 <= int(i) <= count]
    if bad:
        raise TrainError(f"focus names prompt {bad[0]}, but prompts are numbered 1 to {count} (prompts.txt's lines)")
    if weight <= 0:
        raise TrainError(f"focus weight must be above 0, not {weight}")
    if not focus or weight == 1.0:
        return None
    w = np.ones(count)
    w[[int(i) - 1 for i in set(focus)]] = weight
    return w / w.sum()


def dither(x: np.ndarray, rng: np.random.Generator, level: float = 1e-4) -> np.ndarray:
    """Add white noise at -80 dBFS. Exact digital silence in a batch makes the
    CPU backward pass 5-10x slower (denormal floats); this keeps it at speed."""
    return (x + level * rng.standard_normal(x.shape, dtype=np.float32)).astype(np.float32)


@torch.no_grad()
def signal_preserving_init(codec: Codec, seed: int) -> None:
    """Re-draw every convolution so a signal keeps its scale through the stack (biases zero).

    PyTorch's default conv init shrinks activations by about sqrt(3) per
    layer; after the 15-odd layers of a SEANet encoder the latent is mostly
    bias and hardly depends on the input, and training spends its first
    thousands of steps undoing that. Weights here are drawn with variance
    1 / fan_in (the ELUs are near-linear at these levels), which lets the
    codec learn from the first step. Weight-normed layers get their direction
    and norm set to match.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in codec.modules():
        if not isinstance(m, torch.nn.Conv1d | torch.nn.ConvTranspose1d):
            continue
        transposed = isinstance(m, torch.nn.ConvTranspose1d)
        w = m.weight
        fan_in = (w.shape[0] if transposed else w.shape[1]) * w.shape[2]
        if transposed:  # each output sample sums kernel / stride taps
            fan_in = w.shape[0] * max(1, w.shape[2] // m.stride[0])
        new = torch.randn(w.shape, generator=gen) / math.sqrt(fan_in)
        if hasattr(m, "parametrizations") and "weight" in m.parametrizations:
            p = m.parametrizations.weight
            dims = tuple(d for d in range(new.dim()) if p.original0.shape[d] == 1)
            p.original1.copy_(new)
            p.original0.copy_(torch.linalg.vector_norm(new, dim=dims, keepdim=True))
        else:
            m.weight.copy_(new)
        if m.bias is not None:
            m.bias.zero_()


@torch.no_grad()
def replace_dead_codes(codec: Codec, z: torch.Tensor, threshold: float) -> int:
    """Move codewords that (almost) nobody uses onto vectors of this batch; returns how many moved.

    ``z [B, D, F]`` is the encoder output; a code is dead when its EMA usage is
    below ``threshold`` times the mean usage.
    """
    q = codec.quantizer
    residual = z.permute(0, 2, 1).reshape(-1, z.shape[1])
    moved = 0
    for i in range(q.n_codebooks):
        usage = q.cluster_size[i]
        dead = usage < threshold * usage.mean()
        n_dead = int(dead.sum())
        if n_dead:
            pick = torch.randint(0, residual.shape[0], (n_dead,), device=z.device)
            q.embed[i][dead] = residual[pick]
            q.embed_avg[i][dead] = residual[pick]
            q.cluster_size[i][dead] = usage.mean()
            moved += n_dead
        idx = q._nearest(residual, q.embed[i])
        residual = residual - F.embedding(idx, q.embed[i])
    return moved


def train_codec(
    out: str | Path = DEFAULT_ROOT / "codec",
    cfg: CodecTrainConfig | None = None,
    *,
    device: str = "auto",
    fresh: bool = False,
    quiet: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Train (or resume) the codec; returns the training record (also in the checkpoint)."""
    out = Path(out)
    ckpt_path = out / CHECKPOINT
    dev = pick_device(device)
    state = None
    if ckpt_path.exists() and not fresh:
        state = load_checkpoint(ckpt_path)
        if state.get("refit"):
            raise TrainError(f"{ckpt_path} holds re-fitted codebooks (`cicada train codebooks`), not a codec run "
                             "to resume; pass another --out, or --fresh to train a new codec there")
        cfg = resumed(CodecTrainConfig(**saved_config("codec", state["config"])), cfg)
        log.info("resuming the codec from %s at step %d of %d", ckpt_path, state["step"], cfg.steps)
    cfg = cfg or CodecTrainConfig()
    if cfg.peak_weight and cfg.codec.get("kind") != "spectral":
        raise TrainError(f"--peak-weight {cfg.peak_weight:g} weighs the spectral codec's per-bin magnitudes; the "
                         "SEANet codec has none: drop --peak-weight, or train the spectral codec (--kind spectral)")
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)  # decaying tails and fades are denormal floats: 5-10x slower on CPU
    codec = make_codec(cfg.codec)
    if isinstance(codec, Codec):
        signal_preserving_init(codec, cfg.seed)
    codec = codec.to(dev).train()
    opt = torch.optim.Adam(codec.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    loop = Loop("codec")
    if state is not None:
        codec.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        loop.step, loop.elapsed, loop.smooth.values = state["step"], state["elapsed"], state["losses"]
    sr = codec.cfg.sample_rate
    record = dict(stage="codec", config=dataclasses.asdict(cfg), device=device_record(dev),
                  command=command or "cicada train codec", commit=git_commit())
    latent: list[torch.Tensor] = []

    def checkpoint() -> None:
        record.update(loop.summary())
        save_atomic(dict(model=codec.state_dict(), optimizer=opt.state_dict(), step=loop.step, elapsed=loop.elapsed,
                         losses=loop.smooth.values, config=dataclasses.asdict(cfg), record=record), ckpt_path)

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x = torch.from_numpy(codec_batch(step, cfg.seed, cfg.batch, cfg.segment, sr)).to(dev)
        z = codec.encoder(x)
        if step < cfg.vq_warmup:
            # Plain autoencoder first: with codebooks from the start, the commitment loss
            # pulls the young encoder's output to a point and the decoder learns to
            # ignore it. The codebooks are seeded from the warmed-up latents.
            codec.quantizer.inited.fill_(False)
            qo = QuantizerOutput(z, z.new_zeros((), dtype=torch.int64), z.new_zeros(()))
        else:
            qo = codec.quantizer(z)
        latent[:] = [z.detach()]
        _, losses = reconstruction_losses(codec, x, qo.quantized, LossWeights.of(cfg))
        loss = losses.pop("total") + cfg.commit_weight * qo.commit_loss
        return loss, dict(**{k: float(v.detach()) for k, v in losses.items()}, commit=float(qo.commit_loss.detach()))

    def after(step: int) -> None:
        if cfg.dead_code_every and step > cfg.vq_warmup and step % cfg.dead_code_every == 0:
            replace_dead_codes(codec, latent[0], 0.05)

    # max_norm 10 is a guard only: typical gradient norms are 2-5.
    saved = loop.run(cfg, opt, list(codec.parameters()), 10.0, step_fn, checkpoint, quiet, after)
    return record if saved or state is None else state["record"]


def load_codec(path: str | Path, decoder: str | Path | None = None) -> tuple[Codec, dict[str, Any]]:
    """A trained codec (eval mode) and its record, from a codec checkpoint; with ``decoder``, the decoder
    weights of a ``cicada train decoder`` checkpoint made for this codec (its record then has ``decoder``)."""
    state = load_checkpoint(Path(path), "codec")
    if state.get("record", {}).get("stage") != "codec":
        raise TrainError(f"{path}: not a codec checkpoint (run `cicada train codec` first)")
    codec = make_codec(state["config"]["codec"])
    codec.load_state_dict(state["model"])
    record = dict(state["record"])
    if decoder is not None:
        drec = load_decoder(codec, decoder, file_digest(Path(path)), path)
        # a codec re-fitted from a pack (`cicada train codebooks`) carries the pack's decoder record: the new
        # fine-tune started from that decoder, so it stays inside as ``previous``
        record["decoder"] = dict(drec, **({"previous": record["decoder"]} if "decoder" in record else {}))
    return codec.eval(), record


def load_decoder(codec: Codec | SpectralCodec, path: str | Path, codec_digest: str, codec_name: str | Path
                 ) -> dict[str, Any]:
    """Put the decoder weights of a ``cicada train decoder`` checkpoint into ``codec`` (the codec called
    ``codec_name``, whose tokens have ``codec_digest``); returns the fine-tune's record."""
    dstate = load_checkpoint(Path(path), "decoder")
    drec = dstate.get("record", {})
    if drec.get("stage") != "decoder":
        raise TrainError(f"{path}: not a decoder checkpoint (run `cicada train decoder` first)")
    if drec.get("codec_digest") != codec_digest:
        raise TrainError(f"{path} was fine-tuned on another codec than {codec_name}; "
                         f"run `cicada train decoder --codec {codec_name} --fresh` for this codec")
    if isinstance(codec, SpectralCodec):
        saved = saved_config("decoder", dstate["config"])
        codec.set_stereo_phase(saved["stereo_phase"])
        set_decoder_options(codec, saved)
    codec.decoder.load_state_dict(dstate["model"])
    return {k: v for k, v in drec.items() if k != "codec_record"}


def set_decoder_options(codec: SpectralCodec, options: dict[str, Any]) -> None:
    """Give a spectral codec's decoder a fine-tune's phase start, phase locking, magnitude gate and learned
    lock (``options``: a :class:`DecoderTrainConfig` as a dict), before its weights are trained or loaded."""
    if options["learned_lock"] and not options["phase_lock"]:
        raise TrainError("--learned-lock needs --phase-lock N (N >= 1): it learns how far each bin follows "
                         "the peak that the lock finds")
    if codec.cfg.learned_lock and not options["phase_lock"]:
        raise TrainError("this decoder has a learned lock, which needs phase locking: pass --phase-lock N "
                         f"(it was trained with {codec.cfg.phase_lock})")
    codec.set_phase_start(options["phase_start"])
    codec.set_phase_lock(options["phase_lock"])
    if options["magnitude_gate"]:
        codec.add_magnitude_gate()
    if options["learned_lock"]:
        codec.add_learned_lock()


def link_stereo_phase(codec: SpectralCodec, mode: str) -> None:
    """Switch a trained spectral codec's decoder to stereo phase ``mode`` for fine-tuning.

    Independent -> linked: the left channel's advance head becomes the shared advance and the right's,
    which would now say the inter-channel phase difference, is zeroed, so the fine-tune starts from
    centred, fully correlated stereo and learns the width where the corpus has it.
    """
    codec.set_stereo_phase(mode)
    if codec.cfg.linked:
        n = codec.cfg.bins
        rows = slice(3 * n, 4 * n)  # head layout [heads (magnitude, phase[, gate][, lock]), C, N]: phase of channel 1
        with torch.no_grad():
            codec.decoder.net.out.weight[rows].zero_()
            codec.decoder.net.out.bias[rows].zero_()


def train_decoder(
    out: str | Path = DEFAULT_ROOT / "decoder",
    cfg: DecoderTrainConfig | None = None,
    *,
    codec_checkpoint: str | Path = DEFAULT_ROOT / "codec" / CHECKPOINT,
    device: str = "auto",
    fresh: bool = False,
    quiet: bool = False,
    command: str | None = None,
    init: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-tune (or resume fine-tuning) a trained codec's decoder on its own frozen tokens.

    ``codec_checkpoint`` may be a pack folder instead: its codec is read back from its graphs
    (:func:`export.unpack.codec_from_pack`) and its decoder fine-tuned from where the pack has it;
    ``cicada train pack --codec PACK --decoder CKPT`` then puts the result in a copy of the pack.
    ``init``, a decoder checkpoint of the same codec with the same decoder options, starts a new run from
    its weights (fresh optimizer and schedule; ``train all``'s decoder focus stage). A run being resumed
    ignores it.
    """
    out = Path(out)
    ckpt_path = out / CHECKPOINT
    dev = pick_device(device)
    from_pack = is_pack(codec_checkpoint)
    if from_pack:
        base, digest, _ = pack_codec(Path(codec_checkpoint))
        codec: Codec | SpectralCodec = unpacked_codec(base, "to fine-tune the decoder of a pack")
    else:
        codec, _ = load_codec(codec_checkpoint)
        digest = file_digest(Path(codec_checkpoint))
    state = None
    if ckpt_path.exists() and not fresh:
        state = load_checkpoint(ckpt_path, "decoder")
        if state["record"].get("codec_digest") != digest:
            raise TrainError(f"{ckpt_path} fine-tunes another codec than {codec_checkpoint}; pass --fresh")
        cfg = resumed(DecoderTrainConfig(**saved_config("decoder", state["config"])), cfg)
        log.info("resuming the decoder from %s at step %d of %d", ckpt_path, state["step"], cfg.steps)
    cfg = cfg or DecoderTrainConfig()
    weights = prompt_weights(cfg.focus, cfg.focus_weight)
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)
    if isinstance(codec, SpectralCodec) and codec.cfg.stereo_phase != cfg.stereo_phase:
        link_stereo_phase(codec, cfg.stereo_phase)
    if isinstance(codec, SpectralCodec):
        set_decoder_options(codec, dataclasses.asdict(cfg))
    init_record = None
    if state is None and init is not None:
        init_record = _init_decoder(codec, Path(init), digest, codec_checkpoint, cfg)
    codec = codec.to(dev)
    codec.encoder.eval().requires_grad_(False)
    codec.quantizer.eval().requires_grad_(False)
    codec.decoder.train()
    opt = torch.optim.Adam(codec.decoder.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    loop = Loop("decoder")
    if state is not None:
        codec.decoder.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        loop.step, loop.elapsed, loop.smooth.values = state["step"], state["elapsed"], state["losses"]
    sr = codec.cfg.sample_rate
    record = dict(stage="decoder", config=dataclasses.asdict(cfg), device=device_record(dev), codec_digest=digest,
                  command=command or "cicada train decoder", commit=git_commit(),
                  **({"codec_pack": str(codec_checkpoint)} if from_pack else {}))
    if state is not None and "init" in state.get("record", {}):
        record["init"] = state["record"]["init"]
    elif init_record is not None:
        record["init"] = init_record

    def checkpoint() -> None:
        record.update(loop.summary())
        save_atomic(dict(model=codec.decoder.state_dict(), optimizer=opt.state_dict(), step=loop.step,
                         elapsed=loop.elapsed, losses=loop.smooth.values, config=dataclasses.asdict(cfg),
                         record=record), ckpt_path)

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x = torch.from_numpy(codec_batch(cfg.batch_offset + step, cfg.seed, cfg.batch, cfg.segment, sr,
                                         weights)).to(dev)
        with torch.no_grad():
            z = codec.encoder(x)
            if cfg.code_noise > 0:
                rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 11, step]))
                codes = corrupt(codec.quantizer.encode(z), cfg.code_noise, codec.quantizer.codebook_size, rng)
                q = codec.quantizer.decode(codes)
            else:
                q = codec.quantizer(z).quantized
        _, losses = reconstruction_losses(codec, x, q, LossWeights.of(cfg))
        return losses.pop("total"), {k: float(v.detach()) for k, v in losses.items()}

    saved = loop.run(cfg, opt, list(codec.decoder.parameters()), 10.0, step_fn, checkpoint, quiet)
    return record if saved or state is None else state["record"]


def _init_decoder(codec: Codec | SpectralCodec, path: Path, digest: str, codec_name: str | Path,
                  cfg: DecoderTrainConfig) -> dict[str, Any]:
    """Load the decoder weights of the checkpoint at ``path`` (made for the codec with ``digest``, with the
    decoder options ``cfg`` has) into ``codec``; returns what the record says about it."""
    theirs = saved_config("decoder", load_checkpoint(path, "decoder").get("config", {}))
    mine = dataclasses.asdict(cfg)
    other = [k for k in ("stereo_phase", "phase_start", "phase_lock", "magnitude_gate", "learned_lock")
             if k in theirs and theirs[k] != mine[k]]
    if other:
        raise TrainError(f"--init {path} has another {other[0]} ({theirs[other[0]]!r}) than this run "
                         f"({mine[other[0]]!r}); pass the same decoder options")
    drec = load_decoder(codec, path, digest, codec_name)  # checks the stage and the codec, loads the weights
    return dict(checkpoint=str(path), digest=file_digest(path), step=drec.get("step"), command=drec.get("command"),
                focus=list(theirs.get("focus", ())))


def restart_reason(checkpoint: Path, init: Path, stage: str, focus: Sequence[int],
                   contrast: Sequence[Sequence[int]] = ()) -> str | None:
    """Why the fine-tune at ``checkpoint`` must start over from ``init`` (None: it may resume, or there is
    none yet): the file it started from has trained since (a re-run of ``train all`` with more --minutes),
    or is another, or the probe now aims it at other prompts, or (the LM's) pairs them with others."""
    if not checkpoint.exists():
        return None
    state = load_checkpoint(checkpoint, stage)
    saved = saved_config(stage, state.get("config", {}))
    if state.get("record", {}).get("init", {}).get("digest") != file_digest(init):
        return f"{checkpoint} was fine-tuned from an earlier {init}"
    if tuple(saved.get("focus", ())) != tuple(focus):
        return f"{checkpoint} was aimed at other prompts than ({','.join(map(str, focus))})"
    if [tuple(p) for p in saved.get("contrast", ())] != [tuple(p) for p in contrast]:
        return f"{checkpoint} told other prompts apart than ({','.join(f'{a}:{b}' for a, b in contrast)})"
    return None


# --------------------------------------------------------------------------- LM corpus


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class TokenSource:
    """What turns the corpus's audio into the LM's tokens: a codec checkpoint, or a pack's ``encoder.onnx``.

    ``encode(clip [C, N] float32) -> codes [K, F]``. ``digest`` names the
    exact file (the LM records it, and ``cicada train pack`` refuses an LM
    made on other tokens); ``record`` is the codec's training record.
    """

    path: Path
    encode: Callable[[np.ndarray], np.ndarray]
    sample_rate: int
    n_codebooks: int
    codebook_size: int
    digest: str
    record: dict[str, Any]
    pack: bool


def is_pack(path: str | Path) -> bool:
    """Whether ``path`` is a pack folder (it holds a manifest) rather than a checkpoint file."""
    from engine.pack import MANIFEST

    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def pack_codec(path: Path) -> tuple[Any, str, dict[str, Any]]:
    """A pack whose codec makes an LM's tokens: the loaded pack, its ``encoder.onnx`` digest and its codec
    record (the pack's ``[training.codec_training]`` with the pack's path and name)."""
    from engine import pack as packfmt

    try:
        pack = packfmt.load(path)
    except packfmt.PackError as exc:
        raise TrainError(str(exc)) from exc
    if pack.encoder is None:
        raise TrainError(f"{path}: the pack has no encoder.onnx, so the corpus cannot be turned into its "
                         "tokens; pass a codec checkpoint (`cicada train codec`) as --codec")
    codec_record = pack.info.get("training", {}).get("codec_training", {})
    return pack, file_digest(pack.encoder.file), dict(codec_record, pack=str(path), pack_name=pack.name)


def token_source(path: str | Path, hysteresis: float = 0.0, device: torch.device | None = None) -> TokenSource:
    """The tokens of a codec checkpoint or a pack folder.

    A checkpoint is encoded in PyTorch with the quantiser's ``hysteresis``. A pack is encoded by its
    ``encoder.onnx`` in ONNX Runtime; with ``hysteresis`` its codec is read back from its graphs
    (:func:`export.unpack.codec_from_pack`) and encoded in PyTorch, since the graph picks nearest codes.
    """
    path = Path(path)
    device = device or torch.device("cpu")
    from_pack = is_pack(path)
    if from_pack:
        from export.evaluate import pack_encoder

        pack, digest, record = pack_codec(path)
        if not hysteresis:
            encode = pack_encoder(pack, threads=max(1, torch.get_num_threads()))
            return TokenSource(path, encode, pack.audio.sample_rate, pack.codebooks.count,
                               pack.codebooks.cardinality, digest, record, pack=True)
        codec: Codec | SpectralCodec = unpacked_codec(pack)
    else:
        if not path.exists():
            raise TrainError(f"{path}: no codec checkpoint; run `cicada train codec` first, or pass a pack folder "
                             "(--codec packs/default) to train on its tokens")
        codec, record = load_codec(path)
        digest = file_digest(path)
    codec = codec.to(device)
    codec.quantizer.hysteresis = hysteresis

    @torch.no_grad()
    def encode(clip: np.ndarray) -> np.ndarray:
        return codec.encode(torch.from_numpy(clip)[None].to(device))[0].cpu().numpy()

    c = codec.cfg
    return TokenSource(path, encode, c.sample_rate, c.n_codebooks, c.codebook_size, digest, record, pack=from_pack)


def unpacked_codec(pack: Any, need: str = "for --hysteresis with a pack") -> SpectralCodec:
    """The pack's codec in PyTorch (:func:`export.unpack.codec_from_pack`), its errors as :class:`TrainError`
    that say what it was ``need``-ed for."""
    from export.unpack import UnpackError, codec_from_pack

    try:
        return codec_from_pack(pack)
    except UnpackError as exc:
        raise TrainError(f"{exc} (needed {need})") from None


LM_CORPUS_FIELDS = ("corpus_clips", "corpus_seconds", "hysteresis", "held_out_clips", "frames", "context",
                    "text_len")
"""What an LM fine-tune takes from the LM it starts from in ``train all``: the same corpus (read from the LM
stage's cache, not encoded again), held-out clips, crops and ring."""

LM_CORPUS_SEED = 2000
"""The LM corpus is ``data.corpus(cfg.seed + LM_CORPUS_SEED)``; its held-out clips (:func:`held_out_ce`) are
``data.corpus(cfg.seed + LM_HELD_OUT_SEED)``, draws the LM never trains on."""
LM_HELD_OUT_SEED = 9000


def encode_corpus(tokens: TokenSource, cfg: LMTrainConfig, quiet: bool = False,
                  held_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The LM corpus: ``codes [N, K, F]`` int16 and ``labels [N]`` (prompt index), seeded by cfg.seed;
    ``held_out``: the ``cfg.held_out_clips`` per prompt the LM is measured on instead."""
    codes, labels = [], []
    clips = cfg.held_out_clips if held_out else cfg.corpus_clips
    seed = cfg.seed + (LM_HELD_OUT_SEED if held_out else LM_CORPUS_SEED)
    total = clips * len(data.prompts())
    bar = Progress("held-out" if held_out else "encode", total, 0, quiet)
    for i, (idx, clip) in enumerate(data.corpus(seed, clips, cfg.corpus_seconds, tokens.sample_rate)):
        codes.append(tokens.encode(dither(clip, np.random.default_rng(i))).astype(np.int16))
        labels.append(idx)
        bar.update(i + 1, {})
    bar.close()
    return np.stack(codes), np.asarray(labels, np.int64)


def held_out_ce(lm: LM, text: TextEncoder, tok: WordTokenizer, codes: np.ndarray, labels: np.ndarray,
                prompts: list[str], frames: int, window: int, batch: int = 12) -> list[float]:
    """Teacher-forced cross-entropy per codebook (nats a code) of ``codes [N, K, F]`` under each clip's own
    prompt: the middle ``frames`` of every clip, no context noise, no rewording. Measured on the training
    corpus and on held-out clips alike, the two say how much of what the LM learned is the corpus by heart
    (docs/training.md, "A larger LM corpus")."""
    start = max(0, (codes.shape[-1] - frames) // 2)
    sums, count = np.zeros(lm.cfg.n_codebooks), 0
    was_training = lm.training
    lm.eval()
    text.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(codes), batch):
                crop = torch.from_numpy(codes[i : i + batch, :, start : start + frames].astype(np.int64))
                texts = [prompts[j] for j in labels[i : i + batch]]
                _, per_book = lm_loss(lm, text, tok, crop.to(next(lm.parameters()).device), texts, window)
                sums += np.asarray(per_book) * len(crop)
                count += len(crop)
    finally:
        lm.train(was_training)
        text.train(was_training)
    return [float(v) for v in sums / max(count, 1)]


def reword(text: str, rng: np.random.Generator) -> str:
    """A variation of a prompt as users type them: words reordered, one or two left out."""
    words = split_words(text)
    if len(words) > 2 and rng.random() < 0.5:
        del words[int(rng.integers(len(words)))]
    if len(words) > 4 and rng.random() < 0.2:
        del words[int(rng.integers(len(words)))]
    if rng.random() < 0.5:
        rng.shuffle(words)
    elif len(words) > 1 and rng.random() < 0.5:
        i = int(rng.integers(len(words) - 1))
        words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def lm_batch(
    codes: np.ndarray, labels: np.ndarray, prompts: list[str], cfg: LMTrainConfig, rng: np.random.Generator,
    weights: np.ndarray | None = None,
) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """Random crops ``[B, K, frames]`` of the corpus, their (possibly reworded, or empty) prompts, and their
    prompt indices ``[B]`` (0-based).

    ``weights [P]`` (:func:`prompt_weights`) is each prompt's share of the crops; None draws every clip
    equally (as the corpus has the same number of clips of each prompt, every prompt too)."""
    if weights is None:
        pick = rng.integers(0, len(codes), cfg.batch)
    else:
        per_clip = weights[labels] / np.bincount(labels, minlength=len(weights))[labels]
        pick = rng.choice(len(codes), cfg.batch, p=per_clip / per_clip.sum())
    starts = rng.integers(0, codes.shape[-1] - cfg.frames + 1, cfg.batch)
    crop = np.stack([codes[p, :, s : s + cfg.frames] for p, s in zip(pick, starts)]).astype(np.int64)
    texts = []
    for p in pick:
        u = rng.random()
        if u < cfg.cfg_dropout:
            texts.append("")
        elif u < cfg.cfg_dropout + cfg.text_variation * (1 - cfg.cfg_dropout):
            texts.append(reword(prompts[labels[p]], rng))
        else:
            texts.append(prompts[labels[p]])
    return torch.from_numpy(crop), texts, labels[pick]


def contrast_texts(texts: list[str], picked: np.ndarray, prompts: list[str],
                   pairs: Sequence[tuple[int, int]]) -> list[str | None] | None:
    """The other prompt of each crop's ``pairs`` entry (1-based prompt numbers, both ways round), or None
    for a crop with no pair or trained without text; None when no crop has one. ``picked [B]``: the crops'
    0-based prompt indices (:func:`lm_batch`)."""
    other = pair_map(pairs, len(prompts))
    out = [prompts[other[int(p)]] if t and int(p) in other else None for t, p in zip(texts, picked)]
    return out if any(out) else None


def pair_map(pairs: Sequence[tuple[int, int]], count: int) -> dict[int, int]:
    """``pairs`` (1-based prompt numbers) as 0-based prompt -> its other prompt, both ways round (a prompt in
    two pairs keeps its first); a number out of range or a prompt paired with itself is a TrainError."""
    other: dict[int, int] = {}
    for a, b in pairs:
        if not (1 <= a <= count and 1 <= b <= count) or a == b:
            raise TrainError(f"contrast pair {a}:{b}: prompts are numbered 1 to {count} (prompts.txt's lines), "
                             "and a pair names two different ones")
        other.setdefault(a - 1, b - 1)
        other.setdefault(b - 1, a - 1)
    return other


def corrupt(inputs: torch.Tensor, fraction: float, card: int, rng: np.random.Generator) -> torch.Tensor:
    """``inputs [B, K, T]`` with about ``fraction`` of its codes (never the special token ``card``)
    replaced by uniformly random codes ``0..card-1``."""
    if fraction <= 0:
        return inputs
    hit = torch.from_numpy(rng.random(tuple(inputs.shape)) < fraction).to(inputs.device) & (inputs != card)
    noise = torch.from_numpy(rng.integers(0, card, tuple(inputs.shape))).to(inputs.device)
    return torch.where(hit, noise, inputs)


def lm_loss(
    lm: LM, text: TextEncoder, tok: WordTokenizer, codes: torch.Tensor, texts: list[str], window: int,
    noise: float = 0.0, rng: np.random.Generator | None = None, self_feed: float = 0.0,
    contrast: list[str | None] | None = None, margin: float = 0.25, contrast_weight: float = 1.0,
    terms: dict[str, float] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Next-column cross-entropy on the delayed grid; returns (mean loss, per-codebook losses).

    Input is the grid shifted right by one all-special column, with a
    ``noise`` fraction of its codes made random (:func:`corrupt`, drawn from
    ``rng``); targets are the clean grid, and those equal to the special
    token (the delay pattern's fill) are ignored.

    ``self_feed`` (parallel scheduled sampling): a first pass without gradients samples every column from
    the LM's own prediction given the true context, and that fraction of the input codes is replaced by
    those samples before the training pass, so that the LM learns to go on from contexts of its own making
    (at run time it never sees a true one). Costs one more forward pass per step.

    ``contrast`` (:func:`contrast_texts`): for each crop, another prompt or None. The crops that have one
    are scored again under it, and ``contrast_weight`` times :func:`text_margin_loss` is added: a crop's
    codes should cost ``margin`` nats a code more under the other prompt than under its own, so that the
    prompt, not only the context, decides which of two close families the LM goes on with. Its mean gap
    (nats a code) goes into ``terms["margin"]``. Costs a forward pass of those crops.
    """
    special = lm.cfg.special
    delays = list(range(lm.cfg.n_codebooks))
    grid = apply_delay(codes, delays, special)  # [B, K, F + D]
    bos = torch.full_like(grid[:, :, :1], special)
    inputs = torch.cat([bos, grid[:, :, :-1]], dim=-1)
    rng = rng if rng is not None else np.random.default_rng()
    tokens, mask = tok(texts)
    tokens, mask = tokens.to(codes.device), mask.to(codes.device)
    empty = torch.tensor([not t for t in texts], device=codes.device)
    mask = mask.masked_fill(empty[:, None], 0)
    cross = text(tokens, mask) * (~empty)[:, None, None].to(torch.float32)
    if self_feed > 0:
        with torch.no_grad():
            probs = lm(inputs, cross.detach(), mask, window=window).float().softmax(-1)  # [B, K, T, card]
            u = torch.from_numpy(rng.random(probs.shape[:-1])).to(probs)
            own = torch.searchsorted(probs.cumsum(-1), u[..., None].contiguous()).squeeze(-1)
            own = own.clamp_(max=probs.shape[-1] - 1)
        own = torch.cat([bos, own[:, :, :-1]], dim=-1)  # the sample of column t is the input of column t + 1
        hit = torch.from_numpy(rng.random(tuple(inputs.shape)) < self_feed).to(inputs.device)
        inputs = torch.where(hit & (inputs != special) & (own != special), own, inputs)
    if noise > 0:
        inputs = corrupt(inputs, noise, special, rng)
    logits = lm(inputs, cross, mask, window=window)  # [B, K, T, card]
    target = grid.masked_fill(grid == special, -100)
    per_book = [
        F.cross_entropy(logits[:, k].reshape(-1, lm.cfg.card), target[:, k].reshape(-1), ignore_index=-100)
        for k in range(lm.cfg.n_codebooks)
    ]
    loss = torch.stack(per_book).mean()
    if contrast is not None and any(contrast):
        rows = torch.tensor([i for i, c in enumerate(contrast) if c], device=codes.device)
        other_tokens, other_mask = tok([c for c in contrast if c])
        other_tokens, other_mask = other_tokens.to(codes.device), other_mask.to(codes.device)
        other = lm(inputs[rows], text(other_tokens, other_mask), other_mask, window=window)
        hinge, gap = text_margin_loss(logits[rows], other, target[rows], margin)
        loss = loss + contrast_weight * hinge
        if terms is not None:
            terms["margin"] = gap
    return loss, [float(v.detach()) for v in per_book]


def code_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of each sequence's codes ``[B]``, nats a code: ``logits [B, K, T, card]``,
    ``target [B, K, T]`` with -100 where nothing is scored (the delay pattern's fill)."""
    nll = F.cross_entropy(logits.permute(0, 3, 1, 2), target, ignore_index=-100, reduction="none")  # [B, K, T]
    scored = (target != -100).to(nll.dtype)
    return (nll * scored).sum((1, 2)) / scored.sum((1, 2)).clamp(min=1)


def text_margin_loss(own: torch.Tensor, other: torch.Tensor, target: torch.Tensor,
                     margin: float) -> tuple[torch.Tensor, float]:
    """Hinge on how much more a sequence's codes cost under another prompt than under its own.

    ``own``, ``other``: logits ``[B, K, T, card]`` of the same inputs under the sequence's prompt and under
    the other one; ``target [B, K, T]`` as in :func:`code_nll`. Returns (the mean of
    ``max(0, margin - gap)``, the mean gap in nats a code). A gap at or past the margin costs nothing, so
    the LM is not pushed to make the other prompt's continuation absurd, only clearly less likely.
    """
    gap = code_nll(other, target) - code_nll(own, target)  # [B]
    return F.relu(margin - gap).mean(), float(gap.detach().mean())


def train_lm(
    out: str | Path = DEFAULT_ROOT / "lm",
    cfg: LMTrainConfig | None = None,
    *,
    codec_checkpoint: str | Path = DEFAULT_ROOT / "codec" / CHECKPOINT,
    device: str = "auto",
    fresh: bool = False,
    quiet: bool = False,
    command: str | None = None,
    init: str | Path | None = None,
    sized_like_init: bool = False,
    corpus_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train (or resume) the LM and text encoder on the codec's tokens; returns the record.

    ``codec_checkpoint`` is a ``cicada train codec`` checkpoint or a pack folder, whose ``encoder.onnx``
    then makes the tokens (:func:`token_source`). ``init``, an LM checkpoint or a pack folder (whose LM is
    read back from its graphs, :func:`export.unpack.lm_from_pack`), starts a new run from its weights (same
    shapes and tokenizer), with a fresh optimizer and schedule: after ``cicada train codebooks``, whose
    codes keep roughly their old meaning, the old LM learns the new ones in far fewer steps than from
    scratch; with ``cfg.focus``, a shipped LM learns the prompts it confuses without forgetting the others.
    A run being resumed ignores it. ``sized_like_init`` (the CLI's, which has no size options) takes the
    model sizes from ``init``; otherwise ``cfg``'s must match them. The encoded corpus is cached in
    ``corpus_dir`` (default ``out``; ``train all``'s focus stage reads the LM stage's).
    """
    out = Path(out)
    ckpt_path = out / CHECKPOINT
    dev = pick_device(device)
    state = None
    if ckpt_path.exists() and not fresh:
        state = load_checkpoint(ckpt_path)
        cfg = resumed(LMTrainConfig(**saved_config("lm", state["config"])), cfg)
        log.info("resuming the LM from %s at step %d of %d", ckpt_path, state["step"], cfg.steps)
    cfg = cfg or LMTrainConfig()
    tokens = token_source(codec_checkpoint, cfg.hysteresis, dev)
    digest = tokens.digest
    if state is not None and state["codec_digest"] != digest:
        raise TrainError(f"{ckpt_path} was trained on the tokens of another codec than {codec_checkpoint}; "
                         "pass --fresh to train the LM again on this codec")

    prompts = data.prompts()
    weights = prompt_weights(cfg.focus, cfg.focus_weight, len(prompts))  # bad numbers fail before the corpus
    pair_map(cfg.contrast, len(prompts))
    folder = Path(corpus_dir or out)
    codes, labels = _cached_corpus(folder, tokens, cfg, quiet)
    held = _cached_corpus(folder, tokens, cfg, quiet, held_out=True) if cfg.held_out_clips > 0 else None
    if codes.shape[-1] < cfg.frames:
        raise TrainError(f"corpus clips have {codes.shape[-1]} frames, fewer than --frames {cfg.frames}")

    source = None
    if state is None and init is not None:
        source = _lm_source(init)
        if sized_like_init:
            cfg = _sized_like(cfg, *source[:2])
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)
    tok = WordTokenizer.build(prompts, length=cfg.text_len)
    lcfg = LMConfig(n_codebooks=tokens.n_codebooks, card=tokens.codebook_size, **cfg.lm)
    lm = LM(lcfg).to(dev).train()
    text = TextEncoder(TextEncoderConfig(vocab_size=tok.vocab_size, max_len=cfg.text_len, **cfg.text)).to(dev).train()
    params = list(lm.parameters()) + list(text.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)],
                            lr=cfg.lr, betas=(0.9, 0.95))
    loop = Loop("lm")
    init_record = None
    if source is not None:
        init_record = _init_lm(lm, text, tok, source, init)
    if state is not None:
        lm.load_state_dict(state["lm"])
        text.load_state_dict(state["text"])
        opt.load_state_dict(state["optimizer"])
        loop.step, loop.elapsed, loop.smooth.values = state["step"], state["elapsed"], state["losses"]
    record = dict(stage="lm", config=dataclasses.asdict(cfg), device=device_record(dev),
                  command=command or "cicada train lm", commit=git_commit(), codec_digest=digest,
                  codec_record=tokens.record, **({"codec_pack": str(tokens.path)} if tokens.pack else {}), corpus=dict(clips=int(len(codes)), frames=int(codes.shape[-1])))
    if state is not None and "init" in state.get("record", {}):
        record["init"] = state["record"]["init"]
    elif init_record is not None:
        record["init"] = init_record

    def checkpoint() -> None:
        record.update(loop.summary())
        save_atomic(dict(lm=lm.state_dict(), text=text.state_dict(), optimizer=opt.state_dict(), step=loop.step,
                         elapsed=loop.elapsed, losses=loop.smooth.values, config=dataclasses.asdict(cfg),
                         lm_config=dataclasses.asdict(lcfg), text_config=dataclasses.asdict(text.cfg),
                         tokenizer=tok.tokenizer.to_str(), codec_digest=digest, record=record), ckpt_path)

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 11, step]))
        batch, texts, picked = lm_batch(codes, labels, prompts, cfg, rng, weights)
        terms: dict[str, float] = {}
        loss, per_book = lm_loss(lm, text, tok, batch.to(dev), texts, window=cfg.context, noise=cfg.context_noise,
                                 rng=rng, self_feed=cfg.self_feed,
                                 contrast=contrast_texts(texts, picked, prompts, cfg.contrast),
                                 margin=cfg.contrast_margin, contrast_weight=cfg.contrast_weight, terms=terms)
        ce = float(np.mean(per_book))
        return loss, dict(ce=ce, **{f"ce{k}": v for k, v in enumerate(per_book)}, **terms)

    def measure() -> None:
        """Held-out cross-entropy against the same measure on as many training clips (into the record)."""
        if held is None:
            return
        n = len(held[0])
        fit = held_out_ce(lm, text, tok, codes[:n], labels[:n], prompts, cfg.frames, cfg.context)
        new = held_out_ce(lm, text, tok, *held, prompts, cfg.frames, cfg.context)
        record["held_out"] = dict(step=loop.step, clips=n, ce=float(np.mean(new)), train_ce=float(np.mean(fit)),
                                  gap=float(np.mean(new) - np.mean(fit)),
                                  **{f"ce{k}": v for k, v in enumerate(new)})
        log.info("lm: step %d: held-out ce %.3f (%s), training clips %.3f: %.3f nats a code learned by heart",
                 loop.step, np.mean(new), " ".join(f"{v:.2f}" for v in new), np.mean(fit),
                 np.mean(new) - np.mean(fit))

    def after(step: int) -> None:
        if step == cfg.steps or (cfg.held_out_every > 0 and step % cfg.held_out_every == 0):
            measure()

    saved = loop.run(cfg, opt, params, 1.0, step_fn, checkpoint, quiet, after)
    if saved and held is not None and record.get("held_out", {}).get("step") != loop.step:
        measure()  # stopped by the cap: measured where it stopped
        checkpoint()
    return record if saved or state is None else state["record"]


def _cached_corpus(folder: Path, tokens: TokenSource, cfg: LMTrainConfig, quiet: bool,
                   held_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_corpus`, cached in ``folder`` (written atomically) under a name that says what it holds:
    the codec's digest, the seed, clips per prompt and their length, and the hysteresis if any."""
    kind, clips = ("held-out", cfg.held_out_clips) if held_out else ("corpus", cfg.corpus_clips)
    hysteresis = f"-h{cfg.hysteresis:g}" if cfg.hysteresis else ""
    path = folder / f"{kind}-{tokens.digest}-{cfg.seed}-{clips}x{cfg.corpus_seconds:g}s{hysteresis}.npz"
    if path.exists():
        with np.load(path) as z:
            return z["codes"], z["labels"]
    codes, labels = encode_corpus(tokens, cfg, quiet, held_out)
    write_atomic(path, lambda fh: np.savez(fh, codes=codes, labels=labels))
    return codes, labels


def _lm_source(path: str | Path) -> tuple[LM, TextEncoder, WordTokenizer, dict[str, Any]]:
    """The LM, text encoder, tokenizer and record that ``--init`` names: an LM checkpoint, or a pack folder
    whose LM is read back from its graphs (:func:`export.unpack.lm_from_pack`)."""
    if not is_pack(path):
        return load_lm(path)
    from engine import pack as packfmt
    from export.unpack import UnpackError, lm_from_pack

    try:
        return lm_from_pack(packfmt.load(path))
    except (packfmt.PackError, UnpackError) as exc:
        raise TrainError(f"--init {path}: {exc}") from None


def _sized_like(cfg: LMTrainConfig, lm: LM, text: TextEncoder) -> LMTrainConfig:
    """``cfg`` with the model sizes of the LM and text encoder a run starts from (``--init``): a fine-tune
    keeps its model's shape whatever the defaults say."""
    skip = {"n_codebooks", "card"}
    sizes = {k: v for k, v in dataclasses.asdict(lm.cfg).items() if k not in skip}
    text_sizes = {k: v for k, v in dataclasses.asdict(text.cfg).items() if k not in ("vocab_size", "max_len")}
    return dataclasses.replace(cfg, lm=sizes, text=text_sizes, text_len=text.cfg.max_len)


def _init_lm(lm: LM, text: TextEncoder, tok: WordTokenizer,
             source: tuple[LM, TextEncoder, WordTokenizer, dict[str, Any]], path: str | Path) -> dict[str, Any]:
    """Copy the weights of ``source`` (:func:`_lm_source` of ``path``) into ``lm`` and ``text``; returns what
    the record says about it. Shapes and tokenizer must match (the same prompt list)."""
    old_lm, old_text, old_tok, old_record = source
    if old_tok.tokenizer.to_str() != tok.tokenizer.to_str():
        raise TrainError(f"--init {path}: its tokenizer differs from this run's (another prompt list); "
                         "train the LM from scratch instead")
    for name, dst, src in (("LM", lm, old_lm), ("text encoder", text, old_text)):
        mine, theirs = dst.state_dict(), src.state_dict()
        bad = sorted(k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape)
        if bad or set(theirs) - set(mine):
            raise TrainError(f"--init {path}: its {name} has another shape than this run's "
                             f"({(bad or sorted(set(theirs) - set(mine)))[0]}); pass the same model sizes")
        dst.load_state_dict(theirs)
    where = {"pack": str(path)} if is_pack(path) else {"checkpoint": str(path), "digest": file_digest(Path(path))}
    return dict(**where, step=old_record.get("step"), command=old_record.get("command"),
                codec_digest=old_record.get("codec_digest"))


def load_lm(path: str | Path) -> tuple[LM, TextEncoder, WordTokenizer, dict[str, Any]]:
    """The trained LM, text encoder and tokenizer (eval mode) and the record, from an LM checkpoint."""
    from tokenizers import Tokenizer

    state = load_checkpoint(Path(path), "lm")
    if state.get("record", {}).get("stage") != "lm":
        raise TrainError(f"{path}: not an LM checkpoint (run `cicada train lm` first)")
    lm = LM(LMConfig(**state["lm_config"]))
    lm.load_state_dict(state["lm"])
    text = TextEncoder(TextEncoderConfig(**state["text_config"]))
    text.load_state_dict(state["text"])
    tok = WordTokenizer(Tokenizer.from_str(state["tokenizer"]))
    return lm.eval(), text.eval(), tok, state["record"]


# --------------------------------------------------------------------------- pack


PACK_SAMPLING: dict[str, float | int] = {"temperature": 0.9, "top_k": 250, "guidance": 1.5}
"""The ``[sampling]`` of a pack this recipe trains: the best text-sound match measured for the default
pack (docs/training.md, "Measured": guidance 3 made its clips rumbles and glitches, 1.5-2 the prompts)."""


def export_pack(
    out: str | Path = "packs/default",
    *,
    codec_checkpoint: str | Path = DEFAULT_ROOT / "codec" / CHECKPOINT,
    lm_checkpoint: str | Path | None = None,
    decoder_checkpoint: str | Path | None = None,
    quantize: str = "int8",
    overwrite: bool = False,
    command: str | None = None,
    float16: bool = True,
):
    """Export the trained models as a pack with the whole training record in its manifest.

    The LM is quantized as ``quantize`` says; with ``float16`` the other graphs store their weights as
    float16 (they still compute in float32), which keeps the default pack under 50 MB. ``lm_checkpoint``
    defaults to ``out/train/lm/checkpoint.pt``.

    ``codec_checkpoint`` may be a pack folder instead (:func:`_export_from_pack`): for an LM trained on its
    tokens (``cicada train lm --codec PACK``), for a decoder fine-tuned on them (``cicada train decoder
    --codec PACK``), or both. What is not replaced is kept byte for byte, and ``out`` may be that same folder.
    """
    from export.pack import pack_models

    if is_pack(codec_checkpoint):
        return _export_from_pack(out, Path(codec_checkpoint), lm_checkpoint=lm_checkpoint,
                                 decoder_checkpoint=decoder_checkpoint, quantize=quantize, overwrite=overwrite,
                                 command=command, float16=float16)
    codec, codec_record = load_codec(codec_checkpoint, decoder_checkpoint)
    lm, text, tok, lm_record = _checked_lm(lm_checkpoint, file_digest(Path(codec_checkpoint)), codec_checkpoint)
    cfg = LMTrainConfig(**saved_config("lm", lm_record["config"]))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_file = tok.save(Path(tmp) / "tokenizer.json")
        codec.quantizer.hysteresis = cfg.hysteresis  # the pack's encoder makes the tokens the LM learned
        training = dict(
            codec=dataclasses.asdict(codec.cfg),
            **_lm_training(lm, text, lm_record),
            export_command=command or "cicada train pack",
            codec_training=_tomlable(codec_record),
            weights=f"lm {quantize}; decoder, conditioner, encoder {'float16' if float16 else 'float32'} "
                    "(computed in float32)",
            corpus="export/data.py procedural synthesizer, 22 food-sound prompts (export/prompts.txt)",
        )
        return pack_models(
            out,
            codec=codec,
            lm=lm,
            text_encoder=text,
            tokenizer_file=tokenizer_file,
            name="cicada-food",
            description="cicada's own codec and LM, trained on the procedural corpus of the 22 food-sound prompts",
            prompts=data.prompts(),
            frames_per_step=1,
            context=cfg.context,
            text_len=cfg.text_len,
            quantize=quantize,
            source=_pack_source(),
            training=training,
            sampling=dict(PACK_SAMPLING),
            overwrite=overwrite,
            encoder=codec,
            float16=float16,
        )


def _checked_lm(path: str | Path | None, codec_digest: str, codec_name: str | Path
                ) -> tuple[LM, TextEncoder, WordTokenizer, dict[str, Any]]:
    """:func:`load_lm`, refused unless the LM was trained on the tokens whose digest is ``codec_digest``."""
    path = DEFAULT_ROOT / "lm" / CHECKPOINT if path is None else path
    lm, text, tok, record = load_lm(path)
    if record["codec_digest"] != codec_digest:
        raise TrainError(f"{path} was trained on the tokens of another codec than {codec_name}; "
                         f"train the LM again (`cicada train lm --codec {codec_name} --fresh`)")
    return lm, text, tok, record


def _lm_training(lm: LM, text: TextEncoder, lm_record: dict[str, Any]) -> dict[str, Any]:
    """The ``[training]`` entries an exported LM brings: its config, its text encoder's and its record."""
    return dict(lm=dataclasses.asdict(lm.cfg), text_encoder=dataclasses.asdict(text.cfg),
                lm_training=_tomlable({k: v for k, v in lm_record.items() if k != "codec_record"}))


def _pack_source() -> dict[str, str]:
    return {"kind": "trained", "corpus": "export.data", "commit": git_commit() or "unknown"}


def _export_from_pack(out: str | Path, base_path: Path, *, lm_checkpoint: str | Path | None,
                      decoder_checkpoint: str | Path | None, quantize: str, overwrite: bool, command: str | None,
                      float16: bool):
    """:func:`export_pack` with a pack as ``--codec`` (its arguments and defaults are there): the pack
    ``base_path`` with a new LM side, a fine-tuned decoder, or both (:func:`export.pack.derive_pack`).

    - ``lm_checkpoint``: an LM trained on ``base``'s tokens. One trained on held codes (``--hysteresis``)
      also gets an encoder graph that holds codes at its margin (``base``'s codec read back from its graphs).
      Without it, the default LM checkpoint is used unless ``decoder_checkpoint`` is given: then ``base``'s
      LM, conditioner and tokenizer are kept.
    - ``decoder_checkpoint``: a ``cicada train decoder --codec PACK`` checkpoint of ``base``; its decoder
      graph replaces ``base``'s, and its record becomes ``[training.codec_training.decoder]`` (the one it
      replaced kept inside it as ``previous``).
    """
    from export.pack import EncoderGraph, TextSide, derive_pack, lm_manifest
    from export.unpack import encoder_margin

    base, codec_digest, _ = pack_codec(base_path)
    fmt = "float16" if float16 else "float32"
    training: dict[str, Any] = {"export_command": command or "cicada train pack"}
    new: list[str] = []  # what the weights line says was made here
    codec: SpectralCodec | None = None
    decoder_step = encoder = None
    if decoder_checkpoint is not None:
        codec = unpacked_codec(base, "to export a decoder fine-tuned on a pack")
        drec = load_decoder(codec, decoder_checkpoint, codec_digest, base_path)
        before = base.info.get("training", {}).get("codec_training", {})
        training["codec"] = dataclasses.asdict(codec.cfg)  # the fine-tune may have linked the stereo phase
        training["codec_training"] = _tomlable(
            dict(before, decoder=dict(drec, **({"previous": before["decoder"]} if "decoder" in before else {}))))
        decoder_step = codec.eval().streaming_decoder(base.decoder["frames_per_step"])
        new.append(f"decoder fine-tuned from {base_path}'s ({fmt})")
    with tempfile.TemporaryDirectory() as tmp:
        text_side = None
        if lm_checkpoint is not None or decoder_checkpoint is None:
            from export.conditioner import ConditionerGraph
            from export.lm import LMStep

            lm, text, tok, lm_record = _checked_lm(lm_checkpoint, codec_digest, base_path)
            cfg = LMTrainConfig(**saved_config("lm", lm_record["config"]))
            training.update(_lm_training(lm, text, lm_record))
            text_side = TextSide(LMStep(lm, batch=2, context=cfg.context, text_len=cfg.text_len),
                                 ConditionerGraph(text, lm, text_len=cfg.text_len), tok.save(Path(tmp) / "tokenizer.json"),
                                 lm_manifest(lm), data.prompts(), cfg.context, cfg.text_len, quantize)
            if cfg.hysteresis:  # the pack's encoder picks nearest codes; this LM learned held ones
                codec = codec or unpacked_codec(base)
                codec.quantizer.hysteresis = cfg.hysteresis
                encoder = EncoderGraph(codec, base.encoder.input("audio").shape[-1] / base.audio.sample_rate)
                new.append(f"encoder read back from {base_path} with hysteresis {cfg.hysteresis:g} ({fmt})")
        training["encoder_hysteresis"] = cfg.hysteresis if encoder is not None else encoder_margin(base.info)
        kept = [part for part, replaced in (("lm, conditioner", text_side is not None),
                                            ("decoder", decoder_step is not None), ("encoder", encoder is not None))
                if not replaced]
        made = [f"lm {quantize}; conditioner {fmt}"] if text_side is not None else []
        as_in = [f"{', '.join(kept)} as in {base_path} (computed in float32)"] if kept else []
        training["weights"] = "; ".join([*made, *as_in, *new])
        return derive_pack(base_path, out, text_side=text_side, decoder_step=decoder_step, encoder=encoder,
                           float16=float16, training=training, source=_pack_source(), overwrite=overwrite)


def _tomlable(obj: Any) -> Any:
    """Drop None values (TOML has no null) and make tuples lists, recursively."""
    if isinstance(obj, dict):
        return {str(k): _tomlable(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        return [_tomlable(v) for v in obj if v is not None]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _overrides(cfg: Any, args: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, value)
    return cfg


def run_cli(args: Any) -> int:
    """``cicada train codec|lm|pack|all`` (parsed by engine.cli)."""
    logging.getLogger("cicada").setLevel(logging.INFO)
    command = command_line()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    common = ("steps", "minutes", "batch", "lr", "seed")
    if args.stage in ("codec", "all"):
        out = args.runs / "codec" if args.stage == "all" else args.out
        cfg = _overrides(CODEC_KINDS[getattr(args, "kind", None) or "spectral"](), args, (*common, "peak_weight"))
        rec = train_codec(out, cfg, device=args.device, fresh=args.fresh, command=command)
        print(f"codec: step {rec['step']}, {rec['elapsed_minutes']} min on {rec['device']}, "
              f"losses {_fmt(rec['losses'])} -> {out / CHECKPOINT}")
    if args.stage == "codebooks":
        from export.codebooks import CodebooksConfig, train_codebooks

        ckpt = args.out / CHECKPOINT
        if ckpt.exists() and not args.force:
            raise TrainError(f"{ckpt} exists; pass --force to replace it, or another --out")
        cfg = _overrides(CodebooksConfig(), args, ("draws", "iterations", "seed", "seconds", "held_out_draws",
                                                       "keep"))
        rec = train_codebooks(args.out, args.codec, cfg, command=command)["codebooks"]
        print(f"codebooks: held-out quantisation error {rec['error_before']:.4f} -> {rec['error_after']:.4f}, "
              f"codes used {rec['codes_used_before']} -> {rec['codes_used_after']} -> {ckpt} "
              f"(next: `cicada train lm --codec {ckpt}` and `cicada train decoder --codec {ckpt}`)")
        return 0
    if args.stage in ("lm", "all"):
        out = args.runs / "lm" if args.stage == "all" else args.out
        codec = args.runs / "codec" / CHECKPOINT if args.stage == "all" else args.codec
        cfg = _overrides(LMTrainConfig(), args, (*common, "context", "corpus_clips", "hysteresis", "context_noise",
                                                   "cfg_dropout", "self_feed", "focus", "focus_weight",
                                                   "contrast", "contrast_weight", "contrast_margin"))
        if getattr(args, "text_input", None) is not None:
            cfg.lm["text_input"] = args.text_input
        rec = train_lm(out, cfg, codec_checkpoint=codec, device=args.device, fresh=args.fresh, command=command,
                       init=getattr(args, "init", None), sized_like_init=True)
        print(f"lm: step {rec['step']}, {rec['elapsed_minutes']} min on {rec['device']}, "
              f"losses {_fmt(rec['losses'])} -> {out / CHECKPOINT}")
    decoder = getattr(args, "decoder", None)
    if args.stage in ("decoder", "all"):
        out = args.runs / "decoder" if args.stage == "all" else args.out
        codec = args.runs / "codec" / CHECKPOINT if args.stage == "all" else args.codec
        cfg = _overrides(DecoderTrainConfig(), args, (*common, "code_noise", "phase_start", "focus", "focus_weight",
                                                       "flux_weight", "envelope_weight", "phase_lock",
                                                       "magnitude_gate", "learned_lock", "peak_weight"))
        if cfg.phase_lock == 0 and getattr(args, "learned_lock", None) is None:
            cfg.learned_lock = False  # --phase-lock 0 turns the default learned lock off with it
        rec = train_decoder(out, cfg, codec_checkpoint=codec, device=args.device, fresh=args.fresh, command=command,
                            init=getattr(args, "init", None))
        decoder = out / CHECKPOINT
        print(f"decoder: step {rec['step']}, {rec['elapsed_minutes']} min on {rec['device']}, "
              f"losses {_fmt(rec['losses'])} -> {decoder}"
              + (f" (pack it with `cicada train pack{f' --codec {codec}' if is_pack(codec) else ''} "
                 f"--decoder {decoder}`)" if args.stage == "decoder" else ""))
    lm = args.lm if args.stage == "pack" else None
    if args.stage == "all":  # probe the run, then the fine-tunes aimed at what it confuses (export.probe)
        lm, decoder = _focus_stages(args, command, common, decoder)
    if args.stage in ("pack", "all"):
        codec = args.runs / "codec" / CHECKPOINT if args.stage == "all" else args.codec
        pack = export_pack(args.out, codec_checkpoint=codec, lm_checkpoint=lm, decoder_checkpoint=decoder,
                           quantize=getattr(args, "quantize", "int8"), overwrite=args.force, command=command)
        size = sum(f.stat().st_size for f in pack.path.iterdir()) / 1e6
        print(f"wrote {pack.path} ({size:.1f} MB)")
    return 0


def _focus_stages(args: Any, command: str, common: tuple[str, ...], decoder: Path) -> tuple[Path, Path]:
    """``train all`` after its LM and decoder stages: ``--rounds`` rounds (default 1) of the probe, then the
    LM's and the decoder's focus fine-tunes, each from the checkpoint the round before left and aimed at
    the prompts the probe heard it confuse; returns the two checkpoints the pack takes. Round 1's folders
    are ``probe``, ``lm_focus`` and ``decoder_focus``; round N's add N (``probe2``, ...)."""
    from export.probe import ProbeConfig, probe, summary

    runs, codec = args.runs, args.runs / "codec" / CHECKPOINT
    lm = runs / "lm" / CHECKPOINT
    for n in range(1, args.rounds + 1):
        tag = "" if n == 1 else str(n)
        heard = probe(runs / f"probe{tag}", codec_checkpoint=codec, lm_checkpoint=lm, decoder_checkpoint=decoder,
                      cfg=ProbeConfig())
        print(summary(heard))
        out = runs / f"lm_focus{tag}"
        base = saved_config("lm", load_checkpoint(lm, "lm")["config"])
        cfg = _overrides(LMTrainConfig.focus_tune(focus=tuple(heard["focus"]["lm"]),
                                                  **{k: base[k] for k in LM_CORPUS_FIELDS if k in base}),
                         args, common)
        rec = train_lm(out, cfg, codec_checkpoint=codec, device=args.device,
                       fresh=_start_again(args, out / CHECKPOINT, lm, "lm", cfg.focus, cfg.contrast),
                       command=command, init=lm, sized_like_init=True, corpus_dir=runs / "lm")
        print(_focus_done(f"lm focus{tag}", cfg.focus, cfg.focus_weight, rec, out / CHECKPOINT))
        out_dec = runs / f"decoder_focus{tag}"
        dcfg = _overrides(DecoderTrainConfig.focus_tune(heard["focus"]["decoder"]), args, (*common, "peak_weight"))
        rec = train_decoder(out_dec, dcfg, codec_checkpoint=codec, device=args.device,
                            fresh=_start_again(args, out_dec / CHECKPOINT, decoder, "decoder", dcfg.focus),
                            command=command, init=decoder)
        print(_focus_done(f"decoder focus{tag}", dcfg.focus, dcfg.focus_weight, rec, out_dec / CHECKPOINT))
        lm, decoder = out / CHECKPOINT, out_dec / CHECKPOINT
    return lm, decoder


def _start_again(args: Any, checkpoint: Path, init: Path, stage: str, focus: Sequence[int],
                 contrast: Sequence[Sequence[int]] = ()) -> bool:
    """Whether a focus fine-tune starts fresh: ``--fresh``, or :func:`restart_reason` says so (with a warning)."""
    why = None if args.fresh else restart_reason(checkpoint, init, stage, focus, contrast)
    if why:
        log.warning("%s; the %s's focus fine-tune starts again", why, "LM" if stage == "lm" else stage)
    return bool(args.fresh or why)


def _fmt(losses: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in losses.items())


def _focus_done(label: str, focus: Sequence[int], weight: float, rec: dict[str, Any], path: Path) -> str:
    """The line a focus fine-tune of ``train all`` ends with: its prompts and weight, steps, time, losses."""
    return (f"{label} ({','.join(map(str, focus)) or '-'} x{weight:g}): step {rec['step']}, "
            f"{rec['elapsed_minutes']} min, losses {_fmt(rec['losses'])} -> {path}")


def command_line() -> str:
    return "cicada " + " ".join(shlex.quote(a) for a in sys.argv[1:])


__all__ = [
    "CodecTrainConfig", "DecoderTrainConfig", "LMTrainConfig", "TrainError", "train_codec", "train_decoder", "train_lm", "export_pack",
    "load_codec", "load_decoder",
    "load_lm", "encode_corpus", "reword", "spectral_loss", "pick_device", "command_line",
]
