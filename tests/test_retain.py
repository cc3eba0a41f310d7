"""Retentive state on real files: round trip, damage detection, fallback, warm/cold decision."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from vbatt.kernel.clock import FakeClock
from vbatt.retain.store import (
    FORMAT_VERSION,
    MAGIC,
    Loaded,
    RetainError,
    RetainStore,
    apply_restart,
    decide_restart,
    decode,
    encode,
)

IDS = ["A", "B", "C"]


def arrays(tag: int = 1, n: int = 3) -> dict[str, np.ndarray]:
    return {
        "node.trip": np.arange(n, dtype=np.uint32) * tag,
        "node.priority": np.arange(n, dtype=np.int64) % 4,
        "agg.main_limit_w": np.array([1000.0 * tag]),
        "ctl.mode": np.array([1], dtype=np.int64),
        "forecast.level": np.linspace(0, tag, n),
        "energy.wh": np.full((2, n), tag, dtype=np.float32),
        "flags": np.array([True, False, True]),
    }


def meta(ids=IDS, **more) -> dict:
    return {"kind": "vbatt", "node_ids": list(ids), "config_hash": "abc", **more}


def layout_of(a: dict[str, np.ndarray]) -> dict:
    return {k: (v.dtype.str, v.shape) for k, v in a.items()}


def same(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> bool:
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x)


def test_round_trip_keeps_names_dtypes_shapes_values_meta_and_clock(tmp_path):
    clock = FakeClock(start_ns=1_700_000_000_000_000_000)
    store = RetainStore(tmp_path, now_ns=clock.now_ns)
    a = arrays(3)
    assert store.save(a, meta()) == 1
    t1 = clock.now_ns()
    got = RetainStore(tmp_path).load()
    assert got.source == "current" and got.problems == ()
    assert same(got.state.arrays, a)
    assert got.state.meta == meta()
    assert got.state.seq == 1 and got.state.time_ns == t1
    for v in got.state.arrays.values():  # caller may modify what it loaded
        assert v.flags.writeable


def test_empty_and_zero_length_arrays_round_trip():
    a = {"empty": np.zeros(0, dtype=np.float64), "z": np.zeros((0, 4), dtype=np.int32), "s": np.array(7, dtype=np.int8)}
    st = decode(encode(a, {"kind": "x"}, 5, 9))
    assert same(st.arrays, a) and st.seq == 5 and st.time_ns == 9


def test_big_endian_input_is_stored_little_endian_with_same_values():
    a = {"x": np.arange(4, dtype=">f8")}
    st = decode(encode(a, {}, 1, 0))
    assert st.arrays["x"].dtype == np.dtype("<f8") and np.array_equal(st.arrays["x"], np.arange(4.0))


@pytest.mark.parametrize("bad", [np.array([object()]), np.array(["text"]), np.zeros(2, dtype=[("a", "f8")]),
                                 np.array([1 + 2j])])
def test_non_numeric_arrays_are_refused_when_saving(bad, tmp_path):
    with pytest.raises(TypeError, match="not a plain numeric dtype"):
        RetainStore(tmp_path, durable=False).save({"x": bad}, {})
    assert not (tmp_path / "state.bin").exists()


def test_sequence_continues_across_store_instances_and_prev_holds_the_one_before(tmp_path):
    s = RetainStore(tmp_path)
    s.save(arrays(1), meta())
    s.save(arrays(2), meta())
    s2 = RetainStore(tmp_path)
    assert s2.save(arrays(3), meta()) == 3
    assert decode((tmp_path / "state.bin").read_bytes()).seq == 3
    prev = decode((tmp_path / "state.bin.prev").read_bytes())
    assert prev.seq == 2 and same(prev.arrays, arrays(2))
    assert not (tmp_path / "state.bin.tmp").exists()


def test_missing_files_give_none_with_the_reason(tmp_path):
    got = RetainStore(tmp_path / "never-written").load()
    assert got.state is None and got.source == "none"
    assert [p.reason for p in got.problems] == ["missing", "missing"]
    assert "state.bin: missing" in got.reason and "state.bin.prev: missing" in got.reason
    r = decide_restart(got, IDS, layout_of(arrays()))
    assert r.kind == "none" and "missing" in r.describe()
    assert apply_restart(r, None, {}) == []


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":  # one bit in the array bytes
        data[-5] ^= 0x10
    elif how == "flip_header":  # one bit in the JSON description
        data[80] ^= 0x01
    elif how == "flip_seq":  # the sequence number is covered by the checksum too
        data[16] ^= 0x01
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "short":
        data = data[:20]
    elif how == "empty":
        data = b""
    elif how == "extra":
        data += b"\0"
    elif how == "magic":
        data[:8] = b"NOTVBATT"
    elif how == "version":
        data[8:10] = struct.pack("<H", FORMAT_VERSION + 1)
    path.write_bytes(bytes(data))


REASONS = {"flip": "bad_checksum", "flip_header": "bad_checksum", "flip_seq": "bad_checksum",
           "truncate": "truncated", "short": "truncated", "empty": "truncated", "extra": "trailing_bytes",
           "magic": "bad_magic", "version": "bad_version"}


@pytest.mark.parametrize("how", sorted(REASONS))
def test_damaged_current_copy_is_reported_and_previous_is_used(tmp_path, how):
    s = RetainStore(tmp_path)
    s.save(arrays(1), meta())
    s.save(arrays(2), meta())
    _damage(tmp_path / "state.bin", how)
    got = RetainStore(tmp_path).load()
    assert got.source == "previous" and got.state.seq == 1
    assert same(got.state.arrays, arrays(1))
    assert len(got.problems) == 1 and got.problems[0].reason == REASONS[how]
    assert str(tmp_path / "state.bin") in got.reason and REASONS[how] in got.reason


def test_both_copies_damaged_gives_none_with_both_reasons(tmp_path):
    s = RetainStore(tmp_path)
    s.save(arrays(1), meta())
    s.save(arrays(2), meta())
    _damage(tmp_path / "state.bin", "flip")
    _damage(tmp_path / "state.bin.prev", "magic")
    got = RetainStore(tmp_path).load()
    assert got.state is None
    assert sorted(p.reason for p in got.problems) == ["bad_checksum", "bad_magic"]
    assert decide_restart(got, IDS, layout_of(arrays())).kind == "none"


def test_saving_after_a_damaged_current_keeps_the_good_previous(tmp_path):
    # The damaged file must not be rotated over the last good copy.
    s = RetainStore(tmp_path)
    s.save(arrays(1), meta())
    s.save(arrays(2), meta())
    _damage(tmp_path / "state.bin", "flip")
    s2 = RetainStore(tmp_path)
    assert s2.save(arrays(3), meta()) == 2  # seq follows the newest good copy (#1)
    assert decode((tmp_path / "state.bin.prev").read_bytes()).seq == 1
    got = RetainStore(tmp_path).load()
    assert got.source == "current" and same(got.state.arrays, arrays(3))


def test_crash_between_rotate_and_rename_leaves_previous_and_next_save_recovers(tmp_path):
    # State on disk after a kill between the two renames: only .prev and a whole .tmp.
    s = RetainStore(tmp_path)
    s.save(arrays(1), meta())
    s.save(arrays(2), meta())
    os.replace(tmp_path / "state.bin", tmp_path / "state.bin.prev")
    (tmp_path / "state.bin.tmp").write_bytes(encode(arrays(3), meta(), 3, 0)[:100])  # torn temp file
    got = RetainStore(tmp_path).load()
    assert got.source == "previous" and got.state.seq == 2 and got.problems[0].reason == "missing"
    s3 = RetainStore(tmp_path)
    s3.save(arrays(4), meta())
    assert same(RetainStore(tmp_path).load().state.arrays, arrays(4))
    assert decode((tmp_path / "state.bin.prev").read_bytes()).seq == 2


def test_unreadable_file_is_reported(tmp_path):
    (tmp_path / "state.bin").mkdir()  # a directory where the file should be: open() fails
    got = RetainStore(tmp_path).load()
    assert got.state is None and got.problems[0].reason == "unreadable"


def test_too_large_file_is_refused_before_reading(tmp_path):
    RetainStore(tmp_path).save(arrays(1), meta())
    got = RetainStore(tmp_path, max_bytes=100).load()
    assert got.state is None and got.problems[0].reason == "too_large"


def _forge(header: bytes, data: bytes = b"") -> bytes:
    """A file with a valid checksum around an arbitrary description (a hostile or buggy writer)."""
    import hashlib

    body_at = -(-(72 + len(header)) // 64) * 64
    buf = bytearray(body_at + len(data))
    buf[:40] = struct.pack("<8sHHIQqQ", MAGIC, FORMAT_VERSION, 0, len(header), 1, 0, len(data))
    buf[72:72 + len(header)] = header
    buf[body_at:] = data
    h = hashlib.sha256(bytes(buf[:40]))
    h.update(bytes(buf[72:]))
    buf[40:72] = h.digest()
    return bytes(buf)


@pytest.mark.parametrize("header", [
    b"not json",
    b'{"arrays": [["x", "|O", [1], 0]], "meta": {}}',  # object dtype: would unpickle-like
    b'{"arrays": [["x", "<f8", [100], 0]], "meta": {}}',  # past the data
    b'{"arrays": [["x", "<f8", [1], 0], ["x", "<f8", [1], 8]], "meta": {}}',  # repeated name
    b'{"arrays": [["x", "<f8", [1], 8], ["y", "<f8", [1], 0]], "meta": {}}',  # overlapping
    b'{"arrays": [["x", "<f8", -1, 0]], "meta": {}}',
    b'{"arrays": [], "meta": []}',
    b'{"arrays": [["x"]], "meta": {}}',
    b'{"meta": {}}',
    b'\xff\xfe',
])
def test_valid_checksum_but_bad_description_is_rejected_not_trusted(header):
    with pytest.raises(RetainError) as ei:
        decode(_forge(header, bytes(16)), "forged")
    assert ei.value.reason == "bad_header" and str(ei.value).startswith("forged: bad_header:")


# -- warm / cold ------------------------------------------------------------------
def test_same_nodes_and_layout_is_a_warm_restart_restoring_everything(tmp_path):
    s = RetainStore(tmp_path)
    s.save(arrays(2), meta())
    loaded = s.load()
    r = decide_restart(loaded, IDS, layout_of(arrays()))
    assert r.kind == "warm" and r.describe().startswith("warm restart")
    targets = {k: np.zeros_like(v) for k, v in arrays().items()}
    assert sorted(apply_restart(r, loaded.state, targets)) == sorted(arrays())
    assert same(targets, arrays(2))


def test_changed_node_list_is_cold_and_maps_settings_by_node_id():
    saved = arrays(2)
    saved["node.priority"] = np.array([5, 6, 7])
    st = decode(encode(saved, meta(), 4, 0))
    now_ids = ["C", "X", "A", "B"]
    lay = {k: (v.dtype.str, (4,) if k.startswith("node.") else v.shape) for k, v in saved.items()}
    r = decide_restart(st, now_ids, lay)
    assert r.kind == "cold"
    assert set(r.restore) == {"node.priority", "agg.main_limit_w", "ctl.mode"}
    assert "node list changed (3 saved, 4 configured)" in r.describe()
    assert "3 of 4 configured nodes matched by id" in r.describe()
    targets = {"node.priority": np.full(4, 9), "agg.main_limit_w": np.zeros(1), "ctl.mode": np.zeros(1, "i8"),
               "node.trip": np.zeros(4, "u4")}
    apply_restart(r, st, targets)
    assert targets["node.priority"].tolist() == [7, 9, 5, 6]  # X keeps its configured value
    assert targets["agg.main_limit_w"][0] == 2000.0 and targets["ctl.mode"][0] == 1
    assert not targets["node.trip"].any()  # not an operator setting: cold restart drops it


def test_reordered_nodes_are_not_warm():
    st = decode(encode(arrays(), meta(), 1, 0))
    r = decide_restart(st, ["B", "A", "C"], layout_of(arrays()))
    assert r.kind == "cold" and "same ids reordered" in r.describe()


def test_changed_program_memory_layout_is_cold_and_says_which_array():
    st = decode(encode(arrays(), meta(), 1, 0))
    lay = layout_of(arrays())
    lay["forecast.level"] = ("<f8", (3, 2))  # a program changed its memory
    lay["newprog.state"] = ("<f8", (3,))  # and a program was added
    r = decide_restart(st, IDS, lay)
    assert r.kind == "cold"
    assert "forecast.level saved as <f8[3], now <f8[3, 2]" in r.describe()
    assert "newprog.state not saved" in r.describe()
    assert "node.priority" in r.restore


def test_other_kind_or_too_old_state_is_not_used():
    st = decode(encode(arrays(), meta(), 1, 1_000_000_000), "x")
    assert decide_restart(st, IDS, layout_of(arrays()), kind="other").kind == "none"
    r = decide_restart(st, IDS, layout_of(arrays()), now_ns=1_000_000_000 + 3601 * 10**9, max_age_s=3600)
    assert r.kind == "none" and "older than the limit 3600 s" in r.describe()
    assert decide_restart(st, IDS, layout_of(arrays()), now_ns=2_000_000_000, max_age_s=3600).kind == "warm"


def test_out_of_range_or_nan_values_are_never_restored():
    bad = arrays()
    bad["node.priority"] = np.array([0, 5000, 1])  # priority range is 0..1000 (fields.py)
    bad["forecast.level"] = np.array([0.0, np.nan, 1.0])  # a program's own "not set" marker: its business
    st = decode(encode(bad, meta(), 1, 0))
    r = decide_restart(st, IDS, layout_of(bad))
    assert r.kind == "cold"
    assert "node.priority outside its valid range [0, 1000]" in r.describe()
    assert "forecast.level" not in r.describe()
    assert "node.priority" not in r.restore and "agg.main_limit_w" in r.restore
    nan_limit = arrays()
    nan_limit["agg.main_limit_w"] = np.array([np.nan])  # a declared field must be a real value
    r = decide_restart(decode(encode(nan_limit, meta(), 1, 0)), IDS, layout_of(nan_limit))
    assert "agg.main_limit_w holds NaN or infinity" in r.describe() and "agg.main_limit_w" not in r.restore


def test_fallback_problems_appear_in_the_restart_log_line(tmp_path):
    s = RetainStore(tmp_path)
    s.save(arrays(1), meta())
    s.save(arrays(2), meta())
    _damage(tmp_path / "state.bin", "truncate")
    loaded = RetainStore(tmp_path).load()
    r = decide_restart(loaded, IDS, layout_of(arrays()))
    assert isinstance(loaded, Loaded) and r.kind == "warm" and r.seq == 1
    assert "truncated" in r.describe() and "from save #1" in r.describe()


# -- with the real shared-memory process image ----------------------------------------
def test_latched_trip_and_settings_survive_a_restart_through_the_process_image(tmp_path):
    from vbatt.kernel.image import Ctl, ImageSpec, Mode, ProcessImage
    from vbatt.retain.store import layout_of, retained_views
    from vbatt.kernel.seqblock import ArraySpec

    def spec(ids, mem=(ArraySpec("forecast.level", "f8", (3,)),)):
        return ImageSpec(n_nodes=len(ids), partitions=((0, len(ids)),), node_ids=tuple(ids),
                         memory=(ArraySpec("scan.ctx", "f8", (8,)), ArraySpec("stats.count", "i8", (3,)), *mem))

    before = ProcessImage.create(spec(IDS))
    try:
        v = retained_views(before)
        assert "scan.ctx" not in v and "stats.count" not in v and "forecast.level" in v
        before.node["trip"][1] = 0b101  # latched overcurrent + thermal on B
        before.node["priority"][:] = [0, 3, 1]
        before.agg["main_limit_w"][0] = 12_000.0
        before.ctl[Ctl.MODE] = Mode.RUN
        before.mem["forecast.level"][:] = [10.0, 20.0, 30.0]
        RetainStore(tmp_path).save(v, meta())
    finally:
        before.close()

    # warm: same nodes, same programs
    after = ProcessImage.create(spec(IDS))
    try:
        views = retained_views(after)
        loaded = RetainStore(tmp_path).load()
        r = decide_restart(loaded, IDS, layout_of(views))
        assert r.kind == "warm"
        apply_restart(r, loaded.state, views)
        assert after.node["trip"].tolist() == [0, 0b101, 0]
        assert after.node["priority"].tolist() == [0, 3, 1]
        assert after.agg["main_limit_w"][0] == 12_000.0 and after.ctl[Ctl.MODE] == Mode.RUN
        assert after.mem["forecast.level"].tolist() == [10.0, 20.0, 30.0]
    finally:
        after.close()

    # cold: a node added -> settings only, by id
    ids2 = ["A", "B", "C", "D"]
    cold = ProcessImage.create(spec(ids2, mem=(ArraySpec("forecast.level", "f8", (4,)),)))
    try:
        views = retained_views(cold)
        loaded = RetainStore(tmp_path).load()
        r = decide_restart(loaded, ids2, layout_of(views))
        assert r.kind == "cold" and "forecast.level saved as <f8[3], now <f8[4]" in r.describe()
        apply_restart(r, loaded.state, views)
        assert cold.node["priority"].tolist() == [0, 3, 1, 0]
        assert cold.agg["main_limit_w"][0] == 12_000.0
        assert not cold.node["trip"].any() and not cold.mem["forecast.level"].any()
    finally:
        cold.close()
