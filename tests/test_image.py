"""The shared-memory image: layout, attach from another process, no torn reads under concurrent writes."""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pytest

from vbatt.kernel.image import Ctl, ImageSpec, ProcessImage
from vbatt.kernel.seqblock import ArraySpec, Layout, SeqBlock, TornRead
from vbatt.kernel.shm import SHM_DIR, remove_stale_segments

CTX = mp.get_context("spawn")


def _spec(n=1000, parts=None) -> ImageSpec:
    parts = parts or ((0, n // 2), (n // 2, n))
    return ImageSpec(n_nodes=n, partitions=parts, memory=(ArraySpec("p.x", "f8", (n,)),))


def test_layout_is_aligned_and_tiles():
    spec = _spec()
    regions, size = spec.regions()
    offs = [o for _, o in regions]
    assert offs == sorted(offs) and all(o % 64 == 0 for o in offs)
    assert size >= offs[-1]
    with pytest.raises(ValueError, match="must tile 0..10"):
        ImageSpec(n_nodes=10, partitions=((0, 4), (5, 10)))
    lay = Layout()
    lay.add(ArraySpec("a", "f8", (3,)))
    with pytest.raises(ValueError, match="placed twice"):
        lay.add(ArraySpec("a", "f8", (3,)))


def _writer(name, spec, k, stop):
    img = ProcessImage.attach(name, spec)
    block = img.inputs[k]
    r = 0
    while not stop.is_set():
        r += 1
        a = block.begin()
        for arr in a.values():
            arr[:] = r  # every element of every field carries the round number
        block.commit()
    img.close()


# The writer publishes until the reader has seen this many distinct whole publishes (however the OS
# schedules the two processes: on a loaded machine it only takes longer), bounded by a generous timeout.
WANT_DISTINCT = 50
RACE_TIMEOUT_S = 120.0  # well inside pytest-timeout (300 s)


def test_reader_never_sees_a_torn_update_under_concurrent_writes():
    spec = _spec(n=20000, parts=((0, 20000),))
    img = ProcessImage.create(spec)
    stop = CTX.Event()
    w = CTX.Process(target=_writer, args=(img.name, spec, 0, stop))
    try:
        w.start()
        block = img.inputs[0]
        seen, reads, refused = set(), 0, 0
        dst = {name: np.empty_like(arr) for name, arr in block.buffers[0].items()}

        def copy(src):
            for name, arr in src.items():
                dst[name][:] = arr

        give_up = time.monotonic() + RACE_TIMEOUT_S
        while len(seen) < WANT_DISTINCT and time.monotonic() < give_up and w.is_alive():
            if block.seq == 0:
                continue
            try:
                seq = block.read(copy)
            except TornRead:
                refused += 1  # lapped on every retry: refused, never returned torn
                continue
            vals = {int(v) for arr in dst.values() for v in (arr[0], arr[-1], arr[len(arr) // 2])}
            whole = all((arr == arr[0]).all() for arr in dst.values())
            assert whole and len(vals) == 1, f"torn read at seq {seq}: {vals}"
            assert vals == {seq}  # the buffer read is the one the sequence names
            seen.add(seq)
            reads += 1
        writer_was_alive = w.is_alive()
        stop.set()
        w.join(60)
        assert writer_was_alive and w.exitcode == 0
        # the reader really raced the writer: it read while the writer kept publishing
        assert len(seen) >= WANT_DISTINCT, f"{len(seen)} distinct publishes seen in {RACE_TIMEOUT_S} s"
    finally:
        stop.set()
        if w.is_alive():
            w.join(10)
        img.close()


def test_reader_keeps_the_old_buffer_while_a_write_is_in_progress():
    lay = Layout()
    lay.add(ArraySpec("x", "i8", (4,)))
    buf = bytearray(SeqBlock.footprint(lay))
    blk = SeqBlock(lay, buf, 0)
    a = blk.begin()
    a["x"][:] = 1
    blk.commit()
    half = blk.begin()  # the writer is mid-publish ...
    half["x"][:2] = 2
    got = {}
    assert blk.read(lambda v: got.update(x=v["x"].copy())) == 1
    assert got["x"].tolist() == [1, 1, 1, 1]  # ... and the reader gets the last whole publish
    blk.commit()
    # a writer lapping the reader on every try is detected, not returned
    def lapping(v):
        for _ in range(2):
            blk.begin()
            blk.commit()

    with pytest.raises(TornRead):
        blk.read(lapping, retries=3)


def test_published_image_is_whole_for_another_process():
    spec = _spec(n=10)
    img = ProcessImage.create(spec)
    try:
        img.node["battery_w"][:] = np.arange(10.0)
        img.agg["main_w"][0] = 42.0
        img.cycle[0] = 7
        img.publish()
        other = ProcessImage.attach(img.name, spec)
        v, seq = other.read_published()
        assert seq == 1 and v["node.battery_w"].tolist() == list(range(10))
        assert v["agg.main_w"][0] == 42.0 and v["cycle"][0] == 7
        other.close()
        other.close()  # safe twice
    finally:
        img.close()


def test_attach_checks_size_and_magic():
    spec = _spec(n=10)
    img = ProcessImage.create(spec)
    try:
        with pytest.raises(ValueError, match="expected"):
            ProcessImage.attach(img.name, _spec(n=1000))
        img.ctl[Ctl.MAGIC] = 0
        with pytest.raises(ValueError, match="not a vbatt image"):
            ProcessImage.attach(img.name, spec)
    finally:
        img.close()
    assert not (SHM_DIR / img.name).exists()


def test_stale_segments_of_dead_creators_are_removed(tmp_path):
    (tmp_path / "vbatt-999999999-dead").write_bytes(b"x")
    (tmp_path / "vbatt-1-alive").write_bytes(b"x")  # pid 1 exists
    (tmp_path / "other-file").write_bytes(b"x")
    assert remove_stale_segments(tmp_path) == ["vbatt-999999999-dead"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-file", "vbatt-1-alive"]
