"""What every driver shares: its slice of the image, the clock, the stop flag.

A driver owns one input block (a contiguous node range) and runs in its own I/O
process, never in the scan process. It fills `io.staging` with the newest data
of its nodes and calls `io.publish()`; it reads the instruction for its nodes
with `io.read_outputs()`. The base keeps the bookkeeping; a driver writes `run()`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from vbatt.kernel.clock import Clock, MonotonicClock
from vbatt.kernel.fields import NODE_OUTPUTS
from vbatt.kernel.image import DRIVER_INPUTS, Ctl, ProcessImage

__all__ = ["IoContext", "Driver", "OUTPUT_NAMES"]

OUTPUT_NAMES = tuple(f.name for f in NODE_OUTPUTS)


class IoContext:
    def __init__(self, img: ProcessImage, partition: int, clock: Clock | None = None):
        self.img = img
        self.partition = partition
        self.block = img.inputs[partition]
        self.start, self.stop = img.spec.partitions[partition]
        self.n = self.stop - self.start
        self.clock = clock or MonotonicClock()
        self.ids = img.spec.node_ids[self.start:self.stop] if img.spec.node_ids else ()
        self.staging = {f.name: np.zeros(self.n, f.dtype) for f in DRIVER_INPUTS}
        self.outputs = {name: np.zeros(self.n) for name in OUTPUT_NAMES}
        self.output_cycle = 0  # scan cycle of the last instruction read (its sequence number)
        self.output_safe = 0  # 1 when the scan holds the safe allocation
        self._stop = False
        sl = slice(self.start, self.stop)

        def _copy(views):
            for name in OUTPUT_NAMES:
                self.outputs[name][:] = views["node." + name][sl]
            self.output_cycle = int(views["cycle"][0])

        self._copy = _copy

    def publish(self) -> None:
        """Hand the staged inputs to the scan (whole, never torn)."""
        arrays = self.block.begin()
        for name, src in self.staging.items():
            arrays[name][:] = src
        self.block.commit()

    def read_outputs(self) -> int:
        """Copy the newest published instruction of this driver's nodes into `outputs`; returns its cycle."""
        if self.img.pub.seq == 0:
            return 0
        self.img.pub.read(self._copy)
        self.output_safe = int(self.img.ctl[Ctl.SAFE_STATE])
        return self.output_cycle

    def stopping(self) -> bool:
        return self._stop or self.img.ctl[Ctl.IO_STOP] != 0

    def request_stop(self) -> None:
        """Stop this driver only (SIGTERM to its process)."""
        self._stop = True


class Driver:
    """Base of all drivers. `kind` is the config's `driver:` value."""

    kind: ClassVar[str]

    def __init__(self, cfg, fleet, start: int, stop: int):
        self.cfg = cfg
        self.fleet = fleet
        self.start, self.stop = start, stop

    def run(self, io: IoContext) -> None:
        """Exchange data until `io.stopping()`; must return promptly after it turns true."""
        raise NotImplementedError
