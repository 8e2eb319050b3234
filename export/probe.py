"""The probe: hear what a run's models confuse, and aim the fine-tunes that follow at those prompts.

``cicada train all`` runs it after the LM and decoder stages. It packs them (``runs/probe/pack``), renders
``clips`` clips of every prompt with the eval's renderer and classifier (:mod:`export.evaluate`: the
classifier is trained on the procedural corpus only, never on generated audio), and sends held-out corpus
clips through the codec. Then it splits the blame the way the shipped pack's fine-tunes were aimed by hand
(docs/training.md, "Why the codec loses prompts 2 and 16" and "An LM fine-tune aimed at prompts 5 and 7"):

- a prompt whose own reconstructions are heard as another prompt is lost in the codec: the **decoder's**
  focus fine-tune draws it more often;
- a prompt whose generated clips are heard as another more often than its reconstructions are is (also)
  the **LM's** confusion: the LM's focus fine-tune draws it more often.

Example: probe clips and reconstructions of five prompts (3 each; the number is what the classifier heard)::

    prompt   generated   reconstructed   blame
       2      6  6  2      2  2  2        LM       (the codec renders 2; the LM makes 6)
       5     14 14 14      5  5 14        both     (the codec loses 1 of 3; the LM all 3)
       7      1  7  7      7  1  7        decoder  (the codec itself turns 7 into 1, as often)
      16     16 16 16     13 16 16        decoder
       9      9  9  9      9  9  9        -

    -> lm focus (5, 2), decoder focus (5, 7, 16): the most-missed first, at most ``lm_max`` / ``decoder_max``
       (the LM's by how much more its clips miss than the reconstructions, then by its own misses);
       mistaken for (5:14, 2:6): each LM prompt with the prompt its clips are most often heard as. Only
       reported: ``cicada train lm --contrast 5:14`` trains on it, which did not help (docs/training.md,
       "Telling 5 from 14 by the text").

The probe's seeds are not those docs/training.md scores packs with (clips 0, 10, 20, 30; the held-out
codec clips of ``export.data.HELDOUT_SEED``), so the choice is not made on the clips that judge it.
The result is cached in ``runs/probe/probe.json`` with the digests of the three checkpoints it heard: a
re-run of ``train all`` probes again only when one of them changed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("cicada.train")

PROBE_FILE = "probe.json"


@dataclass
class ProbeConfig:
    """How hard the probe listens: about 5 minutes on 2 cores at the defaults (66 generated clips of 10 s,
    66 reconstructions of 6 s, the pack export; plus a minute to fit the classifier when none is cached)."""

    clips: int = 3  # generated clips per prompt
    seconds: float = 10.0  # as long as the eval's clips
    seed: int = 1000  # first clip's seed (the scoring runs use 0, 10, 20, 30)
    codec_clips: int = 3  # held-out reconstructions per prompt
    codec_seconds: float = 6.0
    codec_seed: int = 4242  # not export.data.HELDOUT_SEED, the eval's codec clips
    lm_max: int = 4  # at most this many prompts for the LM's focus
    decoder_max: int = 5  # and for the decoder's


@dataclass(frozen=True)
class Focus:
    """Prompt numbers (1-based, as in prompts.txt) each fine-tune is aimed at."""

    lm: tuple[int, ...]
    decoder: tuple[int, ...]
    mistaken_for: tuple[tuple[int, int], ...] = ()  # (LM prompt, the prompt its clips are most often heard as)


def choose_focus(confusion: np.ndarray, heard_as: dict[int, list[int]], lm_max: int = 4,
                 decoder_max: int = 5) -> Focus:
    """Split the probe's misses between the decoder and the LM (see the module docstring).

    ``confusion [P, P]``: counts of generated clips, rows asked, columns heard (0-based prompt indices).
    ``heard_as``: 0-based prompt index -> the labels of its reconstructions. A prompt with reconstructions
    heard as another goes to the decoder (most missed first); one whose clips are heard as another more
    often than its reconstructions, to the LM (the largest excess first, then the most missed), paired in
    ``mistaken_for`` with the prompt its clips are most often heard as. Ties go to the lower prompt number.
    """
    confusion = np.asarray(confusion)
    codec_missed = {i: sum(lab != i for lab in labs) / len(labs) for i, labs in heard_as.items() if labs}
    asked = confusion.sum(axis=1)
    clip_missed = {i: 1.0 - confusion[i, i] / asked[i] for i in range(len(confusion)) if asked[i]}
    excess = {i: m - codec_missed.get(i, 0.0) for i, m in clip_missed.items()}

    def worst(keys: dict[int, tuple[float, ...]], most: int) -> tuple[int, ...]:
        return tuple(i + 1 for i in sorted(keys, key=lambda i: (*(-k for k in keys[i]), i))[:most])

    lm = worst({i: (e, clip_missed[i]) for i, e in excess.items() if e > 1e-9}, lm_max)
    wrong = [confusion[p - 1] * (np.arange(len(confusion)) != p - 1) for p in lm]
    mistaken_for = tuple((p, int(np.argmax(row)) + 1) for p, row in zip(lm, wrong) if row.any())
    return Focus(lm=lm, decoder=worst({i: (m,) for i, m in codec_missed.items() if m > 0}, decoder_max),
                 mistaken_for=mistaken_for)


def _inputs(codec: Path, lm: Path, decoder: Path, cfg: ProbeConfig) -> dict[str, Any]:
    from export.train import file_digest

    return dict(codec=file_digest(codec), lm=file_digest(lm), decoder=file_digest(decoder),
                config=dataclasses.asdict(cfg))


def probe(folder: str | Path, *, codec_checkpoint: str | Path, lm_checkpoint: str | Path,
          decoder_checkpoint: str | Path, cfg: ProbeConfig | None = None, classifier: Any = None,
          progress: bool = True) -> dict[str, Any]:
    """Probe the run's models (see the module docstring) in ``folder``; returns the record, whose
    ``focus`` is ``{"lm": [...], "decoder": [...]}`` (prompt numbers, 1-based).

    ``classifier``: a fitted :class:`export.evaluate.SoundClassifier`, or None for the eval's (cached in
    ``folder/classifier.npz``, fitted there when missing or stale). A probe of the same three files with
    the same config is read back from ``folder/probe.json`` instead of run again.
    """
    from engine.pack import write_atomic
    from export import data
    from export import evaluate as ev
    from export.train import export_pack

    folder, cfg = Path(folder), cfg or ProbeConfig()
    codec_checkpoint, lm_checkpoint, decoder_checkpoint = map(Path, (codec_checkpoint, lm_checkpoint,
                                                                      decoder_checkpoint))
    inputs = _inputs(codec_checkpoint, lm_checkpoint, decoder_checkpoint, cfg)
    saved = folder / PROBE_FILE
    if saved.is_file():
        try:
            record = json.loads(saved.read_text())
            if record.get("inputs") == inputs:
                log.info("probe: %s heard these checkpoints already", saved)
                return _with_focus(record, cfg)
        except (OSError, ValueError) as exc:
            log.warning("probe: ignoring %s (%s); probing again", saved, exc)
    clf = classifier if classifier is not None else ev.load_or_fit(folder / "classifier.npz")
    pack_dir = folder / "pack"
    log.info("probe: packing the LM %s and decoder %s into %s", lm_checkpoint, decoder_checkpoint, pack_dir)
    export_pack(pack_dir, codec_checkpoint=codec_checkpoint, lm_checkpoint=lm_checkpoint,
                decoder_checkpoint=decoder_checkpoint, overwrite=True, command="cicada train all (probe)")
    result = ev.evaluate(pack_dir, clips_per_prompt=cfg.clips, seconds=cfg.seconds, seed=cfg.seed,
                         out_dir=folder, classifier=clf, progress=progress)
    reconstruct = ev.pack_reconstructor(pack_dir)
    if reconstruct is None:  # export_pack always writes an encoder; a pack without one cannot say
        raise RuntimeError(f"{pack_dir} has no encoder.onnx, so the probe cannot hear the codec")
    codec = ev.codec_metrics(reconstruct, seed=cfg.codec_seed, clips_per_prompt=cfg.codec_clips,
                             seconds=cfg.codec_seconds, latency_samples=int(reconstruct.latency_samples),
                             sample_rate=data.SAMPLE_RATE, classifier=clf)
    names = list(clf.prompts)
    heard = {names.index(p): labs for p, labs in codec["heard_as"].items()}
    record = _with_focus(dict(
        inputs=inputs, text_match_mean=result["text_match_mean"], text_match_min=result["text_match_min"],
        codec_recognised=codec["recognised"], confusion=result["confusion"],
        codec_heard_as={str(i + 1): [x + 1 for x in labs] for i, labs in sorted(heard.items())},
        prompts=names, seconds_taken=result["seconds_taken"]), cfg)
    write_atomic(saved, lambda fh: fh.write(json.dumps(record, indent=1).encode()))
    return record


def _with_focus(record: dict[str, Any], cfg: ProbeConfig) -> dict[str, Any]:
    """``record`` with ``focus`` made from what it heard (so that a cached probe follows today's rule)."""
    heard = {int(k) - 1: [x - 1 for x in labs] for k, labs in record["codec_heard_as"].items()}
    focus = choose_focus(np.asarray(record["confusion"]), heard, cfg.lm_max, cfg.decoder_max)
    return dict(record, focus=dict(lm=list(focus.lm), decoder=list(focus.decoder),
                                   mistaken_for=[list(p) for p in focus.mistaken_for]))


def summary(record: dict[str, Any]) -> str:
    """One line for the console: what the probe heard and where it aims the fine-tunes."""
    names = ",".join
    return (f"probe: text match {record['text_match_mean']:.2f} (min {record['text_match_min']:.2f}), codec "
            f"recognised {record['codec_recognised']:.2f}; LM focus ({names(map(str, record['focus']['lm'])) or '-'}; "
            f"heard as {names(f'{a}:{b}' for a, b in record['focus'].get('mistaken_for', [])) or '-'}), "
            f"decoder focus ({names(map(str, record['focus']['decoder'])) or '-'})")


__all__ = ["Focus", "ProbeConfig", "choose_focus", "probe", "summary"]
