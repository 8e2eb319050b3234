"""EnCodec-compatible neural audio codec: SEANet encoder/decoder, LSTM, residual VQ.

The offline semantics (padding, trimming, reflection on short inputs, residual
quantisation) are those of Hugging Face ``transformers.EncodecModel`` without
chunking or normalisation, so a converted checkpoint decodes to the same audio
(:func:`load_hf_encodec`). Every padding amount is a plain Python integer, which
keeps the modules exportable.

Shapes: ``B`` batch, ``C`` audio channels, ``T`` samples, ``D`` latent
dimension, ``K`` codebooks, ``F`` frames (``T = F * hop``), ``N`` card.

The streaming form of the decoder lives in :mod:`export.streaming`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

if TYPE_CHECKING:  # pragma: no cover
    import transformers

PAD_MODES = ("constant", "reflect")


# ---------------------------------------------------------------------------
# configuration


@dataclass
class CodecConfig:
    """Shape of an EnCodec-style codec. Defaults are MusicGen's 32 kHz codec.

    ``ratios`` are the upsampling ratios in decoder order; the encoder uses them
    reversed. ``hop_length`` is their product.
    """

    sample_rate: int = 32_000
    channels: int = 1
    n_filters: int = 64
    ratios: list[int] = field(default_factory=lambda: [8, 5, 4, 4])
    dimension: int = 128
    n_residual_layers: int = 1
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    lstm_layers: int = 2
    causal: bool = False
    pad_mode: str = "reflect"
    conv_shortcut: bool = False
    trim_right_ratio: float = 1.0
    n_codebooks: int = 4
    codebook_size: int = 2048

    def __post_init__(self) -> None:
        self.ratios = [int(r) for r in self.ratios]
        if self.channels not in (1, 2):
            raise ValueError(f"CodecConfig.channels must be 1 or 2, got {self.channels}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"CodecConfig.pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}")
        if not self.ratios or any(r < 1 for r in self.ratios):
            raise ValueError(f"CodecConfig.ratios must be positive integers, got {self.ratios}")
        if not self.causal and self.trim_right_ratio != 1.0:
            raise ValueError("CodecConfig.trim_right_ratio != 1.0 only makes sense with causal=True")
        if not 0.0 <= self.trim_right_ratio <= 1.0:
            raise ValueError(f"CodecConfig.trim_right_ratio must lie in [0, 1], got {self.trim_right_ratio}")
        for name in ("n_filters", "dimension", "n_codebooks", "codebook_size", "kernel_size",
                     "last_kernel_size", "residual_kernel_size", "compress", "dilation_base"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CodecConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lstm_layers < 0 or self.n_residual_layers < 0:
            raise ValueError("CodecConfig.lstm_layers and n_residual_layers must be >= 0")

    @property
    def hop_length(self) -> int:
        """Audio samples per code frame."""
        return int(math.prod(self.ratios))

    @property
    def frame_rate(self) -> float:
        """Code frames per second."""
        return self.sample_rate / self.hop_length

    @classmethod
    def musicgen_32khz(cls) -> CodecConfig:
        """MusicGen's codec (``facebook/encodec_32khz``)."""
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodecConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown CodecConfig fields: {sorted(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------------------
# padded convolutions


def pad1d(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """Pad the last axis of ``x`` [B, C, T] by ``left``/``right`` samples.

    ``mode`` "constant" pads zeros. "reflect" mirrors around the edge samples;
    when the input is too short to reflect (``T <= max(left, right)``) it is
    first extended with zeros on the right so that reflection is defined, and
    the result is cut back to ``T + left + right`` samples from the right end.
    """
    if left == 0 and right == 0:
        return x
    if mode == "constant":
        return F.pad(x, (left, right), mode="constant", value=0.0)
    if mode != "reflect":
        raise ValueError(f"unsupported pad mode {mode!r}")
    length = x.shape[-1]
    widest = max(left, right)
    grow = widest + 1 - length if length <= widest else 0
    if grow > 0:
        x = F.pad(x, (0, grow))
    y = F.pad(x, (left, right), mode="reflect")
    if grow > 0:
        y = y[..., : y.shape[-1] - grow]
    return y


class PaddedConv1d(nn.Module):
    """Weight-normed Conv1d that pads its input so ``T_out = ceil(T_in / stride)``.

    The total padding is ``(kernel - 1) * dilation + 1 - stride``; causal puts it
    all on the left, otherwise the right gets ``total // 2`` and the left the
    rest. Strided convolutions add "extra" right padding so the last window is
    complete.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        causal: bool = False,
        pad_mode: str = "reflect",
    ) -> None:
        super().__init__()
        self.conv = weight_norm(nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation))
        self.causal = causal
        self.pad_mode = pad_mode
        self.stride = stride
        self.effective_kernel = (kernel_size - 1) * dilation + 1
        self.padding_total = self.effective_kernel - stride

    def static_padding(self) -> tuple[int, int]:
        """Left and right padding, not counting the length-dependent extra right padding."""
        if self.causal:
            return self.padding_total, 0
        right = self.padding_total // 2
        return self.padding_total - right, right

    def extra_padding(self, length: int) -> int:
        """Right zero/reflect padding that completes the last strided window."""
        k, s, p = self.effective_kernel, self.stride, self.padding_total
        n_frames = -((k - p - length) // s)  # ceil((length - k + p) / s)
        ideal = n_frames * s + k - p
        return ideal - length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, T] -> [B, C_out, ceil(T / stride)]."""
        left, right = self.static_padding()
        right += self.extra_padding(x.shape[-1])
        return self.conv(pad1d(x, left, right, self.pad_mode))


class TrimmedConvTranspose1d(nn.Module):
    """Weight-normed ConvTranspose1d trimmed so ``T_out = T_in * stride``.

    ``kernel - stride`` samples are trimmed: causal trims
    ``ceil(total * trim_right_ratio)`` on the right and the rest on the left;
    non-causal trims ``total // 2`` on the right and the rest on the left.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        *,
        causal: bool = False,
        trim_right_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        if kernel_size < stride:
            raise ValueError(f"transposed conv kernel {kernel_size} shorter than its stride {stride}")
        self.conv = weight_norm(nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride))
        self.causal = causal
        self.trim_right_ratio = trim_right_ratio
        self.stride = stride
        self.kernel_size = kernel_size

    def trims(self) -> tuple[int, int]:
        """Samples trimmed on the left and on the right of the full output."""
        total = self.kernel_size - self.stride
        right = math.ceil(total * self.trim_right_ratio) if self.causal else total // 2
        return total - right, right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, T] -> [B, C_out, T * stride]."""
        y = self.conv(x)
        left, right = self.trims()
        return y[..., left : y.shape[-1] - right]


class LSTMBlock(nn.Module):
    """Multi-layer LSTM over time with a skip connection: ``y = lstm(x) + x``."""

    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D, T] -> [B, D, T]."""
        seq = x.permute(2, 0, 1)  # [T, B, D]
        out, _ = self.lstm(seq)
        return (out + seq).permute(1, 2, 0)


class ResidualUnit(nn.Module):
    """SEANet residual block.

    ``branch``: ELU, conv(k=residual_kernel_size, dilation, dim -> dim // compress),
    ELU, conv(k=1, -> dim). Output ``shortcut(x) + branch(x)`` where the shortcut
    is the identity or a 1x1 convolution.
    """

    def __init__(self, cfg: CodecConfig, dim: int, dilation: int) -> None:
        super().__init__()
        hidden = dim // cfg.compress
        conv = dict(causal=cfg.causal, pad_mode=cfg.pad_mode)
        self.block = nn.ModuleList(
            [
                nn.ELU(),
                PaddedConv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation, **conv),
                nn.ELU(),
                PaddedConv1d(hidden, dim, 1, **conv),
            ]
        )
        self.shortcut: nn.Module = PaddedConv1d(dim, dim, 1, **conv) if cfg.conv_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, dim, T] -> [B, dim, T]."""
        y = x
        for layer in self.block:
            y = layer(y)
        return self.shortcut(x) + y


class SEANetEncoder(nn.Module):
    """wav [B, C, T] -> latent [B, D, ceil(T / hop)]."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        conv = dict(causal=cfg.causal, pad_mode=cfg.pad_mode)
        layers: list[nn.Module] = [PaddedConv1d(cfg.channels, cfg.n_filters, cfg.kernel_size, **conv)]
        dim = cfg.n_filters
        for ratio in reversed(cfg.ratios):
            for j in range(cfg.n_residual_layers):
                layers.append(ResidualUnit(cfg, dim, cfg.dilation_base**j))
            layers.append(nn.ELU())
            layers.append(PaddedConv1d(dim, dim * 2, ratio * 2, stride=ratio, **conv))
            dim *= 2
        if cfg.lstm_layers > 0:
            layers.append(LSTMBlock(dim, cfg.lstm_layers))
        layers.append(nn.ELU())
        layers.append(PaddedConv1d(dim, cfg.dimension, cfg.last_kernel_size, **conv))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SEANetDecoder(nn.Module):
    """latent [B, D, F] -> wav [B, C, F * hop]."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        conv = dict(causal=cfg.causal, pad_mode=cfg.pad_mode)
        dim = cfg.n_filters * 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [PaddedConv1d(cfg.dimension, dim, cfg.kernel_size, **conv)]
        if cfg.lstm_layers > 0:
            layers.append(LSTMBlock(dim, cfg.lstm_layers))
        for ratio in cfg.ratios:
            layers.append(nn.ELU())
            layers.append(
                TrimmedConvTranspose1d(
                    dim, dim // 2, ratio * 2, ratio, causal=cfg.causal, trim_right_ratio=cfg.trim_right_ratio
                )
            )
            dim //= 2
            for j in range(cfg.n_residual_layers):
                layers.append(ResidualUnit(cfg, dim, cfg.dilation_base**j))
        layers.append(nn.ELU())
        layers.append(PaddedConv1d(cfg.n_filters, cfg.channels, cfg.last_kernel_size, **conv))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# ---------------------------------------------------------------------------
# residual vector quantiser


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # [B, D, F], straight-through in training
    codes: torch.Tensor  # [B, K, F] int64
    commit_loss: torch.Tensor  # scalar


@torch.jit.script
def hold_codes(dist: torch.Tensor, nearest: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """Hysteresis in a quantiser stage's code choice, frame by frame.

    dist [B, F, N] squared distances to the N codewords, nearest [B, F] their
    argmin, slack [B, F] -> codes [B, F]: frame t keeps frame t-1's code while
    its distance exceeds the nearest one's by at most ``slack[t]``.

    A steady sound whose latent sits between two codewords otherwise flickers::

        nearest  55 55 251 55 55 219 55      (one-frame jumps a causal decoder
        held     55 55  55 55 55  55 55       and the LM both take for onsets)

    while a real change, which moves the latent well past the old codeword,
    switches at once. Scripted so the pack's encoder graph exports it as a loop.
    """
    prev = nearest[:, 0]
    out = [prev]
    for t in range(1, dist.shape[1]):
        d = dist[:, t]
        new = nearest[:, t]
        extra = d.gather(1, prev.unsqueeze(1)).squeeze(1) - d.gather(1, new.unsqueeze(1)).squeeze(1)
        prev = torch.where(extra <= slack[:, t], prev, new)
        out.append(prev)
    return torch.stack(out, dim=1)


class ResidualVQ(nn.Module):
    """Residual vector quantiser with K Euclidean codebooks ``embed`` [K, N, D].

    ``encode`` picks, stage by stage, the nearest codeword to what the previous
    stages left (with ``hysteresis`` > 0 it keeps the previous frame's codeword
    while that is nearly as near, see :func:`hold_codes`); ``decode`` sums the
    chosen codewords. In training mode
    ``forward`` updates the codebooks by exponential moving averages of the
    assigned vectors and returns a straight-through output and the commitment
    loss.
    """

    def __init__(self, dim: int, n_codebooks: int, codebook_size: int, *, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.n_codebooks = n_codebooks
        self.codebook_size = codebook_size
        self.decay = decay
        self.eps = eps
        self.hysteresis = 0.0  # an encoding choice, not a weight: set by whoever encodes (train lm, the pack)
        self.register_buffer("embed", torch.randn(n_codebooks, codebook_size, dim) * 0.1)
        self.register_buffer("embed_avg", self.embed.clone())
        self.register_buffer("cluster_size", torch.ones(n_codebooks, codebook_size))
        self.register_buffer("inited", torch.zeros((), dtype=torch.bool))

    @staticmethod
    def _distances(x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """x [..., D], embed [N, D] -> squared distances [..., N] to every codeword.

        The codewords' energies come from the transposed table the product reads, so that an exported
        encoder stores each codebook once as ``[D, N]`` (plus ``[N, D]`` for the residual's lookup, which
        the last codebook has none of), not a third copy for the energies: 262 KB per pack.
        """
        et = embed.t()
        return x.pow(2).sum(-1, keepdim=True) - 2 * x @ et + et.pow(2).sum(0)

    @staticmethod
    def _nearest(x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """x [M, D], embed [N, D] -> index [M] of the nearest codeword."""
        return ResidualVQ._distances(x, embed).argmin(dim=-1)

    def encode(self, z: torch.Tensor, n_codebooks: int | None = None) -> torch.Tensor:
        """z [B, D, F] -> codes [B, K, F] (int64)."""
        k = self.n_codebooks if n_codebooks is None else n_codebooks
        b, d, f = z.shape
        if self.hysteresis > 0:
            return self._encode_held(z.permute(0, 2, 1), k, self.hysteresis)
        residual = z.permute(0, 2, 1).reshape(b * f, d)
        codes = []
        for i in range(k):
            idx = self._nearest(residual, self.embed[i])
            residual = residual - F.embedding(idx, self.embed[i])
            codes.append(idx.view(b, f))
        return torch.stack(codes, dim=1)

    def _encode_held(self, residual: torch.Tensor, k: int, margin: float) -> torch.Tensor:
        """residual [B, F, D] -> codes [B, K, F], each stage's choice held by :func:`hold_codes`."""
        codes = []
        for i in range(k):
            embed = self.embed[i]
            dist = self._distances(residual, embed)  # [B, F, N]
            idx = hold_codes(dist, dist.argmin(-1), margin * residual.pow(2).sum(-1))
            residual = residual - F.embedding(idx, embed)
            codes.append(idx)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, F] -> latent [B, D, F] (sum of the chosen codewords)."""
        out = torch.zeros((), dtype=self.embed.dtype, device=codes.device)
        for i in range(codes.shape[1]):
            out = out + F.embedding(codes[:, i], self.embed[i])
        return out.permute(0, 2, 1)

    @torch.no_grad()
    def _ema_update(self, i: int, x: torch.Tensor, idx: torch.Tensor) -> None:
        onehot = F.one_hot(idx, self.codebook_size).to(x.dtype)  # [M, N]
        counts = onehot.sum(0)
        sums = onehot.t() @ x
        self.cluster_size[i].mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg[i].mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size[i].sum()
        smoothed = (self.cluster_size[i] + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed[i].copy_(self.embed_avg[i] / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        """Seed every codebook with random training vectors (first training batch)."""
        for i in range(self.n_codebooks):
            pick = torch.randint(0, x.shape[0], (self.codebook_size,), device=x.device)
            self.embed[i].copy_(x[pick] * (0.5**i))
            self.embed_avg[i].copy_(self.embed[i])
        self.cluster_size.fill_(1.0)
        self.inited.fill_(True)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z [B, D, F] -> (quantized [B, D, F], codes [B, K, F], commit_loss)."""
        b, d, f = z.shape
        flat = z.permute(0, 2, 1).reshape(b * f, d)
        if self.training and not bool(self.inited):
            self._init_from(flat.detach())
        residual = flat
        quantized = torch.zeros_like(flat)
        codes = []
        loss = flat.new_zeros(())
        for i in range(self.n_codebooks):
            idx = self._nearest(residual.detach(), self.embed[i])
            q = F.embedding(idx, self.embed[i])
            loss = loss + F.mse_loss(residual, q.detach())
            if self.training:
                self._ema_update(i, residual.detach(), idx)
            quantized = quantized + q
            residual = residual - q.detach()
            codes.append(idx.view(b, f))
        quantized = flat + (quantized - flat).detach()  # straight-through estimator
        return QuantizerOutput(
            quantized.view(b, f, d).permute(0, 2, 1), torch.stack(codes, dim=1), loss / self.n_codebooks
        )


# ---------------------------------------------------------------------------
# the codec


class CodecOutput(NamedTuple):
    audio: torch.Tensor  # [B, C, F * hop]
    codes: torch.Tensor  # [B, K, F]
    commit_loss: torch.Tensor  # scalar


class Codec(nn.Module):
    """EnCodec-compatible codec: ``encode`` wav -> codes, ``decode`` codes -> wav."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = SEANetEncoder(cfg)
        self.decoder = SEANetDecoder(cfg)
        self.quantizer = ResidualVQ(cfg.dimension, cfg.n_codebooks, cfg.codebook_size)

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, C, T] -> codes [B, K, ceil(T / hop)] (int64)."""
        if wav.dim() != 3 or wav.shape[1] != self.cfg.channels:
            raise ValueError(f"expected wav [B, {self.cfg.channels}, T], got {list(wav.shape)}")
        return self.quantizer.encode(self.encoder(wav))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """latent z [B, D, F] -> wav [B, C, F * hop]."""
        return self.decoder(z)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, F] -> wav [B, C, F * hop]."""
        if codes.dim() != 3:
            raise ValueError(f"expected codes [B, K, F], got {list(codes.shape)}")
        return self.decoder(self.quantizer.decode(codes))

    def forward(self, wav: torch.Tensor) -> CodecOutput:
        """Training pass: wav [B, C, T] -> reconstruction trimmed to T, codes, commitment loss."""
        z = self.encoder(wav)
        q = self.quantizer(z)
        audio = self.decoder(q.quantized)[..., : wav.shape[-1]]
        return CodecOutput(audio, q.codes, q.commit_loss)

    def streaming_decoder(self, frames_per_step: int = 1) -> nn.Module:
        """The decoder's step graph for a pack (:class:`export.streaming.StreamingDecoder`, a frozen copy)."""
        from export.streaming import StreamingDecoder

        return StreamingDecoder(self, frames_per_step=frames_per_step)


# ---------------------------------------------------------------------------
# Hugging Face conversion


def codec_config_from_hf(hf_config: Any) -> CodecConfig:
    """Translate a ``transformers.EncodecConfig``; refuse what :class:`Codec` does not model."""

    def refuse(name: str, value: Any, why: str) -> ValueError:
        return ValueError(f"EncodecConfig.{name}={value!r} is not supported: {why}")

    c = hf_config
    if c.norm_type != "weight_norm":
        raise refuse("norm_type", c.norm_type, "only weight_norm is implemented (no time_group_norm)")
    if c.normalize:
        raise refuse("normalize", c.normalize, "input normalisation / audio scales are not implemented")
    if c.chunk_length_s is not None:
        raise refuse("chunk_length_s", c.chunk_length_s, "chunked encoding with overlap-add is not implemented")
    if c.pad_mode not in PAD_MODES:
        raise refuse("pad_mode", c.pad_mode, f"supported pad modes are {PAD_MODES}")
    if c.audio_channels not in (1, 2):
        raise refuse("audio_channels", c.audio_channels, "mono or stereo only")
    codebook_dim = c.codebook_dim if c.codebook_dim is not None else c.hidden_size
    if codebook_dim != c.hidden_size:
        raise refuse("codebook_dim", codebook_dim, f"must equal hidden_size ({c.hidden_size})")
    return CodecConfig(
        sample_rate=int(c.sampling_rate),
        channels=int(c.audio_channels),
        n_filters=int(c.num_filters),
        ratios=[int(r) for r in c.upsampling_ratios],
        dimension=int(c.hidden_size),
        n_residual_layers=int(c.num_residual_layers),
        kernel_size=int(c.kernel_size),
        last_kernel_size=int(c.last_kernel_size),
        residual_kernel_size=int(c.residual_kernel_size),
        dilation_base=int(c.dilation_growth_rate),
        compress=int(c.compress),
        lstm_layers=int(c.num_lstm_layers),
        causal=bool(c.use_causal_conv),
        pad_mode=str(c.pad_mode),
        conv_shortcut=bool(c.use_conv_shortcut),
        trim_right_ratio=float(c.trim_right_ratio),
        n_codebooks=int(c.num_quantizers),
        codebook_size=int(c.codebook_size),
    )


def _weight_modules(root: nn.Module) -> list[nn.Module]:
    """Convolutions and LSTMs of ``root`` in registration order."""
    kinds = (nn.Conv1d, nn.ConvTranspose1d, nn.LSTM)
    return [m for m in root.modules() if isinstance(m, kinds)]


@torch.no_grad()
def _copy_conv(dst: nn.Conv1d | nn.ConvTranspose1d, src: nn.Module, where: str) -> None:
    kind = nn.ConvTranspose1d if isinstance(dst, nn.ConvTranspose1d) else nn.Conv1d
    if not isinstance(src, kind):
        raise ValueError(f"{where}: {type(src).__name__} where {kind.__name__} expected")
    dst_p = dst.parametrizations.weight
    src_p = getattr(getattr(src, "parametrizations", None), "weight", None)
    if src_p is not None and src_p.original0.shape == dst_p.original0.shape:
        dst_p.original0.copy_(src_p.original0)  # g
        dst_p.original1.copy_(src_p.original1)  # v
    else:  # plain or legacy weight norm: make the folded weight equal the source weight
        w = src.weight.detach()
        if w.shape != dst_p.original1.shape:
            raise ValueError(f"{where}: weight shape {list(w.shape)} vs {list(dst_p.original1.shape)}")
        dst_p.original1.copy_(w)
        dst_p.original0.copy_(torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True))
    if (src.bias is None) != (dst.bias is None):
        raise ValueError(f"{where}: bias presence differs")
    if dst.bias is not None:
        dst.bias.copy_(src.bias)


def load_hf_encodec(hf_model: transformers.EncodecModel) -> Codec:
    """Build a :class:`Codec` equal to ``hf_model`` (weights copied; the HF model is untouched)."""
    cfg = codec_config_from_hf(hf_model.config)
    codec = Codec(cfg)
    for part in ("encoder", "decoder"):
        mine = _weight_modules(getattr(codec, part))
        theirs = _weight_modules(getattr(hf_model, part))
        if len(mine) != len(theirs):
            raise ValueError(f"{part}: {len(theirs)} weight layers in the HF model, {len(mine)} expected")
        for i, (dst, src) in enumerate(zip(mine, theirs)):
            where = f"{part} layer {i}"
            if isinstance(dst, nn.LSTM):
                if not isinstance(src, nn.LSTM):
                    raise ValueError(f"{where}: {type(src).__name__} where LSTM expected")
                dst.load_state_dict(src.state_dict())
            else:
                _copy_conv(dst, src, where)
    layers = hf_model.quantizer.layers
    if len(layers) < cfg.n_codebooks:
        raise ValueError(f"HF quantizer has {len(layers)} codebooks, config says {cfg.n_codebooks}")
    with torch.no_grad():
        for i in range(cfg.n_codebooks):
            embed = layers[i].codebook.embed
            codec.quantizer.embed[i].copy_(embed)
            codec.quantizer.embed_avg[i].copy_(embed)
        codec.quantizer.inited.fill_(True)
    return codec.eval()
