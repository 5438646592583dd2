"""The what-if CLI and the HTML report on a small real experiment (tiny preset, no Prefect)."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

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


def test_influence_ranks_every_example_in_the_run(experiment, tmp_path, capsys):
    code, out = run(capsys, "influence", "--experiment", "tiny", "--warehouse", str(experiment.path), "--ref",
                    "latest-tracin-cp-rescaled", "--top", "50", "--plot", str(tmp_path / "i.png"),
                    "--out", str(tmp_path / "i.csv"))
    assert code == 0
    ranking = pl.read_csv(tmp_path / "i.csv")
    assert ranking["effect"].is_sorted()
    assert max(abs(row["interaction"]) for row in out["interactions"]) < 1e-9  # TracIn is additive
    assert (tmp_path / "i.png").exists()


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
    for heading in ("Runs", "Example coverage", "Leaderboard (held-out runs)", "Trajectories: true vs simulated",
                    "Interactions", "Order effects"):
        assert heading in structure.headings
    assert len(structure.images) == 3 and all(src.startswith("data:image/png;base64,") for src in structure.images)
    assert structure.external == [] and structure.scripts == 0 and structure.tables >= 6


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed")
def test_report_renders_in_headless_chromium(experiment, tmp_path, capsys):
    main(["report", "--experiment", "tiny", "--warehouse", str(experiment.path), "--out", str(tmp_path / "r.html")])
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", f"file://{tmp_path / 'r.html'}"], capture_output=True,
                         text=True, timeout=120)
    assert "Simfluence report: tiny" in dom.stdout and "Leaderboard" in dom.stdout
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
