"""Explicit-state streaming form of the codec decoder, for ONNX export.

:class:`StreamingDecoder` turns a :class:`~export.codec.Codec` decoder into a
fixed-shape step graph::

    (codes [B, K, F], step_in [1], *state_in) -> (pcm [B, C, F*hop], step_out [1], *state_out)

How it stays exact
------------------
Each layer runs with a fixed streaming *delay*: sample ``j`` of its output
stream is sample ``j - D`` of the layer's offline output. ``step`` counts the
frames already decoded, so every layer knows statically (in the graph: from
``step`` by integer arithmetic) which offline index each buffered sample has.
Samples with a negative offline index are *pre-roll*; they are never trusted:

* stride-1 conv, padding ``pl``/``pr``: delay ``d = pr`` (constant padding) or
  ``max(pl, pr)`` (reflect padding, which needs ``pl`` future samples at the
  start), a cache of ``pl + d`` past input samples. Before the valid conv,
  pre-roll positions of ``cat(cache, x)`` are overwritten with what offline
  padding puts there: zeros, or the mirror image around offline index 0
  (gather with clamped indices, selected by ``torch.where``).
* LSTM: stepped frame by frame; (h, c) only advance on frames whose offline
  index is >= 0, so the pre-roll never reaches the state.
* transposed conv (stride r, kernel k): overlap-add state of ``k - r`` samples,
  pre-roll inputs zeroed, bias added on emission; delay ``D * r + trim_left``.
* residual blocks: the shortcut is delayed by the branch's delay (delay line).
* the output's pre-roll (the first ``lookahead_samples`` samples) is zeroed.

So stream sample ``i`` equals offline ``codec.decode(all codes)`` sample
``i - lookahead_samples`` from the very first sample on, for causal and
non-causal, constant and reflect padding. Only the end differs (offline pads
the end of the sequence; a stream has none).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from export.codec import (
    Codec,
    CodecConfig,
    LSTMBlock,
    PaddedConv1d,
    ResidualUnit,
    TrimmedConvTranspose1d,
)
from export.onnx import GraphSpec, TensorSpec

StateShape = tuple[str, tuple[int, ...]]  # (name, shape), float32
_LayerOut = tuple[torch.Tensor, list[torch.Tensor]]  # (y, new state)


class _Ctx:
    """Static bookkeeping while layers are built: rate, delay, names, batch."""

    def __init__(self, batch: int, frames: int) -> None:
        self.batch = batch
        self.frames = frames
        self.spf = 1  # samples per frame at the current layer's rate
        self.delay = 0  # accumulated streaming delay, in samples of the current rate

    @property
    def n(self) -> int:
        """Samples per call at the current rate."""
        return self.frames * self.spf


def _plain_conv(conv: nn.Conv1d) -> nn.Conv1d:
    """A plain Conv1d holding ``conv``'s effective (weight-norm folded) weight.

    (Deep-copying a parametrized module and removing the parametrization from
    the copy would also strip it from the original: they share one class.)
    """
    plain = nn.Conv1d(
        conv.in_channels, conv.out_channels, conv.kernel_size[0], dilation=conv.dilation[0], bias=conv.bias is not None
    )
    with torch.no_grad():
        plain.weight.copy_(conv.weight)
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)
    return plain


def _offline_index(step: torch.Tensor, spf: int, offset: int, length: int) -> torch.Tensor:
    """Offline index of each of ``length`` buffered samples: ``step * spf - offset + p``. [length] int64."""
    return step * spf - offset + torch.arange(length, dtype=torch.int64)


class _StreamConv(nn.Module):
    """Stride-1 padded conv with a cache of past input samples."""

    def __init__(self, layer: PaddedConv1d, ctx: _Ctx, name: str) -> None:
        super().__init__()
        if layer.stride != 1:
            raise ValueError("streaming supports stride-1 convolutions only")
        conv = _plain_conv(layer.conv)
        self.conv = conv
        self.pad_left, self.pad_right = layer.static_padding()
        self.reflect = layer.pad_mode == "reflect"
        d = max(self.pad_left, self.pad_right) if self.reflect else self.pad_right
        self.cache_len = self.pad_left + d
        self.delay_in = ctx.delay
        self.spf = ctx.spf
        self.n = ctx.n
        # Needs fixing iff some buffered sample can have a negative offline index
        # whose content is not already right (a zero initial cache is right for
        # constant padding when the input itself has no pre-roll).
        self.fix = self.cache_len + self.delay_in > 0 and (self.reflect or self.delay_in > 0)
        self.state: list[StateShape] = (
            [(f"{name}_cache", (ctx.batch, conv.in_channels, self.cache_len))] if self.cache_len > 0 else []
        )
        ctx.delay += d

    def forward(self, x: torch.Tensor, step: torch.Tensor, state: list[torch.Tensor]) -> _LayerOut:
        """x [B, C_in, N] -> y [B, C_out, N]."""
        if self.cache_len == 0:
            return self.conv(x), []
        buf = torch.cat([state[0], x], dim=-1)  # [B, C_in, cache + N]
        new_cache = buf[..., -self.cache_len :]
        length = self.cache_len + self.n
        if self.fix:
            o = _offline_index(step, self.spf, self.cache_len + self.delay_in, length)
            neg = o < 0
            if self.reflect and self.pad_left > 0:
                # Offline index -k (1 <= k <= pad_left) mirrors offline index k. Only
                # those pre-roll positions can reach a valid output; the rest become 0.
                # A gather of pad_left samples and a one-hot matmul keep this cheap.
                k = torch.arange(1, self.pad_left + 1, dtype=torch.int64)  # [pl]
                p0 = self.cache_len + self.delay_in - step * self.spf  # position of offline 0, [1]
                mirror = buf.index_select(2, torch.clamp(p0 + k, 0, length - 1))  # [B, C, pl]
                place = (o.unsqueeze(0) == -k.unsqueeze(1)).to(buf.dtype)  # [pl, length]
                fixed = torch.where(neg, torch.matmul(mirror, place), buf)
            else:
                fixed = buf.masked_fill(neg, 0.0)
        else:
            fixed = buf
        y = self.conv(fixed[..., : self.n + self.pad_left + self.pad_right])
        return y, [new_cache]


class _StreamLSTM(nn.Module):
    """LSTM with skip; pre-roll frames are stepped one by one and leave (h, c) alone."""

    def __init__(self, block: LSTMBlock, ctx: _Ctx, name: str) -> None:
        super().__init__()
        if ctx.spf != 1:
            raise ValueError("the LSTM must run at the frame rate")
        self.lstm = copy.deepcopy(block.lstm)
        self.frames = ctx.frames
        self.delay_in = ctx.delay
        shape = (self.lstm.num_layers, ctx.batch, self.lstm.hidden_size)
        self.state: list[StateShape] = [(f"{name}_h", shape), (f"{name}_c", shape)]

    def forward(self, x: torch.Tensor, step: torch.Tensor, state: list[torch.Tensor]) -> _LayerOut:
        """x [B, D, F] -> [B, D, F]."""
        h, c = state
        seq = x.permute(2, 0, 1)  # [F, B, D]
        # Frame f of a call is pre-roll iff step + f < delay_in, so only the first
        # min(delay_in, F) frames need the masked single steps; the rest run as one.
        singles = min(self.delay_in, self.frames)
        outs = []
        for f in range(singles):
            y, (h2, c2) = self.lstm(seq[f : f + 1], (h, c))
            live = step + (f - self.delay_in) >= 0  # [1] bool
            h = torch.where(live, h2, h)
            c = torch.where(live, c2, c)
            outs.append(y)
        if singles < self.frames:
            y, (h, c) = self.lstm(seq[singles:], (h, c))
            outs.append(y)
        out = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
        return (out + seq).permute(1, 2, 0), [h, c]


class _StreamConvTranspose(nn.Module):
    """Transposed conv by overlap-add of ``kernel - stride`` pending samples."""

    def __init__(self, layer: TrimmedConvTranspose1d, ctx: _Ctx, name: str) -> None:
        super().__init__()
        conv = layer.conv
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride = layer.stride
        self.tail = layer.kernel_size - layer.stride
        self.delay_in = ctx.delay
        self.spf_in = ctx.spf
        self.n_in = ctx.n
        out_ch = self.weight.shape[1]
        self.state: list[StateShape] = (
            [(f"{name}_ola", (ctx.batch, out_ch, self.tail))] if self.tail > 0 else []
        )
        trim_left, _ = layer.trims()
        ctx.delay = ctx.delay * self.stride + trim_left
        ctx.spf *= self.stride

    def forward(self, x: torch.Tensor, step: torch.Tensor, state: list[torch.Tensor]) -> _LayerOut:
        """x [B, C_in, N] -> [B, C_out, N * stride]."""
        if self.delay_in > 0:
            o = _offline_index(step, self.spf_in, self.delay_in, self.n_in)
            x = x.masked_fill(o < 0, 0.0)
        y = F.conv_transpose1d(x, self.weight, None, stride=self.stride)  # [B, C_out, (N-1)*r + k]
        emit = self.n_in * self.stride
        if self.tail == 0:
            return y + self.bias[:, None], []
        y = torch.cat([y[..., : self.tail] + state[0], y[..., self.tail :]], dim=-1)
        return y[..., :emit] + self.bias[:, None], [y[..., emit:]]


class _StreamResidual(nn.Module):
    """Residual unit: streamed branch plus a shortcut delayed by the branch delay."""

    def __init__(self, unit: ResidualUnit, ctx: _Ctx, name: str) -> None:
        super().__init__()
        delay_in = ctx.delay
        acts = [m for m in unit.block if not isinstance(m, PaddedConv1d)]
        convs = [m for m in unit.block if isinstance(m, PaddedConv1d)]
        if len(acts) != 2 or len(convs) != 2:
            raise ValueError("unexpected residual unit layout")
        self.act = nn.ELU()
        self.conv0 = _StreamConv(convs[0], ctx, f"{name}_conv0")
        self.conv1 = _StreamConv(convs[1], ctx, f"{name}_conv1")
        self.shortcut = _plain_conv(unit.shortcut.conv) if isinstance(unit.shortcut, PaddedConv1d) else None
        self.skip_len = ctx.delay - delay_in
        dim = convs[0].conv.in_channels
        skip = [(f"{name}_skip", (ctx.batch, dim, self.skip_len))] if self.skip_len > 0 else []
        self.state: list[StateShape] = self.conv0.state + self.conv1.state + skip
        self.n0 = len(self.conv0.state)
        self.n1 = len(self.conv1.state)

    def forward(self, x: torch.Tensor, step: torch.Tensor, state: list[torch.Tensor]) -> _LayerOut:
        """x [B, dim, N] -> [B, dim, N]."""
        s0 = state[: self.n0]
        s1 = state[self.n0 : self.n0 + self.n1]
        y, o0 = self.conv0(self.act(x), step, s0)
        y, o1 = self.conv1(self.act(y), step, s1)
        new: list[torch.Tensor] = o0 + o1
        short = x if self.shortcut is None else self.shortcut(x)
        if self.skip_len > 0:
            line = torch.cat([state[self.n0 + self.n1], short], dim=-1)
            short = line[..., : x.shape[-1]]
            new.append(line[..., -self.skip_len :])
        return short + y, new


class _Act(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.elu = nn.ELU()
        self.state: list[StateShape] = []

    def forward(self, x: torch.Tensor, step: torch.Tensor, state: list[torch.Tensor]) -> _LayerOut:
        return self.elu(x), []


def decoder_lookahead(cfg: CodecConfig) -> int:
    """Streaming delay of the decoder in output samples (what :class:`StreamingDecoder` reports).

    The delay depends on kernels, ratios and padding only, so it is measured on
    a copy of ``cfg`` with minimal widths (cheap even for full-size shapes).
    """
    slim = dataclasses.replace(cfg, n_filters=1, dimension=1, compress=1, n_codebooks=1, codebook_size=1)
    return StreamingDecoder(Codec(slim), frames_per_step=1).lookahead_samples


class CodesStepGraph(nn.Module):
    """What every decoder step graph shares: ``spec`` lists ``codes`` first and then the state inputs, and
    ``codebook_size`` bounds valid codes."""

    spec: GraphSpec
    codebook_size: int

    def initial_state(self) -> list[torch.Tensor]:
        """Zeros for every state input (same order as ``spec.inputs[1:]``)."""
        return [s.zeros() for s in self.spec.inputs[1:]]

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """``(codes, *initial_state())`` with valid random codes, for export."""
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, self.codebook_size, self.spec.inputs[0].shape, generator=g, dtype=torch.int64)
        return (codes, *self.initial_state())


class StreamingDecoder(CodesStepGraph):
    """Fixed-shape, explicit-state step graph of a codec decoder.

    Built from a copy of ``codec``'s decoder and codebooks with weight norm
    folded (``codec`` is left untouched; its later changes are not seen). ``forward(codes,
    *state_in)`` decodes ``frames_per_step`` frames and returns ``(pcm,
    *state_out)``; feed ``state_out`` back as the next ``state_in``, starting
    from :meth:`initial_state`. Stream sample ``i`` is offline sample
    ``i - lookahead_samples``; the first ``lookahead_samples`` are zeros.
    """

    def __init__(self, codec: Codec, frames_per_step: int = 1, batch: int = 1) -> None:
        super().__init__()
        if frames_per_step < 1 or batch < 1:
            raise ValueError("frames_per_step and batch must be >= 1")
        cfg: CodecConfig = codec.cfg
        self.cfg = cfg
        self.frames = frames_per_step
        self.batch = batch
        self.hop = cfg.hop_length
        decoder = codec.decoder  # read only: every streaming layer holds its own folded copy
        k, card, dim = codec.quantizer.embed.shape
        self.n_codebooks = k
        self.codebook_size = card
        # one table for all codebooks: codes + k * card index it.
        self.register_buffer("table", codec.quantizer.embed.detach().clone().reshape(k * card, dim))
        self.register_buffer("offsets", (torch.arange(k, dtype=torch.int64) * card).view(1, k, 1))

        ctx = _Ctx(batch, frames_per_step)
        layers: list[nn.Module] = []
        n_up = n_res = 0
        n_conv = 0
        for m in decoder.layers:
            if isinstance(m, nn.ELU):
                layers.append(_Act())
            elif isinstance(m, PaddedConv1d):
                layers.append(_StreamConv(m, ctx, f"conv{n_conv}"))
                n_conv += 1
            elif isinstance(m, LSTMBlock):
                layers.append(_StreamLSTM(m, ctx, "lstm"))
            elif isinstance(m, TrimmedConvTranspose1d):
                layers.append(_StreamConvTranspose(m, ctx, f"up{n_up}"))
                n_up += 1
                n_res = 0
            elif isinstance(m, ResidualUnit):
                layers.append(_StreamResidual(m, ctx, f"up{n_up - 1}_res{n_res}"))
                n_res += 1
            else:
                raise ValueError(f"no streaming form for {type(m).__name__}")
        if ctx.spf != self.hop:
            raise AssertionError("decoder rate bookkeeping is off")
        self.layers = nn.ModuleList(layers)
        self.lookahead_samples: int = ctx.delay
        self._state_shapes: list[StateShape] = [s for layer in layers for s in layer.state]  # type: ignore[attr-defined]
        self._counts = [len(layer.state) for layer in layers]  # type: ignore[attr-defined]
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

        b, c, f = batch, cfg.channels, frames_per_step
        inputs = [TensorSpec("codes", (b, k, f), "int64"), TensorSpec("step_in", (1,), "int64", "step_out")]
        outputs = [TensorSpec("pcm", (b, c, f * self.hop)), TensorSpec("step_out", (1,), "int64", "step_in")]
        for name, shape in self._state_shapes:
            inputs.append(TensorSpec(f"{name}_in", shape, "float32", f"{name}_out"))
            outputs.append(TensorSpec(f"{name}_out", shape, "float32", f"{name}_in"))
        self.spec = GraphSpec(
            inputs,
            outputs,
            meta={
                "kind": "codec_decoder",
                "frames_per_step": f,
                "batch": b,
                "hop_length": self.hop,
                "sample_rate": cfg.sample_rate,
                "channels": c,
                "n_codebooks": k,
                "codebook_size": card,
                "lookahead_samples": self.lookahead_samples,
            },
        )

    def forward(self, codes: torch.Tensor, *state_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """codes [B, K, F] int64, step_in [1] int64, *state -> pcm [B, C, F*hop], step_out [1], *state."""
        step = state_in[0]
        rest = list(state_in[1:])
        x = F.embedding(codes + self.offsets, self.table).sum(dim=1).transpose(1, 2)  # [B, D, F]
        new_state: list[torch.Tensor] = []
        i = 0
        for layer, count in zip(self.layers, self._counts):
            x, out = layer(x, step, rest[i : i + count])
            new_state.extend(out)
            i += count
        if self.lookahead_samples > 0:
            u = _offline_index(step, self.hop, self.lookahead_samples, self.frames * self.hop)
            x = x.masked_fill(u < 0, 0.0)
        return (x, step + self.frames, *new_state)


@torch.no_grad()
def stream_decode(decoder: StreamingDecoder, codes: torch.Tensor) -> torch.Tensor:
    """Run ``decoder`` over codes [B, K, T] (T a multiple of its frames_per_step) -> pcm [B, C, T * hop].

    The stream starts from :meth:`StreamingDecoder.initial_state`; the output
    carries the decoder's lookahead (see the class docstring).
    """
    total = codes.shape[-1]
    if total % decoder.frames:
        raise ValueError(f"{total} frames is not a multiple of frames_per_step={decoder.frames}")
    state = decoder.initial_state()
    out = []
    for t in range(0, total, decoder.frames):
        pcm, *state = decoder(codes[..., t : t + decoder.frames], *state)
        out.append(pcm)
    return torch.cat(out, dim=-1)
