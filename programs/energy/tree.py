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
priority p (0 .. MAX_CLASSES-1) the D_N values D_FRAC, D_LATCHED, D_LEFT, D_RUNTIME, D_REACHABLE]; a
NaN fraction: no decision for p. A sweep takes several cycles (kernel.py) and a node's part of the sums
depends on its class state (its own-need lock, the latch): sums of a sweep begun before the first lease,
or during a fallback, are the leaf's own even when this cycle's class state is the tree's.
The remaining target is carried, not the clock: the leaf's clock is set so that its target minus its
clock is the tree's (everything the program derives from the clock goes through that difference).
"""

from __future__ import annotations

from numba import njit

__all__ = ["DECISIONS", "D_FRAC", "D_LATCHED", "D_LEFT", "D_RUNTIME", "D_REACHABLE", "D_N", "T_USED", "T_SWEPT",
           "T_AT", "tree_size", "tree_classes"]

DECISIONS = ("frac", "latched", "left_s", "runtime_s", "reachable")  # per priority, in this order
D_FRAC, D_LATCHED, D_LEFT, D_RUNTIME, D_REACHABLE = range(len(DECISIONS))
D_N = len(DECISIONS)
T_USED = 1  # [0] is the lease deadline
T_SWEPT = 2
T_AT = 3  # the first priority's values


def tree_size(classes: int) -> int:
    return T_AT + D_N * classes


@njit(nogil=True, cache=True)
def tree_classes(wall_s, tree, prio_of, n_cls, target_s, clock_s, latched, frac, runtime_s, reachable):
    """While the tree's decisions are leased (wall_s before tree[0]), put them in place of this
    controller's own, class by class (class c is priority prio_of[c]). Returns -1 when not leased,
    else the number of classes whose target is unreachable."""
    if not wall_s < tree[0]:
        return -1
    bad = 0
    for c in range(n_cls):
        j = T_AT + D_N * prio_of[c]
        if prio_of[c] >= 0 and j + D_N <= tree.shape[0] and tree[j + D_FRAC] == tree[j + D_FRAC]:
            frac[c] = tree[j + D_FRAC]
            latched[c] = 1 if tree[j + D_LATCHED] != 0.0 else 0
            clock_s[c] = target_s[c] - tree[j + D_LEFT]
            runtime_s[c] = tree[j + D_RUNTIME]
            reachable[c] = 1 if tree[j + D_REACHABLE] != 0.0 else 0
        bad += reachable[c] == 0
    return bad
