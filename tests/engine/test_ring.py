"""Shared-memory SPSC ring: wraparound, partial transfers, cross-process use, no allocation when reading."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import time
import tracemalloc
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import pytest

from engine.ring import DATA_OFFSET, HEADER_SLOTS, Ring


def frames(start: int, n: int, channels: int = 2) -> np.ndarray:
    """Frames numbered ``start .. start+n``: sample (i, c) = i + c / 10, so order and channel are both checked."""
    idx = np.arange(start, start + n, dtype=np.float64)[:, None]
    return (idx + np.arange(channels)[None, :] / 10).astype(np.float32)


@pytest.fixture
def ring() -> Iterator[Ring]:
    r = Ring.create(8, 2)
    yield r
    r.close()


def test_geometry_and_header(ring: Ring) -> None:
    assert (ring.capacity, ring.channels) == (8, 2)
    assert ring.fill() == 0 and ring.space() == 8
    assert DATA_OFFSET == 8 * HEADER_SLOTS == 128
    assert ring.write_index == ring.read_index == ring.underruns == ring.callbacks == 0


def test_wraparound_keeps_order(ring: Ring) -> None:
    rng = np.random.default_rng(0)
    written = read = 0
    out = np.zeros((8, 2), np.float32)
    for _ in range(500):
        n = int(rng.integers(0, 9))
        written += ring.write(frames(written, n))
        assert 0 <= ring.fill() <= 8
        m = int(rng.integers(0, 9))
        got = ring.read_into(out[:m])
        np.testing.assert_array_equal(out[:got], frames(read, got))
        read += got
    assert ring.write_index == written and ring.read_index == read
    assert written > 8 * 50  # wrapped many times


def test_partial_write_when_nearly_full(ring: Ring) -> None:
    assert ring.write(frames(0, 5)) == 5
    assert ring.write(frames(5, 5)) == 3  # only 3 fit
    assert ring.space() == 0 and ring.write(frames(8, 1)) == 0
    out = np.full((10, 2), -1, np.float32)
    assert ring.read_into(out) == 8
    np.testing.assert_array_equal(out[:8], frames(0, 8))
    assert (out[8:] == -1).all()  # rows past the count are left alone


def test_partial_read_when_short(ring: Ring) -> None:
    ring.write(frames(0, 3))
    out = np.zeros((6, 2), np.float32)
    assert ring.read_into(out) == 3
    assert ring.read_into(out) == 0
    np.testing.assert_array_equal(out[:3], frames(0, 3))


def test_read_across_the_seam(ring: Ring) -> None:
    ring.write(frames(0, 6))
    ring.read_into(np.zeros((6, 2), np.float32))
    assert ring.write(frames(6, 7)) == 7  # rows 6, 7, then 0..4
    out = np.zeros((7, 2), np.float32)
    assert ring.read_into(out) == 7
    np.testing.assert_array_equal(out, frames(6, 7))


def test_discard_and_converts_dtype(ring: Ring) -> None:
    ring.write(frames(0, 4).astype(np.float64))
    assert ring.discard(3) == 3 and ring.fill() == 1
    out = np.zeros((1, 2), np.float32)
    ring.read_into(out)
    np.testing.assert_array_equal(out, frames(3, 1))
    ring.write(frames(0, 4))
    assert ring.discard() == 4 and ring.fill() == 0


def test_rejects_wrong_shape(ring: Ring) -> None:
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        ring.write(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError):
        ring.write(np.zeros(4, np.float32))


def test_attach_shares_data_and_counters(ring: Ring) -> None:
    other = Ring.attach(ring.name)
    try:
        assert (other.capacity, other.channels) == (8, 2)
        ring.write(frames(0, 4))
        other.callbacks = 7
        other.device_rate = 44100
        other.output_latency = 0.0125
        assert ring.callbacks == 7 and ring.device_rate == 44100
        assert ring.output_latency == pytest.approx(0.0125)
        out = np.zeros((4, 2), np.float32)
        assert other.read_into(out) == 4
        np.testing.assert_array_equal(out, frames(0, 4))
        assert ring.fill() == 0
    finally:
        other.close()
    assert ring.fill() == 0 and ring.write(frames(0, 1)) == 1  # the attacher's close left the owner's segment


def test_owner_close_unlinks() -> None:
    r = Ring.create(16, 1)
    name = r.name
    r.close()
    r.close()  # idempotent
    with pytest.raises(FileNotFoundError):
        Ring.attach(name)


def test_attach_refuses_foreign_segment() -> None:
    shm = SharedMemory(create=True, size=4096)
    try:
        with pytest.raises(ValueError, match="not a cicada ring"):
            Ring.attach(shm.name)
    finally:
        shm.close()
        shm.unlink()


def _consumer(name: str, total: int, conn: multiprocessing.connection.Connection) -> None:
    """Spawned: read ``total`` frames as they arrive, check their order, report (count, mismatches)."""
    ring = Ring.attach(name)
    out = np.zeros((64, ring.channels), np.float32)
    got = bad = 0
    deadline = time.monotonic() + 20
    while got < total and time.monotonic() < deadline:
        n = ring.read_into(out)
        if n == 0:
            time.sleep(0.0005)
            continue
        bad += int(np.count_nonzero(out[:n] != frames(got, n, ring.channels)))
        got += n
    ring.callbacks = 1234
    ring.close()
    conn.send((got, bad))


def test_cross_process_reader() -> None:
    total = 20_000
    ctx = multiprocessing.get_context("spawn")
    ring = Ring.create(256, 3)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_consumer, args=(ring.name, total, child), daemon=True)
    proc.start()
    try:
        written = 0
        deadline = time.monotonic() + 20
        while written < total and time.monotonic() < deadline:
            n = ring.write(frames(written, min(100, total - written), 3))
            written += n
            if n == 0:
                time.sleep(0.0005)
        assert parent.poll(20), "consumer did not finish"
        got, bad = parent.recv()
        assert (got, bad) == (total, 0)
        proc.join(5)
        assert proc.exitcode == 0
        # The child's exit did not unlink the segment (resource tracker), and its counter write is visible.
        assert ring.callbacks == 1234
        again = Ring.attach(ring.name)
        again.close()
    finally:
        if proc.exitcode is None:
            proc.kill()
            proc.join(5)
        ring.close()


def test_read_into_allocates_nothing() -> None:
    block = 4096  # 32 KiB of samples per call: any per-call buffer would dwarf the bound below
    ring = Ring.create(4 * block, 2)
    src = np.ones((block, 2), np.float32)
    out = np.zeros((block, 2), np.float32)
    try:
        for _ in range(10):  # warm up
            ring.write(src[:3000])
            ring.read_into(out)
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            for _ in range(1000):
                ring.write(src[:3000])  # odd size: reads and writes cross the seam often
                ring.read_into(out)
            after, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert after - before < 1024, f"grew {after - before} bytes over 1000 calls"
        assert peak - before < 4096, f"peak {peak - before} bytes: something allocates a buffer"
    finally:
        ring.close()
