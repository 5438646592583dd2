"""Compiled kernels for the matrix-free normal operator of the ridge solvers.

SciPy's CSR-times-dense runs at a fraction of memory bandwidth for the shapes used here (a
few non-zeros per row, a few hundred dense columns). These numba kernels make one pass over
the transition arrays, keep the small ``[n, m]`` tables in cache (the solvers pass shards of
test examples whose A and B tables fit in a core's L2 cache: see
``simfluence.solvers.SHARD_TABLE_BYTES``), and fuse the intercept projection. They are serial
and release the GIL, so callers parallelise over shards of test examples with threads. Arrays
are C-contiguous, all float64 or all float32 (accumulators take the output's type) but for the
group sums and means, which may be float64 either way; ``-1`` in ``batches`` pads. ``multishift_iteration`` is the rest of a multi-shift CG iteration, in
float64 whatever the operator's type.

Shapes: batches ``int64[N, b]``; prev, q2, values, out ``[N, m]`` (q2 may have 0 rows when
nothing is projected); group ``int64[N]`` intercept group of each transition; A, B, out_a,
out_b ``[n, m]`` (0 rows for a block the model lacks); group sums ``[G, m]``.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def design_apply(batches, prev, A, B, use_a, use_b, q2, group, out, group_sum, group_q2_sum):  # pragma: no cover
    """``out[k] = prev[k] * sum_p A[batches[k, p]] + sum_p B[batches[k, p]]``, and, when q2 has
    rows, the per-group sums of ``out`` and ``q2 * out`` (added into group_sum, group_q2_sum)."""
    N, width = batches.shape
    m = out.shape[1]
    project = q2.shape[0] > 0
    acc_a = np.zeros(m, dtype=out.dtype)
    acc_b = np.zeros(m, dtype=out.dtype)
    for k in range(N):
        for j in range(m):
            acc_a[j] = 0.0
            acc_b[j] = 0.0
        for p in range(width):
            i = batches[k, p]
            if i < 0:
                continue
            if use_a and use_b:  # one loop per case: each vectorises (2x faster than branching inside)
                for j in range(m):
                    acc_a[j] += A[i, j]
                    acc_b[j] += B[i, j]
            elif use_a:
                for j in range(m):
                    acc_a[j] += A[i, j]
            else:
                for j in range(m):
                    acc_b[j] += B[i, j]
        for j in range(m):
            out[k, j] = prev[k, j] * acc_a[j] + acc_b[j]
        if project:
            g = group[k]
            for j in range(m):
                group_sum[g, j] += out[k, j]
                group_q2_sum[g, j] += q2[k, j] * out[k, j]


@numba.njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def design_transpose(batches, prev, values, use_a, use_b, q2, group, group_mean, group_coef,
                     out_a, out_b):  # pragma: no cover
    """``out_a[i] = sum_k C_ki prev[k] v[k]`` and ``out_b[i] = sum_k C_ki v[k]`` where
    ``v[k] = values[k] - group_mean[g] - q2[k] * group_coef[g]`` when q2 has rows, else
    ``values[k]``. A scatter: values are read once, the outputs stay in cache."""
    N, width = batches.shape
    m = values.shape[1]
    project = q2.shape[0] > 0
    out_a[:] = 0.0
    out_b[:] = 0.0
    v = np.zeros(m, dtype=out_a.dtype)
    weighted = np.zeros(m, dtype=out_a.dtype)
    for k in range(N):
        if project:
            g = group[k]
            for j in range(m):
                v[j] = values[k, j] - group_mean[g, j] - q2[k, j] * group_coef[g, j]
        else:
            for j in range(m):
                v[j] = values[k, j]
        for j in range(m):
            weighted[j] = prev[k, j] * v[j]
        for p in range(width):
            i = batches[k, p]
            if i < 0:
                continue
            if use_a and use_b:
                for j in range(m):
                    out_a[i, j] += weighted[j]
                    out_b[i, j] += v[j]
            elif use_a:
                for j in range(m):
                    out_a[i, j] += weighted[j]
            else:
                for j in range(m):
                    out_b[i, j] += v[j]


@numba.njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def multishift_update(x, p, r, shifts, zeta, zeta_old, alpha, alpha_old, beta, beta_old, res, tol, done,
                      iteration):  # pragma: no cover
    """One iteration of multi-shift CG for every shifted system not yet converged, in place.

    For shift ``s`` (``done[s] == 0``) and test column ``j``: the new ``zeta`` from the base
    system's ``alpha``, ``beta`` of this and the previous iteration, then ``x[s] += step * p[s]``
    and ``p[s] = decay * p[s] + zeta_new * r`` with ``step = alpha * zeta_new / zeta`` and
    ``decay = beta * (zeta_new / zeta)^2``; ``done[s] = iteration`` once every column's
    residual ``|zeta_new| * res`` is at most ``tol``.

    Shapes: x, p ``[S, k, n, m]`` (k blocks: A and/or B); r ``[k, n, m]`` the base residual;
    shifts, zeta, zeta_old ``[S, m]``; alpha, alpha_old, beta, beta_old, res ``[m]``; done
    ``int64[S]``."""
    S, k, n, m = x.shape
    step = np.empty(m)
    decay = np.empty(m)
    weight = np.empty(m)
    for s in range(S):
        if done[s]:
            continue
        converged = True
        for j in range(m):
            denom = (alpha[j] * beta_old[j] * (zeta_old[s, j] - zeta[s, j])
                     + zeta_old[s, j] * alpha_old[j] * (1.0 + shifts[s, j] * alpha[j]))
            zeta_new = zeta[s, j] * zeta_old[s, j] * alpha_old[j] / denom if denom != 0.0 else 0.0
            ratio = zeta_new / zeta[s, j] if zeta[s, j] != 0.0 else 0.0
            step[j] = alpha[j] * ratio
            decay[j] = beta[j] * ratio * ratio
            weight[j] = zeta_new
            zeta_old[s, j] = zeta[s, j]
            zeta[s, j] = zeta_new
            if abs(zeta_new) * res[j] > tol:
                converged = False
        for b in range(k):
            for i in range(n):
                x_i, p_i, r_i = x[s, b, i], p[s, b, i], r[b, i]
                for j in range(m):
                    x_i[j] += step[j] * p_i[j]
                    p_i[j] = decay[j] * p_i[j] + weight[j] * r_i[j]
        if converged:
            done[s] = iteration


@numba.njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def multishift_iteration(product, p, p_operator, r, rr, alpha_old, beta_old, base, rhs_norm, x, ps, shifts, zeta,
                         zeta_old, tol, done, iteration):  # pragma: no cover
    """One iteration of multi-shift CG after the operator product, in place and fused: with
    ``q = product + base * p`` (the base system's matrix times ``p``), ``alpha = rr / (p.q)``,
    ``r -= alpha q``, ``beta = rr_new / rr``, every shifted system's update
    (:func:`multishift_update`), then ``p = r + beta p`` and ``p_operator`` = p in the operator's
    type (the next product's input); ``rr``, ``alpha_old``, ``beta_old`` become this iteration's.

    Shapes: product, p_operator ``[k, n, m]`` in the operator's type; p, r ``[k, n, m]``; rr,
    alpha_old, beta_old, base (the smallest penalty), rhs_norm ``[m]``; x, ps, shifts, zeta,
    zeta_old, done as in :func:`multishift_update`."""
    k, n, m = r.shape
    pq = np.zeros(m)
    for b in range(k):
        for i in range(n):
            for j in range(m):
                pq[j] += p[b, i, j] * (product[b, i, j] + base[j] * p[b, i, j])
    alpha = np.empty(m)
    for j in range(m):
        alpha[j] = rr[j] / pq[j] if pq[j] > 0.0 else 0.0
    rr_new = np.zeros(m)
    for b in range(k):
        for i in range(n):
            for j in range(m):
                r[b, i, j] -= alpha[j] * (product[b, i, j] + base[j] * p[b, i, j])
                rr_new[j] += r[b, i, j] * r[b, i, j]
    beta = np.empty(m)
    res = np.empty(m)
    for j in range(m):
        beta[j] = rr_new[j] / rr[j] if rr[j] > 0.0 else 0.0
        res[j] = np.sqrt(rr_new[j]) / rhs_norm[j]
    multishift_update(x, ps, r, shifts, zeta, zeta_old, alpha, alpha_old, beta, beta_old, res, tol, done, iteration)
    for b in range(k):
        for i in range(n):
            for j in range(m):
                p[b, i, j] = r[b, i, j] + beta[j] * p[b, i, j]
                p_operator[b, i, j] = p[b, i, j]
    for j in range(m):
        rr[j] = rr_new[j]
        alpha_old[j] = alpha[j]
        beta_old[j] = beta[j]


@numba.njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def linear_rollout(batches, A, B, use_a, use_b, alpha0, beta0, base, out, runs, cols):  # pragma: no cover
    """Roll Simfluence-Linear forward in place for runs ``runs[0]..runs[1]-1`` and test columns
    ``cols[0]..cols[1]-1``: ``out[r, 0]`` holds the initial losses and update ``t`` gives
    ``out[r, t+1] = (base + alpha0[g] + sum_p A[i_p]) * out[r, t] + beta0[g] + sum_p B[i_p]``
    with ``i_p = batches[r, t, p]`` (``-1`` pads) and ``g = min(t, G - 1)``.

    Shapes: batches ``int64[R, T, b]``; A, B ``[n, m]`` (0 rows for a missing block); alpha0,
    beta0 ``[G, m]``; out ``[R, T+1, m]``, all in out's dtype. Columns are taken in blocks of 64
    so that the rows gathered from A and B stay in cache."""
    T, width = batches.shape[1], batches.shape[2]
    G = alpha0.shape[0]
    acc_a = np.empty(64, dtype=out.dtype)
    acc_b = np.empty(64, dtype=out.dtype)
    for lo in range(cols[0], cols[1], 64):
        hi = min(cols[1], lo + 64)
        for r in range(runs[0], runs[1]):
            for t in range(T):
                g = min(t, G - 1)
                for j in range(lo, hi):
                    acc_a[j - lo] = base + alpha0[g, j]
                    acc_b[j - lo] = beta0[g, j]
                for p in range(width):
                    i = batches[r, t, p]
                    if i < 0:
                        continue
                    if use_a and use_b:
                        for j in range(lo, hi):
                            acc_a[j - lo] += A[i, j]
                            acc_b[j - lo] += B[i, j]
                    elif use_a:
                        for j in range(lo, hi):
                            acc_a[j - lo] += A[i, j]
                    else:
                        for j in range(lo, hi):
                            acc_b[j - lo] += B[i, j]
                for j in range(lo, hi):
                    out[r, t + 1, j] = acc_a[j - lo] * out[r, t, j] + acc_b[j - lo]
