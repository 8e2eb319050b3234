"""ONNX helpers (export/onnx.py): int8 quantization and float16 storage."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from export.onnx import ort_session, quantize_int8, store_float16


def _matmul_graph(path: Path, rows: int = 64, cols: int = 128) -> np.ndarray:
    """A graph ``y = x @ W`` with a random ``W [rows, cols]`` saved at ``path``; returns ``W``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(0, 0.05, (rows, cols)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
        [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return w


def test_int8_quantization_keeps_the_product_and_says_nothing(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The weights become int8, the product stays within a few percent, and onnxruntime's hint about its
    own shape pre-processing (which quantize_int8 does its own way) is not logged; other warnings are."""
    import onnx

    w = _matmul_graph(tmp_path / "f.onnx")
    with caplog.at_level(logging.INFO):
        quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx")
        logging.getLogger().warning("still heard")
    assert not any("pre-processing" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage() == "still heard" for r in caplog.records)
    types = {i.name: i.data_type for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    assert types["W_quantized"] == onnx.TensorProto.INT8
    x = np.random.default_rng(1).normal(0, 1, (1, w.shape[0])).astype(np.float32)
    y = ort_session(tmp_path / "q.onnx").run(None, {"x": x})[0]
    assert np.sqrt(((y - x @ w) ** 2).mean() / ((x @ w) ** 2).mean()) < 0.05


def test_float16_storage_rounds_large_weights_only(tmp_path: Path) -> None:
    import onnx

    w = _matmul_graph(tmp_path / "f.onnx")
    store_float16(tmp_path / "f.onnx", tmp_path / "h.onnx")
    names = {i.name for i in onnx.load(str(tmp_path / "h.onnx")).graph.initializer}
    assert names == {"W__f16"}
    x = np.random.default_rng(1).normal(0, 1, (1, w.shape[0])).astype(np.float32)
    y = ort_session(tmp_path / "h.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w.astype(np.float16).astype(np.float32), rtol=1e-4, atol=1e-5)
    store_float16(tmp_path / "f.onnx", tmp_path / "k.onnx", min_elements=w.size + 1)  # too small: kept
    assert {i.name for i in onnx.load(str(tmp_path / "k.onnx")).graph.initializer} == {"W"}
