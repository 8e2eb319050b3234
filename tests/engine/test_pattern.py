"""Delay pattern: streaming push equals export.lm's whole-sequence apply/revert."""

from __future__ import annotations

import numpy as np
import pytest

from engine.pattern import DelayPattern


@pytest.mark.parametrize("delays", [[0, 1, 2, 3], [0, 0], [0, 2, 5], [1, 0]])
def test_streaming_pattern_matches_offline(delays: list[int]) -> None:
    torch = pytest.importorskip("torch")
    from export.lm import apply_delay

    k, t, special = len(delays), 12, 99
    codes = np.random.default_rng(0).integers(0, 50, size=(1, k, t))
    grid = apply_delay(torch.from_numpy(codes), delays, special)[0].numpy()  # [K, T + max]
    pat = DelayPattern(delays, special)
    frames = []
    inputs = []
    for c in range(grid.shape[1]):
        inputs.append(pat.input_column.copy())
        # the sampler may return anything in the cells before each delay: feed garbage there
        col = np.where(c < np.asarray(delays), 7, grid[:, c])
        out = pat.push(col)
        if out is not None:
            frames.append(out)
    assert np.array_equal(np.stack(frames, axis=1), codes[0])
    # the LM reads an all-special BOS column, then the previous delayed column
    assert (inputs[0] == special).all()
    for c in range(1, grid.shape[1]):
        assert np.array_equal(inputs[c], grid[:, c - 1])


def test_first_frame_after_max_delay_then_one_per_column() -> None:
    pat = DelayPattern([0, 1, 2, 3], 2048)
    got = [pat.push(np.full(4, c)) is not None for c in range(8)]
    assert got == [False, False, False, True, True, True, True, True]
    assert pat.latency_frames == 3
    pat.reset()
    assert pat.push(np.zeros(4, np.int64)) is None
