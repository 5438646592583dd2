"""Compiled kernels for the matrix-free normal operator of the ridge solvers.

SciPy's CSR-times-dense runs at a fraction of memory bandwidth for the shapes used here (a
few non-zeros per row, a few hundred dense columns). These numba kernels make one pass over
the transition arrays, keep the small ``[n, m]`` tables in cache, and fuse the intercept
projection. They are serial and release the GIL, so callers parallelise over shards of
test examples with threads. Arrays are float64 and C-contiguous; ``-1`` in ``batches`` pads.

Shapes: batches ``int64[N, b]``; prev, q2, values, out ``[N, m]`` (q2 may have 0 rows when
nothing is projected); group ``int64[N]`` intercept group of each transition; A, B, out_a,
out_b ``[n, m]`` (0 rows for a block the model lacks); group sums ``[G, m]``.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, fastmath=True)
def design_apply(batches, prev, A, B, use_a, use_b, q2, group, out, group_sum, group_q2_sum):  # pragma: no cover
    """``out[k] = prev[k] * sum_p A[batches[k, p]] + sum_p B[batches[k, p]]``, and, when q2 has
    rows, the per-group sums of ``out`` and ``q2 * out`` (added into group_sum, group_q2_sum)."""
    N, width = batches.shape
    m = out.shape[1]
    project = q2.shape[0] > 0
    acc_a = np.zeros(m)
    acc_b = np.zeros(m)
    for k in range(N):
        acc_a[:] = 0.0
        acc_b[:] = 0.0
        for p in range(width):
            i = batches[k, p]
            if i < 0:
                continue
            if use_a:
                row_a = A[i]
                for j in range(m):
                    acc_a[j] += row_a[j]
            if use_b:
                row_b = B[i]
                for j in range(m):
                    acc_b[j] += row_b[j]
        row = out[k]
        prev_k = prev[k]
        for j in range(m):
            row[j] = prev_k[j] * acc_a[j] + acc_b[j]
        if project:
            g = group[k]
            sums = group_sum[g]
            q2_sums = group_q2_sum[g]
            q2_k = q2[k]
            for j in range(m):
                sums[j] += row[j]
                q2_sums[j] += q2_k[j] * row[j]


@numba.njit(nogil=True, cache=True, fastmath=True)
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
    v = np.zeros(m)
    weighted = np.zeros(m)
    for k in range(N):
        values_k = values[k]
        if project:
            g = group[k]
            mean_g = group_mean[g]
            coef_g = group_coef[g]
            q2_k = q2[k]
            for j in range(m):
                v[j] = values_k[j] - mean_g[j] - q2_k[j] * coef_g[j]
        else:
            for j in range(m):
                v[j] = values_k[j]
        prev_k = prev[k]
        for j in range(m):
            weighted[j] = prev_k[j] * v[j]
        for p in range(width):
            i = batches[k, p]
            if i < 0:
                continue
            if use_a:
                row_a = out_a[i]
                for j in range(m):
                    row_a[j] += weighted[j]
            if use_b:
                row_b = out_b[i]
                for j in range(m):
                    row_b[j] += v[j]
