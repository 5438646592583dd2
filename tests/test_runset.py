"""RunSet validation and splitting."""

import numpy as np
import pytest

from simfluence import RunSet, RunSetError


def _arrays(R=6, T=4, b=2, m=3, n=10):
    rng = np.random.default_rng(0)
    return rng.integers(0, n, (R, T, b)), rng.uniform(0.5, 2, (R, T + 1, m))


@pytest.mark.parametrize("mutate, message", [
    (lambda b, l: (b[:, :2], l), "T\\+1=3 steps"),
    (lambda b, l: (b[:3], l), "batches has 3 runs but losses has 6"),
    (lambda b, l: (b[..., 0], l), "shape \\[R, T, b\\]"),
    (lambda b, l: (b[:0], l[:0]), "empty"),
    (lambda b, l: (b, l[:, :, :0]), "no test examples"),
])
def test_shape_errors(mutate, message):
    batches, losses = _arrays()
    with pytest.raises(RunSetError, match=message):
        RunSet(*mutate(batches, losses))


def test_unknown_ids_nan_losses_and_empty_batches_are_named():
    batches, losses = _arrays()
    bad = batches.copy()
    bad[2, 1, 0] = 10
    with pytest.raises(RunSetError, match=r"batches\[2, 1, 0\] = 10 is not a training id in 0..9"):
        RunSet(bad, losses, n_train=10)
    nan = losses.copy()
    nan[4, 3, 1] = np.nan
    with pytest.raises(RunSetError, match="run 44 has a non-finite loss nan at step 3 for test example 1"):
        RunSet(batches, nan, run_ids=np.arange(40, 46))
    empty = batches.copy()
    empty[1, 2] = -1
    with pytest.raises(RunSetError, match="update 3 has an empty batch"):
        RunSet(empty, losses)
    with pytest.raises(RunSetError, match="integer"):
        RunSet(batches + 0.5, losses)
    with pytest.raises(RunSetError, match="duplicate"):
        RunSet(batches, losses, run_ids=np.zeros(6))


def test_split_is_by_whole_runs_and_reproducible():
    batches, losses = _arrays(R=10)
    runs = RunSet(batches, losses, run_ids=np.arange(100, 110))
    fitting, heldout = runs.split(3, seed=4)
    assert heldout.n_runs == 3 and fitting.n_runs == 7
    assert not set(fitting.run_ids) & set(heldout.run_ids)
    np.testing.assert_array_equal(runs.split(3, seed=4)[1].run_ids, heldout.run_ids)
    assert runs.split(0.2)[1].n_runs == 2
    with pytest.raises(RunSetError, match="cannot hold out"):
        runs.split(10)


def test_folds_partition_the_runs():
    batches, losses = _arrays(R=11)
    runs = RunSet(batches, losses)
    folds = runs.run_folds(4, seed=1)
    validation = np.concatenate([v for _, v in folds])
    assert sorted(validation) == list(range(11))
    for fit, val in folds:
        assert not set(fit) & set(val)


def test_select_tests():
    batches, losses = _arrays()
    runs = RunSet(batches, losses, test_ids=np.array([7, 8, 9]))
    picked = runs.select_tests([2, 0])
    assert picked.test_ids.tolist() == [9, 7]
    np.testing.assert_array_equal(picked.losses[..., 0], losses[..., 2])
