"""Generator: prompt + parameters -> the next PCM block. No threads, seedable.

One *step* is one LM call (one column of the delay pattern); one *block* is
``F`` frames (the decoder's ``frames_per_step``) of ``hop`` samples each::

    params snapshot ──┐
    condition ────────┤
                      v
    pattern.input_column [K] ─> lm.step ─> logits [2, K, V] ─> guide + sample ─> column [K]
                                                                                   │
             decoder.step(codes [1, K, F]) <── F complete frames <── pattern.push ─┘
                      │
                      v
                 pcm [C, F*hop]

``lm_step()`` and ``decode()`` are separate so an engine can run them on two
workers (the LM for frame n+1 while the decoder renders frame n); ``next_block()``
does both in order. Given the same seed, prompt and parameter changes at the
same steps, the output is the same sample for sample.

Latency (what this stage adds between a change and the sound it makes):
``pattern.latency_frames`` columns of delay pattern, plus ``F - 1`` frames of
block assembly, plus the decoder's lookahead; see ``latency_samples``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from engine.codec import DecoderSession
from engine.conditioner import Condition, Conditioner, blend
from engine.lm import LMSession
from engine.pack import Pack
from engine.pattern import DelayPattern
from engine.sampling import SamplingParams, guide, sample


class GeneratorError(Exception):
    """A request the generator cannot honour (bad provider, bad parameter)."""


@dataclass(frozen=True)
class GenParams:
    """What the generator reads once per step. Replace it whole; never mutate."""

    prompt: str = ""
    prompt_b: str = ""  # second prompt to morph towards
    morph: float = 0.0  # 0 = prompt, 1 = prompt_b
    sampling: SamplingParams = field(default_factory=SamplingParams)
    version: int = 0  # bumped by whoever changes anything (for latency accounting)

    def with_changes(self, **changes: object) -> GenParams:
        return replace(self, version=self.version + 1, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_values(cls, v: Mapping[str, Any], version: int = 0, morph: float | None = None) -> GenParams:
        """The generator's share of parameter-registry values (``engine.params``): prompts, morph, sampling."""
        return cls(
            prompt=str(v["prompt"]),
            prompt_b=str(v["prompt_b"]),
            morph=float(v["morph"] if morph is None else morph),
            sampling=SamplingParams(float(v["temperature"]), int(v["top_k"]), float(v["top_p"]), float(v["guidance"])),
            version=version,
        )


def resolve_providers(device: str) -> list[str]:
    """``"cpu"`` / ``"cuda"`` / ``"auto"`` -> ONNX Runtime providers; refuse CUDA we don't have.

    ONNX Runtime silently falls back to the CPU when the CUDA provider cannot
    load; asking for ``cuda`` here fails loudly instead.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise GeneratorError(
                "the CUDA execution provider is not available in this ONNX Runtime "
                f"(available: {', '.join(available)}); install onnxruntime-gpu "
                "(pip install -e '.[cuda]') with a matching CUDA, or use --compute cpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available else [
            "CPUExecutionProvider"
        ]
    raise GeneratorError(f"unknown compute device {device!r}: use cpu, cuda or auto")


class Generator:
    """Owns a pack's ONNX Runtime sessions and streams PCM from it.

    Attributes: ``sample_rate``, ``channels``, ``hop`` (samples per frame),
    ``block_frames`` (F), ``block_samples`` (F * hop).
    """

    def __init__(
        self,
        pack: Pack,
        *,
        seed: int = 0,
        params: GenParams | None = None,
        lm_threads: int = 1,
        decoder_threads: int = 1,
        compute: str = "cpu",
    ) -> None:
        providers = resolve_providers(compute)
        self.pack = pack
        self.providers = providers
        self.sample_rate = pack.audio.sample_rate
        self.channels = pack.audio.channels
        self.hop = pack.audio.hop_length
        self.lm = LMSession(pack, lm_threads, providers)
        self.decoder = DecoderSession(pack, decoder_threads, providers)
        self.conditioner = Conditioner(pack, 1, providers)
        self.block_frames = self.decoder.frames_per_step
        self.block_samples = self.block_frames * self.hop
        cb = pack.codebooks
        self.pattern = DelayPattern(cb.delays, cb.special_token)
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self._guided = np.zeros((cb.count, cb.cardinality), np.float32)
        self._frames = np.zeros((cb.count, self.block_frames), np.int64)
        self._nframes = 0
        # (params, the prompt key they need, its condition): swapped whole, so a step never sees a mix
        self._staged: tuple[GenParams, tuple[str, str, float] | None, Condition] = (
            GenParams(), None, self.conditioner.null())
        self._applied: tuple[str, str, float] | None = None
        self.condition: Condition = self._staged[2]
        self.steps = 0
        self.resets = 0
        # params version of each of the last columns, to tag frames (control-latency accounting)
        self._col_versions = np.zeros(self.pattern.max_delay + 1, np.int64)
        self.block_version = 0  # version in force when codebook 0 of the block's first frame was sampled
        self.set_params(params or self._staged[0])
        self._apply_condition()

    # ------------------------------------------------------------------ latency

    @property
    def latency_samples(self) -> int:
        """Samples between the step a change takes effect and its first sound in the output."""
        return (self.pattern.latency_frames + self.block_frames - 1) * self.hop + self.decoder.lookahead_samples

    # ------------------------------------------------------------------ control

    def set_params(self, params: GenParams) -> None:
        """Replace the parameter snapshot; the next step reads it. Any thread may call this.

        A prompt change runs the conditioner here, in the caller's thread, so the
        step that picks it up only copies the new cross-attention inputs.
        """
        params.sampling.checked()
        key = (params.prompt, params.prompt_b, params.morph)
        cond = None if key == self._staged[1] else self.prepare(params)
        self._staged = (params, key, cond if cond is not None else self._staged[2])

    @property
    def params(self) -> GenParams:
        """The parameter snapshot in force (the next step reads it)."""
        return self._staged[0]

    def prepare(self, params: GenParams) -> Condition:
        """Compute the condition for ``params`` (the conditioner run; thread-safe, cached)."""
        a = self.conditioner.encode(params.prompt)
        if params.prompt_b.strip() and params.morph > 0.0:
            return blend(a, self.conditioner.encode(params.prompt_b), params.morph)
        return a

    def _apply_condition(self) -> None:
        _, key, cond = self._staged
        if key == self._applied:
            return
        self.lm.set_condition(cond.cross_k, cond.cross_v, cond.mask)
        self.condition = cond
        self._applied = key

    def reset(self) -> None:
        """Start a fresh stream (after a NaN, or on request); keeps prompt and seed position."""
        self.reset_context()
        self.decoder.reset()

    def reset_context(self) -> None:
        """The LM half of :meth:`reset` (the decoder may live on another worker)."""
        self.lm.reset()
        self.pattern.reset()
        self._nframes = 0
        self.resets += 1

    # ------------------------------------------------------------------ stepping

    def lm_step(self) -> np.ndarray | None:
        """One LM step; returns a complete frame of codes ``[K]`` or None (pattern warm-up)."""
        self._apply_condition()
        params = self._staged[0]
        s = params.sampling
        self._col_versions[self.pattern.columns % self._col_versions.size] = params.version
        logits = self.lm.step(self.pattern.input_column)
        if s.guidance == 1.0 or not self.lm.has_cross:
            guided = logits[0]
        else:
            guided = guide(logits, s.guidance, self._guided)
        column = sample(guided, s, self.rng)
        self.steps += 1
        return self.pattern.push(column)

    def next_codes(self) -> np.ndarray:
        """Step the LM until a block of ``F`` frames is complete: ``codes [K, F]`` (a reused buffer)."""
        while True:
            frame = self.lm_step()
            if frame is None:
                continue
            self._frames[:, self._nframes] = frame
            if self._nframes == 0:
                # the frame just completed had its codebook 0 sampled max_delay columns ago
                c = self.pattern.columns - 1 - self.pattern.max_delay
                self.block_version = int(self._col_versions[c % self._col_versions.size])
            self._nframes += 1
            if self._nframes == self.block_frames:
                self._nframes = 0
                return self._frames

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """``codes [K, F]`` -> ``pcm [C, F*hop]`` float32 (a reused buffer)."""
        return self.decoder.step(codes)

    def next_block(self) -> np.ndarray:
        """The next ``pcm [C, F*hop]`` block, LM and decoder in sequence."""
        return self.decode(self.next_codes())
