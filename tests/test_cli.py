"""The command line: JSON output and clear errors with a non-zero exit."""

import json

from simfluence_platform.cli import main


def test_synthetic_json(capsys):
    args = ["--json", "synthetic", "--n-train", "30", "--n-tests", "5", "--runs", "12", "--steps", "10",
            "--heldout", "4", "--bootstrap", "20"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    methods = {row["method"] for row in result["scores"]}
    assert {"simfluence_linear", "simfluence_additive", "constant", "mean_trajectory"} <= methods


def test_synthetic_table(capsys):
    assert main(["synthetic", "--n-train", "30", "--n-tests", "5", "--runs", "12", "--steps", "10", "--heldout", "4",
                 "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert "all_steps_mse" in out and "simfluence_linear" in out


def test_bad_input_exits_2_with_a_message(capsys):
    assert main(["synthetic", "--runs", "5", "--heldout", "5", "--n-tests", "3", "--steps", "4"]) == 2
    assert "cannot hold out 5 of 5 runs" in capsys.readouterr().err
