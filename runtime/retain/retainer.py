"""Retentive state of a run: restored before the first cycle, saved while the scan runs.

The scan never touches a file. The supervisor restores the saved state into the
image before the scan process starts, and a thread of the supervisor saves:
at once when a latched trip, an alarm or an operator setting changes (checked
every `poll_ms` against the published image, which is always whole), and every
`period_s` for the programs' memory (forecast state, integrators, counters).
Program memory is read without the seqlock: each 8-byte element is a value of
one cycle or the next, never a torn number, which is all a smoothing state or
an integrator needs.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Annotated

import numpy as np
from pydantic import Field

from vbatt.config.base import Strict
from vbatt.kernel.image import Ctl, ProcessImage
from vbatt.retain.store import (DEFAULT_SETTINGS, RETAINED_FIELDS, Restart, RetainStore, apply_restart, decide_restart,
                                layout_of, retained_name, retained_views)

__all__ = ["RetainConfig", "Retainer"]

log = logging.getLogger("vbatt.retain.store")

# Saved as soon as they change: every retained field (trips, alarms, operator settings) and the mode.
WATCHED = tuple(retained_name(f) for f in RETAINED_FIELDS) + ("ctl.mode",)


class RetainConfig(Strict):
    enabled: bool = False
    dir: str = "var/retain"  # relative to the working directory
    period_s: Annotated[float, Field(gt=0)] = 1.0
    poll_ms: Annotated[float, Field(gt=0)] = 20.0
    keep_trips_on_cold: bool = False  # cold = operator settings only (issue 6); true keeps trips of nodes that still exist


class Retainer:
    def __init__(self, cfg: RetainConfig, img: ProcessImage, *, cold: bool = False):
        self.cfg = cfg
        self.img = img
        self.cold = cold
        self.store = RetainStore(cfg.dir)
        self.saves = 0
        self.failures = 0
        self.kind = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live = retained_views(img)
        pub_names = set(img.pub.buffers[0])
        # node/aggregate values come whole from the published image; the rest (mode, memory) live
        self._copy = {k: v.copy() for k, v in self._live.items()}
        self._from_pub = [k for k in self._live if k in pub_names]
        self._direct = [k for k in self._live if k not in pub_names]
        self._meta = {"kind": "vbatt", "node_ids": list(img.spec.node_ids)}
        self._last = {k: np.zeros(0) for k in WATCHED}

    # -- start ------------------------------------------------------------------------------
    def restore(self) -> str:
        """Before the scan starts: put back what can be trusted; returns the log line."""
        loaded = self.store.load()
        settings = DEFAULT_SETTINGS + (("node.trip",) if self.cfg.keep_trips_on_cold else ())
        layout = layout_of(self._live)
        restart = decide_restart(loaded, self.img.spec.node_ids, layout, settings=settings)
        if self.cold and restart.kind == "warm":
            ids = np.arange(self.img.spec.n_nodes, dtype=np.int64)
            restart = Restart("cold", ("cold restart requested",), tuple(n for n in settings if n in layout),
                              (ids, ids), seq=restart.seq)
        self.restored = apply_restart(restart, loaded.state, self._live)
        self.img.ctl[Ctl.WARM] = 1 if restart.kind == "warm" else 0
        self.kind = restart.kind
        first = restart.kind == "none" and all(p.reason == "missing" for p in loaded.problems)
        line = f"first start: no retained state yet in {self.cfg.dir}" if first else restart.describe()
        (log.warning if restart.kind == "none" and not first else log.info)(line)
        return line

    # -- while running ----------------------------------------------------------------------
    def _read(self, names) -> None:
        def copy(views):
            for k in names:
                self._copy[k][...] = views[k]

        self.img.pub.read(copy)
        for k in self._direct:
            self._copy[k][...] = self._live[k]

    def save_now(self) -> None:
        self._read(self._from_pub)
        try:
            self.store.save(self._copy, self._meta)
            self.saves += 1
        except OSError as exc:
            self.failures += 1
            log.error("retain save failed (%s): the previous copy stays", exc)
        self._last = {k: self._copy[k].copy() for k in WATCHED}

    def _changed(self) -> bool:
        self._read([k for k in WATCHED if k in self._from_pub])
        return any(not np.array_equal(self._copy[k], self._last[k]) for k in WATCHED)

    def _run(self) -> None:
        next_periodic = time.monotonic() + self.cfg.period_s
        while not self._stop.wait(self.cfg.poll_ms / 1e3):
            if self.img.pub.seq == 0:
                continue
            now = time.monotonic()
            if now >= next_periodic or self._changed():
                self.save_now()
                next_periodic = now + self.cfg.period_s

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vbatt-retain", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Save the running state one last time, before the scan's safe-state shutdown changes the mode."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
            if self.img.pub.seq:
                self.save_now()
