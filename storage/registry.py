"""The versioned simulator registry: content-addressed bundles indexed in the warehouse.

A bundle is a folder ``<registry_root>/<experiment>/<version>/`` holding the simulator's own
files (``simulator.json``, ``parameters.safetensors``; never a pickle) and ``manifest.json``:
method, hyperparameters, the fitting and held-out run ids, data and config hashes, code
version, metrics, and the sha256 of every file. The version is the first 16 hex digits of the
sha256 of the manifest's content part, so the same fit gives the same version. Bundles are
written in a staging folder and renamed into place (atomic publish); the ``simulators`` and
``aliases`` tables index them.

Loading binds a bundle to the version asked for: a version read from the database must have
a version's form (16 lowercase hex digits); the bundle is found from the experiment and the
version alone (never from the ``path`` column), must resolve to exactly
``<registry_root>/<experiment>/<version>`` and hold no symbolic link; its manifest must state
that version and hash to it, list exactly the files present, and every file must match its
sha256. A bundle copied or linked into another version's folder is therefore refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from simfluence.simulators import Simulator, load_simulator
from simfluence_platform.storage.warehouse import Warehouse, WarehouseError, check_name, fetch_one, transaction

MANIFEST = "manifest.json"
# The manifest's part that its version is the hash of.
CONTENT_KEYS = ("experiment", "name", "method", "hyperparameters", "fit_run_ids", "heldout_run_ids", "data_hash",
                "config_hash", "files")
VERSION_PATTERN = re.compile(r"[0-9a-f]{16}")


class RegistryError(WarehouseError):
    """Raised for unknown versions or aliases, tampered bundles and unsafe names."""


@dataclass(frozen=True)
class BundleInfo:
    """A published bundle: where it is and what its manifest says."""

    experiment: str
    version: str
    path: Path
    manifest: dict[str, Any]


def code_version() -> str:
    """The installed simfluence version, plus the git commit when run from a checkout."""
    from simfluence import __version__

    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    commit = ""
    try:
        ref = head.read_text().strip()
        commit = (head.parent / ref[5:]).read_text().strip()[:12] if ref.startswith("ref: ") else ref[:12]
    except OSError:
        pass
    return f"{__version__}+{commit}" if commit else __version__


def is_version(text: object) -> bool:
    """Whether ``text`` has a version's form: 16 lowercase hex digits."""
    return isinstance(text, str) and VERSION_PATTERN.fullmatch(text) is not None


def _version_of(content: dict[str, Any]) -> str:
    """The version of a manifest's content part: the first 16 hex digits of its sha256."""
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish(
    warehouse: Warehouse,
    experiment: str,
    simulator: Simulator,
    *,
    fit_run_ids: list[int] | np.ndarray,
    heldout_run_ids: list[int] | np.ndarray,
    data_hash: str,
    config_hash: str,
    metrics: dict[str, float] | None = None,
    aliases: tuple[str, ...] = ("latest",),
    name: str | None = None,
) -> BundleInfo:
    """Save a fitted simulator as a bundle, index it, and point ``aliases`` at it. Idempotent.

    ``name``: what the leaderboard calls it (e.g. ``tracin_cp_rescaled``; default the class's method).
    """
    check_name(experiment, "experiment name")
    for alias in aliases:
        check_name(alias, "alias")
    root = warehouse.registry_root / experiment
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(root)
    staging = root / f".staging-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        simulator.save(staging)
        files = {p.name: _sha256(p) for p in sorted(staging.iterdir())}
        content = {
            "experiment": experiment,
            "name": name or simulator.method,
            "method": simulator.method,
            "hyperparameters": simulator.hyperparameters(),
            "fit_run_ids": sorted(int(r) for r in fit_run_ids),
            "heldout_run_ids": sorted(int(r) for r in heldout_run_ids),
            "data_hash": data_hash,
            "config_hash": config_hash,
            "files": files,
        }
        version = _version_of(content)
        manifest = {**content, "version": version, "code_version": code_version(), "metrics": metrics or {}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        final = root / version
        if final.exists():
            shutil.rmtree(staging)
        else:
            os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    manifest = verify(bundle_folder(warehouse, experiment, version), version)  # ours, or one published before
    with warehouse.writer() as con, transaction(con):
        con.execute(
            "INSERT INTO simulators (experiment, version, method, path, fit_run_ids, heldout_run_ids, "
            "hyperparameters, data_hash, config_hash, code_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            [experiment, version, manifest["name"], f"{experiment}/{version}", manifest["fit_run_ids"],
             manifest["heldout_run_ids"], json.dumps(manifest["hyperparameters"], sort_keys=True), data_hash,
             config_hash, manifest["code_version"]],
        )
        for alias in aliases:
            _set_alias(con, experiment, alias, version)
    return BundleInfo(experiment, version, final, manifest)


def _remove_abandoned_staging(root: Path) -> None:
    """Delete the staging folders of publishes whose process is gone (killed mid-publish)."""
    for folder in root.glob(".staging-*"):
        pid = folder.name.split("-")[1]
        if pid.isdigit():
            if int(pid) == os.getpid():
                continue  # another publish of this process, under way
            try:
                os.kill(int(pid), 0)
                continue  # that publish is still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # a live process of another user
        shutil.rmtree(folder, ignore_errors=True)


def _set_alias(con, experiment: str, alias: str, version: str) -> None:
    con.execute(
        "INSERT INTO aliases (experiment, alias, version) VALUES (?, ?, ?) "
        "ON CONFLICT (experiment, alias) DO UPDATE SET version = excluded.version, updated_at = now()",
        [experiment, alias, version],
    )


def alias_version(warehouse: Warehouse, experiment: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None when the experiment has no such alias."""
    with warehouse.reader() as con:
        row = fetch_one(con, "SELECT version FROM aliases WHERE experiment = ? AND alias = ?", [experiment, alias])
    return None if row is None else row[0]


def set_alias(warehouse: Warehouse, experiment: str, alias: str, version: str) -> None:
    """Point ``alias`` (e.g. ``best`` or a user name) at an existing version."""
    check_name(alias, "alias")
    if not is_version(version):
        raise RegistryError(f"{version!r} is not a version (16 lowercase hex digits)")
    with warehouse.writer() as con:
        if fetch_one(con, "SELECT 1 FROM simulators WHERE experiment = ? AND version = ?", [experiment, version]) is None:
            raise RegistryError(f"experiment {experiment!r} has no simulator version {version!r}")
        _set_alias(con, experiment, alias, version)


def resolve(warehouse: Warehouse, experiment: str, ref: str) -> BundleInfo:
    """A version or alias of an experiment -> its bundle, with the manifest read and checked."""
    version = resolve_version(warehouse, experiment, ref)
    path = bundle_folder(warehouse, experiment, version)
    return BundleInfo(experiment, version, path, verify(path, version))


def resolve_version(warehouse: Warehouse, experiment: str, ref: str) -> str:
    """A version, a unique prefix of one (at least 4 hex digits) or an alias of an experiment ->
    the version it names (checked to exist; the bundle itself is not read)."""
    check_name(experiment, "experiment name")
    check_name(ref, "version or alias")
    with warehouse.reader() as con:
        row = fetch_one(con, "SELECT version FROM aliases WHERE experiment = ? AND alias = ?", [experiment, ref])
        if row is not None and not is_version(row[0]):
            raise RegistryError(f"alias {ref!r} of experiment {experiment!r} points at {row[0]!r}, not a version "
                                "(16 lowercase hex digits); refusing to load it")
        version = row[0] if row else ref
        if row is None and re.fullmatch(r"[0-9a-f]{4,15}", ref):  # a unique prefix of a version
            matches = [r[0] for r in con.execute(
                "SELECT version FROM simulators WHERE experiment = ? AND starts_with(version, ?) ORDER BY version",
                [experiment, ref]).fetchall()]
            if len(matches) > 1:
                raise RegistryError(f"version prefix {ref!r} of experiment {experiment!r} is ambiguous: "
                                    f"{', '.join(matches)}")
            version = matches[0] if matches else ref
        if not is_version(version) or fetch_one(
                con, "SELECT 1 FROM simulators WHERE experiment = ? AND version = ?", [experiment, version]) is None:
            known = [r[0] for r in con.execute(
                "SELECT alias FROM aliases WHERE experiment = ? ORDER BY alias", [experiment]).fetchall()]
            raise RegistryError(f"experiment {experiment!r} has no simulator version or alias {ref!r} "
                                f"(aliases: {', '.join(known) or 'none'})")
    return version


def bundle_folder(warehouse: Warehouse, experiment: str, version: str) -> Path:
    """``<registry_root>/<experiment>/<version>``, refused unless it resolves to exactly that
    place: neither the bundle's folder nor its experiment's may be a symbolic link (the
    registry folder itself may be)."""
    folder = warehouse.registry_root / experiment / version
    expected = warehouse.registry_root.resolve() / experiment / version
    if folder.resolve() != expected:
        raise RegistryError(f"{folder}: a symbolic link (to {folder.resolve()}); a bundle must be a real folder "
                            f"in {expected.parent}")
    return folder


def verify(path: Path, version: str) -> dict[str, Any]:
    """Check a folder as the bundle of ``version``; return its manifest.

    The folder's name, the manifest's version and the manifest's hash must all be ``version``;
    the folder must hold exactly the files the manifest lists plus the manifest, none of them a
    symbolic link, each matching its sha256.
    """
    if path.name != version:
        raise RegistryError(f"{path}: the folder of version {path.name}, not {version}")
    if not path.is_dir():
        raise RegistryError(f"{path}: no bundle here; the registry lost version {version}")
    entries = sorted(path.iterdir())
    for entry in entries:
        if entry.is_symlink() or not entry.is_file():
            what = "a symbolic link" if entry.is_symlink() else "not a plain file"
            raise RegistryError(f"{entry}: {what} in a bundle; refusing to load it")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise RegistryError(f"{path}: no {MANIFEST}; not a registry bundle")
    try:
        manifest = json.loads(manifest_path.read_text())
        content = {key: manifest[key] for key in CONTENT_KEYS}
        stated = manifest["version"]
    except (ValueError, KeyError, TypeError) as error:
        raise RegistryError(f"{manifest_path}: not a bundle manifest ({type(error).__name__}: {error})") from None
    if stated != version:
        raise RegistryError(f"{manifest_path}: the manifest of version {stated}, not {version} (a bundle moved or "
                            "copied into another version's folder?); refusing to load it")
    if _version_of(content) != version:
        raise RegistryError(f"{manifest_path}: manifest does not hash to its version {version}")
    present = sorted(entry.name for entry in entries if entry.name != MANIFEST)
    if present != sorted(manifest["files"]):
        raise RegistryError(f"{path}: holds {present}, its manifest lists {sorted(manifest['files'])}; "
                            "refusing to load it")
    for name, expected in manifest["files"].items():
        if _sha256(path / name) != expected:
            raise RegistryError(f"{path / name}: content does not match the hash in {MANIFEST}; refusing to load")
    return manifest


def load(warehouse: Warehouse, experiment: str, ref: str = "latest") -> tuple[Simulator, BundleInfo]:
    """Load a verified simulator by version or alias."""
    info = resolve(warehouse, experiment, ref)
    return load_simulator(info.path), info


def list_versions(warehouse: Warehouse, experiment: str) -> list[dict[str, Any]]:
    """Every published version of an experiment with its aliases, newest first."""
    with warehouse.reader() as con:
        rows = con.execute(
            "SELECT s.version, s.method, s.created_at, s.code_version, "
            "list(a.alias ORDER BY a.alias) FILTER (WHERE a.alias IS NOT NULL) AS aliases "
            "FROM simulators s LEFT JOIN aliases a USING (experiment, version) "
            "WHERE s.experiment = ? GROUP BY ALL ORDER BY s.created_at DESC", [experiment]).fetchall()
    return [{"version": v, "method": m, "created_at": str(c), "code_version": cv, "aliases": a or []}
            for v, m, c, cv, a in rows]


def compare(warehouse: Warehouse, experiment: str, refs: list[str]) -> list[dict[str, Any]]:
    """Manifests' methods, hyperparameters, runs and metrics of several versions, side by side."""
    out = []
    for ref in refs:
        info = resolve(warehouse, experiment, ref)
        m = info.manifest
        out.append({"ref": ref, "version": info.version, "name": m["name"], "method": m["method"],
                    "hyperparameters": m["hyperparameters"], "n_fit_runs": len(m["fit_run_ids"]),
                    "n_heldout_runs": len(m["heldout_run_ids"]), "metrics": m["metrics"],
                    "data_hash": m["data_hash"], "code_version": m.get("code_version")})
    return out


def record_evaluations(warehouse: Warehouse, experiment: str,
                       evaluations: list[tuple[str, list[dict[str, Any]], list[int]]]) -> None:
    """Write held-out scores to ``evaluations``, all in one transaction: for each (version,
    rows with ``metric``, ``value``, ``ci_low``, ``ci_high``, held-out run ids).
    Re-evaluating a version on the same held-out runs replaces its scores."""
    with warehouse.writer() as con, transaction(con):
        for version, scores, heldout_run_ids in evaluations:
            if fetch_one(con, "SELECT 1 FROM simulators WHERE experiment = ? AND version = ?",
                         [experiment, version]) is None:
                raise RegistryError(f"experiment {experiment!r} has no simulator version {version!r}")
            held = sorted(int(r) for r in heldout_run_ids)
            heldout_hash = hashlib.sha256(json.dumps(held).encode()).hexdigest()[:16]
            for row in scores:
                con.execute(
                    "INSERT INTO evaluations (experiment, version, metric, value, ci_low, ci_high, heldout_hash, "
                    "n_heldout) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (experiment, version, metric, heldout_hash) "
                    "DO UPDATE SET value = excluded.value, ci_low = excluded.ci_low, ci_high = excluded.ci_high, "
                    "evaluated_at = now()",
                    [experiment, version, row["metric"], row["value"], row["ci_low"], row["ci_high"], heldout_hash,
                     len(held)],
                )


def aliases(warehouse: Warehouse, experiment: str) -> dict[str, str]:
    """Every alias of the experiment and the version it points at."""
    with warehouse.reader() as con:
        rows = con.execute("SELECT alias, version FROM aliases WHERE experiment = ? ORDER BY alias",
                           [experiment]).fetchall()
    return dict(rows)


def evaluation_scores(warehouse: Warehouse, experiment: str, versions: list[str]) -> pl.DataFrame:
    """The recorded held-out scores of these versions: method, version, metric, value, ci_low, ci_high."""
    with warehouse.reader() as con:
        return con.sql("SELECT s.method, s.version, e.metric, e.value, e.ci_low, e.ci_high FROM evaluations e "
                       "JOIN simulators s USING (experiment, version) WHERE e.experiment = ? AND list_contains(?, version) "
                       "ORDER BY s.method, e.metric", params=[experiment, versions]).pl()


def leaderboard_by_version(warehouse: Warehouse, experiment: str) -> dict[str, dict[str, Any]]:
    """version -> its held-out scores (the ``leaderboard`` view's columns), for evaluated versions."""
    with warehouse.reader() as con:
        frame = con.sql("SELECT * EXCLUDE (experiment, method, created_at) FROM leaderboard WHERE experiment = ?",
                        params=[experiment]).pl()
    return {row.pop("version"): row for row in frame.to_dicts()}
