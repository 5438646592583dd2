"""Curriculum samplers, files and edits."""

import json

import numpy as np
import pytest

from simfluence import curricula
from simfluence.curricula import CurriculumError


def test_uniform_is_seeded_and_distinct_within_a_batch():
    a = curricula.uniform(50, 3, 20, 8, seed=1)
    assert a.shape == (3, 20, 8) and a.min() >= 0 and a.max() < 50
    np.testing.assert_array_equal(a, curricula.uniform(50, 3, 20, 8, seed=1))
    assert not np.array_equal(a, curricula.uniform(50, 3, 20, 8, seed=2))
    assert all(len(set(batch)) == 8 for run in a for batch in run)


def test_subset_epochs_trains_each_chosen_example_once_per_epoch():
    c = curricula.subset_epochs(100, 4, subset_size=10, epochs=3, batch_size=4, seed=0)
    assert c.shape == (4, 8, 4)
    for run in c:
        ids, counts = np.unique(run[run >= 0], return_counts=True)
        assert len(ids) == 10 and set(counts) == {3}
    assert (c[:, -1, 2:] == -1).all()


@pytest.mark.parametrize("call, message", [
    (lambda: curricula.uniform(5, 1, 1, 6), "batch size 6 must lie in 1..5"),
    (lambda: curricula.uniform(0, 1, 1, 1), "empty"),
    (lambda: curricula.subset_epochs(5, 1, 6, 1, 2), "subset_size"),
])
def test_impossible_requests(call, message):
    with pytest.raises(CurriculumError, match=message):
        call()


def test_files_round_trip(tmp_path):
    c = curricula.uniform(20, 2, 3, 2, seed=0)
    (tmp_path / "c.json").write_text(json.dumps(c.tolist()))
    np.save(tmp_path / "c.npy", c)
    rows = ["run,step,position,example_id"] + [
        f"{r},{t + 1},{p},{c[r, t, p]}" for r in range(2) for t in range(3) for p in range(2)
    ]
    (tmp_path / "c.csv").write_text("\n".join(rows))
    for name in ("c.json", "c.npy", "c.csv"):
        np.testing.assert_array_equal(curricula.load(tmp_path / name, 20), c)
    (tmp_path / "one.json").write_text(json.dumps(c[0].tolist()))
    np.testing.assert_array_equal(curricula.load(tmp_path / "one.json", 20), c[:1])


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(CurriculumError, match="does not exist"):
        curricula.load(tmp_path / "missing.json", 5)
    (tmp_path / "bad.json").write_text("[[[1, 99]]]")
    with pytest.raises(CurriculumError, match="bad.json: unknown training id 99"):
        curricula.load(tmp_path / "bad.json", 5)
    (tmp_path / "bad.csv").write_text("run,step\n1,1\n")
    with pytest.raises(CurriculumError, match="columns must include"):
        curricula.load(tmp_path / "bad.csv", 5)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(CurriculumError, match="unknown curriculum format"):
        curricula.load(tmp_path / "x.txt", 5)


def test_edits():
    c = np.array([[0, 1], [2, 3], [0, 4]])
    np.testing.assert_array_equal(curricula.remove(c, [0]), [[1, -1], [2, 3], [4, -1]])
    np.testing.assert_array_equal(curricula.insert(c, 9, 1), [[0, 1, 9], [2, 3, -1], [0, 4, -1]])
    moved = curricula.move(c, 0, 2)
    assert (moved == 0).sum() == 2 and (moved[1] == 0).sum() == 2 and (moved[[0, 2]] == 0).sum() == 0
    np.testing.assert_array_equal(curricula.reorder(c, [3, 1, 2]), c[[2, 0, 1]])
    np.testing.assert_array_equal(curricula.swap(c, 1, 3), c[[2, 1, 0]])
    np.testing.assert_array_equal(curricula.replace_batch(c, 2, [7, 8, 9])[1], [7, 8, 9])
    repeated = curricula.repeat(c, 4, 3, seed=0)
    assert (repeated == 4).sum() == 3 and all((row == 4).sum() <= 1 for row in repeated)
    assert (curricula.repeat(c, 0, 1) == 0).sum() == 1
    assert np.array_equal(c, [[0, 1], [2, 3], [0, 4]])  # inputs are never modified
    with pytest.raises(CurriculumError, match="not in this curriculum"):
        curricula.move(c, 5, 1)
    with pytest.raises(CurriculumError, match="permutation"):
        curricula.reorder(c, [1, 1, 2])
    with pytest.raises(CurriculumError, match="outside 1..3"):
        curricula.swap(c, 0, 1)


def test_coverage_counts_and_warns():
    c = np.array([[[0, 1], [0, 2]], [[0, -1], [1, 1]]])
    with pytest.warns(UserWarning, match="2 training examples appear fewer than 3 times"):
        cov = curricula.coverage(c, 4, min_occurrences=3)
    assert cov.occurrences.tolist() == [3, 3, 1, 0]
    assert cov.runs_with.tolist() == [2, 2, 1, 0]
