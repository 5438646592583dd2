"""Attacks on the SQL surface and the registry, each refused with a one-line error and no change.

Every test works on a copy of one small real warehouse (two complete runs, one still
streaming, a published and evaluated simulator) under ``tmp_path/home``, beside a folder
``tmp_path/outside`` that no query may read or write.
"""

import hashlib
import json
import shutil
from pathlib import Path

import polars as pl
import pytest

import simfluence as sf
from simfluence_platform.cli import main
from simfluence_platform.storage import registry
from simfluence_platform.storage.experiments import register_experiment
from simfluence_platform.storage.ingest import ingest
from simfluence_platform.storage.shards import LossShardWriter, RunHeader
from simfluence_platform.storage.warehouse import Warehouse


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A home folder built once; every test gets its own copy."""
    home = tmp_path_factory.mktemp("template")
    wh = Warehouse(home / "warehouse.duckdb")
    frame = lambda k: pl.DataFrame({"example_id": range(k), "text": ["x"] * k, "label": ["a"] * k})  # noqa: E731
    register_experiment(wh, "exp", {"seed": 1}, frame(12), frame(4))
    runs, _ = sf.synthetic.linear_runs(12, 4, 3, 6, 2, seed=0)
    for r in range(3):
        writer = LossShardWriter(wh.shard_root, RunHeader("exp", r, 6, 2, 4, curriculum_kind="uniform"))
        writer.write_batches(runs.batches[r])
        for t in range(7 if r < 2 else 3):
            writer.log(t, runs.losses[r, t])
        if r < 2:
            writer.complete()
        else:
            writer.flush()
        if r == 1:
            ingest(wh)  # runs 0 and 1 complete; run 2 is still streaming (live_losses)
    for simulator in (sf.MeanTrajectory(), sf.Constant()):
        info = registry.publish(wh, "exp", simulator.fit(runs), fit_run_ids=[0], heldout_run_ids=[1], data_hash="d",
                                config_hash="c", aliases=("latest", f"latest-{simulator.method}"))
        scores = sf.metrics.score({"m": simulator}, runs.select_runs([1]), n_boot=5).to_dicts()
        registry.record_evaluations(wh, "exp", [(info.version, scores, [1])])
    return home


@pytest.fixture
def wh(template, tmp_path, monkeypatch) -> Warehouse:
    shutil.copytree(template, tmp_path / "home")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret,value\nkey,42\n")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))  # DuckDB would install extensions under $HOME/.duckdb
    return Warehouse(tmp_path / "home" / "warehouse.duckdb")


def state(wh: Warehouse) -> dict:
    """Every file under the test's folder with its sha256, every table's row count, every run's status."""
    root = wh.home.parent
    files = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(root.rglob("*")) if p.is_file()}
    with wh.reader() as con:
        tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                            "WHERE table_type = 'BASE TABLE' ORDER BY 1").fetchall()]
        counts = {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchall()[0][0] for t in tables}
        statuses = con.execute("SELECT run_id, status FROM runs ORDER BY run_id").fetchall()
    return {"files": files, "counts": counts, "statuses": statuses}


def sql(wh: Warehouse, query: str, *options: str) -> int:
    return main(["sql", query, "--warehouse", str(wh.path), *options])


def refused(wh: Warehouse, query: str, capsys) -> str:
    """Run an attack: exit status 2, a one-line message, and the warehouse and files unchanged."""
    before = state(wh)
    status = sql(wh, query)
    captured = capsys.readouterr()
    assert status == 2, captured.out
    assert captured.out == ""
    assert captured.err.startswith("simfluence sql: error: ") and captured.err.count("\n") == 1, captured.err
    assert state(wh) == before
    return captured.err


def q(path: Path) -> str:
    return str(path).replace("'", "''")


# ---- one statement, read-only ----------------------------------------------------------------

def test_several_statements_are_refused(wh, capsys):
    err = refused(wh, "SELECT 1; SELECT 2", capsys)
    assert "one statement per call, got 2" in err


def test_detach_and_attach_read_write_is_refused(wh, capsys):
    attack = (f"ATTACH ':memory:' AS m (READ_WRITE); USE m; DETACH warehouse; ATTACH '{q(wh.path)}' AS w (READ_WRITE); "
              "UPDATE w.runs SET status = 'failed' WHERE run_id = 1; DELETE FROM w.losses WHERE run_id = 0; "
              "DROP TABLE w.simulators; SELECT 1")
    assert "one statement per call" in refused(wh, attack, capsys)
    err = refused(wh, f"ATTACH '{q(wh.path)}' AS w (READ_WRITE)", capsys)
    assert "only read-only queries are allowed" in err and "ATTACH" in err


def test_attaching_another_file_is_refused(wh, capsys):
    other = wh.home.parent / "outside" / "other.duckdb"
    err = refused(wh, f"ATTACH '{q(other)}' AS o", capsys)
    assert "only read-only queries are allowed" in err and not other.exists()


def test_copy_to_a_file_is_refused(wh, capsys):
    for target in (wh.home.parent / "outside" / "losses.csv", wh.shard_root / "losses.csv"):
        err = refused(wh, f"COPY losses TO '{q(target)}'", capsys)
        assert "only read-only queries are allowed" in err and "COPY" in err


def test_export_database_is_refused(wh, capsys):
    err = refused(wh, f"EXPORT DATABASE '{q(wh.home.parent / 'outside' / 'dump')}'", capsys)
    assert "only read-only queries are allowed" in err and "EXPORT" in err


@pytest.mark.parametrize("reader", ["read_text('{secret}')", "read_csv('{secret}')", "glob('{outside}/*')",
                                    "read_blob('{shards}/../../outside/secret.txt')", "glob('{home}/*')"])
def test_files_outside_the_shard_folder_cannot_be_read(wh, capsys, reader):
    outside = wh.home.parent / "outside"
    query = "SELECT * FROM " + reader.format(secret=q(outside / "secret.txt"), outside=q(outside),
                                             shards=q(wh.shard_root), home=q(wh.home))
    err = refused(wh, query, capsys)
    assert "only files under" in err and "secret,value" not in err


@pytest.mark.parametrize("attack", ["SET enable_external_access = true", "RESET lock_configuration",
                                    "PRAGMA enable_external_access = true", "SET allowed_directories = ['/']",
                                    "SET VARIABLE x = 1", "CALL pragma_version()", "CHECKPOINT", "BEGIN TRANSACTION"])
def test_settings_and_other_statements_are_refused(wh, capsys, attack):
    assert "only read-only queries are allowed" in refused(wh, attack, capsys)


def test_the_configuration_is_locked_before_the_query_runs(wh):
    settings = wh.query("SELECT current_setting('enable_external_access') AS external, "
                        "current_setting('lock_configuration') AS locked, "
                        "current_setting('autoload_known_extensions') AS autoload, "
                        "current_setting('allowed_directories') AS allowed")
    row = settings.row(0, named=True)
    assert (row["external"], row["locked"], row["autoload"]) == (False, True, False)
    assert str(wh.shard_root.resolve()) + "/" in row["allowed"]


@pytest.mark.parametrize("attack", ["INSTALL '{extension}'", "LOAD '{extension}'", "INSTALL excel", "LOAD json"])
def test_extensions_cannot_be_installed_or_loaded(wh, capsys, attack):
    extension = wh.home.parent / "outside" / "evil.duckdb_extension"
    extension.write_bytes(b"\0" * 512)
    err = refused(wh, attack.format(extension=q(extension)), capsys)
    assert "only read-only queries are allowed" in err and "LOAD" in err


def test_an_empty_query_is_refused(wh, capsys):
    assert "no SQL statement" in refused(wh, " ; -- nothing", capsys)


# ---- what must keep working --------------------------------------------------------------------

@pytest.mark.parametrize("query", ["SELECT * FROM leaderboard", "SELECT * FROM loss_curves", "SELECT * FROM final_losses",
                                   "SELECT * FROM example_coverage", "SELECT * FROM run_optimizers",
                                   "SELECT * FROM live_losses", "DESCRIBE runs", "SHOW TABLES", "SUMMARIZE losses",
                                   "FROM runs", "VALUES (1)", "WITH a AS (SELECT 1 AS x) SELECT x FROM a;",
                                   "SELECT count(*) FROM read_parquet('{shards}/*/run-*/losses-*.parquet')"])
def test_documented_queries_return_rows_as_json(wh, capsys, query):
    assert sql(wh, query.format(shards=q(wh.shard_root.resolve())), "--json") == 0
    result = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)
    assert result["rows"] and len(result["rows"][0]) == len(result["columns"])


def test_live_losses_show_the_streaming_run(wh):
    assert wh.query("SELECT count(*) AS n, min(run_id) AS run FROM live_losses").rows() == [(12, 2)]


# ---- output formats ----------------------------------------------------------------------------

NON_FINITE = "SELECT 'nan'::DOUBLE AS a, 'inf'::DOUBLE AS b, '-inf'::DOUBLE AS c, 1.5 AS d"


def test_json_output_is_valid_json_with_null_for_non_finite_numbers(wh, capsys):
    assert sql(wh, NON_FINITE, "--json") == 0  # --json after the subcommand
    assert json.loads(capsys.readouterr().out, parse_constant=pytest.fail) == {
        "columns": ["a", "b", "c", "d"], "rows": [[None, None, None, 1.5]]}
    assert main(["--json", "sql", NON_FINITE, "--warehouse", str(wh.path)]) == 0  # and before it
    assert json.loads(capsys.readouterr().out, parse_constant=pytest.fail)["rows"] == [[None, None, None, 1.5]]
    assert sql(wh, NON_FINITE, "--format", "json") == 0
    assert json.loads(capsys.readouterr().out, parse_constant=pytest.fail) == [{"a": None, "b": None, "c": None, "d": 1.5}]


def test_csv_output_writes_lists_and_structs_as_json(wh, capsys):
    assert sql(wh, "SELECT [1, 2] AS l, {'k': 'v', 'n': 'nan'::DOUBLE} AS s, NULL::INTEGER[] AS e, 'x' AS t",
               "--format", "csv") == 0
    assert capsys.readouterr().out == 'l,s,e,t\n"[1, 2]","{""k"": ""v"", ""n"": null}",,x\n'


def test_json_flag_after_any_subcommand(capsys):
    args = ["synthetic", "--n-train", "20", "--n-tests", "3", "--runs", "8", "--steps", "5", "--heldout", "3",
            "--bootstrap", "5", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out, parse_constant=pytest.fail)["scores"]


# ---- the registry ------------------------------------------------------------------------------

def versions(wh: Warehouse) -> dict[str, str]:
    aliases = registry.aliases(wh, "exp")
    return {"mean": aliases["latest-mean_trajectory"], "constant": aliases["latest-constant"]}


def test_a_bundle_swapped_into_another_versions_folder_is_refused(wh):
    v = versions(wh)
    folder = wh.registry_root / "exp"
    shutil.rmtree(folder / v["mean"])
    shutil.copytree(folder / v["constant"], folder / v["mean"])  # self-consistent, but the constant's bundle
    with pytest.raises(registry.RegistryError, match=f"manifest of version {v['constant']}, not {v['mean']}"):
        registry.load(wh, "exp", "latest-mean_trajectory")
    registry.load(wh, "exp", v["constant"])  # the untouched bundle still loads


def test_symlinked_bundles_and_files_are_refused(wh):
    v = versions(wh)
    folder = wh.registry_root / "exp"
    elsewhere = wh.home.parent / "outside" / v["mean"]
    shutil.move(folder / v["mean"], elsewhere)
    (folder / v["mean"]).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(registry.RegistryError, match="symbolic link"):
        registry.load(wh, "exp", v["mean"])
    (folder / v["mean"]).unlink()
    (folder / v["mean"]).symlink_to(folder / v["constant"], target_is_directory=True)  # inside the registry
    with pytest.raises(registry.RegistryError, match="symbolic link"):
        registry.load(wh, "exp", v["mean"])
    params = folder / v["constant"] / "parameters.safetensors"
    copy = wh.home.parent / "outside" / "parameters.safetensors"
    shutil.move(params, copy)
    params.symlink_to(copy)  # same bytes, but not inside the bundle
    with pytest.raises(registry.RegistryError, match="symbolic link"):
        registry.load(wh, "exp", v["constant"])


def test_an_alias_that_is_not_a_version_is_refused(wh):
    v = versions(wh)
    escape = "../../../outside/bundle"
    shutil.copytree(wh.registry_root / "exp" / v["mean"], wh.home.parent / "outside" / "bundle")
    with wh.writer() as con:  # what an SQL hole could have written
        con.execute("INSERT INTO simulators SELECT * REPLACE (? AS version) FROM simulators WHERE version = ?",
                    [escape, v["mean"]])
        con.execute("UPDATE aliases SET version = ? WHERE alias = 'latest'", [escape])
    with pytest.raises(registry.RegistryError, match="alias 'latest' of experiment 'exp' points at "
                                                     r"'(\.\./){3}outside/bundle', not a version"):
        registry.load(wh, "exp", "latest")
    with pytest.raises(registry.RegistryError, match="not a version"):
        registry.set_alias(wh, "exp", "best", escape)

