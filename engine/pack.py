"""Model packs: a folder with ``manifest.toml`` and the ONNX step graphs.

A pack holds three graphs (see docs/pack-format.md for the whole contract)::

    conditioner.onnx  text_tokens [1,Tc], text_mask [1,Tc]       -> cross_k, cross_v [L,1,H,Tc,Dh]
    lm.onnx           tokens [B,K], position | rope_cos/rope_sin,
                      cache_k_<l>/cache_v_<l> [B,H,S,Dh] per layer, cache_mask [1,S],
                      cross_k_<l>/cross_v_<l> [B,H,Tc,Dh] per layer, cross_mask [B,Tc]
                                                                  -> logits [B,K,card], new_k/v [L,B,H,1,Dh]
    decoder.onnx      codes [1,K,F], *state_in                    -> pcm [1,C,F*hop], *state_out

:func:`load` reads the manifest, checks every key and value, and checks every
graph's inputs and outputs against it. Anything wrong is refused with a
:class:`PackError` whose message names the file, the key or tensor, what was
expected and what was found, and what to do about it. This module never
imports torch.
"""

from __future__ import annotations

import math
import os
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

FORMAT_VERSION = 1
MANIFEST = "manifest.toml"

_ONNX_TYPES = {1: "float32", 7: "int64", 10: "float16", 6: "int32", 9: "bool"}


class PackError(Exception):
    """A pack that cannot be used. The message says what is wrong and what to do."""


# ---------------------------------------------------------------------------
# Manifest schema
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One declared graph input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    state: str | None = None  # partner tensor for streaming state


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frame_rate: float
    hop_length: int


@dataclass(frozen=True)
class CodebookInfo:
    count: int
    cardinality: int
    special_token: int
    delays: tuple[int, ...]


@dataclass(frozen=True)
class GraphInfo:
    """A graph file and its declared tensors; ``params`` holds the section's other keys."""

    section: str
    file: Path
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    params: dict[str, Any] = field(default_factory=dict)

    def input(self, name: str) -> TensorInfo | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorInfo | None:
        return next((t for t in self.outputs if t.name == name), None)

    def __getitem__(self, key: str) -> Any:
        return self.params[key]


@dataclass(frozen=True)
class Pack:
    path: Path
    name: str
    description: str
    audio: AudioInfo
    codebooks: CodebookInfo
    decoder: GraphInfo
    lm: GraphInfo
    conditioner: GraphInfo
    tokenizer: Path
    prompts: tuple[str, ...]
    info: dict[str, Any]  # free-form [source] / [training] records
    encoder: GraphInfo | None = None  # optional whole-clip encoder (eval, audio prompts)
    sampling: dict[str, float | int] = field(default_factory=dict)
    """The pack's own sampling settings (``[sampling]``: temperature, top_k, top_p, guidance; any subset).

    What the pack was measured with, or what its source recommends (MusicGen's generation config).
    They replace the registry's defaults for this pack; a preset or the command line still overrides them.
    """

    @property
    def decoder_latency_ms(self) -> float:
        """Decoder lookahead in milliseconds (0 for a causal decoder)."""
        return 1000.0 * self.decoder["lookahead_samples"] / self.audio.sample_rate

    def session(self, graph: GraphInfo, options: Any = None, providers: list | None = None) -> Any:
        """Open an ONNX Runtime session for ``graph``; failures become PackError."""
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(
                str(graph.file), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises several unrelated types
            raise PackError(
                f"{graph.file}: ONNX Runtime cannot load this graph ({_first_line(exc)}). "
                "Re-export the pack with `cicada export`."
            ) from None
        check_session(graph, session)
        return session


# key -> (type check, description). Nested tables are dicts of the same.
_Check = Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_int_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_str(x) for x in v)


def _is_tensor_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) for x in v)


_TENSOR_KEYS = {"name": _is_str, "shape": _is_int_list, "dtype": _is_str, "state": _is_str}
_GRAPH_KEYS = {"file": _is_str, "inputs": _is_tensor_list, "outputs": _is_tensor_list}

# (check, required)
_SCHEMA: dict[str, dict[str, tuple[_Check, bool]]] = {
    "": {
        "format": (_is_int, True),
        "name": (_is_str, True),
        "description": (_is_str, False),
    },
    "audio": {
        "sample_rate": (_is_int, True),
        "channels": (_is_int, True),
        "frame_rate": (_is_num, True),
        "hop_length": (_is_int, True),
    },
    "codebooks": {
        "count": (_is_int, True),
        "cardinality": (_is_int, True),
        "special_token": (_is_int, True),
        "delays": (_is_int_list, True),
    },
    "decoder": {
        **{k: (c, True) for k, c in _GRAPH_KEYS.items()},
        "frames_per_step": (_is_int, True),
        "lookahead_samples": (_is_int, True),
        "causal": (_is_bool, True),
    },
    "lm": {
        **{k: (c, True) for k, c in _GRAPH_KEYS.items()},
        "positions": (_is_str, True),
        "max_positions": (_is_int, True),
        "context": (_is_int, True),
        "batch": (_is_int, True),
        "layers": (_is_int, True),
        "heads": (_is_int, True),
        "head_dim": (_is_int, True),
        "dim": (_is_int, True),
        "rope_theta": (_is_num, False),
        "quantization": (_is_str, True),
    },
    "conditioner": {
        **{k: (c, True) for k, c in _GRAPH_KEYS.items()},
        "tokenizer": (_is_str, True),
        "max_tokens": (_is_int, True),
    },
    "prompts": {"known": (_is_str_list, True)},
    # Optional: audio [1, C, T] -> codes [1, K, F], T dynamic (-1 in the manifest).
    "encoder": {**{k: (c, True) for k, c in _GRAPH_KEYS.items()}},
    # Optional: the sampling this pack is meant to be played with (see Pack.sampling).
    "sampling": {
        "temperature": (_is_num, False),
        "top_k": (_is_int, False),
        "top_p": (_is_num, False),
        "guidance": (_is_num, False),
    },
}
# Tables a pack may leave out: optional graphs, and the rest.
_OPTIONAL_GRAPHS = ("encoder",)
_OPTIONAL_TABLES = (*_OPTIONAL_GRAPHS, "sampling")
# Free-form record tables: any keys allowed.
_FREE_TABLES = ("source", "training")
_TYPE_WORDS = {
    _is_int: "an integer",
    _is_num: "a number",
    _is_str: "a string",
    _is_bool: "true or false",
    _is_int_list: "a list of integers",
    _is_str_list: "a list of strings",
    _is_tensor_list: "a list of tensor tables {name, shape, dtype}",
}


class _Problems:
    """Collects every problem so one refusal lists them all."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.items: list[str] = []

    def add(self, msg: str) -> None:
        self.items.append(msg)

    def raise_if_any(self) -> None:
        if self.items:
            lines = "\n".join(f"  - {m}" for m in self.items)
            raise PackError(f"pack {self.where} is not usable:\n{lines}")


def _check_schema(doc: dict[str, Any], problems: _Problems) -> None:
    tables = {k for k in _SCHEMA if k}
    for key, value in doc.items():
        if key in tables:
            if not isinstance(value, dict):
                problems.add(f"{MANIFEST}: [{key}] must be a table")
            continue
        if key in _FREE_TABLES:
            continue
        if key not in _SCHEMA[""]:
            known = sorted(set(_SCHEMA[""]) | tables | set(_FREE_TABLES))
            problems.add(f"{MANIFEST}: unknown key '{key}' (known: {', '.join(known)}); remove it or fix its spelling")
    for table, keys in _SCHEMA.items():
        section = doc if not table else doc.get(table)
        if section is None and table in _OPTIONAL_TABLES:
            continue
        if section is None:
            problems.add(f"{MANIFEST}: missing table [{table}]")
            continue
        if not isinstance(section, dict):
            continue
        for key, (check, required) in keys.items():
            full = f"{table}.{key}" if table else key
            if key not in section:
                if required:
                    problems.add(f"{MANIFEST}: missing key '{full}' ({_TYPE_WORDS[check]})")
                continue
            if not check(section[key]):
                problems.add(
                    f"{MANIFEST}: '{full}' must be {_TYPE_WORDS[check]}, found {section[key]!r}"
                )
        if table:
            for key in section:
                if key not in keys:
                    problems.add(
                        f"{MANIFEST}: unknown key '{table}.{key}' (known in [{table}]: "
                        f"{', '.join(keys)}); remove it or fix its spelling"
                    )


def _tensors(section: str, kind: str, items: list[dict], problems: _Problems) -> tuple[TensorInfo, ...]:
    out = []
    for i, t in enumerate(items):
        where = f"{MANIFEST}: {section}.{kind}[{i}]"
        bad = [k for k in t if k not in _TENSOR_KEYS]
        if bad:
            problems.add(f"{where}: unknown key(s) {bad} (known: name, shape, dtype, state)")
        if not all(k in t for k in ("name", "shape", "dtype")):
            problems.add(f"{where}: needs name, shape and dtype")
            continue
        if not all(check(t[k]) for k, check in _TENSOR_KEYS.items() if k in t):
            problems.add(f"{where}: name/dtype/state must be strings and shape a list of integers, found {t}")
            continue
        if t["dtype"] not in _ONNX_TYPES.values():
            problems.add(f"{where}: dtype '{t['dtype']}' is not one of {sorted(set(_ONNX_TYPES.values()))}")
        out.append(TensorInfo(t["name"], tuple(t["shape"]), t["dtype"], t.get("state")))
    return tuple(out)


def _check_state_pairs(g: GraphInfo, problems: _Problems) -> None:
    outputs = {t.name: t for t in g.outputs}
    inputs = {t.name: t for t in g.inputs}
    for t in g.inputs:
        if t.state is None:
            continue
        partner = outputs.get(t.state)
        if partner is None:
            problems.add(f"{MANIFEST}: [{g.section}] state input '{t.name}' names output '{t.state}', which is not declared")
        elif g.section == "decoder" and (partner.shape != t.shape or partner.dtype != t.dtype):
            problems.add(
                f"{MANIFEST}: [{g.section}] state '{t.name}' {list(t.shape)} {t.dtype} and its update "
                f"'{partner.name}' {list(partner.shape)} {partner.dtype} differ"
            )
    for t in g.outputs:
        if t.state is not None and t.state.endswith("_*"):  # one input per layer: cache_k_0, cache_k_1, ...
            if not any(n.startswith(t.state[:-1]) for n in inputs):
                problems.add(f"{MANIFEST}: [{g.section}] state output '{t.name}' names inputs '{t.state}', none declared")
        elif t.state is not None and t.state not in inputs:
            problems.add(f"{MANIFEST}: [{g.section}] state output '{t.name}' names input '{t.state}', which is not declared")


def _expect(g: GraphInfo, kind: str, name: str, shape: tuple[int, ...], dtype: str, why: str, problems: _Problems) -> None:
    t = g.input(name) if kind == "inputs" else g.output(name)
    if t is None:
        declared = ", ".join(x.name for x in (g.inputs if kind == "inputs" else g.outputs)) or "none"
        problems.add(
            f"{MANIFEST}: [{g.section}] must declare {kind[:-1]} '{name}' {list(shape)} {dtype} "
            f"(declared {kind}: {declared})"
        )
        return
    if t.shape != shape or t.dtype != dtype:
        problems.add(
            f"{MANIFEST}: [{g.section}] {kind[:-1]} '{name}' is declared {list(t.shape)} {t.dtype}, "
            f"expected {list(shape)} {dtype} ({why})"
        )


def _check_consistency(p: Pack, problems: _Problems) -> None:
    a, cb, d, lm, c = p.audio, p.codebooks, p.decoder, p.lm, p.conditioner
    if not 8000 <= a.sample_rate <= 192000:
        problems.add(f"{MANIFEST}: audio.sample_rate {a.sample_rate} is outside 8000..192000 Hz")
    if a.channels not in (1, 2):
        problems.add(f"{MANIFEST}: audio.channels must be 1 or 2, found {a.channels}")
    if a.hop_length <= 0 or a.frame_rate <= 0 or not math.isclose(
        a.hop_length * a.frame_rate, a.sample_rate, rel_tol=1e-9
    ):
        problems.add(
            f"{MANIFEST}: audio.sample_rate {a.sample_rate} does not equal hop_length {a.hop_length} x "
            f"frame_rate {a.frame_rate} = {a.hop_length * a.frame_rate:g}; the decoder emits "
            f"hop_length samples per frame, so one of the three is wrong"
        )
    if cb.count < 1 or cb.cardinality < 2:
        problems.add(f"{MANIFEST}: codebooks.count must be >= 1 and cardinality >= 2")
    if cb.special_token != cb.cardinality:
        problems.add(
            f"{MANIFEST}: codebooks.special_token is {cb.special_token}; cicada packs use "
            f"cardinality ({cb.cardinality}) as the special token"
        )
    if len(cb.delays) != cb.count or any(x < 0 for x in cb.delays):
        problems.add(f"{MANIFEST}: codebooks.delays {list(cb.delays)} must hold {cb.count} non-negative integers")

    f = d["frames_per_step"]
    if f < 1:
        problems.add(f"{MANIFEST}: decoder.frames_per_step must be >= 1, found {f}")
    if d["lookahead_samples"] < 0:
        problems.add(f"{MANIFEST}: decoder.lookahead_samples must be >= 0")
    _expect(d, "inputs", "codes", (1, cb.count, f), "int64", "1 x codebooks.count x decoder.frames_per_step", problems)
    _expect(d, "outputs", "pcm", (1, a.channels, f * a.hop_length), "float32",
            "1 x audio.channels x frames_per_step*hop_length", problems)

    if lm["positions"] not in ("sinusoidal", "rotary"):
        problems.add(f"{MANIFEST}: lm.positions must be 'sinusoidal' or 'rotary', found '{lm['positions']}'")
    if lm["quantization"] not in ("none", "int8"):
        problems.add(f"{MANIFEST}: lm.quantization must be 'none' or 'int8', found '{lm['quantization']}'")
    if lm["batch"] not in (1, 2):
        problems.add(f"{MANIFEST}: lm.batch must be 1 or 2 (2 = classifier-free guidance), found {lm['batch']}")
    if lm["heads"] * lm["head_dim"] != lm["dim"]:
        problems.add(f"{MANIFEST}: lm.heads x lm.head_dim ({lm['heads']} x {lm['head_dim']}) != lm.dim ({lm['dim']})")
    B, L, H, S, Dh = lm["batch"], lm["layers"], lm["heads"], lm["context"], lm["head_dim"]
    Tc = c["max_tokens"]
    _expect(lm, "inputs", "tokens", (B, cb.count), "int64", "lm.batch x codebooks.count", problems)
    if lm["positions"] == "sinusoidal":
        _expect(lm, "inputs", "position", (1,), "int64", "sinusoidal positions", problems)
    elif lm["positions"] == "rotary":
        _expect(lm, "inputs", "rope_cos", (1, Dh // 2), "float32", "1 x head_dim/2", problems)
        _expect(lm, "inputs", "rope_sin", (1, Dh // 2), "float32", "1 x head_dim/2", problems)
        if "rope_theta" not in lm.params:
            problems.add(f"{MANIFEST}: rotary packs need lm.rope_theta")
    for i in range(L):
        for n in (f"cache_k_{i}", f"cache_v_{i}"):
            _expect(lm, "inputs", n, (B, H, S, Dh), "float32", "batch x heads x context x head_dim", problems)
        for n in (f"cross_k_{i}", f"cross_v_{i}"):
            _expect(lm, "inputs", n, (B, H, Tc, Dh), "float32", "batch x heads x conditioner.max_tokens x head_dim", problems)
    _expect(lm, "inputs", "cache_mask", (1, S), "float32", "1 x lm.context", problems)
    _expect(lm, "inputs", "cross_mask", (B, Tc), "float32", "lm.batch x conditioner.max_tokens", problems)
    _expect(lm, "outputs", "logits", (B, cb.count, cb.cardinality), "float32", "batch x codebooks x cardinality", problems)
    for n in ("new_k", "new_v"):
        _expect(lm, "outputs", n, (L, B, H, 1, Dh), "float32", "layers x batch x heads x 1 x head_dim", problems)

    _expect(c, "inputs", "text_tokens", (1, Tc), "int64", "1 x conditioner.max_tokens", problems)
    _expect(c, "inputs", "text_mask", (1, Tc), "int64", "1 x conditioner.max_tokens", problems)
    for n in ("cross_k", "cross_v"):
        _expect(c, "outputs", n, (L, 1, H, Tc, Dh), "float32", "layers x 1 x heads x max_tokens x head_dim", problems)
    e = p.encoder
    if e is not None:  # fixed length: shorter clips are zero-padded at the end (the encoder is causal)
        t = e.input("audio").shape[-1] if e.input("audio") is not None and e.input("audio").shape else 0
        _expect(e, "inputs", "audio", (1, a.channels, t), "float32", "1 x channels x samples", problems)
        _expect(e, "outputs", "codes", (1, cb.count, -(-t // a.hop_length)), "int64",
                "1 x codebooks x ceil(samples / hop_length)", problems)


def _check_graph_file(g: GraphInfo, problems: _Problems) -> None:
    """Compare the ONNX file's real inputs/outputs with the manifest."""
    import onnx

    try:
        model = onnx.load(str(g.file), load_external_data=False)
    except Exception as exc:
        problems.add(f"{g.file.name}: not a readable ONNX model ({_first_line(exc)}); re-export the pack")
        return
    if not model.graph.node:
        problems.add(f"{g.file.name}: the ONNX file holds no graph (empty or truncated); re-export the pack")
        return
    def io(values: Any) -> dict[str, tuple[tuple, str]]:
        got: dict[str, tuple[tuple, str]] = {}
        for vi in values:
            tt = vi.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in tt.shape.dim)
            got[vi.name] = (dims, _ONNX_TYPES.get(tt.elem_type, f"onnx type {tt.elem_type}"))
        return got

    _compare_io(g, io(model.graph.input), io(model.graph.output), problems)


_ORT_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16",
              "tensor(int32)": "int32", "tensor(bool)": "bool"}


def check_session(g: GraphInfo, session: Any) -> None:
    """Compare an ONNX Runtime session's inputs/outputs with the manifest; raise PackError on a mismatch.

    The same check as :func:`load` with ``check_graphs``, from the session ORT built anyway (no second parse).
    """

    def io(values: Any) -> dict[str, tuple[tuple, str]]:
        return {
            v.name: (tuple(d if isinstance(d, int) else (d or "?") for d in v.shape), _ORT_TYPES.get(v.type, v.type))
            for v in values
        }

    problems = _Problems(g.file.parent)
    _compare_io(g, io(session.get_inputs()), io(session.get_outputs()), problems)
    problems.raise_if_any()


def _compare_io(
    g: GraphInfo, inputs: dict[str, tuple[tuple, str]], outputs: dict[str, tuple[tuple, str]], problems: _Problems
) -> None:
    for kind, declared, got in (("input", g.inputs, inputs), ("output", g.outputs, outputs)):
        want = {t.name: t for t in declared}
        for name, t in want.items():
            if name not in got:
                problems.add(
                    f"{g.file.name}: the manifest declares {kind} '{name}' but the graph has no such "
                    f"{kind} (graph {kind}s: {', '.join(got) or 'none'})"
                )
                continue
            shape, dtype = got[name]
            if len(shape) == len(t.shape):  # -1 in the manifest: a dynamic dimension
                shape = tuple(-1 if w == -1 else d for d, w in zip(shape, t.shape))
            if shape != t.shape or dtype != t.dtype:
                problems.add(
                    f"{g.file.name}: {kind} '{name}' is {list(shape)} {dtype} in the graph, "
                    f"the manifest expects {list(t.shape)} {t.dtype}"
                )
        for name in got:
            if name not in want:
                problems.add(f"{g.file.name}: graph {kind} '{name}' is not declared in [{g.section}] of {MANIFEST}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def load(path: str | os.PathLike, *, check_graphs: bool = True) -> Pack:
    """Read and validate the pack at ``path``; raise :class:`PackError` if it is not usable."""
    root = Path(path)
    if not root.is_dir():
        raise PackError(f"pack {root}: no such folder. Give the folder that holds {MANIFEST}.")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise PackError(f"pack {root}: {MANIFEST} is missing. A pack is a folder with {MANIFEST} and ONNX files; build one with `cicada export`.")
    try:
        doc = tomllib.loads(mpath.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PackError(f"{mpath}: not valid TOML ({exc}); fix the file or re-export the pack") from None

    problems = _Problems(root)
    _check_schema(doc, problems)
    problems.raise_if_any()
    if doc["format"] != FORMAT_VERSION:
        raise PackError(
            f"{mpath}: format {doc['format']} is not supported (this cicada reads format {FORMAT_VERSION}); "
            "re-export the pack with this version of cicada"
        )

    graphs: dict[str, GraphInfo] = {}
    for section in ("decoder", "lm", "conditioner", *(t for t in _OPTIONAL_GRAPHS if t in doc)):
        s = doc[section]
        g = GraphInfo(
            section=section,
            file=root / s["file"],
            inputs=_tensors(section, "inputs", s["inputs"], problems),
            outputs=_tensors(section, "outputs", s["outputs"], problems),
            params={k: v for k, v in s.items() if k not in _GRAPH_KEYS},
        )
        if not g.file.is_file():
            problems.add(f"{section}.file: {g.file.name} is missing from {root}; copy it back or re-export the pack")
        _check_state_pairs(g, problems)
        graphs[section] = g
    problems.raise_if_any()

    a, cb = doc["audio"], doc["codebooks"]
    tokenizer = root / doc["conditioner"]["tokenizer"]
    pack = Pack(
        path=root,
        name=doc["name"],
        description=doc.get("description", ""),
        audio=AudioInfo(a["sample_rate"], a["channels"], float(a["frame_rate"]), a["hop_length"]),
        codebooks=CodebookInfo(cb["count"], cb["cardinality"], cb["special_token"], tuple(cb["delays"])),
        decoder=graphs["decoder"],
        lm=graphs["lm"],
        conditioner=graphs["conditioner"],
        tokenizer=tokenizer,
        prompts=tuple(doc["prompts"]["known"]),
        info={k: doc[k] for k in _FREE_TABLES if k in doc},
        encoder=graphs.get("encoder"),
        sampling=_sampling(doc.get("sampling", {}), problems),
    )
    _check_consistency(pack, problems)
    if not tokenizer.is_file():
        problems.add(f"conditioner.tokenizer: {tokenizer.name} is missing from {root}")
    else:
        try:
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(tokenizer))
        except Exception as exc:
            problems.add(f"{tokenizer.name}: not a readable tokenizers file ({_first_line(exc)})")
    if check_graphs:
        for g in graphs.values():
            _check_graph_file(g, problems)
    problems.raise_if_any()
    return pack


def _sampling(table: dict[str, Any], problems: _Problems) -> dict[str, float | int]:
    """``[sampling]`` checked against the parameter registry's ranges (types are checked by the schema)."""
    from engine.params import in_range

    accepted, wrong = in_range(table)
    for problem in wrong:
        problems.add(f"{MANIFEST}: sampling.{problem}")
    return accepted  # type: ignore[return-value]  # sampling parameters are all numbers


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` through ``write(binary file)`` so that a crash leaves either the old or the new file.

    The data goes to a temporary sibling (created with the umask's ordinary
    permissions, not mkstemp's 0600), is flushed to disk, then renamed over
    ``path``. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def write_manifest(root: str | os.PathLike, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as ``manifest.toml`` in ``root`` (atomically)."""
    import tomli_w

    path = Path(root) / MANIFEST
    write_text_atomic(path, tomli_w.dumps(doc))
    return path
