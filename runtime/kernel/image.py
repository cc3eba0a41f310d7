"""The process image: every field of every node as preallocated arrays in shared memory.

Struct of arrays, named by the docs/design.md vocabulary (`fields.py`). Three parts:

* **input blocks**, one per driver process (its own node range): drivers publish
  measurements there through a double-buffered seqlock (`SeqBlock`);
* **work arrays**, owned by the scan: the latched inputs, settings, outputs and
  state of all nodes, the aggregates and the programs' memory;
* the **published block**: a seqlocked copy of the work arrays that drivers (for
  the instructions) and the OPC UA server (for everything) read.

One segment holds all of it; every process maps it and builds the same views
from the same `ImageSpec`, so nothing is allocated or pickled per cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from vbatt.kernel.fields import AGGREGATES, NODE_FIELDS, NODE_INPUTS
from vbatt.kernel.seqblock import ALIGN, ArraySpec, Layout, SeqBlock
from vbatt.kernel.shm import Segment

__all__ = ["ImageSpec", "ProcessImage", "Ctl", "Mode", "ScanState", "CommandRing", "Op"]

# Written by drivers. `online` is derived by the scan at latch, not sent.
DRIVER_INPUTS = tuple(f for f in NODE_INPUTS if f.name != "online")
MAGIC = 0x76626174_74000001  # "vbatt" + layout version


class Ctl:
    """Indices of the control words (int64) at the head of the segment."""

    MAGIC = 0
    STOP_REQ = 1  # supervisor -> scan: finish the cycle and stop
    MODE = 2  # Mode: what the scan is doing
    STATE = 3  # ScanState
    SCAN_PID = 4
    SAFE_STATE = 5  # 1 while outputs hold the safe allocation
    WATCHDOG = 6  # 1 after K consecutive overruns (latched until restart)
    CYCLES = 7
    OVERRUNS = 8  # missed slots, counted
    STARTED_NS = 9
    TORN_READS = 10  # input reads that were retried past their limit
    PROGRAM_FAULTS = 11  # program exceptions -> safe allocation
    IO_STOP = 12  # supervisor -> drivers: stop
    LAST_SEQ = 13  # published sequence of the last cycle before the safe-state shutdown
    RT_FIFO = 14  # SCHED_FIFO priority granted to the scan (0 = not granted)
    RT_MLOCK = 15  # 1 = mlockall granted
    RT_SLACK = 16  # 1 = timer slack set to 1 ns
    WARM = 17  # 1 = warm restart: program memory was restored, programs must not re-initialise it
    RELOADED = 18  # number of the last program reload applied (-n: reload n failed, old programs kept)
    N = 32


class Mode:
    STOP = 0
    RUN = 1


class ScanState:
    INIT = 0
    WAITING = 1  # for the first data of every driver
    RUNNING = 2
    DONE = 3
    FAILED = 4


class Op:
    """Commands applied by the scan between two cycles."""

    SET_MODE = 1  # value: Mode
    RESET_TRIP = 2  # node
    SET_PRIORITY = 3  # node, value
    SET_MAIN_LIMIT = 4  # value (W)
    ACK_ALARM = 5  # node, arg: alarm bits
    RELOAD_PROGRAMS = 6  # arg: reload number (vbatt.supervise.reload); rebind programs with new parameters
    SET_MEMORY = 7  # arg: ImageSpec.memory_index of a program's setting, node: element, value (Program.set_memory)
    SET_TREE_STATE = 8  # value: agg tree_state (fields.py), from the hierarchy link


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to lay out (or re-attach to) an image; picklable."""

    n_nodes: int
    partitions: tuple[tuple[int, int], ...]  # [start, stop) node range per input writer
    memory: tuple[ArraySpec, ...] = ()  # program memory and statistics
    command_producers: int = 4
    command_slots: int = 256
    node_ids: tuple[str, ...] = field(default=(), compare=False)
    # program memory placed in the work arrays, so that every publish carries it whole (Program.published)
    published: tuple[ArraySpec, ...] = ()

    def __post_init__(self) -> None:
        covered = sorted(self.partitions)
        pos = 0
        for a, b in covered:
            if a != pos or b < a:
                raise ValueError(f"input partitions must tile 0..{self.n_nodes}: got {self.partitions}")
            pos = b
        if pos != self.n_nodes:
            raise ValueError(f"input partitions must tile 0..{self.n_nodes}: got {self.partitions}")

    def work_layout(self) -> Layout:
        lay = Layout()
        for f in NODE_FIELDS:
            lay.add(ArraySpec("node." + f.name, f.dtype, (self.n_nodes,)))
        for f in AGGREGATES:
            lay.add(ArraySpec("agg." + f.name, f.dtype, (1,)))
        lay.add(ArraySpec("cycle", "i8", (1,)))
        lay.add(ArraySpec("time_ns", "i8", (1,)))
        for spec in self.published:
            lay.add(ArraySpec("mem." + spec.name, spec.dtype, spec.shape))
        return lay

    def memory_names(self) -> tuple[str, ...]:
        """Every program memory array, published or not; `Op.SET_MEMORY` names one by its index here."""
        return tuple(s.name for s in self.memory + self.published)

    def memory_index(self, name: str) -> int:
        return self.memory_names().index(name)

    def input_layout(self, k: int) -> Layout:
        a, b = self.partitions[k]
        lay = Layout()
        for f in DRIVER_INPUTS:
            lay.add(ArraySpec(f.name, f.dtype, (b - a,)))
        return lay

    def memory_layout(self) -> Layout:
        lay = Layout()
        for spec in self.memory:
            lay.add(spec)
        return lay

    def command_layout(self) -> Layout:
        p, k = self.command_producers, self.command_slots
        lay = Layout()
        lay.add(ArraySpec("head", "i8", (p,)))
        lay.add(ArraySpec("tail", "i8", (p,)))
        lay.add(ArraySpec("op", "i8", (p, k)))
        lay.add(ArraySpec("node", "i8", (p, k)))
        lay.add(ArraySpec("arg", "i8", (p, k)))
        lay.add(ArraySpec("value", "f8", (p, k)))
        return lay

    def regions(self) -> tuple[list[tuple[str, int]], int]:
        """Byte offset of each region and the total segment size."""
        out, pos = [], 0

        def place(name: str, size: int) -> None:
            nonlocal pos
            out.append((name, pos))
            pos += -(-size // ALIGN) * ALIGN

        place("ctl", Ctl.N * 8)
        place("work", self.work_layout().size)
        place("pub", SeqBlock.footprint(self.work_layout()))
        for k in range(len(self.partitions)):
            place(f"in{k}", SeqBlock.footprint(self.input_layout(k)))
        place("mem", self.memory_layout().size)
        place("cmd", self.command_layout().size)
        return out, pos


@njit(nogil=True, cache=True)
def _pending(head, tail):
    for p in range(head.shape[0]):
        if head[p] != tail[p]:
            return True
    return False


@njit(nogil=True, cache=True)
def gather(src, dst, src_off, dst_off, nbytes):
    """Copy byte ranges src[src_off[f]:+nbytes[f]] -> dst[dst_off[f]:+nbytes[f]] for every field f."""
    for f in range(src_off.shape[0]):
        s, d, n = src_off[f], dst_off[f], nbytes[f]
        dst[d:d + n] = src[s:s + n]


class CommandRing:
    """One single-producer ring per producer; the scan is the only consumer."""

    def __init__(self, arrays: dict[str, np.ndarray], slots: int):
        self.a = arrays
        self.slots = slots

    def push(self, producer: int, op: int, node: int = -1, value: float = 0.0, arg: int = 0) -> int:
        """Queue a command; returns its ticket (compare with `applied`)."""
        head, tail = int(self.a["head"][producer]), int(self.a["tail"][producer])
        if head - tail >= self.slots:
            raise BufferError(f"command ring {producer} is full ({self.slots} pending)")
        i = head % self.slots
        self.a["op"][producer, i] = op
        self.a["node"][producer, i] = node
        self.a["arg"][producer, i] = arg
        self.a["value"][producer, i] = value
        self.a["head"][producer] = head + 1  # publish last
        return head + 1

    def room(self, producer: int) -> int:
        """Free slots of one producer's ring (its producer alone fills them)."""
        return self.slots - (int(self.a["head"][producer]) - int(self.a["tail"][producer]))

    def applied(self, producer: int) -> int:
        return int(self.a["tail"][producer])

    def drain(self, apply) -> int:
        """Scan side: `apply(op, node, value, arg)` for every pending command."""
        n = 0
        head, tail = self.a["head"], self.a["tail"]
        if not _pending(head, tail):
            return 0
        for p in range(len(head)):
            t = int(tail[p])
            while t < int(head[p]):
                i = t % self.slots
                apply(int(self.a["op"][p, i]), int(self.a["node"][p, i]),
                      float(self.a["value"][p, i]), int(self.a["arg"][p, i]))
                t += 1
                tail[p] = t
                n += 1
        return n


class ProcessImage:
    def __init__(self, spec: ImageSpec, segment: Segment):
        self.spec = spec
        self.segment = segment
        buf = segment.map
        offs = dict(spec.regions()[0])
        self.ctl = np.frombuffer(buf, dtype=np.int64, count=Ctl.N, offset=offs["ctl"])
        work_layout = spec.work_layout()
        self._work_raw = np.frombuffer(buf, dtype=np.uint8, count=work_layout.size, offset=offs["work"])
        work = work_layout.views(buf, offs["work"])
        self.node = {k[5:]: v for k, v in work.items() if k.startswith("node.")}
        self.agg = {k[4:]: v for k, v in work.items() if k.startswith("agg.")}
        self.cycle = work["cycle"]
        self.time_ns = work["time_ns"]
        self.pub = SeqBlock(work_layout, buf, offs["pub"])
        self.inputs = [SeqBlock(spec.input_layout(k), buf, offs[f"in{k}"]) for k in range(len(spec.partitions))]
        self.mem = spec.memory_layout().views(buf, offs["mem"])
        self.mem.update({k[4:]: v for k, v in work.items() if k.startswith("mem.")})
        self.commands = CommandRing(spec.command_layout().views(buf, offs["cmd"]), spec.command_slots)

    # -- lifecycle -----------------------------------------------------------
    @classmethod
    def create(cls, spec: ImageSpec) -> "ProcessImage":
        seg = Segment.create(spec.regions()[1])
        img = cls(spec, seg)
        img.ctl[Ctl.MAGIC] = MAGIC
        return img

    @classmethod
    def attach(cls, name: str, spec: ImageSpec) -> "ProcessImage":
        img = cls(spec, Segment.attach(name, spec.regions()[1]))
        if int(img.ctl[Ctl.MAGIC]) != MAGIC:
            raise ValueError(f"segment {name} is not a vbatt image of this version")
        return img

    @property
    def name(self) -> str:
        return self.segment.name

    def close(self) -> None:
        self.segment.close()

    # -- scan side -------------------------------------------------------------
    def latch_plan(self, k: int) -> tuple:
        """Byte offsets to copy input block k into the work arrays with one `gather` call."""
        a, b = self.spec.partitions[k]
        src_lay, work = self.spec.input_layout(k), self.spec.work_layout()
        src_off, dst_off, nbytes = [], [], []
        for f in DRIVER_INPUTS:
            off, spec = src_lay.offsets[f.name]
            woff, _ = work.offsets["node." + f.name]
            item = np.dtype(spec.dtype).itemsize
            src_off.append(off)
            dst_off.append(woff + a * item)
            nbytes.append((b - a) * item)
        return (self._work_raw, np.array(src_off, np.int64), np.array(dst_off, np.int64), np.array(nbytes, np.int64))

    def publish(self) -> None:
        """Copy the work arrays to the published block (one memmove)."""
        self.pub.publish_raw(self._work_raw)

    def read_last_cycle(self) -> dict[str, np.ndarray]:
        """After the scan has stopped: the image as its last cycle left it (before the safe state)."""
        last = int(self.ctl[Ctl.LAST_SEQ])
        if last == 0 or self.pub.seq - last > 1:
            return self.read_published()[0]
        return {k: v.copy() for k, v in self.pub.buffers[last & 1].items()}

    def read_published(self, dst: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], int]:
        """A whole, consistent copy of the published image (allocates: not for the cycle)."""
        if dst is None:
            dst = np.empty_like(self._work_raw)
        seq = self.pub.read_raw(dst)
        views = self.spec.work_layout().views(dst)
        return views, seq

