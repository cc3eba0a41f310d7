"""Retentive state: named arrays + a small JSON dict, on disk so that any crash leaves a loadable copy.

A controller must come back from a restart or a `kill -9` with its latched trips,
alarms, energy counters, forecast state and operator settings, and never from a
half-written file. Hence:

* **atomic save**: write `<name>.tmp`, fsync it, rotate `<name>` to `<name>.prev`,
  rename the temp file to `<name>`, fsync the directory. Whatever instant the
  writer dies at, one of `<name>` / `<name>.prev` is a whole, earlier save.
* **self-checking file**: a fixed header (magic, format version, sequence number,
  timestamp, lengths) and a SHA-256 over header and body; a file that is missing,
  short, long, of another format or whose checksum fails is rejected with the
  specific reason, and the loader falls back to the other copy, then to "none"
  (the caller starts from safe defaults).
* **no pickle**: the body is a JSON description followed by raw little-endian
  array bytes; only plain numeric dtypes are accepted, so loading a hostile file
  can at worst be rejected.

File layout (all integers little-endian)::

    0   8s   magic  b"VBRETAIN"
    8   u16  format version (FORMAT_VERSION)
    10  u16  reserved, 0
    12  u32  JSON header length H
    16  u64  sequence number (1, 2, ... per store)
    24  i64  time written, ns since the Unix epoch (injected clock)
    32  u64  data length D
    40  32s  SHA-256 over bytes [0, 40) and [72, end)
    72  H    JSON: {"arrays": [[name, dtype, shape, offset], ...], "meta": {...}}
    ..  pad  zeros up to a multiple of 64
    B   D    array bytes, each array at B + offset (64-byte aligned)

`decide_restart` says whether the saved state fits the running configuration
(warm: restore everything), fits only in part (cold: operator settings, mapped
by node id) or cannot be used (none), and why; `apply_restart` copies it into
the caller's arrays (e.g. the process image views).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np

from vbatt.kernel.fields import AGGREGATES, NODE_FIELDS, Field, Scope, fields

if TYPE_CHECKING:
    from vbatt.kernel.image import ProcessImage

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "RetainError",
    "RetainState",
    "Loaded",
    "RetainStore",
    "encode",
    "decode",
    "Restart",
    "DEFAULT_SETTINGS",
    "decide_restart",
    "apply_restart",
    "RETAINED_FIELDS",
    "RETAINED_NODE_FIELDS",
    "retained_name",
    "RETAINED_AGGREGATES",
    "retained_views",
    "layout_of",
]

MAGIC = b"VBRETAIN"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sHHIQqQ")  # magic .. data length: 40 bytes
_DIGEST_AT = _PREFIX.size
_HEADER_AT = _DIGEST_AT + 32
_ALIGN = 64
_MAX_HEADER = 64 << 20  # a header this large is damage, not a fleet
_DTYPE_KINDS = "biuf"  # bool, signed, unsigned, float: plain bytes, nothing executable

Reason = Literal["missing", "unreadable", "truncated", "bad_magic", "bad_version", "bad_checksum",
                 "bad_header", "trailing_bytes", "too_large"]


class RetainError(ValueError):
    """A retained-state file cannot be used. `reason` is one of `Reason`; the message says where and why."""

    def __init__(self, reason: Reason, source: str, detail: str):
        self.reason = reason
        self.source = source
        self.detail = detail
        super().__init__(f"{source}: {reason}: {detail}")


@dataclass(frozen=True)
class RetainState:
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    seq: int
    time_ns: int


# -- the byte format ------------------------------------------------------------
def _pad(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _check_dtype(dt: np.dtype, what: str) -> np.dtype:
    if dt.kind not in _DTYPE_KINDS or dt.fields is not None or dt.subdtype is not None or dt.hasobject:
        raise TypeError(f"{what}: dtype {dt.str} is not a plain numeric dtype (expected bool, int, uint or float)")
    return dt.newbyteorder("<") if dt.byteorder == ">" else dt


def encode(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], seq: int, time_ns: int) -> bytes:
    """The file bytes for one save. Raises TypeError/ValueError for what cannot be stored faithfully."""
    specs, chunks, pos = [], [], 0
    for name, a in arrays.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"array name {name!r}: expected a non-empty string")
        a = np.asarray(a)
        dt = _check_dtype(a.dtype, f"array {name!r}")
        raw = np.ascontiguousarray(a, dtype=dt).tobytes()
        off = _pad(pos)
        chunks.append((off, raw))
        specs.append([name, dt.str, list(a.shape), off])
        pos = off + len(raw)
    header = json.dumps({"arrays": specs, "meta": dict(meta)}, allow_nan=False, sort_keys=True,
                        separators=(",", ":")).encode()
    body_at = _pad(_HEADER_AT + len(header))
    buf = bytearray(body_at + pos)
    buf[:_PREFIX.size] = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header), seq, time_ns, pos)
    buf[_HEADER_AT:_HEADER_AT + len(header)] = header
    for off, raw in chunks:
        buf[body_at + off:body_at + off + len(raw)] = raw
    h = hashlib.sha256(memoryview(buf)[:_DIGEST_AT])
    h.update(memoryview(buf)[_HEADER_AT:])
    buf[_DIGEST_AT:_HEADER_AT] = h.digest()
    return bytes(buf)


def decode(data: bytes, source: str = "<bytes>") -> RetainState:
    """Parse and verify one file's bytes; raises RetainError with the specific reason."""
    if len(data) < _HEADER_AT:
        raise RetainError("truncated", source, f"{len(data)} bytes, shorter than the {_HEADER_AT}-byte header")
    magic, version, _, hlen, seq, time_ns, dlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise RetainError("bad_magic", source, f"starts with {magic!r}, expected {MAGIC!r} (not a vbatt retain file)")
    if version != FORMAT_VERSION:
        raise RetainError("bad_version", source, f"format version {version}, this vbatt reads {FORMAT_VERSION}")
    if hlen > _MAX_HEADER:
        raise RetainError("bad_header", source, f"header length {hlen} exceeds {_MAX_HEADER}")
    body_at = _pad(_HEADER_AT + hlen)
    want = body_at + dlen
    if len(data) < want:
        raise RetainError("truncated", source, f"{len(data)} bytes, the header promises {want}")
    if len(data) > want:
        raise RetainError("trailing_bytes", source, f"{len(data) - want} bytes after the end of the data")
    h = hashlib.sha256(memoryview(data)[:_DIGEST_AT])
    h.update(memoryview(data)[_HEADER_AT:])
    if h.digest() != data[_DIGEST_AT:_HEADER_AT]:
        raise RetainError("bad_checksum", source, "SHA-256 mismatch: the file was damaged after it was written")
    # Past the checksum the bytes are what some writer produced; still parse defensively
    # because a hostile file can carry a valid checksum.
    try:
        head = json.loads(bytes(data[_HEADER_AT:_HEADER_AT + hlen]))
        meta, specs = head["meta"], head["arrays"]
        if not isinstance(meta, dict) or not isinstance(specs, list):
            raise ValueError("'meta' must be an object and 'arrays' a list")
        arrays: dict[str, np.ndarray] = {}
        end = 0
        for name, dts, shape, off in specs:
            if not isinstance(name, str) or name in arrays:
                raise ValueError(f"array name {name!r} is not a string or is repeated")
            if not isinstance(dts, str) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"array {name!r}: bad dtype or shape")
            if not isinstance(off, int) or off < end:
                raise ValueError(f"array {name!r}: offset {off!r} overlaps the previous array")
            dt = _check_dtype(np.dtype(dts), f"array {name!r}")
            count = math.prod(shape)
            stop = off + count * dt.itemsize
            if stop > dlen:
                raise ValueError(f"array {name!r} ends at {stop}, past the data ({dlen} bytes)")
            arrays[name] = np.frombuffer(data, dtype=dt, count=count, offset=body_at + off).reshape(shape).copy()
            end = stop
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise RetainError("bad_header", source, f"cannot parse the description: {exc}") from None
    return RetainState(arrays, meta, seq, time_ns)


# -- the store: two copies on disk ---------------------------------------------------
@dataclass(frozen=True)
class Loaded:
    """What `RetainStore.load()` found: the newest good copy (or none) and what was wrong with the rest."""

    state: RetainState | None
    source: Literal["current", "previous", "none"]
    path: Path | None
    problems: tuple[RetainError, ...] = ()

    @property
    def reason(self) -> str:
        """One line for the log: which copy was used and why the others were not."""
        why = "; ".join(str(p) for p in self.problems)
        if self.state is None:
            return f"no usable retained state ({why})" if why else "no usable retained state"
        used = f"retained state #{self.state.seq} from {self.path}"
        if not why:
            return used
        return f"{used} ({'fallback' if self.source == 'previous' else 'also'}: {why})"


class RetainStore:
    """`<dir>/<name>` and `<dir>/<name>.prev`, written by one process at a time.

    Saves are serialised by an flock on `<name>.lock`; sequence numbers assume one
    store object writes (a second writer could repeat a number, never tear a file).

    `now_ns` stamps each save (wall clock by default, injectable for tests);
    `durable=False` skips fsync (tests and benchmarks on tmpfs only: without it a
    power cut can lose the newest save, never both copies).
    """

    def __init__(self, directory: str | Path, name: str = "state.bin", *,
                 now_ns: Callable[[], int] = time.time_ns, durable: bool = True, max_bytes: int = 1 << 30):
        self.dir = Path(directory)
        self.current = self.dir / name
        self.previous = self.dir / (name + ".prev")
        self.tmp = self.dir / (name + ".tmp")
        self.lock = self.dir / (name + ".lock")
        self.now_ns = now_ns
        self.durable = durable
        self.max_bytes = max_bytes
        self._seq: int | None = None  # last sequence number on disk; read lazily
        self._current_good = False  # rotate `current` into `.prev` only when it is known whole

    def _read(self, path: Path) -> RetainState:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > self.max_bytes:
                    raise RetainError("too_large", str(path), f"{size} bytes, more than the limit {self.max_bytes}")
                data = f.read()
        except FileNotFoundError:
            raise RetainError("missing", str(path), "no such file") from None
        except OSError as exc:
            raise RetainError("unreadable", str(path), exc.strerror or str(exc)) from None
        return decode(data, str(path))

    def load(self) -> Loaded:
        """The newest whole copy; `.state is None` (with the reasons) when neither is usable."""
        found, problems = [], []
        for label, path in (("current", self.current), ("previous", self.previous)):
            try:
                found.append((self._read(path), label, path))
            except RetainError as exc:
                problems.append(exc)
        self._current_good = any(label == "current" for _, label, _ in found)
        seqs = [s.seq for s, _, _ in found]
        self._seq = max(seqs, default=0) if self._seq is None else max(self._seq, *seqs, 0)
        if not found:
            return Loaded(None, "none", None, tuple(problems))
        state, label, path = max(found, key=lambda t: t[0].seq)
        if label == "current":  # a missing .prev is normal then (first save); a damaged one is worth saying
            problems = [p for p in problems if p.reason != "missing"]
        return Loaded(state, label, path, tuple(problems))

    def save(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> int:
        """Write one state atomically; returns its sequence number."""
        if self._seq is None:
            self.load()
        seq = self._seq + 1
        data = encode(arrays, meta, seq, int(self.now_ns()))
        self.dir.mkdir(parents=True, exist_ok=True)
        # A second writer (an old controller not yet dead) must not interleave with this
        # one on the shared temp file; the kernel drops the lock when a holder dies.
        lock = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._write(data)
        finally:
            os.close(lock)
        self._seq = seq
        self._current_good = True
        return seq

    def _write(self, data: bytes) -> None:
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if self._current_good:
            try:
                os.replace(self.current, self.previous)
            except FileNotFoundError:  # removed behind our back: .prev stays the older good copy
                pass
        os.replace(self.tmp, self.current)
        if self.durable:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


# -- warm or cold -------------------------------------------------------------------------
def retained_name(f: Field) -> str:
    """The array name of a retained field: "node.<field>" (restored by node id on a cold restart) or
    "agg.<field>"."""
    return f"{f.scope.value}.{f.name}"


# What of the field table is retentive, and which of it are operator settings: what a cold
# restart keeps (with the RUN/STOP mode, an operator setting that is no field).
RETAINED_FIELDS: tuple[Field, ...] = fields(retained=True)
DEFAULT_SETTINGS: tuple[str, ...] = tuple(retained_name(f) for f in RETAINED_FIELDS if f.operator_settable) + \
    ("ctl.mode",)

_RANGES = {**{"node." + f.name: (f.lo, f.hi) for f in NODE_FIELDS if f.lo is not None},
           **{"agg." + f.name: (f.lo, f.hi) for f in AGGREGATES if f.lo is not None}}


@dataclass(frozen=True)
class Restart:
    """The decision and what to copy. `kind`: warm (everything), cold (settings only), none."""

    kind: Literal["warm", "cold", "none"]
    reasons: tuple[str, ...]
    restore: tuple[str, ...] = ()  # array names apply_restart copies
    node_map: tuple[np.ndarray, np.ndarray] | None = field(default=None, compare=False)  # saved idx, current idx
    seq: int = 0

    def describe(self) -> str:
        """The log line: which restart happened and why."""
        what = {"warm": "warm restart: all retained state restored",
                "cold": f"cold restart: operator settings restored ({', '.join(self.restore) or 'none applicable'})",
                "none": "cold start from safe defaults: nothing restored"}[self.kind]
        seq = f" from save #{self.seq}" if self.kind != "none" else ""
        return f"{what}{seq}" + (f" - {'; '.join(self.reasons)}" if self.reasons else "")


def _bad_values(name: str, a: np.ndarray) -> str | None:
    # Only declared fields have a meaning to check; NaN in a program's memory is that
    # program's own convention (e.g. "no previous setpoint yet"), never a reason to go cold.
    if not name.startswith(("node.", "agg.", "ctl.")):
        return None
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        return f"{name} holds NaN or infinity"
    rng = _RANGES.get(name)
    if rng is not None and a.size and (a.min() < rng[0] or a.max() > rng[1]):
        return f"{name} outside its valid range [{rng[0]:g}, {rng[1]:g}]"
    return None


def decide_restart(state: RetainState | Loaded | None, node_ids: Sequence[str],
                   layout: Mapping[str, tuple[str, tuple[int, ...]]], *, kind: str = "vbatt",
                   settings: Iterable[str] = DEFAULT_SETTINGS, now_ns: int | None = None,
                   max_age_s: float | None = None) -> Restart:
    """Can the saved state be used by the configuration about to run?

    `layout` is every array a warm restart restores, name -> (dtype, shape), in
    the current configuration (node fields, aggregates, program memory). Warm
    needs the same `kind`, the same node ids in the same order and every array of
    `layout` saved with the same dtype and shape. Otherwise the `settings` are
    restored where they still fit (cold). Values out of their field's range, or
    NaN, are never restored.
    """
    if isinstance(state, Loaded):
        prefix = [str(p) for p in state.problems]
        state = state.state
    else:
        prefix = []
    if state is None:
        return Restart("none", tuple(prefix) or ("no retained state",))
    meta = state.meta
    if meta.get("kind") != kind:
        return Restart("none", (*prefix, f"saved by {meta.get('kind')!r}, expected {kind!r}"), seq=state.seq)
    if max_age_s is not None and now_ns is not None and (now_ns - state.time_ns) > max_age_s * 1e9:
        age = (now_ns - state.time_ns) / 1e9
        return Restart("none", (*prefix, f"saved {age:.0f} s ago, older than the limit {max_age_s:g} s"),
                       seq=state.seq)
    saved_ids = list(meta.get("node_ids", []))
    reasons = list(prefix)
    bad = {name: why for name, a in state.arrays.items() if (why := _bad_values(name, a))}
    reasons += bad.values()

    warm_blockers = []
    if saved_ids != list(node_ids):
        warm_blockers.append(f"node list changed ({len(saved_ids)} saved, {len(node_ids)} configured"
                             f"{', same ids reordered' if sorted(saved_ids) == sorted(node_ids) else ''})")
    for name, (dts, shape) in layout.items():
        a = state.arrays.get(name)
        if a is None:
            warm_blockers.append(f"{name} not saved")
        elif a.dtype != np.dtype(dts).newbyteorder("<") or a.shape != tuple(shape):
            warm_blockers.append(f"{name} saved as {a.dtype.str}{list(a.shape)}, now {np.dtype(dts).str}{list(shape)}")
        elif name in bad:
            warm_blockers.append(f"{name} rejected")
    if not warm_blockers:
        return Restart("warm", tuple(reasons), tuple(layout), seq=state.seq)

    # Cold: settings that still fit. Per-node ones follow their node id.
    cur = {nid: i for i, nid in enumerate(node_ids)}
    pairs = [(i, cur[nid]) for i, nid in enumerate(saved_ids) if nid in cur]
    node_map = (np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.int64))
    restore = []
    for name in settings:
        a = state.arrays.get(name)
        if a is None or name in bad or name not in layout:
            continue
        dts, shape = layout[name]
        if name.startswith("node."):
            if a.shape == (len(saved_ids),) and tuple(shape) == (len(node_ids),):
                restore.append(name)
        elif a.shape == tuple(shape):
            restore.append(name)
    blocker = "; ".join(warm_blockers[:5]) + (f"; and {len(warm_blockers) - 5} more" if len(warm_blockers) > 5 else "")
    reasons.append(f"warm restart impossible: {blocker}")
    if any(n.startswith("node.") for n in restore):
        reasons.append(f"{len(pairs)} of {len(node_ids)} configured nodes matched by id")
    return Restart("cold", tuple(reasons), tuple(restore), node_map, seq=state.seq)


# -- what of the process image is retentive --------------------------------------------------
RETAINED_NODE_FIELDS: tuple[str, ...] = tuple(f.name for f in RETAINED_FIELDS if f.scope is Scope.NODE)
RETAINED_AGGREGATES: tuple[str, ...] = tuple(f.name for f in RETAINED_FIELDS if f.scope is Scope.AGGREGATE)
_NOT_RETAINED_MEMORY = ("scan.ctx", "stats.")  # per-run: cycle context and run statistics


def retained_views(img: "ProcessImage") -> dict[str, np.ndarray]:
    """Live views of everything retentive in `img`, by the names `decide_restart` uses.

    Node fields as "node.<field>", aggregates as "agg.<name>", the RUN/STOP mode as
    "ctl.mode" and every program memory array (forecast state, energy counters, ...)
    under its own name. Save from these between two cycles (the scan owns them);
    restore into them before the first cycle.
    """
    from vbatt.kernel.image import Ctl  # only here: the storage format above stays free of the image

    out = {f"node.{f}": img.node[f] for f in RETAINED_NODE_FIELDS}
    out.update({f"agg.{a}": img.agg[a] for a in RETAINED_AGGREGATES})
    out["ctl.mode"] = img.ctl[Ctl.MODE:Ctl.MODE + 1]
    out.update({k: v for k, v in img.mem.items() if not k.startswith(_NOT_RETAINED_MEMORY)})
    return out


def layout_of(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape), the `layout` argument of `decide_restart`."""
    return {k: (v.dtype.str, tuple(v.shape)) for k, v in arrays.items()}


def apply_restart(restart: Restart, state: RetainState | None, targets: Mapping[str, np.ndarray]) -> list[str]:
    """Copy the restored arrays into `targets` (e.g. image views); returns the names copied."""
    if restart.kind == "none" or state is None:
        return []
    done = []
    for name in restart.restore:
        src, dst = state.arrays[name], targets.get(name)
        if dst is None:
            continue
        if restart.kind == "cold" and name.startswith("node.") and restart.node_map is not None:
            s, d = restart.node_map
            dst[d] = src[s]
        else:
            dst[...] = src
        done.append(name)
    return done
