"""ONNX export of step graphs and the parity checks that go with it.

Every graph cicada exports is a *step graph* with fixed shapes and named
tensors::

    (inputs..., *state_in) -> (outputs..., *state_out)

A module that wants to be exported describes itself with :class:`TensorSpec`
lists (``input_specs`` / ``output_specs``) and can build example inputs from
them. The same specs are written to the pack manifest, and the engine checks
the loaded graphs against them (engine/pack.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "int64": torch.int64}


@dataclass(frozen=True)
class TensorSpec:
    """Name, fixed shape and dtype of one graph input or output.

    ``state`` names the partner tensor for streaming state: on an input it is
    the name of the output that carries its next value, and vice versa.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"  # "float32" | "int64"
    state: str | None = None

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=_TORCH_DTYPES[self.dtype])

    def to_manifest(self) -> dict:
        d: dict = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.state is not None:
            d["state"] = self.state
        return d


@dataclass
class GraphSpec:
    """Inputs and outputs of one exported step graph."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    meta: dict = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]


def export_graph(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    spec: GraphSpec,
    path: str | os.PathLike,
    *,
    opset: int = 17,
    dynamo: bool = False,
) -> Path:
    """Export ``module`` (in eval mode, plain weights) to ``path``.

    The TorchScript exporter (``dynamo=False``) is the default: with fixed
    shapes it is both reliable and fast (tenths of a second for the tiny test
    models against seconds for the torch.export path). Large graphs (>1.8 GB)
    are written with external data next to the .onnx file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    n_params = sum(p.numel() for p in module.parameters())
    big = n_params * 4 > 1_800_000_000
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        kwargs: dict = dict(
            input_names=spec.input_names,
            output_names=spec.output_names,
            opset_version=opset,
            dynamo=dynamo,
            do_constant_folding=True,
        )
        if big:
            kwargs["external_data"] = True
        torch.onnx.export(module, tuple(example_inputs), str(path), **kwargs)
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != spec.input_names or got_out != spec.output_names:
        raise RuntimeError(
            f"exported {path.name}: graph I/O {got_in} -> {got_out} differs from the spec "
            f"{spec.input_names} -> {spec.output_names} (an unused input is dropped by the exporter)"
        )
    return path


def ort_session(path: str | os.PathLike, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(session, spec: GraphSpec, inputs: Iterable[torch.Tensor | np.ndarray]) -> list[np.ndarray]:
    feeds = {}
    for s, x in zip(spec.inputs, inputs):
        feeds[s.name] = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return session.run(spec.output_names, feeds)


def max_abs_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


class _DropHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing before quantization")


@contextlib.contextmanager
def _without_preprocessing_hint() -> Iterator[None]:
    """``quantize_dynamic`` logs a WARNING on the root logger asking for its shape pre-processing, which
    :func:`quantize_int8` does its own way (it clears the shapes and optimises first); users of ``cicada
    train pack`` should not see it."""
    hint = _DropHint()
    root = logging.getLogger()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Dynamic int8 quantization of the MatMul/Gemm (and LSTM) weights of ``src`` into ``dst``.

    ``quantize_dynamic`` trips over the shape annotations the exporter leaves
    in ``graph.value_info``, and only recognises an LSTM once the graph has
    been saved optimised at BASIC level (it then becomes DynamicQuantizeLSTM),
    so both are done first. Activations stay float32; inputs and outputs keep
    their names, shapes and types.
    """
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        model = onnx.load(str(src))
        del model.graph.value_info[:]
        cleared = Path(tmp) / "cleared.onnx"
        onnx.save(model, str(cleared))
        basic = Path(tmp) / "basic.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(basic)
        so.log_severity_level = 3
        ort.InferenceSession(str(cleared), so, providers=["CPUExecutionProvider"])
        with _without_preprocessing_hint():
            quantize_dynamic(
                str(basic),
                str(dst),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm", "LSTM"],
                per_channel=False,
            )
    return dst


def store_float16(src: str | os.PathLike, dst: str | os.PathLike, min_elements: int = 4096,
                  constants: bool = True) -> Path:
    """Store ``src``'s large float32 weights as float16 in ``dst``; the graph still computes in float32.

    Each float32 initializer (or, with ``constants``, ``Constant`` node) of at least ``min_elements``
    values becomes float16 plus a ``Cast`` back to float32 under the original name, so every
    consumer is unchanged. ONNX Runtime folds those casts once when the session
    opens: the file is about half the size and steps cost the same. The weights
    are rounded to float16 (relative error <= 2^-11); small tensors (norms,
    biases) stay float32.

    ``constants = False`` keeps ``Constant`` nodes (the exporter's form of fixed buffers such as DFT bases)
    in float32. An analysis basis must stay exact where its output goes through a logarithm: rounded to
    float16, its leakage (about -66 dB) lifts every quiet bin's log power, which moved the spectral codec's
    latents by 30 % and changed most of its codes.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph

    def halve(t: Any, name: str) -> tuple[Any, Any] | None:
        """A large float32 tensor ``t`` -> (its float16 copy named ``name__f16``, the Cast back to ``name``)."""
        if t.data_type != TensorProto.FLOAT or int(np.prod(t.dims)) < min_elements:
            return None
        half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), f"{name}__f16")
        return half, helper.make_node("Cast", [half.name], [name], to=TensorProto.FLOAT, name=f"{name}__cast")

    casts = []
    for init in list(graph.initializer):
        if (done := halve(init, init.name)) is not None:
            graph.initializer.remove(init)
            graph.initializer.append(done[0])
            casts.append(done[1])
    for node in reversed(casts):
        graph.node.insert(0, node)
    # Tensors the exporter left as Constant nodes (non-persistent buffers such as DFT bases): the node
    # now makes the float16 copy, and its Cast follows it.
    for i in reversed(range(len(graph.node)) if constants else ()):
        node = graph.node[i]
        if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
            continue
        if (done := halve(node.attribute[0].t, node.output[0])) is not None:
            node.attribute[0].t.CopyFrom(done[0])
            node.output[0] = done[0].name
            graph.node.insert(i + 1, done[1])
    onnx.checker.check_model(model)
    dst = Path(dst)
    onnx.save(model, str(dst))
    return dst
