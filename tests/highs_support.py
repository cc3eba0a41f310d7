"""A dense LP or diagonal QP solved by HiGHS, for the reference formulations of the tests
(test_allocation_highs.py, feeder_reference.py)."""

from __future__ import annotations

import highspy
import numpy as np
import scipy.sparse as sp

__all__ = ["highs"]


def highs(c, a_rows, row_lo, row_hi, col_lo, col_hi, hess_diag=None, maximise=False, tight=False, debug=False,
          extra: dict | None = None):
    """Solve min/max c.x (+ 0.5 x' diag(h) x) s.t. row_lo <= A x <= row_hi, col bounds; returns x."""
    h = highspy.Highs()
    h.setOptionValue("output_flag", debug)
    h.setOptionValue("qp_iteration_limit", 200_000)
    for k, v in (extra or {}).items():
        h.setOptionValue(k, v)
    if hess_diag is None or tight:  # tight tolerances stall the active-set QP on degenerate problems
        for opt in ("primal_feasibility_tolerance", "dual_feasibility_tolerance"):
            h.setOptionValue(opt, 1e-9)
    lp = highspy.HighsLp()
    nc = len(c)
    lp.num_col_ = nc
    lp.num_row_ = a_rows.shape[0]
    lp.col_cost_ = np.asarray(c, float)
    lp.col_lower_ = np.asarray(col_lo, float)
    lp.col_upper_ = np.asarray(col_hi, float)
    lp.row_lower_ = np.asarray(row_lo, float)
    lp.row_upper_ = np.asarray(row_hi, float)
    a = sp.csc_matrix(a_rows)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = a.indptr
    lp.a_matrix_.index_ = a.indices
    lp.a_matrix_.value_ = a.data
    lp.a_matrix_.num_col_ = nc
    lp.a_matrix_.num_row_ = a_rows.shape[0]
    if maximise:
        lp.sense_ = highspy.ObjSense.kMaximize
    model = highspy.HighsModel()
    model.lp_ = lp
    if hess_diag is not None:
        nz = np.flatnonzero(hess_diag)
        hs = highspy.HighsHessian()
        hs.dim_ = nc
        hs.format_ = highspy.HessianFormat.kTriangular
        start = np.zeros(nc + 1, np.int32)
        np.add.at(start, nz + 1, 1)
        hs.start_ = np.cumsum(start).astype(np.int32)
        hs.index_ = nz.astype(np.int32)
        hs.value_ = np.asarray(hess_diag, float)[nz]
        model.hessian_ = hs
    h.passModel(model)
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal, h.modelStatusToString(h.getModelStatus())
    return np.array(h.getSolution().col_value)
