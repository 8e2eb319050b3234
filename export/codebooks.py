"""Re-fit a trained codec's residual codebooks by k-means on a balanced set of corpus latents.

The codec stage learns its codebooks by exponential moving averages of the
latents of its batches while the encoder is still moving under them; a codeword
that the encoder has moved away from is re-seeded on a random vector of one
batch. What it ends with fits the finished encoder loosely: the shipped codec's
codebook 0 uses 86 of its 1024 codes on held-out draws, and the four stages
leave 6 % of a latent's variance unexplained (up to 11 % for the tonal
families), which the decoder hears as a steady hum that flutters.

With encoder and decoder frozen, the codebooks can be fitted afterwards to the
latents they have to quantise, as k-means does, stage by stage on what the
stages before left::

    latents z [M, D] of draws of every prompt (the same number of frames each)
    residual r = z
    for each stage k:   embed[k] <- k-means(r), starting from the trained codebook
                        r <- r - embed[k][nearest(r)]

A codeword that ends a k-means iteration with nothing assigned moves onto the
vector the stage serves worst (farthest-point seeding). The result is a codec checkpoint (stage
``codec``) whose encoder and decoder are the source's and whose codebooks are
the new ones: its tokens are new, so the LM is trained again on it (``cicada
train lm --codec CKPT --init LM_CKPT`` starts from the old LM, whose codes
keep roughly their meaning), and the decoder is fine-tuned on them (``cicada
train decoder --codec CKPT``). Measured on the shipped pack, the codec gets better and an LM
warm-started on the new tokens did not (docs/training.md, "Re-fitted codebooks"), so no stage of
``cicada train all`` runs this.

Shapes: ``M`` latent vectors (frames), ``D`` latent dimension, ``K`` stages, ``N`` codewords per stage,
``P`` prompts.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export import data
from export.codec import ResidualVQ
from export.spectral import SpectralCodec
from export.train import (
    CHECKPOINT,
    CodecTrainConfig,
    TrainError,
    file_digest,
    git_commit,
    is_pack,
    load_codec,
    pack_codec,
    save_atomic,
    unpacked_codec,
)

log = logging.getLogger("cicada.train")


@dataclass
class CodebooksConfig:
    """``cicada train codebooks`` at the defaults: 16 draws of 4 s of every prompt (70 400 latent frames),
    12 k-means iterations per stage, measured on 8 held-out draws of every prompt (about a minute on 2
    CPU cores)."""

    seed: int = 0
    draws: int = 16
    seconds: float = 4.0
    iterations: int = 12
    held_out_draws: int = 8
    keep: int = 0  # leading codebooks kept as trained (1: codebook 0's codes, the LM's surest, stay)


HELD_OUT_SEED = 555
"""Seed of the held-out draws the quantisation error is measured on (the fit draws use ``seed + 1234``)."""


def nearest(x: torch.Tensor, embed: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """``x [M, D]``, ``embed [N, D]`` -> index ``[M]`` of each vector's nearest codeword (in chunks of rows, so
    the ``[M, N]`` distances never all exist at once)."""
    out = [ResidualVQ._distances(x[i: i + chunk], embed).argmin(-1) for i in range(0, x.shape[0], chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def kmeans_stage(r: torch.Tensor, init: torch.Tensor, iterations: int) -> torch.Tensor:
    """One stage: ``r [M, D]`` (what the earlier stages left), ``init [N, D]`` -> codebook ``[N, D]``.

    Lloyd iterations from ``init``; a codeword left with no vector moves onto the vector the codebook
    serves worst (largest squared error, counting the codewords moved before it), so that no code stays
    dead and the moved ones spread out.
    """
    embed = init.clone()
    n = embed.shape[0]
    for _ in range(iterations):
        idx = nearest(r, embed)
        counts = torch.bincount(idx, minlength=n)
        sums = torch.zeros_like(embed).index_add_(0, idx, r)
        live = counts > 0
        embed[live] = sums[live] / counts[live, None].to(r.dtype)
        dead = (~live).nonzero().squeeze(1).tolist()
        if dead:
            # farthest-point reseeding: each dead codeword takes the vector served worst so far, counting
            # the codewords just placed, so that they spread over the poorly served regions
            err = (r - embed[idx]).pow(2).sum(-1)
            for j in dead:
                worst = int(err.argmax())
                embed[j] = r[worst]
                err = torch.minimum(err, (r - r[worst]).pow(2).sum(-1))
    return embed


def residual_kmeans(z: torch.Tensor, init: torch.Tensor, iterations: int, keep: int = 0) -> torch.Tensor:
    """``z [M, D]``, trained codebooks ``init [K, N, D]`` -> re-fitted codebooks ``[K, N, D]`` (stage by stage on
    the residual, see the module docstring); the first ``keep`` stages stay as trained (their codes, which an
    LM has learned, keep their meaning) and the later ones are fitted to what those leave."""
    out = init.clone()
    r = z.clone()
    for k in range(init.shape[0]):
        if k >= keep:
            out[k] = kmeans_stage(r, init[k], iterations)
        r = r - out[k][nearest(r, out[k])]
    return out


def quantise_residual(z: torch.Tensor, embed: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``z [M, D]`` through the stages of ``embed [K, N, D]`` -> (what is left ``[M, D]``, codes used per stage)."""
    r = z.clone()
    used = []
    for e in embed:
        idx = nearest(r, e)
        used.append(int(idx.unique().numel()))
        r = r - e[idx]
    return r, used


def relative_error(z: torch.Tensor, labels: np.ndarray, embed: torch.Tensor, prompts: int) -> tuple[list[float], list[int]]:
    """Per prompt, the fraction of the latents' variance (about the mean of all of ``z``) the codebooks leave
    unexplained, ``[P]``, and the codes used per stage."""
    r, used = quantise_residual(z, embed)
    spread = (z - z.mean(0)).pow(2).sum(-1)
    left = r.pow(2).sum(-1)
    out = []
    for p in range(prompts):
        m = torch.from_numpy(labels == p)
        out.append(float(left[m].sum() / spread[m].sum().clamp_min(1e-12)) if bool(m.any()) else float("nan"))
    return out, used


@torch.no_grad()
def corpus_latents(encoder: torch.nn.Module, seed: int, draws: int, seconds: float, sample_rate: int
                   ) -> tuple[torch.Tensor, np.ndarray]:
    """The encoder's latents of ``draws`` draws of every prompt: ``z [M, D]`` and the prompt of each row ``[M]``."""
    rows, labels = [], []
    for p in range(len(data.prompts())):
        for n in range(draws):
            clip = torch.from_numpy(data.synth(p, seconds, seed=seed, n=n, sample_rate=sample_rate))[None]
            z = encoder(clip)[0].T
            rows.append(z)
            labels.append(np.full(len(z), p))
    return torch.cat(rows), np.concatenate(labels)


def refit(codec: Any, cfg: CodebooksConfig) -> dict[str, Any]:
    """Re-fit ``codec.quantizer``'s codebooks in place; returns what was measured (per-prompt relative error
    on held-out draws before and after, codes used per stage)."""
    codec.eval()
    sr = codec.cfg.sample_rate
    prompts = len(data.prompts())
    q = codec.quantizer
    z, _ = corpus_latents(codec.encoder, cfg.seed + 1234, cfg.draws, cfg.seconds, sr)
    held, held_labels = corpus_latents(codec.encoder, HELD_OUT_SEED, cfg.held_out_draws, cfg.seconds, sr)
    before, used_before = relative_error(held, held_labels, q.embed, prompts)
    log.info("codebooks: %d latent frames, held-out error %.4f before", len(z), float(np.mean(before)))
    new = residual_kmeans(z, q.embed.detach(), cfg.iterations, cfg.keep)
    after, used_after = relative_error(held, held_labels, new, prompts)
    log.info("codebooks: held-out error %.4f after", float(np.mean(after)))
    with torch.no_grad():
        q.embed.copy_(new)
        q.embed_avg.copy_(new)
        r = z
        for k in range(q.n_codebooks):
            idx = nearest(r, new[k])
            q.cluster_size[k].copy_(torch.bincount(idx, minlength=q.codebook_size).to(q.cluster_size.dtype))
            r = r - new[k][idx]
        q.inited.fill_(True)
    return dict(config=dataclasses.asdict(cfg), frames=int(len(z)), held_out_frames=int(len(held)),
                error_before=round(float(np.mean(before)), 5), error_after=round(float(np.mean(after)), 5),
                error_before_per_prompt=[round(v, 4) for v in before],
                error_after_per_prompt=[round(v, 4) for v in after],
                codes_used_before=used_before, codes_used_after=used_after)


def train_codebooks(out: str | Path, source: str | Path, cfg: CodebooksConfig | None = None, *,
                    command: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Re-fit the codebooks of ``source`` (a codec checkpoint or a pack folder) and write the result as a codec
    checkpoint ``out/checkpoint.pt``; returns its record (the source's codec record with ``codebooks``)."""
    cfg = cfg or CodebooksConfig()
    for name in ("draws", "iterations", "held_out_draws"):
        if int(getattr(cfg, name)) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.seconds > 0:
        raise TrainError(f"seconds must be > 0, got {cfg.seconds}")
    source = Path(source)
    if is_pack(source):
        pack, digest, record = pack_codec(source)
        codec = unpacked_codec(pack, "to re-fit its codebooks")
        record = dict(record, source=str(source))
    else:
        codec, record = load_codec(source)
        digest = file_digest(source)
        record = dict(record, source=str(source))
    if not isinstance(codec, SpectralCodec):
        raise TrainError(f"{source}: only the spectral codec's codebooks can be re-fitted here")
    if not 0 <= cfg.keep < codec.quantizer.n_codebooks:
        raise TrainError(f"--keep {cfg.keep}: keep 0 to {codec.quantizer.n_codebooks - 1} of the "
                         f"{codec.quantizer.n_codebooks} codebooks as trained (at least one is re-fitted)")
    n = codec.quantizer.codebook_size
    if cfg.draws * len(data.prompts()) * cfg.seconds * codec.cfg.frame_rate < n:
        raise TrainError(f"--draws {cfg.draws} gives fewer latent frames than the {n} codewords of a stage; "
                         "raise --draws")
    measured = refit(codec, cfg)
    record = dict(record, stage="codec",
                  codebooks=dict(measured, command=command or "cicada train codebooks", commit=git_commit(),
                                 source_digest=digest))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(CodecTrainConfig())
    config["codec"] = codec.cfg.to_dict()
    save_atomic(dict(model=codec.state_dict(), config=config, record=record, refit=True), out / CHECKPOINT)
    if not quiet:
        log.info("codebooks: wrote %s", out / CHECKPOINT)
    return record


__all__ = ["CodebooksConfig", "kmeans_stage", "residual_kmeans", "relative_error", "refit", "train_codebooks"]
