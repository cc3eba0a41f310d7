"""Double-buffered sequence lock: one writer, any number of readers, no torn reads.

The writer fills the buffer that readers are *not* told about, then advances the
sequence. `wseq` is raised before the writer touches a buffer, so a reader that
copied buffer `s & 1` knows its copy is whole exactly when `wseq < s + 2`
afterwards. Stores and loads stay in program order on x86-64 (TSO); every step
below is a separate C call, so the compiler cannot reorder them either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ArraySpec", "Layout", "SeqBlock", "TornRead"]

ALIGN = 64


class TornRead(RuntimeError):
    """The writer overwrote the buffer during every retry of a read."""


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class Layout:
    """Places named arrays at 64-byte aligned offsets in a flat byte range."""

    def __init__(self) -> None:
        self.offsets: dict[str, tuple[int, ArraySpec]] = {}
        self.size = 0

    def add(self, spec: ArraySpec) -> int:
        if spec.name in self.offsets:
            raise ValueError(f"array {spec.name!r} placed twice")
        off = -(-self.size // ALIGN) * ALIGN
        self.offsets[spec.name] = (off, spec)
        self.size = off + spec.nbytes
        return off

    def views(self, buf, base: int = 0) -> dict[str, np.ndarray]:
        out = {}
        for name, (off, spec) in self.offsets.items():
            count = int(np.prod(spec.shape, dtype=np.int64))
            a = np.frombuffer(buf, dtype=spec.dtype, count=count, offset=base + off)
            out[name] = a.reshape(spec.shape)
        return out


def _copy_out(raw: np.ndarray, dst: np.ndarray) -> None:
    dst[...] = raw


class SeqBlock:
    """A group of arrays published together through a double-buffered seqlock.

    Placed in a segment at `base`: [seq, wseq] (int64), then buffer 0 and 1, each
    laid out by `layout` so that one publish or one read is a single memmove.
    """

    def __init__(self, layout: Layout, buf, base: int):
        self.layout = layout
        self.stride = -(-layout.size // ALIGN) * ALIGN
        self._ctl = np.frombuffer(buf, dtype=np.int64, count=2, offset=base)
        b0 = base + ALIGN
        self._raw = [
            np.frombuffer(buf, dtype=np.uint8, count=layout.size, offset=b0 + i * self.stride)
            for i in (0, 1)
        ]
        self.buffers = [layout.views(buf, b0 + i * self.stride) for i in (0, 1)]

    @staticmethod
    def footprint(layout: Layout) -> int:
        return ALIGN + 2 * (-(-layout.size // ALIGN) * ALIGN)

    @property
    def seq(self) -> int:
        """Number of completed publishes; 0 = never written."""
        return int(self._ctl[0])

    # -- writer side -------------------------------------------------------
    def begin(self) -> dict[str, np.ndarray]:
        """Start a publish; returns the arrays to fill. End with `commit()`."""
        s = int(self._ctl[0])
        self._ctl[1] = s + 1
        return self.buffers[(s + 1) & 1]

    def commit(self) -> None:
        self._ctl[0] = self._ctl[1]

    def publish_raw(self, src: np.ndarray) -> None:
        """Publish from a private byte image laid out like the buffers (one memmove)."""
        s = int(self._ctl[0])
        self._ctl[1] = s + 1
        self._raw[(s + 1) & 1][:] = src
        self._ctl[0] = s + 1

    # -- reader side -------------------------------------------------------
    def read_into(self, fn, args: tuple, retries: int = 16) -> int:
        """Call `fn(raw_bytes_of_the_newest_whole_buffer, *args)`; returns its sequence.

        `fn` must only copy out of the buffer it is given: if the writer overwrote it
        meanwhile the copy is discarded and done again (TornRead after `retries`).
        """
        for _ in range(retries):
            s = int(self._ctl[0])
            fn(self._raw[s & 1], *args)
            if int(self._ctl[1]) < s + 2:
                return s
        raise TornRead(f"writer overtook the reader {retries} times")

    def read(self, copy, retries: int = 16) -> int:
        """Call `copy(arrays)` on the named arrays of the newest whole buffer; returns its sequence."""
        return self.read_into(lambda raw: copy(self.buffers[0 if raw is self._raw[0] else 1]), (), retries)

    def read_raw(self, dst: np.ndarray, retries: int = 16) -> int:
        """Copy the newest whole buffer's bytes into `dst` (one memmove)."""
        return self.read_into(_copy_out, (dst,), retries)
