"""Vendor model 64252 "vbatt_tree": the curves a controller offers its parent and the levels it takes.

It follows the node map's models (common 1, battery 802, vendor 64251: drivers/modbus/sunspec.py) in
the same SunSpec chain, so a standard SunSpec client walks past it to the end model. Everything is
float64 (big-endian, 4 registers): exactness across levels is to 1e-6 W, which float32 cannot carry.
Body layout (offsets in registers), K classes, N knots:

    0  Classes    uint16   K
    1  MaxKnots   uint16   N
    2  Format     uint16   FORMAT, the layout's version (a parent refuses another)
    3  SumSeq     uint32   counts summary refreshes (a reader sees a fresh one)
    5  OwnW       float64  stage 2 budget the subtree's batteries bring: sum min(hi, link)
    9  UpW        float64  sum min(served - lo, link): the most main supply its links take
   13  ServedW    float64  sum served (at the levels it applied last)
   17  BusW       float64  its net import from the feed now (its share of the feed)
   21  BatW       float64  its battery power now (> 0 discharge)
   25  DisN       uint16   knots of the discharge battery curve
   26  ChgN       uint16   knots of the charge battery curve
   27  ClassN[K]  uint16   knots of the shed curve of class k
 27+K  Energy     K x C float64 (C = len(classes.COLS)): per priority class k, the energy offer
                  (programs/hierarchy/classes.py): DemandW, ReserveDemandW, EnergyWh (pooled usable), LocalS
                  (first node out of its own energy; +inf none), LeftS (remaining target), TargetS (NaN: no
                  node of the class in the subtree), Latched (1: shed for energy), PoolNowW, PowerNeedW,
                  PowerSlackW, DeliverableWh (within the class's remaining target), Leaves (leaves in the
                  sums), LeavesOnTree (of those, swept wholly at the tree's decisions), Absent (configured
                  children of the subtree's levels missing from the sums), ProbeS, ProbeWh, ProbeW (the power
                  probe's answer: the m the subtree's leaves all probed class k at, NaN: not one m; the
                  deliverable energy A(m) and its slope: programs/energy/tree.py PROBE), ReleaseW (the
                  power its own-need locks could add to the bus; PowerNeedW is the need before any is lifted),
                  YieldW (what they could add held only for the class's remaining target),
                  StrandedW (the part of its pooled demand its nodes serve from stranded energy), YieldShedW
                  (YieldW with the class shed: its batteries' export alone)
 27+(1+4C)K  Knots    N x (x float64, y float64): DisN, then ChgN, then each class's, in order
 then the levels (written by the parent, one request):
       LvSeq uint32, LvLeaseMs uint32, Dis uint16, Decided uint16, Lam float64, Mu[K] float64
       (LvSeq 0 with LvLeaseMs 0, the rest NaN/0: the hand-back, the parent's last write as it stops in order;
       the child drops the levels at once and runs on its own: no lease ran out. A child without it reads a
       lease of 0, refuses the write as before, and its lease runs out)
 then the energy decisions (written by the parent before the levels, when Decided = 1):
       K x D float64 (D = len(programs/energy/tree.py DECISIONS)): Frac, Latched, LeftS, RuntimeS,
       Reachable, HorizonS, ProbeS, Release, Yield, TargetS per priority class (NaN Frac: no decision for the
       class; TargetS: the tree's target, so that a leaf without one of its own applies the tree's caps)

A parent refuses a child whose model length, Format, K or N is not its own, and an energy offer whose
probe is not one (classes.check), with the reason as the child's fault.
"""

from __future__ import annotations

import struct

import numpy as np

from vbatt.drivers.modbus.sunspec import NODE_MAP
from vbatt.programs.energy.tree import D_N
from vbatt.programs.hierarchy import classes as hc
from vbatt.programs.hierarchy.curves import Curve, Levels, Summary

__all__ = ["TREE_ID", "FORMAT", "HAND_BACK_SEQ", "HAND_BACK_LEASE_MS", "TreeLayout"]

TREE_ID = 64252
FORMAT = 4  # 1: before the power probe (no Format register); 2: the probe's question and answer; 3: Yield, TargetS,
# StrandedW; 4: YieldShedW
# (the hand-back below is no new format: the layout is the same, and a child without it lets the lease run out)
HAND_BACK_SEQ = 0  # LvSeq of the hand-back; an ordinary levels write never carries it
HAND_BACK_LEASE_MS = 0  # LvLeaseMs of the hand-back (an ordinary write's lease is 1 .. 3,600,000 ms)


class TreeLayout:
    def __init__(self, classes: int, max_knots: int):
        self.k, self.n = classes, max_knots
        self.addr = NODE_MAP.base + NODE_MAP.size - 2  # where the node map's end model was
        self.body = self.addr + 2
        self.head_len = 27 + classes
        self.cls_len = 4 * hc.N_COLS * classes  # the energy offer, right after the header
        self.knots_at = self.body + self.head_len + self.cls_len
        self.levels_at = self.knots_at + 8 * max_knots
        self.levels_len = 10 + 4 * classes
        self.dec_at = self.levels_at + self.levels_len
        self.dec_len = 4 * D_N * classes
        self.length = self.head_len + self.cls_len + 8 * max_knots + self.levels_len + self.dec_len
        self.end = self.body + self.length  # the end model (0xFFFF, 0)
        self._head = struct.Struct(f">HHHIddddd{2 + classes}H")
        self._levels = struct.Struct(f">IIHHd{classes}d")

    # -- the summary (child side writes, parent side reads) ------------------------------------------
    def encode_summary(self, s: Summary, seq: int) -> tuple[list[int], list[int]]:
        """(header and energy offer registers from `body`, knot registers from `knots_at`); raises
        when the curves need more than N knots."""
        curves = [s.dis, s.chg] + [s.classes.get(c, Curve.zero()) for c in range(self.k)]
        total = sum(c.xs.size for c in curves)
        if total > self.n:
            raise OverflowError(f"the curves need {total} knots, the tree model holds {self.n} "
                                f"(hierarchy.max_knots)")
        head = self._head.pack(self.k, self.n, FORMAT, seq & 0xFFFFFFFF, s.own_w, s.up_w, s.served_w,
                               s.bus_w, s.battery_w,
                               *(c.xs.size for c in curves))
        xy = np.concatenate([np.column_stack([c.xs, c.ys]).reshape(-1) for c in curves]).astype(">f8")
        en = (s.energy if s.energy is not None else hc.empty(self.k)).astype(">f8").reshape(-1)
        return (list(struct.unpack(f">{len(head) // 2}H", head)) + en.view(">u2").astype(int).tolist(),
                xy.view(">u2").astype(int).tolist())

    def decode_energy(self, words) -> np.ndarray:
        """The energy offer (K, len(classes.COLS)) from the cls_len registers after the header; raises
        ValueError when its power probe cannot be one."""
        out = np.asarray(words, np.uint16).astype(">u2").view(">f8").astype(np.float64).reshape(self.k, hc.N_COLS)
        hc.check(out, "tree model energy offer")
        return out

    def check_length(self, model_id: int, length: int) -> None:
        """The model header's id and length: a vbatt controller's tree model of this layout."""
        if model_id != TREE_ID:
            raise ValueError(f"no tree model {TREE_ID} at {self.addr} (got model {model_id}): not a vbatt "
                             f"controller with an uplink")
        if length != self.length:
            raise ValueError(f"tree model of {length} registers, expected {self.length} for {self.k} classes, "
                             f"{self.n} knots and format {FORMAT} (hierarchy.classes and max_knots, and the "
                             f"vbatt version, must match across levels)")

    def decode_head(self, words) -> dict:
        k, n, fmt, seq, own, up, served, bus, bat, dis_n, chg_n, *cls_n = self._head.unpack(
            struct.pack(f">{self.head_len}H", *words))
        if fmt != FORMAT:
            raise ValueError(f"tree model format {fmt}, expected {FORMAT} (every level must run the same vbatt "
                             f"tree format)")
        if (k, n) != (self.k, self.n):
            raise ValueError(f"tree model with {k} classes and {n} knots, expected {self.k} and {self.n} "
                             f"(hierarchy.classes and max_knots must match across levels)")
        return dict(seq=seq, own_w=own, up_w=up, served_w=served, bus_w=bus, battery_w=bat,
                    counts=[dis_n, chg_n, *cls_n])

    def decode_summary(self, head: dict, knot_words, energy: np.ndarray | None = None) -> Summary:
        xy = np.asarray(knot_words, np.uint16).astype(">u2").view(">f8").astype(np.float64).reshape(-1, 2)
        curves, at = [], 0
        for c in head["counts"]:
            curves.append(Curve(xy[at:at + c, 0].copy(), xy[at:at + c, 1].copy()) if c else Curve.zero())
            at += c
        return Summary(head["own_w"], {k: curves[2 + k] for k in range(self.k) if head["counts"][2 + k]},
                       head["up_w"], head["served_w"], curves[0], curves[1], head["bus_w"], head["battery_w"],
                       energy)

    # -- the levels (parent side writes, child side reads) -------------------------------------------
    def encode_levels(self, lv: Levels, seq: int, lease_ms: int) -> list[int]:
        mu = [lv.mu(c) for c in range(self.k)]
        raw = self._levels.pack(seq & 0xFFFFFFFF, lease_ms, 1 if lv.dis else 0, 0 if lv.energy is None else 1,
                                lv.lam, *mu)
        return list(struct.unpack(f">{self.levels_len}H", raw))

    def encode_hand_back(self) -> list[int]:
        """The levels block of the hand-back: LvSeq HAND_BACK_SEQ, LvLeaseMs 0, Decided 0, every level NaN (a
        reader that took it for levels would refuse them)."""
        raw = self._levels.pack(HAND_BACK_SEQ, HAND_BACK_LEASE_MS, 0, 0, float("nan"), *([float("nan")] * self.k))
        return list(struct.unpack(f">{self.levels_len}H", raw))

    @staticmethod
    def is_hand_back(seq: int, lease_ms: int) -> bool:
        return seq == HAND_BACK_SEQ and lease_ms == HAND_BACK_LEASE_MS

    @staticmethod
    def next_seq(seq: int) -> int:
        """The LvSeq after `seq`: 1, 2, ... 2**32 - 1, then 1 again (HAND_BACK_SEQ is never a renewal)."""
        return seq % 0xFFFFFFFF + 1

    def encode_decisions(self, dec) -> list[int]:
        """The energy decisions (K, D) as the dec_len registers at dec_at."""
        return np.asarray(dec, ">f8").reshape(-1).view(">u2").astype(int).tolist()

    def decode_levels(self, words) -> tuple[int, int, Levels]:
        """From the levels_len + dec_len registers at levels_at."""
        seq, lease, dis, decided, lam, *mu = self._levels.unpack(
            struct.pack(f">{self.levels_len}H", *words[:self.levels_len]))
        dec = None
        if decided == 1:
            dec = np.asarray(words[self.levels_len:self.levels_len + self.dec_len], np.uint16).astype(">u2").view(
                ">f8").astype(np.float64).reshape(self.k, D_N)
        return seq, lease, Levels({c: m for c, m in enumerate(mu)}, lam, dis == 1, dec)
