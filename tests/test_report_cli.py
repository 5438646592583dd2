"""The what-if CLI and the HTML report on a small real experiment (tiny preset, no Prefect)."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import polars as pl
import pytest

from simfluence_platform.cli import main
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
    code, out = run(capsys, "whatif", "--experiment", "tiny", "--warehouse", wh, "--out", str(tmp_path / "same.csv"))
    assert code == 0 and all(v == 0 for v in out["final_loss_change"].values())  # no edits: no change
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
    (["--edit", "insert:999@1"], "unknown training id 999"),
    (["--edit", "explode:1"], "unknown edit"),
    (["--run", "77"], "run 77"),
])
def test_bad_whatif_input_is_explained(experiment, capsys, args, message):
    code, err = run(capsys, "whatif", "--experiment", "tiny", "--warehouse", str(experiment.path), *args)
    assert code == 2 and re.search(message, err), err


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
