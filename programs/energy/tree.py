"""The energy decisions of a tree of controllers, at a leaf (docs/hierarchy.md "Energy across levels").

A leaf's energy program sums its own nodes per class; the top of the tree runs the class rules
(rules.py `decide`) on the whole tree's sums with its main supply limit and sends down, per priority,
what `decide` would have written: the served fraction, the shed latch, the remaining target, the
runtime and whether the target is reachable. While that is leased, the leaf uses it in place of its
own decide() output, for its caps (serve_max_w), its nodes' own-need locks and runtimes, and the next
sweep's horizons; its own decide() still runs (classes the tree does not carry keep its answer, and
its state is warm for the fallback). When the lease runs out it decides on its own again, on its own
main_limit_w, starting from the tree's clocks and latches.

memory `tree` (f8): [lease deadline (wall s; 0: none), used (written by the program: 1 when the class
sums it publishes were swept wholly at the tree's decisions, so that the sums it offers upward are the
tree's), swept (written by the program: the lease held at every cycle of the sweep under way), then per
priority p (0 .. MAX_CLASSES-1) the D_N values D_FRAC, D_LATCHED, D_LEFT, D_RUNTIME, D_REACHABLE, D_HORIZON,
D_PROBE, D_RELEASE, D_YIELD, D_TARGET, then per priority the P_N values of the power probe (written by the
program)]; a NaN fraction: no decision for p. A sweep takes several cycles (kernel.py) and a node's part of the sums
depends on its class state (its own-need lock, the latch): sums of a sweep begun before the first lease,
or during a fallback, are the leaf's own even when this cycle's class state is the tree's.
The remaining target is carried, not the clock: the leaf's clock is set so that its target minus its
clock is the tree's (everything the program derives from the clock goes through that difference).

The power runtime (rules.power_runtime) is the tree's too. Its probe needs every node: the deliverable
energy A(m) within the top's estimate m, with the classes before the probed one served for their horizons,
is a sum over nodes (kernel._power_probe), so the top asks it. Per class it sends the horizon (D_HORIZON:
min(remaining target, the tree's first node out of its own energy, the tree's power runtime), which a
flat controller's sweep takes as hz_s) and the probe's m (D_PROBE; 0: none); the leaf's sweep takes both in
place of its own (tree_sweep), and at the sweep's end writes the m it probed at with A(m) and its slope
(tree_probed: PROBE, per priority, after the decisions), which its offer carries up and every level adds.
The top takes the Newton step (power_runtime) on the tree's sum once the answer to its question is back.
"""

from __future__ import annotations

from numba import njit

__all__ = ["DECISIONS", "D_FRAC", "D_LATCHED", "D_LEFT", "D_RUNTIME", "D_REACHABLE", "D_HORIZON", "D_PROBE", "D_N",
           "D_RELEASE", "D_YIELD", "D_TARGET", "PROBE", "P_S", "P_WH", "P_W", "P_REL", "P_PNEED", "P_YLD", "P_YLS",
           "P_N", "T_USED", "T_SWEPT", "T_AT", "tree_size", "probe_at", "tree_active", "tree_classes", "tree_sweep",
           "tree_probed", "tree_release"]

# target_s: the tree's ride-through target of the priority (its class rules are on where the tree has any
# target > 0, as a flat controller's: a leaf whose own classes all have none still takes the tree's caps)
DECISIONS = ("frac", "latched", "left_s", "runtime_s", "reachable", "horizon_s", "probe_s", "release",
             "yield", "target_s")  # per priority
D_FRAC, D_LATCHED, D_LEFT, D_RUNTIME, D_REACHABLE, D_HORIZON, D_PROBE, D_RELEASE, D_YIELD, D_TARGET = range(
    len(DECISIONS))
D_N = len(DECISIONS)
# the power probe of the last whole sweep, per priority (written by the program): the m it was taken at
# (NaN: none yet), the deliverable energy A(m) (Wh) and its slope (W); and the class's power shortfall's
# inputs of that sweep (kernel._release): the power its nodes' own-need locks could add to the bus (W) and
# the power its loads ask of the bus before any lock is lifted (W), and the power its locks could add held only
# for the class's remaining target (W: what another class short of power takes first, kernel._release), and that
# with the class shed (W: its batteries' export alone, what a class taking it first leaves a later one that is shed)
PROBE = ("probe_s", "probe_wh", "probe_w", "release_w", "power_need_w", "yield_w", "yield_shed_w")
P_S, P_WH, P_W, P_REL, P_PNEED, P_YLD, P_YLS = range(len(PROBE))
P_N = len(PROBE)
T_USED = 1  # [0] is the lease deadline
T_SWEPT = 2
T_AT = 3  # the first priority's values


def tree_size(classes: int) -> int:
    return T_AT + (D_N + P_N) * classes


@njit(nogil=True, cache=True)
def probe_at(size):
    """Where the probe's values begin in a `tree` memory of `size` values."""
    return T_AT + D_N * ((size - T_AT) // (D_N + P_N))


@njit(nogil=True, cache=True)
def _decided(tree, p):
    """Where priority p's decisions begin in a `tree` memory; -1 where the tree decides none for it (no
    priority, beyond the memory, or a NaN share: a class the top has not decided)."""
    j = T_AT + D_N * p
    if p >= 0 and j + D_N <= probe_at(tree.shape[0]) and tree[j + D_FRAC] == tree[j + D_FRAC]:
        return j
    return -1


@njit(nogil=True, cache=True)
def tree_active(wall_s, tree):
    """While the tree's decisions are leased: whether the tree has any ride-through target (its class rules
    narrow what is served, as a flat controller's with a target; none: today's allocation)."""
    if not wall_s < tree[0]:
        return False
    for p in range((probe_at(tree.shape[0]) - T_AT) // D_N):
        j = _decided(tree, p)
        if j >= 0 and tree[j + D_TARGET] > 0.0:
            return True
    return False


@njit(nogil=True, cache=True)
def tree_classes(wall_s, tree, prio_of, n_cls, target_s, clock_s, latched, frac, runtime_s, reachable):
    """While the tree's decisions are leased (wall_s before tree[0]), put them in place of this
    controller's own, class by class (class c is priority prio_of[c]). Returns -1 when not leased,
    else the number of classes whose target is unreachable."""
    if not wall_s < tree[0]:
        return -1
    bad = 0
    for c in range(n_cls):
        j = _decided(tree, prio_of[c])
        if j >= 0:
            frac[c] = tree[j + D_FRAC]
            latched[c] = 1 if tree[j + D_LATCHED] != 0.0 else 0
            clock_s[c] = target_s[c] - tree[j + D_LEFT]
            runtime_s[c] = tree[j + D_RUNTIME]
            reachable[c] = 1 if tree[j + D_REACHABLE] != 0.0 else 0
        bad += reachable[c] == 0
    return bad


@njit(nogil=True, cache=True)
def tree_sweep(wall_s, tree, prio_of, n_cls, hz_s, probe_s):
    """At a sweep's start, while the tree's decisions are leased: the tree's horizons and power probe in
    place of this controller's own, for the classes the tree decides (a NaN horizon keeps its own, a NaN
    probe asks none)."""
    if not wall_s < tree[0]:
        return
    for c in range(n_cls):
        j = _decided(tree, prio_of[c])
        if j >= 0:
            h = tree[j + D_HORIZON]
            hz_s[c] = max(0.0, h) if h == h else hz_s[c]
            m = tree[j + D_PROBE]
            probe_s[c] = max(0.0, m) if m == m else 0.0


@njit(nogil=True, cache=True)
def tree_probed(tree, prio_of, n_cls, probe_s, pv, release_w, need_w, yield_w, yield_shed_w):
    """At a sweep's end: the m each class was probed at (0: none) and the deliverable energy and its slope
    there (kernel._power_probe), and the sweep's releasable power, power need and the power its locks held beyond
    their class's remaining target could add (kernel._release's inputs), per priority, for the offer upward."""
    at = probe_at(tree.shape[0])
    if at < T_AT:  # a memory too small for any class (no tree): nothing to write, and no index below 0
        return
    for c in range(n_cls):
        j = at + P_N * prio_of[c]
        if prio_of[c] >= 0 and j + P_N <= tree.shape[0]:
            tree[j + P_S] = probe_s[c]
            tree[j + P_WH] = pv[0, c]
            tree[j + P_W] = pv[1, c]
            tree[j + P_REL] = release_w[c]
            tree[j + P_PNEED] = need_w[c]
            tree[j + P_YLD] = yield_w[c]
            tree[j + P_YLS] = yield_shed_w[c]


@njit(nogil=True, cache=True)
def _share(q, own):
    """A share the tree sent (clamped to 0..1), or this controller's own where it sent none (NaN)."""
    return min(1.0, max(0.0, q)) if q == q else own


@njit(nogil=True, cache=True)
def tree_release(wall_s, tree, prio_of, n_cls, rq, yq):
    """While the tree's decisions are leased: the share of its own-need locks' power each class releases
    (rq), and the share of what they hold beyond its remaining target each class yields to another (yq)
    (kernel._release, decided by the top on the tree's sums), in place of this controller's own."""
    if not wall_s < tree[0]:
        return
    for c in range(n_cls):
        j = _decided(tree, prio_of[c])
        if j >= 0:
            rq[c] = _share(tree[j + D_RELEASE], rq[c])
            yq[c] = _share(tree[j + D_YIELD], yq[c])
