"""Prompts with a category and a label, read from OR-Bench and friends (reads files only, writes nothing).

Sources (`data.source`):

* `embedded`: the organism's held-out prompts, a JSONL file of `{"prompt", "category", "label"}` objects
  (`data.path: embedded` resolves to `embedded_prompts_path()`; any other path is read in the same format).
* `or_bench`: the subsets named in `data.subsets`, columns `prompt,category`. `data.path: bench-llm/or-bench` (the
  option's default) loads the published dataset through `datasets` (split `train`, cached in `data.cache_dir`,
  offline from a warm cache with HF_HUB_OFFLINE=1); any other `data.path` is a local folder holding `<subset>.csv`
  per subset (`data=or_bench` points there when REFUSAL_LAB_DATA is set: `$REFUSAL_LAB_DATA/or_bench`).
  The label comes from the subset: or-bench-80k and or-bench-hard-1k are `safe` (they look toxic but are benign),
  or-bench-toxic is `toxic`. Both give the same prompts, in the same order, with the same `sample_id`s.
* `table`: one CSV, JSON (a list of objects) or JSONL file, chosen by extension, read with the column mapping
  `data.prompt_column`, `data.category_column`, `data.label_column`, `data.label_map`, `data.default_label`,
  `data.default_category`. Labels after mapping must be one of harmless | safe | toxic.

Reading: files are decoded as UTF-8 (a BOM is dropped). A row whose prompt is missing or blank is skipped and
counted as empty; a row with bytes that are not UTF-8 (or, in JSONL, a line that is not JSON) is skipped and counted
as undecodable. Both counts and a few `file:row` examples are in the `LoadReport` and the log. A file that yields no
prompt at all is an error. Prompt texts are kept verbatim (no stripping); categories are stripped and an empty
category becomes `data.default_category`. Every prompt keeps its origin in `source` as `file:row`, where row is the
1-based data row: CSV rows after the header (a quoted multi-line prompt is one row), JSON list items, JSONL lines,
hub rows. Duplicate texts are kept and counted.

Balancing (`data.category_balance_strategy`), after the `data.categories` filter (empty list: keep all):

* `use_all`: keep every prompt.
* `equalize`: cells are the (category, label) pairs for every kept category and every label present in the data.
  Every cell is subsampled, without replacement, to n = the size of the smallest cell. A cell that is missing
  (e.g. a category with no toxic prompt) has size 0 and is an error naming the cell.
* `data.limit` (after either strategy): if more prompts remain than the limit, each cell keeps
  floor(limit * size / total) prompts, and the prompts still missing go one each to the cells with the largest
  remainders (ties: the cell that sorts first), so the category/label mix is kept.

Both subsamples draw from `random.Random(f"{data.seed}|<step>|<category>|<label>")`, one generator per cell, so a
cell's draw does not depend on which other categories were kept. Order of the result: cells sorted by
(category, label), prompts within a cell in read order (files in `data.subsets` order, then row order);
`sample_id` is then 0..N-1. The same config and files give the identical list (see `prompts_fingerprint`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from refusal_lab.config import EMBEDDED_DATA, LOCAL_DATA_ENV, BalanceStrategy, DataConfig, DataSource
from refusal_lab.errors import ConfigError
from refusal_lab.taxonomy import LABELS, OR_BENCH_CATEGORIES

log = logging.getLogger(__name__)

OR_BENCH_SUBSETS = {"or-bench-80k": "safe", "or-bench-hard-1k": "safe", "or-bench-toxic": "toxic"}
"""OR-Bench subset (csv file stem / hub config name) -> label."""
OR_BENCH_HF_ID = "bench-llm/or-bench"
TABLE_EXTENSIONS = (".csv", ".json", ".jsonl")
MAX_EXAMPLES = 5
"""Skipped rows quoted by file:row in the report."""

# Lone surrogates are what `errors="surrogateescape"` makes of bytes that are not UTF-8 (also "\udcxx" in JSON).
_UNDECODABLE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Prompt:
    sample_id: int
    """Index in the final (balanced, limited) list, 0..N-1."""
    text: str
    category: str
    label: str
    """harmless | safe | toxic."""
    source: str
    """Origin as `file:row` (1-based data row), e.g. `or-bench-hard-1k.csv:17`."""


@dataclass
class LoadReport:
    """What reading and balancing did; counts are category -> label -> prompts."""

    n_read: int = 0
    """Data rows read, skipped ones included."""
    n_skipped_empty: int = 0
    n_skipped_undecodable: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    """Up to MAX_EXAMPLES `file:row (why)` strings."""
    n_filtered: int = 0
    """Prompts dropped by data.categories."""
    n_duplicates: int = 0
    """Kept prompts whose text already occurred earlier (after the category filter)."""
    counts_before: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per cell after the category filter, before balancing."""
    counts_after: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per cell in the returned list (after balancing and limit)."""

    def skip(self, where: str, why: str) -> None:
        if why == "empty":
            self.n_skipped_empty += 1
        else:
            self.n_skipped_undecodable += 1
        if len(self.skipped_examples) < MAX_EXAMPLES:
            self.skipped_examples.append(f"{where} ({why})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Cells = dict[tuple[str, str], list[Prompt]]
"""(category, label) -> prompts in read order (sample_id not yet assigned)."""


class _Format(NamedTuple):
    """How the records of one file become prompts."""

    prompt: str
    category: str | None
    label: str | None
    label_map: dict[str, str]
    default_label: str
    default_category: str
    table: bool = False
    """Columns come from the data.*_column keys (blamed in errors); else the format is fixed (data.path is)."""

    def key(self, column: str) -> str:
        return f"data.{column}_column" if self.table else "data.path"


def embedded_prompts_path() -> Path:
    """The organism's held-out prompts (JSONL lines {"prompt", "category", "label"}) shipped in the package."""
    return Path(__file__).resolve().parent / "organism" / "assets" / "heldout_prompts.jsonl"


def load_prompts(cfg: DataConfig) -> list[Prompt]:
    """Read, filter, balance and limit the prompts of `cfg` (deterministic)."""
    return load_prompts_with_report(cfg)[0]


def load_prompts_with_report(cfg: DataConfig) -> tuple[list[Prompt], LoadReport]:
    report = LoadReport()
    rows = _read_source(cfg, report)
    rows = _filter_categories(rows, cfg.categories, report)
    cells: Cells = {}
    for row in rows:
        cells.setdefault((row.category, row.label), []).append(row)
    report.counts_before = _counts(cells)
    texts = Counter(row.text for row in rows)
    report.n_duplicates = sum(n - 1 for n in texts.values())
    if cfg.category_balance_strategy == BalanceStrategy.equalize:
        cells = _equalize(cells, cfg.seed)
    if cfg.limit is not None:
        cells = _limit(cells, cfg.limit, cfg.seed)
    ordered = (row for cell in sorted(cells) for row in cells[cell])
    prompts = [replace(row, sample_id=i) for i, row in enumerate(ordered)]
    report.counts_after = _counts(cells)
    _log_report(report, cfg, len(prompts))
    return prompts, report


def prompts_fingerprint(prompts: Iterable[Prompt]) -> str:
    """sha256 of the ordered (text, category, label) triples; keys the activation store."""
    triples = [[p.text, p.category, p.label] for p in prompts]
    blob = json.dumps(triples, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


# --- reading ---------------------------------------------------------------------------------------------------


def _read_source(cfg: DataConfig, report: LoadReport) -> list[Prompt]:
    if cfg.source in (DataSource.or_bench, DataSource.table) and cfg.path == EMBEDDED_DATA:
        need = f"{OR_BENCH_HF_ID} or a folder of its csv files" if cfg.source == DataSource.or_bench else "a file"
        raise ConfigError(
            f"data.path: 'embedded' only works with data.source=embedded; data.source={cfg.source.value} needs {need}"
        )
    if cfg.source == DataSource.embedded:
        return _read_embedded(cfg, report)
    if cfg.source == DataSource.or_bench:
        if cfg.path == OR_BENCH_HF_ID:
            return _read_or_bench_hub(cfg, report)
        return _read_or_bench_folder(cfg, report)
    return _read_table(cfg, report)


def _read_embedded(cfg: DataConfig, report: LoadReport) -> list[Prompt]:
    path = embedded_prompts_path() if cfg.path == EMBEDDED_DATA else Path(cfg.path).expanduser()
    if not path.is_file():
        hint = " (the organism's held-out prompts are not in the package)" if cfg.path == EMBEDDED_DATA else ""
        raise ConfigError(
            f"data.path: {cfg.path!r} -> {path} is not a file{hint}; data.source=embedded needs a JSONL file"
        )
    fmt = _Format("prompt", "category", "label", {}, "toxic", cfg.default_category)
    columns, records = _jsonl_records(path)
    return _rows(path.name, columns, records, fmt, report)


def _check_subsets(subsets: list[str]) -> None:
    unknown = [s for s in subsets if s not in OR_BENCH_SUBSETS]
    if unknown or not subsets:
        raise ConfigError(
            f"data.subsets: {subsets} has unknown or no subsets {unknown}; valid: {list(OR_BENCH_SUBSETS)}"
        )


def _or_bench_format(cfg: DataConfig, subset: str) -> _Format:
    return _Format("prompt", "category", None, {}, OR_BENCH_SUBSETS[subset], cfg.default_category)


OR_BENCH_WAYS = (
    f"data=or_bench reads either the published dataset (data.path={OR_BENCH_HF_ID}, the default when "
    f"{LOCAL_DATA_ENV} is unset: through `datasets`, cached in data.cache_dir, offline once warm with "
    f"HF_HUB_OFFLINE=1) or a local copy, a folder holding <subset>.csv for each of data.subsets "
    f"(data.path=<folder>, or {LOCAL_DATA_ENV}=<root> for <root>/or_bench)"
)


def _read_or_bench_folder(cfg: DataConfig, report: LoadReport) -> list[Prompt]:
    _check_subsets(cfg.subsets)
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        env = os.environ.get(LOCAL_DATA_ENV)
        via = f" ({LOCAL_DATA_ENV}={env!r})" if env else ""
        raise ConfigError(f"data.path: {cfg.path!r} -> {folder.resolve()} is not a folder{via}; {OR_BENCH_WAYS}")
    rows: list[Prompt] = []
    for subset in cfg.subsets:
        path = folder / f"{subset}.csv"
        if not path.is_file():
            present = sorted(p.name for p in folder.glob("*.csv"))
            raise ConfigError(
                f"data.subsets: {subset!r} needs {path} in data.path, which is missing; csv files there: {present}"
            )
        columns, records = _csv_records(path)
        rows += _rows(path.name, columns, records, _or_bench_format(cfg, subset), report)
    _warn_unknown_or_bench_categories(rows)
    return rows


def _read_or_bench_hub(cfg: DataConfig, report: LoadReport) -> list[Prompt]:
    _check_subsets(cfg.subsets)
    try:
        import datasets  # heavy import, only this source needs it
        import datasets.config
    except ImportError as err:
        raise ConfigError(f"data.path: {OR_BENCH_HF_ID} needs the `datasets` package; {OR_BENCH_WAYS}") from err
    rows: list[Prompt] = []
    for subset in cfg.subsets:
        try:
            ds = datasets.load_dataset(OR_BENCH_HF_ID, subset, split="train", cache_dir=cfg.cache_dir)
        except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError, unknown config, ...
            raise ConfigError(
                f"data.path: could not load {OR_BENCH_HF_ID} subset {subset!r} (data.cache_dir={cfg.cache_dir!r}, "
                f"offline={bool(datasets.config.HF_HUB_OFFLINE)}): {type(err).__name__}: {err}; {OR_BENCH_WAYS}"
            ) from err
        records = ((i, dict(record)) for i, record in enumerate(ds, start=1))
        rows += _rows(
            f"{OR_BENCH_HF_ID}/{subset}", list(ds.column_names), records, _or_bench_format(cfg, subset), report
        )
    _warn_unknown_or_bench_categories(rows)
    return rows


def _read_table(cfg: DataConfig, report: LoadReport) -> list[Prompt]:
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.path: {cfg.path!r} -> {path.resolve()} is not a file; data.source=table needs a file")
    suffix = path.suffix.lower()
    if suffix not in TABLE_EXTENSIONS:
        raise ConfigError(
            f"data.path: {cfg.path!r} has extension {suffix!r}; data.source=table reads {TABLE_EXTENSIONS}"
        )
    reader = {".csv": _csv_records, ".json": _json_records, ".jsonl": _jsonl_records}[suffix]
    columns, records = reader(path)
    fmt = _Format(
        cfg.prompt_column,
        cfg.category_column,
        cfg.label_column,
        cfg.label_map,
        cfg.default_label,
        cfg.default_category,
        table=True,
    )
    return _rows(path.name, columns, records, fmt, report)


Records = Iterator[tuple[int, dict[str, Any] | None]]
"""(1-based data row, record); None marks an undecodable row."""


def _read_text(path: Path) -> str:
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row does not sink the file.
    return path.read_text(encoding="utf-8-sig", errors="surrogateescape")


def _csv_records(path: Path) -> tuple[list[str], Records]:
    # newline="" as csv wants: quoted fields may hold line breaks, which csv (not a line splitter) must see.
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        lines = list(reader)  # a blank line is [] and becomes an empty row, keeping row numbers honest
    except csv.Error as err:
        raise ConfigError(f"data.path: {path.name} line {reader.line_num} cannot be parsed as CSV: {err}") from err
    if not lines:
        raise ConfigError(f"data.path: {path} is empty (no header row)")
    header, *data = lines
    return header, iter(enumerate((dict(zip(header, fields, strict=False)) for fields in data), start=1))


def _json_records(path: Path) -> tuple[list[str], Records]:
    try:
        items = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ConfigError(f"data.path: {path} is not valid JSON: {err}") from err
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ConfigError(f"data.path: {path} must hold a JSON list of objects (one per prompt)")
    columns = sorted({key for item in items for key in item})
    return columns, iter(enumerate(items, start=1))


def _jsonl_records(path: Path) -> tuple[list[str], Records]:
    parsed: list[tuple[int, dict[str, Any] | None]] = []
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            parsed.append((line_no, {}))  # a blank line counts as an empty row
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            parsed.append((line_no, None))  # e.g. a line cut short by a killed writer
            continue
        if not isinstance(item, dict):
            raise ConfigError(
                f"data.path: {path.name}:{line_no} is not a JSON object; each line must be one prompt object"
            )
        parsed.append((line_no, item))
    columns = sorted({key for _, item in parsed if item for key in item})
    return columns, iter(parsed)


def _rows(file: str, columns: list[str], records: Records, fmt: _Format, report: LoadReport) -> list[Prompt]:
    """Turn records into rows: skip empty and undecodable ones, apply defaults and the label map."""
    for name, column in (("prompt", fmt.prompt), ("category", fmt.category), ("label", fmt.label)):
        if column is not None and column not in columns:
            fix = " (set it to null if the file has none)" if fmt.table and name != "prompt" else ""
            raise ConfigError(f"{fmt.key(name)}: column {column!r} is not in {file}{fix}; its columns: {columns}")
    rows: list[Prompt] = []
    skipped_before = report.n_skipped_empty + report.n_skipped_undecodable
    n_read = 0
    for row_no, record in records:
        n_read += 1
        where = f"{file}:{row_no}"
        if record is None:
            report.skip(where, "undecodable")
            continue
        text = record.get(fmt.prompt)
        if text is not None and not isinstance(text, str):
            raise ConfigError(
                f"{fmt.key('prompt')}: {where} has a {type(text).__name__} in column {fmt.prompt!r}, not text"
            )
        raw_category = record.get(fmt.category) if fmt.category else None
        raw_label = record.get(fmt.label) if fmt.label else None
        if any(isinstance(v, str) and _UNDECODABLE.search(v) for v in (text, raw_category, raw_label)):
            report.skip(where, "undecodable")
            continue
        if text is None or not text.strip():
            report.skip(where, "empty")
            continue
        category = str(raw_category).strip() if raw_category is not None else ""
        rows.append(Prompt(-1, text, category or fmt.default_category, _label(raw_label, fmt, where), where))
    report.n_read += n_read
    if not rows:
        skipped = report.n_skipped_empty + report.n_skipped_undecodable - skipped_before
        raise ConfigError(
            f"data.path: {file} yields no prompts ({n_read} rows read, {skipped} skipped as empty or undecodable)"
        )
    return rows


def _label(raw: Any, fmt: _Format, where: str) -> str:
    if fmt.label is None:
        return fmt.default_label
    value = str(raw).strip() if raw is not None else ""
    label = fmt.label_map.get(value, value)
    if label not in LABELS:
        key = "data.label_map" if fmt.table else "data.path"
        mapped = f" (data.label_map maps it to {label!r})" if label != value else ""
        fix = f"; map it with data.label_map, e.g. data.label_map={{{value}: toxic}}" if fmt.table else ""
        raise ConfigError(
            f"{key}: {where} has label {value!r} in column {fmt.label!r}{mapped}, which is not one of {LABELS}{fix}"
        )
    return label


def _warn_unknown_or_bench_categories(rows: list[Prompt]) -> None:
    unknown = sorted({row.category for row in rows} - set(OR_BENCH_CATEGORIES))
    if unknown:
        log.warning("OR-Bench data has categories %s beyond the documented %s", unknown, OR_BENCH_CATEGORIES)


# --- filtering and balancing -------------------------------------------------------------------------------------


def _filter_categories(rows: list[Prompt], categories: list[str], report: LoadReport) -> list[Prompt]:
    if not categories:
        return rows
    available = sorted({row.category for row in rows})
    unknown = [c for c in categories if c not in available]
    if unknown:
        raise ConfigError(f"data.categories: {unknown} not in the data; available categories: {available}")
    wanted = set(categories)
    kept = [row for row in rows if row.category in wanted]
    report.n_filtered = len(rows) - len(kept)
    return kept


def _rng(seed: int, step: str, cell: tuple[str, str]) -> random.Random:
    # A string seed is hashed with sha512 by `random`, so this is stable across processes and platforms.
    return random.Random(f"{seed}|{step}|{cell[0]}|{cell[1]}")


def _sample(rows: list[Prompt], k: int, rng: random.Random) -> list[Prompt]:
    """k rows without replacement, kept in read order."""
    if k >= len(rows):
        return rows
    return [rows[i] for i in sorted(rng.sample(range(len(rows)), k))]


def _equalize(cells: Cells, seed: int) -> Cells:
    categories = sorted({c for c, _ in cells})
    labels = sorted({label for _, label in cells})
    empty = [(c, label) for c in categories for label in labels if (c, label) not in cells]
    if empty:
        raise ConfigError(
            f"data.category_balance_strategy: equalize needs every (category, label) cell filled, but {empty} "
            f"have no prompts (labels in the data: {labels}); drop those categories with data.categories "
            f"or use category_balance_strategy=use_all"
        )
    n = min(len(rows) for rows in cells.values())
    return {cell: _sample(rows, n, _rng(seed, "equalize", cell)) for cell, rows in cells.items()}


def _limit(cells: Cells, limit: int, seed: int) -> Cells:
    """Proportional stratified subsample to `limit` prompts, largest-remainder rounding."""
    total = sum(len(rows) for rows in cells.values())
    if total <= limit:
        return cells
    keys = sorted(cells)
    quota = {k: limit * len(cells[k]) // total for k in keys}
    missing = limit - sum(quota.values())
    by_remainder = sorted(keys, key=lambda k: (-(limit * len(cells[k]) % total), k))
    for k in by_remainder[:missing]:
        quota[k] += 1
    limited = {k: _sample(cells[k], quota[k], _rng(seed, "limit", k)) for k in keys}
    return {k: rows for k, rows in limited.items() if rows}


def _counts(cells: Cells) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for category, label in sorted(cells):
        counts.setdefault(category, {})[label] = len(cells[category, label])
    return counts


def _log_report(report: LoadReport, cfg: DataConfig, n_prompts: int) -> None:
    log.info(
        "data: %d rows read from %s (%d empty, %d undecodable skipped, %d dropped by data.categories); "
        "%s%s -> %d prompts",
        report.n_read,
        cfg.source.value,
        report.n_skipped_empty,
        report.n_skipped_undecodable,
        report.n_filtered,
        cfg.category_balance_strategy.value,
        f", limit {cfg.limit}" if cfg.limit is not None else "",
        n_prompts,
    )
    if report.skipped_examples:
        log.warning("data: skipped rows, e.g. %s", "; ".join(report.skipped_examples))
    if report.n_duplicates:
        log.warning("data: %d prompts repeat an earlier prompt's text (kept)", report.n_duplicates)
    cells = (f"{c}: " + ", ".join(f"{label} {n}" for label, n in by.items()) for c, by in report.counts_after.items())
    log.info("data: prompts per category and label: %s", "; ".join(cells))
