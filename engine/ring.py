"""Single-producer single-consumer ring of interleaved float32 audio over shared memory.

The engine's producer thread writes PCM blocks ``[N, C]`` into the ring; the audio process (a child of the
engine, see :mod:`engine.audio`) attaches to the same segment by name and copies out of it in its sound-card
callback. Everything is preallocated when the ring is created; neither side allocates buffers afterwards.

Layout of the shared-memory segment (all header slots are native-endian signed 64-bit integers)::

    byte offset  slot  name             written by   meaning
    -----------  ----  ---------------  -----------  -----------------------------------------------------
      0           0    MAGIC            owner        ``RING_MAGIC``; checked by :meth:`Ring.attach`
      8           1    CAPACITY         owner        capacity in frames (one frame = one sample per channel)
     16           2    CHANNELS         owner        channels per frame
     24           3    WRITE_INDEX      producer     frames ever written (monotonic, never wraps)
     32           4    READ_INDEX       consumer     frames ever read (monotonic, never wraps)
     40           5    UNDERRUNS        consumer     underrun events (playing, then a block came up short)
     48           6    CALLBACKS        consumer     audio callbacks run
     56           7    HEARTBEAT_NS     consumer     ``time.monotonic_ns()`` at the last callback
     64           8    DEVICE_RATE      consumer     sample rate the device was actually opened at (Hz)
     72           9    LATENCY_NS       consumer     output latency the stream reported (nanoseconds)
     80          10    STATUS           both         status code (see ``engine.audio.Status``)
     88          11    STOP_REQUEST     both         0 none, 1 fade-out requested (engine), 2 faded (callback)
     96          12    FRAMES_PLAYED    consumer     frames handed to the device, silence included
    104          13    UNDERRUN_FRAMES  consumer     frames of silence played while starved
    112          14    CONSUMER_PID     consumer     process id of the current consumer (0: none)
    120          15    XRUNS            consumer     callbacks the device flagged as late (PortAudio status)
    128..               data             producer     ``float32[CAPACITY, CHANNELS]``, C order (interleaved)

The frame at monotonic index ``i`` lives at row ``i % CAPACITY``. ``WRITE_INDEX - READ_INDEX`` is the fill,
always within ``[0, CAPACITY]``. Indices are int64 and count frames: at 192 kHz they last 1.5 million years.

Memory ordering. Each index has exactly one writer. The producer copies the samples first and only then stores
the new write index; the consumer loads the write index first and only then reads the samples (and mirrors
this for the read index). A store of an aligned 8-byte slot through a ``memoryview`` cast to ``'q'`` is a
single aligned 64-bit move, so the other process never sees a torn index. On x86-64 (total store order) this
is enough: stores are not reordered with older stores and loads are not reordered with older loads, and
CPython cannot reorder the two steps because each is an opaque C call. On weakly ordered CPUs (ARM) the
hardware could in principle make the index visible before the data; there is no fence available from pure
Python. In practice the several hundred instructions of interpreter work between the two steps make it
vanishingly unlikely, and the worst outcome is one block of stale samples, never a crash.

Only one thread of one process may write, and only one may read, at any time. Counter slots other than the
indices are plain stores from their single writer; readers treat them as approximate and monotonic.
"""

from __future__ import annotations

import sys
import threading
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np

__all__ = [
    "CALLBACKS",
    "CAPACITY",
    "CHANNELS",
    "CONSUMER_PID",
    "DATA_OFFSET",
    "DEVICE_RATE",
    "FRAMES_PLAYED",
    "HEADER_SLOTS",
    "HEARTBEAT_NS",
    "LATENCY_NS",
    "MAGIC",
    "READ_INDEX",
    "RING_MAGIC",
    "Ring",
    "STATUS",
    "STOP_REQUEST",
    "UNDERRUNS",
    "UNDERRUN_FRAMES",
    "WRITE_INDEX",
    "XRUNS",
]

# Header slots (index into the int64 header; byte offset = 8 * slot).
MAGIC = 0
CAPACITY = 1
CHANNELS = 2
WRITE_INDEX = 3
READ_INDEX = 4
UNDERRUNS = 5
CALLBACKS = 6
HEARTBEAT_NS = 7
DEVICE_RATE = 8
LATENCY_NS = 9
STATUS = 10
STOP_REQUEST = 11
FRAMES_PLAYED = 12
UNDERRUN_FRAMES = 13
CONSUMER_PID = 14
XRUNS = 15

HEADER_SLOTS = 16
DATA_OFFSET = 8 * HEADER_SLOTS  # 128 bytes: keeps the data 64-byte aligned (shared memory is page aligned)
RING_MAGIC = int.from_bytes(b"cicring1", "little")

_FRAME_DTYPE = np.dtype(np.float32)
_TRACK_LOCK = threading.Lock()


def _open_untracked(name: str) -> SharedMemory:
    """Attach to an existing segment without registering it with this process's resource tracker.

    Before Python 3.13 every ``SharedMemory(name)`` registers the segment, and a tracker that this process
    started itself would unlink the segment when this process exits, pulling it from under its owner.
    """
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, create=False, track=False)  # type: ignore[call-arg]
    with _TRACK_LOCK:
        register = resource_tracker.register
        resource_tracker.register = lambda *args, **kwargs: None  # type: ignore[assignment]
        try:
            return SharedMemory(name=name, create=False)
        finally:
            resource_tracker.register = register  # type: ignore[assignment]


class Ring:
    """SPSC ring of float32 frames ``[capacity, channels]`` in a shared-memory segment, plus a counter header.

    Create it in the owning process with :meth:`create` (the owner unlinks the segment on :meth:`close`) and
    attach from another process with :meth:`attach` using :attr:`name`. ``write`` is for the producer only,
    ``read_into``/``discard`` for the consumer only; both are non-blocking and allocate no buffers.
    """

    def __init__(self, shm: SharedMemory, owner: bool) -> None:
        self._shm = shm
        self._owner = owner
        self._closed = False
        header = shm.buf[:DATA_OFFSET].cast("q")
        if header[MAGIC] != RING_MAGIC:
            header.release()
            raise ValueError(f"shared memory {shm.name!r} is not a cicada ring")
        capacity = int(header[CAPACITY])
        channels = int(header[CHANNELS])
        self._header = header
        self._capacity = capacity
        self._channels = channels
        self._data: np.ndarray = np.ndarray(
            (capacity, channels), dtype=_FRAME_DTYPE, buffer=shm.buf, offset=DATA_OFFSET
        )

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def create(cls, capacity_frames: int, channels: int) -> Ring:
        """Allocate a new zeroed ring holding ``capacity_frames`` frames of ``channels`` float32 samples."""
        capacity_frames = int(capacity_frames)
        channels = int(channels)
        if capacity_frames < 1 or channels < 1:
            raise ValueError(f"ring needs capacity_frames >= 1 and channels >= 1, got {capacity_frames}, {channels}")
        size = DATA_OFFSET + capacity_frames * channels * _FRAME_DTYPE.itemsize
        shm = SharedMemory(create=True, size=size)
        header = shm.buf[:DATA_OFFSET].cast("q")
        for slot in range(HEADER_SLOTS):
            header[slot] = 0
        header[CAPACITY] = capacity_frames
        header[CHANNELS] = channels
        header[MAGIC] = RING_MAGIC
        header.release()
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> Ring:
        """Map the ring that another process created under ``name``; closing it never unlinks the segment."""
        shm = _open_untracked(name)
        try:
            return cls(shm, owner=False)
        except BaseException:
            shm.close()
            raise

    # -- geometry ---------------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Name of the shared-memory segment; pass it to :meth:`attach` in another process."""
        return self._shm.name

    @property
    def capacity(self) -> int:
        """Capacity in frames."""
        return self._capacity

    @property
    def channels(self) -> int:
        """Samples per frame."""
        return self._channels

    @property
    def header(self) -> memoryview:
        """The header as a writable ``memoryview`` of int64 (format ``'q'``), indexed by the slot constants.

        For hot paths (the audio callback) that update counters without property overhead.
        """
        return self._header

    # -- data path ------------------------------------------------------------------------------------------

    def fill(self) -> int:
        """Frames written but not yet read."""
        header = self._header
        return header[WRITE_INDEX] - header[READ_INDEX]

    def space(self) -> int:
        """Frames that :meth:`write` can take now."""
        header = self._header
        return self._capacity - (header[WRITE_INDEX] - header[READ_INDEX])

    def write(self, block: np.ndarray) -> int:
        """Producer: copy as many leading frames of ``block`` ``[N, channels]`` as fit; return how many.

        Never blocks. Samples are converted to float32 (same-kind casting). The write index is published
        only after the samples are in place.
        """
        if block.ndim != 2 or block.shape[1] != self._channels:
            raise ValueError(f"ring takes blocks of shape [N, {self._channels}], got {list(block.shape)}")
        header = self._header
        capacity = self._capacity
        w = header[WRITE_INDEX]
        n = min(block.shape[0], capacity - (w - header[READ_INDEX]))
        if n <= 0:
            return 0
        pos = w % capacity
        first = min(n, capacity - pos)
        data = self._data
        np.copyto(data[pos : pos + first], block[:first], casting="same_kind")
        if n > first:
            np.copyto(data[: n - first], block[first:n], casting="same_kind")
        header[WRITE_INDEX] = w + n
        return n

    def read_into(self, out: np.ndarray) -> int:
        """Consumer: copy up to ``len(out)`` frames into ``out`` ``[N, channels]`` float32; return how many.

        Never blocks and allocates no buffers (only transient slice views). Rows of ``out`` past the returned
        count are left untouched. The read index is published only after the samples are copied out.
        """
        header = self._header
        capacity = self._capacity
        r = header[READ_INDEX]
        n = min(out.shape[0], header[WRITE_INDEX] - r)
        if n <= 0:
            return 0
        pos = r % capacity
        first = min(n, capacity - pos)
        data = self._data
        np.copyto(out[:first], data[pos : pos + first])
        if n > first:
            np.copyto(out[first:n], data[: n - first])
        header[READ_INDEX] = r + n
        return n

    def discard(self, frames: int | None = None) -> int:
        """Consumer: drop up to ``frames`` unread frames (all of them if None) without copying; return how many.

        Only while no other consumer is running (e.g. the engine dropping stale audio between audio processes).
        """
        header = self._header
        r = header[READ_INDEX]
        avail = header[WRITE_INDEX] - r
        n = avail if frames is None else max(0, min(int(frames), avail))
        header[READ_INDEX] = r + n
        return n

    # -- counters -------------------------------------------------------------------------------------------

    def _get(self, slot: int) -> int:
        return int(self._header[slot])

    def _set(self, slot: int, value: int) -> None:
        self._header[slot] = int(value)

    @property
    def write_index(self) -> int:
        """Frames ever written (monotonic)."""
        return self._get(WRITE_INDEX)

    @property
    def read_index(self) -> int:
        """Frames ever read (monotonic)."""
        return self._get(READ_INDEX)

    @property
    def underruns(self) -> int:
        """Underrun events counted by the consumer."""
        return self._get(UNDERRUNS)

    @underruns.setter
    def underruns(self, value: int) -> None:
        self._set(UNDERRUNS, value)

    @property
    def callbacks(self) -> int:
        """Audio callbacks run so far (all consumers of this ring together)."""
        return self._get(CALLBACKS)

    @callbacks.setter
    def callbacks(self, value: int) -> None:
        self._set(CALLBACKS, value)

    @property
    def heartbeat_ns(self) -> int:
        """``time.monotonic_ns()`` of the last callback (0: none yet). Comparable across processes on one host."""
        return self._get(HEARTBEAT_NS)

    @heartbeat_ns.setter
    def heartbeat_ns(self, value: int) -> None:
        self._set(HEARTBEAT_NS, value)

    @property
    def device_rate(self) -> int:
        """Sample rate the device was opened at (0: not open yet)."""
        return self._get(DEVICE_RATE)

    @device_rate.setter
    def device_rate(self, value: int) -> None:
        self._set(DEVICE_RATE, value)

    @property
    def output_latency(self) -> float:
        """Output latency the stream reported, in seconds."""
        return self._get(LATENCY_NS) * 1e-9

    @output_latency.setter
    def output_latency(self, seconds: float) -> None:
        self._set(LATENCY_NS, round(seconds * 1e9))

    @property
    def status(self) -> int:
        """Status code (meaning defined by the user of the ring; see ``engine.audio.Status``)."""
        return self._get(STATUS)

    @status.setter
    def status(self, value: int) -> None:
        self._set(STATUS, value)

    @property
    def stop_request(self) -> int:
        """0: play; 1: fade out and go silent (set by the engine); 2: faded out (set by the callback)."""
        return self._get(STOP_REQUEST)

    @stop_request.setter
    def stop_request(self, value: int) -> None:
        self._set(STOP_REQUEST, value)

    @property
    def frames_played(self) -> int:
        """Frames handed to the device (silence included)."""
        return self._get(FRAMES_PLAYED)

    @frames_played.setter
    def frames_played(self, value: int) -> None:
        self._set(FRAMES_PLAYED, value)

    @property
    def underrun_frames(self) -> int:
        """Frames of silence the consumer played while starved (after the first audio)."""
        return self._get(UNDERRUN_FRAMES)

    @underrun_frames.setter
    def underrun_frames(self, value: int) -> None:
        self._set(UNDERRUN_FRAMES, value)

    @property
    def consumer_pid(self) -> int:
        """Process id of the consumer that last announced itself (0: none)."""
        return self._get(CONSUMER_PID)

    @consumer_pid.setter
    def consumer_pid(self, value: int) -> None:
        self._set(CONSUMER_PID, value)

    @property
    def xruns(self) -> int:
        """Callbacks that the device flagged as late (PortAudio's output underflow status)."""
        return self._get(XRUNS)

    @xruns.setter
    def xruns(self, value: int) -> None:
        self._set(XRUNS, value)

    # -- lifetime -------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def close(self) -> None:
        """Unmap the segment; the owner also unlinks it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._data = np.empty((0, self._channels), dtype=_FRAME_DTYPE)
        self._header.release()
        try:
            self._shm.close()
        except BufferError:
            pass  # someone still holds a view of the data; the mapping goes when the process exits
        if self._owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return f"Ring(closed, capacity={self._capacity}, channels={self._channels})"
        return (
            f"Ring(name={self.name!r}, capacity={self._capacity}, channels={self._channels}, "
            f"fill={self.fill()}, owner={self._owner})"
        )
