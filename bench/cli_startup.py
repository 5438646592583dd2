"""How fast a read-only command answers: ``simfluence sql "SELECT 42"`` against a real warehouse.

Baselines measured in the same run, each as a fresh process (median of ``--repeat``):
- ``duckdb floor``: Python starting, importing DuckDB and answering the query on the file,
  read-only, with nothing else (what no command line can beat);
- ``duckdb + polars floor``: the same plus importing Polars, which prints every table that is
  not a short one of plain columns (in the same format);
- ``eager imports``: the same command's process importing what the command line used to import
  up front (the simulators, the metrics with SciPy, Numba kernels, Polars) before answering;
- ``before (NumPy, PyArrow, Polars)``: the command with the modules it loaded before its read
  path was trimmed (the edit syntax help came with NumPy, the rows reached Polars, which printed
  every table, through PyArrow).

Usage: ``python bench/cli_startup.py [--repeat 7] [--json PATH]``. Prints seconds and ratios and
writes them to ``PATH`` (default ``bench/results/cli_startup.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from simfluence_platform.storage.experiments import register_experiment
from simfluence_platform.storage.warehouse import Warehouse

SIMFLUENCE = str(Path(sys.executable).parent / "simfluence")


def seconds(command: list[str], env: dict[str, str], repeat: int) -> float:
    """The median wall-clock seconds of ``command`` as a fresh process (it must succeed)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path, default=Path("bench/results/cli_startup.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        wh = Warehouse(Path(home) / "warehouse.duckdb")
        frame = pl.DataFrame({"example_id": range(4), "text": ["x"] * 4, "label": ["a"] * 4})
        register_experiment(wh, "bench", {}, frame, frame)
        env = {**os.environ, "SIMFLUENCE_HOME": home}
        floor = seconds([sys.executable, "-c", "import duckdb, sys; "
                         "print(duckdb.connect(sys.argv[1], read_only=True).sql('SELECT 42').fetchall())",
                         str(wh.path)], env, args.repeat)
        polars_floor = seconds([sys.executable, "-c", "import duckdb, polars, sys; "
                                "print(duckdb.connect(sys.argv[1], read_only=True).sql('SELECT 42').fetchall())",
                                str(wh.path)], env, args.repeat)
        before = seconds([sys.executable, "-c", "import numpy, pyarrow, polars; "
                          "from simfluence_platform.cli import main; raise SystemExit(main(['sql', 'SELECT 42']))"],
                         env, args.repeat)
        eager = seconds([sys.executable, "-c", "import simfluence.simulators, simfluence.metrics, "
                         "simfluence.momentum, simfluence.synthetic, polars, numpy, tqdm; "
                         "from simfluence_platform.cli import main; raise SystemExit(main(['sql', 'SELECT 42']))"],
                        env, args.repeat)
        command = seconds([SIMFLUENCE, "sql", "SELECT 42"], env, args.repeat)
    print(f"simfluence sql \"SELECT 42\" (median of {args.repeat} fresh processes)")
    print(f"  duckdb floor (import duckdb, query)   {floor:6.2f} s")
    print(f"  duckdb + polars floor                 {polars_floor:6.2f} s")
    print(f"  eager imports (the old command line)  {eager:6.2f} s")
    print(f"  before (NumPy, PyArrow, Polars)       {before:6.2f} s")
    print(f"  simfluence sql                        {command:6.2f} s   "
          f"{eager / command:.1f}x faster than eager imports, {before / command:.2f}x faster than before, "
          f"{command / floor:.1f}x the duckdb floor, {command / polars_floor:.2f}x the duckdb + polars floor")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"repeat": args.repeat, "duckdb_floor_seconds": floor,
                                     "duckdb_polars_floor_seconds": polars_floor, "eager_imports_seconds": eager,
                                     "before_seconds": before, "sql_seconds": command}, indent=2))


if __name__ == "__main__":
    main()
