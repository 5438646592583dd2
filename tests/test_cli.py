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


def test_progress_follows_a_collection_from_its_markers(tmp_path, capsys):
    """Runs finishing while `progress` polls: it prints each new count with a rate, stops when
    every run has finished, and stops at once when the process it follows is gone."""
    import subprocess
    import threading

    import numpy as np

    from simfluence_platform.storage.shards import LossShardWriter, RunHeader
    from simfluence_platform.storage.warehouse import Warehouse

    wh = Warehouse(tmp_path / "warehouse.duckdb")

    def finish(run_id: int, ok: bool = True) -> None:
        writer = LossShardWriter(wh.shard_root, RunHeader("demo", run_id, 2, 1, 3))
        writer.write_batches(np.zeros((2, 1), dtype=np.int64))
        for step in range(3):
            writer.log(step, np.ones(3))
        writer.complete() if ok else writer.fail("loss became NaN")

    finish(0)
    later = threading.Timer(0.3, lambda: [finish(1), finish(2), finish(3, ok=False)])
    later.start()
    out = main(["--json", "progress", "--experiment", "demo", "--runs", "4", "--interval", "0.05",
                "--warehouse", str(wh.path)])
    later.join()
    assert out == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["complete"], result["failed"]) == (3, 1)
    main(["progress", "--experiment", "demo", "--runs", "4", "--warehouse", str(wh.path)])
    assert "3/4 runs complete, 1 failed" in capsys.readouterr().out
    gone = subprocess.Popen(["true"])
    gone.wait()
    main(["progress", "--experiment", "demo", "--runs", "10", "--while-pid", str(gone.pid), "--warehouse",
          str(wh.path)])
    assert "3/10 runs complete, 1 failed" in capsys.readouterr().out
