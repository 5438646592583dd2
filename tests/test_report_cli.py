"""The what-if CLI and the HTML report on a small real experiment (tiny preset, no Prefect)."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import polars as pl
import pytest

import simfluence as sf
from simfluence_platform.cli import main
from simfluence_platform.storage import registry
from simfluence_platform.storage.experiments import load_runset
from simfluence_platform.storage.warehouse import Warehouse
from simfluence_platform.tasks.collect import collect
from simfluence_platform.tasks.config import preset
from simfluence_platform.tasks.evaluate import evaluate_and_report
from simfluence_platform.tasks.fit import fit_and_publish


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    wh = Warehouse(tmp_path_factory.mktemp("home") / "warehouse.duckdb")
    collect(preset("tiny"), 10, wh)
    fit_and_publish(wh, "tiny", ["simfluence_linear", "tracin_cp_rescaled", "mean_trajectory"], log=lambda m: None)
    evaluate_and_report(wh, "tiny", n_boot=20)
    return wh


def run(capsys, *args):
    code = main(["--json", *args])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else captured.err)


def test_whatif_and_simulate_write_their_files(experiment, tmp_path, capsys):
    wh = str(experiment.path)
    code, out = run(capsys, "whatif", "--experiment", "tiny", "--warehouse", wh, "--edit", "remove:3",
                    "--edit", "swap:1,2", "--tests", "0,2", "--out", str(tmp_path / "w.parquet"),
                    "--plot", str(tmp_path / "w.png"), "--mark", "3")
    assert code == 0 and out["run_id"] == 4 and set(out["final_loss_change"]) == {"0", "2"}
    table = pl.read_parquet(tmp_path / "w.parquet")
    assert table.columns == ["step", "test_id", "observed", "simulated_base", "simulated_whatif"]
    assert table.height == 7 * 2 and (tmp_path / "w.png").stat().st_size > 1000
    (tmp_path / "c.json").write_text(json.dumps([[[0, 1, 2, 3]] * 6]))
    code, out = run(capsys, "simulate", "--experiment", "tiny", "--warehouse", wh, "--curriculum",
                    str(tmp_path / "c.json"), "--out", str(tmp_path / "s.csv"))
    assert code == 0 and "observed" not in pl.read_csv(tmp_path / "s.csv").columns
    assert set(out["simulated_final_loss"]) == {str(t) for t in range(8)} and "warning" not in out
    assert all(len(curve) == 7 and curve[-1] == out["simulated_final_loss"][t]
               for t, curve in out["simulated_losses"].items())
    (tmp_path / "long.json").write_text(json.dumps([[[0, 1, 2, 3]] * 9]))
    code, out = run(capsys, "simulate", "--experiment", "tiny", "--warehouse", wh, "--curriculum",
                    str(tmp_path / "long.json"))
    assert code == 0 and "9 steps, past the 6" in out["warning"]


def test_whatif_changes_carry_intervals_and_the_error_flag(experiment, capsys):
    code, out = run(capsys, "whatif", "--experiment", "tiny", "--warehouse", str(experiment.path), "--edit", "remove:3",
                    "--bootstrap", "8")
    assert code == 0 and out["n_refits"] == 8
    for test_id, change in out["final_loss_change"].items():
        assert out["ci_low"][test_id] <= out["ci_high"][test_id]
    mean = out["mean_change"]
    assert mean["ci_low"] <= mean["ci_high"]
    assert mean["below_error"] == (abs(mean["effect"]) < out["heldout_final_error"]["mean"])
    code, out = run(capsys, "whatif", "--experiment", "tiny", "--warehouse", str(experiment.path), "--edit", "remove:3",
                    "--bootstrap", "0")
    assert code == 0 and out["mean_change"]["ci_low"] is None  # no refits, no interval (strict JSON null)
    main(["whatif", "--experiment", "tiny", "--warehouse", str(experiment.path), "--edit", "remove:3", "--bootstrap", "4"])
    printed = capsys.readouterr().out
    assert "largest decreases" in printed and "largest increases" in printed and "over 4 refits" in printed


def test_influence_ranks_every_example_in_the_run(experiment, tmp_path, capsys):
    code, out = run(capsys, "influence", "--experiment", "tiny", "--warehouse", str(experiment.path), "--ref",
                    "latest-tracin-cp-rescaled", "--top", "50", "--plot", str(tmp_path / "i.png"),
                    "--out", str(tmp_path / "i.csv"))
    assert code == 0
    ranking = pl.read_csv(tmp_path / "i.csv")
    assert ranking["effect"].is_sorted()
    assert max(abs(row["interaction"]) for row in out["interactions"]) < 1e-9  # TracIn is additive
    assert (tmp_path / "i.png").exists()
    assert all(row["effect"] < 0 for row in out["helpful"]) and all(row["effect"] > 0 for row in out["harmful"])
    assert len(out["helpful"]) + len(out["harmful"]) == ranking.filter(pl.col("effect") != 0).height
    assert all(row["label"] and row["text"] for row in out["helpful"] + out["harmful"])


def test_answers_for_chosen_tests_compare_with_the_error_of_their_mean(experiment, capsys):
    """With --tests, whatif's and influence's held-out error is the simulator's error of the mean
    final loss over those test examples on its held-out runs (what their mean answers are on),
    computed here from the stored runs."""
    wh = str(experiment.path)
    code, whatif_out = run(capsys, "whatif", "--experiment", "tiny", "--warehouse", wh, "--edit", "remove:3",
                           "--tests", "0,2", "--bootstrap", "0")
    assert code == 0
    code, influence_out = run(capsys, "influence", "--experiment", "tiny", "--warehouse", wh, "--tests", "0,2",
                              "--bootstrap", "0", "--pairs", "2")
    assert code == 0 and influence_out["version"] == whatif_out["version"]
    simulator, info = registry.load(experiment, "tiny", whatif_out["version"])
    held = load_runset(experiment, "tiny", run_ids=info.manifest["heldout_run_ids"], test_ids=simulator.test_ids)
    chosen = [list(simulator.test_ids).index(t) for t in (0, 2)]
    final = simulator.simulate(held.batches, held.initial_loss)[:, -1, chosen].mean(axis=1)
    expected = float(np.sqrt(np.mean((final - held.losses[:, -1, chosen].mean(axis=1)) ** 2)))
    assert whatif_out["heldout_final_error"]["mean"] == pytest.approx(expected, rel=1e-9)
    assert influence_out["heldout_final_error"] == pytest.approx(expected, rel=1e-9)
    mean = whatif_out["mean_change"]
    assert mean["below_error"] == (abs(mean["effect"]) < expected)


def test_effects_table_equals_brute_force_leave_one_out(experiment, tmp_path, capsys):
    """The stored table against removing each example from each held-out curriculum through the
    simulator, one simulation at a time; the views and the export carry the same numbers."""
    wh = str(experiment.path)
    code, out = run(capsys, "effects", "--experiment", "tiny", "--warehouse", wh, "--bootstrap", "6",
                    "--out", str(tmp_path / "effects.parquet"), "--tests", "2")
    assert code == 0 and out["n_refits"] == 6 and out["base"] == "heldout"
    simulator, info = registry.load(experiment, "tiny", out["version"])
    held = load_runset(experiment, "tiny", run_ids=info.manifest["heldout_run_ids"], test_ids=simulator.test_ids)
    total, count = {}, {}
    for curriculum, start in zip(held.batches, held.initial_loss):
        final = simulator.simulate(curriculum[None], start[None])[0, -1]
        for i in sorted({int(x) for x in curriculum.ravel() if x >= 0}):
            without = simulator.simulate(sf.curricula.remove(curriculum, [i])[None], start[None])[0, -1]
            total[i] = total.get(i, 0) + (final - without)
            count[i] = count.get(i, 0) + 1
    stored = Warehouse(experiment.path).query(
        f"SELECT train_id, test_id, effect, ci_low, ci_high, n_curricula, below_error, heldout_error FROM effects "
        f"WHERE experiment = 'tiny' AND version = '{out['version']}'")
    per_test = stored.filter(pl.col("test_id").is_not_null())
    assert per_test.height == len(total) * len(simulator.test_ids)
    for row in per_test.iter_rows(named=True):
        position = int(np.flatnonzero(simulator.test_ids == row["test_id"])[0])
        expected = total[row["train_id"]][position] / count[row["train_id"]]
        assert abs(row["effect"] - expected) < 1e-10 and row["n_curricula"] == count[row["train_id"]]
        assert row["ci_low"] <= row["ci_high"] and row["below_error"] == (abs(row["effect"]) < row["heldout_error"])
    mean = stored.filter(pl.col("test_id").is_null()).sort("train_id")
    np.testing.assert_allclose(mean["effect"].to_numpy(), [total[i].mean() / count[i] for i in sorted(total)],
                               rtol=1e-10)
    helpful = Warehouse(experiment.path).query(
        "SELECT rank, train_id, train_text, train_label, effect FROM most_helpful_examples "
        f"WHERE version = '{out['version']}' AND test_id IS NULL ORDER BY rank")
    assert helpful["rank"].to_list() == [1, 2, 3, 4, 5] and helpful["effect"].is_sorted()
    assert helpful["train_id"][0] == out["rankings"]["mean"]["helpful"][0]["train_id"]
    assert helpful["train_text"].str.len_chars().min() > 0 and helpful["train_label"].null_count() == 0
    harmful = Warehouse(experiment.path).query(
        "SELECT effect FROM most_harmful_examples WHERE test_id = 2 ORDER BY rank")
    assert harmful["effect"].is_sorted(descending=True) and harmful["effect"][0] == stored.filter(
        pl.col("test_id") == 2)["effect"].max()
    exported = pl.read_parquet(tmp_path / "effects.parquet")
    assert exported.height == stored.height and {"train_text", "test_label", "ci_low"} <= set(exported.columns)
    code, again = run(capsys, "effects", "--experiment", "tiny", "--warehouse", wh, "--bootstrap", "0",
                      "--curricula", "3")
    after = Warehouse(experiment.path).query(
        f"SELECT count(*) AS n, count(ci_low) AS with_ci, min(base) AS base FROM effects "
        f"WHERE version = '{out['version']}'").row(0, named=True)
    assert code == 0 and after["with_ci"] == 0 and after["base"] == "sampled:3"  # replaced, not appended
    assert after["n"] == again["rows"]


def test_registry_commands(experiment, capsys):
    wh = str(experiment.path)
    code, rows = run(capsys, "registry", "list", "--experiment", "tiny", "--warehouse", wh)
    assert code == 0 and {"version", "method", "aliases", "all_steps_mse"} <= set(rows[0])
    evaluated = next(r for r in rows if r["all_steps_mse"] is not None)
    code, shown = run(capsys, "registry", "show", evaluated["version"][:6], "--experiment", "tiny", "--warehouse", wh)
    assert code == 0 and shown["version"] == evaluated["version"] and shown["data_hash"]
    assert shown["heldout"]["all_steps_mse"] == evaluated["all_steps_mse"]
    code, compared = run(capsys, "registry", "compare", "latest", evaluated["version"], "--experiment", "tiny",
                         "--warehouse", wh)
    assert code == 0 and [c["ref"] for c in compared] == ["latest", evaluated["version"]]
    code, moved = run(capsys, "registry", "alias", "mine", evaluated["version"][:8], "--experiment", "tiny",
                      "--warehouse", wh)
    assert code == 0 and moved["version"] == evaluated["version"] and moved["previous"] is None
    assert registry.alias_version(experiment, "tiny", "mine") == evaluated["version"]
    other = next(r["version"] for r in rows if r["version"] != evaluated["version"])
    code, moved = run(capsys, "registry", "alias", "mine", other, "--experiment", "tiny", "--warehouse", wh)
    assert code == 0 and moved["previous"] == evaluated["version"] and moved["version"] == other


@pytest.mark.parametrize("args, message", [
    (["--ref", "nope"], "no simulator version or alias 'nope'"),
    (["--tests", "99"], r"test ids \[99\] are out of range"),
    (["--edit", "insert:999@1"], "training example id 999 is outside 0..15"),
    (["--edit", "explode:1"], "unknown edit"),
    (["--run", "77"], "run 77"),
])
def test_bad_whatif_input_is_explained(experiment, capsys, args, message):
    edit = [] if any(a == "--edit" for a in args) else ["--edit", "swap:1,2"]
    code, err = run(capsys, "whatif", "--experiment", "tiny", "--warehouse", str(experiment.path), *edit, *args)
    assert code == 2 and re.search(message, err), err


def snapshot(folder) -> dict:
    """Every file under ``folder`` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


BAD_INPUT = [  # (command line after the warehouse option, what the one-line message must say)
    (["whatif", "--experiment", "tiny"], "give at least one edit"),
    (["whatif", "--experiment", "tiny", "--edit", "remove:99"], "training example id 99 is outside 0..15"),
    (["whatif", "--experiment", "tiny", "--edit", "remove:-1"], "training example id -1 is outside"),
    (["whatif", "--experiment", "tiny", "--edit", "swap:1"], "expected 2 integers, got '1'"),
    (["whatif", "--experiment", "tiny", "--edit", "move:5"], "expected 1 integer"),
    (["whatif", "--experiment", "tiny", "--edit", "swap:1,2", "--tests", "a,b"], "--tests takes comma-separated"),
    (["influence", "--experiment", "tiny", "--pairs", "0"], "argument --pairs: must be at least 1, got 0"),
    (["influence", "--experiment", "tiny", "--top", "x"], "argument --top: expected an integer, got 'x'"),
    (["simulate", "--experiment", "tiny", "--curriculum", "{curriculum_object}"], "expected nested lists"),
    (["collect", "--preset", "tiny", "--runs", "0"], "argument --runs: must be at least 1, got 0"),
    (["collect", "--preset", "tiny", "--runs", "-1"], "argument --runs: must be at least 1, got -1"),
    (["collect", "--config", "{seed_config}", "--runs", "1"], "seed must be non-negative, got -1"),
    (["collect", "--config", "{newline_name}", "--runs", "1"], r"name 'x\\n' must use letters"),
    (["collect", "--config", "{huge_steps}", "--runs", "1"], "training.steps must lie in 1..100000"),
    (["fit", "--experiment", "nope"], "unknown experiment 'nope'"),
    (["fit", "--experiment", "tiny", "--methods", "magic"], "unknown methods"),
    (["evaluate", "--experiment", "tiny", "--versions", "0123456789abcdef"], "no simulator version or alias"),
    (["refit", "--experiment", "nope"], "unknown experiment 'nope'"),
    (["sql", "SELECT 1; SELECT 2"], "one statement per call"),
    (["effects", "--experiment", "tiny", "--curricula", "0"], "--curricula takes 'heldout' or a positive number"),
    (["effects", "--experiment", "tiny", "--out", "effects.txt"], "write tables as .csv or .parquet"),
    (["effects", "--experiment", "tiny", "--bootstrap", "-1"], "argument --bootstrap: must be at least 0"),
    (["registry", "alias", "mine", "--experiment", "tiny"], "registry alias takes ALIAS VERSION"),
    (["registry", "show", "--experiment", "tiny"], "takes at least one version or alias"),
    (["registry", "show", "abcd", "--experiment", "tiny"], "no simulator version or alias 'abcd'"),
    (["registry", "rename", "--experiment", "tiny"], "invalid choice: 'rename'"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a[:3]) + f" #{i}" for i, (a, _) in
                                                          enumerate(BAD_INPUT)])
def test_bad_input_table(experiment, tmp_path, capsys, args, message):
    """Every documented command with bad input: exit 2, one line naming the value, no
    traceback, nothing written, and no flow started first."""
    files = {
        "curriculum_object": ("c.json", '{"steps": [[1, 2]]}'),
        "seed_config": ("seed.yaml", "preset: tiny\nseed: -1\n"),
        "newline_name": ("name.yaml", 'preset: tiny\nname: "x\\n"\n'),
        "huge_steps": ("steps.yaml", "preset: tiny\ntraining: {steps: 100000000}\n"),
    }
    for key, (name, text) in files.items():
        (tmp_path / name).write_text(text)
    args = [a.format(**{k: str(tmp_path / n) for k, (n, _) in files.items()}) for a in args]
    before = snapshot(experiment.home)
    try:
        code = main([args[0], "--warehouse", str(experiment.path), *args[1:]])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and re.search(message, lines[0]) and "Traceback" not in err, err
    assert snapshot(experiment.home) == before


def test_a_bundle_of_another_experiment_is_refused(experiment, capsys):
    version = json.loads((next((experiment.registry_root / "tiny").iterdir()) / "manifest.json").read_text())["version"]
    code, err = run(capsys, "whatif", "--experiment", "other", "--ref", version, "--warehouse", str(experiment.path))
    assert code == 2 and "no simulator version or alias" in err


class _Structure(HTMLParser):
    def __init__(self):
        super().__init__()
        self.headings, self.images, self.external, self.scripts, self.tables, self._in = [], [], [], 0, 0, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("h1", "h2", "h3"):
            self._in = tag
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "script":
            self.scripts += 1
        if tag == "table":
            self.tables += 1
        for key in ("src", "href"):
            if attrs.get(key, "").startswith(("http:", "https:", "//")):
                self.external.append(attrs[key])

    def handle_data(self, data):
        if self._in:
            self.headings.append(data.strip())
            self._in = None


def test_report_is_self_contained(experiment, tmp_path, capsys):
    code, out = run(capsys, "report", "--experiment", "tiny", "--warehouse", str(experiment.path),
                    "--out", str(tmp_path / "report.html"))
    assert code == 0
    structure = _Structure()
    structure.feed((tmp_path / "report.html").read_text())
    for heading in ("Summary", "Runs", "Example coverage", "Leaderboard (held-out runs)",
                    "Trajectories: true vs simulated", "Most helpful", "Most harmful", "Interactions", "Order effects"):
        assert heading in structure.headings
    text = (tmp_path / "report.html").read_text()
    assert "The best simulator is" in text and "How far to trust them" in text and "intervals over 20 refits" in text
    assert len(structure.images) == 3 and all(src.startswith("data:image/png;base64,") for src in structure.images)
    assert structure.external == [] and structure.scripts == 0 and structure.tables >= 6


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed")
def test_report_renders_in_headless_chromium(experiment, tmp_path, capsys):
    main(["report", "--experiment", "tiny", "--warehouse", str(experiment.path), "--out", str(tmp_path / "r.html")])
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", f"file://{tmp_path / 'r.html'}"], capture_output=True,
                         text=True, timeout=120)
    assert "Simfluence report: tiny" in dom.stdout and "Leaderboard" in dom.stdout and "How far to trust them" in dom.stdout
    shot = subprocess.run(["chromium", *flags, "--window-size=1200,2400", f"--screenshot={tmp_path / 'r.png'}",
                           f"file://{tmp_path / 'r.html'}"], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and (tmp_path / "r.png").stat().st_size > 20_000


def test_two_versions_of_one_method_are_told_apart_and_leave_the_standing_report(experiment):
    standing = experiment.home / "reports" / "tiny" / "leaderboard.md"
    before = standing.read_text()
    first = json.loads((experiment.registry_root / "tiny").joinpath(
        registry.alias_version(experiment, "tiny", "latest-mean-trajectory"), "manifest.json").read_text())
    runs = first["fit_run_ids"][1:]  # a second mean-trajectory version, fitted on one run fewer
    second = registry.publish(experiment, "tiny", sf.MeanTrajectory().fit(load_runset(experiment, "tiny", run_ids=runs)),
                              fit_run_ids=runs, heldout_run_ids=first["heldout_run_ids"], data_hash="x",
                              config_hash=first["config_hash"], aliases=("second",))
    evaluation = evaluate_and_report(experiment, "tiny", refs=[first["version"], second.version,
                                                                 "latest-mean-trajectory"], n_boot=10)
    assert set(evaluation.scores["method"]) == {"mean_trajectory", f"mean_trajectory@{second.version[:8]}"}
    assert standing.read_text() == before and evaluation.report_dir.name.startswith("versions-")
    assert f"mean_trajectory@{second.version[:8]}" in evaluation.files[0].read_text()


def test_an_evaluation_reads_each_bundle_and_run_set_once_and_writes_once(experiment, monkeypatch):
    """The read-session: aliases that name one version are verified once, the held-out runs are
    loaded once, and every score is recorded in one writer transaction."""
    from simfluence_platform.tasks import session as session_module

    counts = {"verify": 0, "runsets": 0, "writers": 0}
    verify, load_runset_, writer = registry.verify, session_module.load_runset, Warehouse.writer

    def counting(name, function):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(registry, "verify", counting("verify", verify))
    monkeypatch.setattr(session_module, "load_runset", counting("runsets", load_runset_))
    monkeypatch.setattr(Warehouse, "writer", counting("writers", writer))
    refs = ["latest-simfluence-linear", "latest", "latest-tracin-cp-rescaled", "latest-mean-trajectory"]
    evaluation = evaluate_and_report(experiment, "tiny", refs=refs, n_boot=10)
    assert set(evaluation.scores["method"]) == {"simfluence_linear", "tracin_cp_rescaled", "mean_trajectory"}
    assert counts == {"verify": 3, "runsets": 1, "writers": 1}
