"""Reading datasets: local .jsonl/.json/.csv/.parquet files, a folder of them, a hub dataset (name, subset,
split), or `tiny:TASK` (generated offline). Several sources are mixed, each keeping `fraction` of its rows.

Every row keeps its origin (``file:line``) so that an error can say exactly where the bad row is; formats.py
turns the raw rows into the shapes the rest of posttrain understands.
"""

from __future__ import annotations

import codecs
import csv
import json
import math
import random
from pathlib import Path

from posttrain.config.schema import DataSource
from posttrain.errors import PosttrainError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_ROWS = 10**8  # a mix larger than this is a typo in a fraction, not a dataset (and would exhaust memory)


# ----------------------------------------------------------------------------------------------------------
# Reading one source.


def kind_of(value) -> str:
    """A value's type as a JSON user knows it, for error messages."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # nan, inf: the JSON NaN/Infinity extensions, or an empty CSV/parquet cell
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


_MAGIC = {b"\x1f\x8b": "gzip-compressed; decompress it first (gunzip)", b"PK\x03\x04": "a zip archive; unzip it first",
          b"\x89PNG": "a PNG image, not a dataset",
          b"\x7fELF": "a program (ELF binary), not a dataset"}


def _check_text(path: Path, head: bytes) -> None:
    """Refuse, with what the file is instead, data that is not UTF-8 text (its first bytes: `head`)."""
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            raise PosttrainError(f"{path}: this is {what}")
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in head[:4096]:
        raise PosttrainError(f"{path}: not UTF-8 text (UTF-16/32 text or binary: it holds NUL bytes); "
                             "re-save the file as UTF-8")


def _decode(path: Path, raw: bytes, line: int | None = None) -> str:
    try:
        return raw.decode("utf-8-sig")  # Excel & co. write a BOM
    except UnicodeDecodeError as err:
        line = line or raw.count(b"\n", 0, err.start) + 1
        raise PosttrainError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); re-save the file as "
                             "UTF-8 (it may be Latin-1 or Windows-1252)") from None


def _empty(path: Path) -> PosttrainError:
    return PosttrainError(f"{path}: the file is empty, so the source(s) hold no rows; check the path")


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows, origins = [], []
    with path.open("rb") as handle:
        _check_text(path, handle.read(4096))
        handle.seek(0)
        for number, raw in enumerate(handle, start=1):
            text = _decode(path, raw, number)
            line = text.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:  # json's whole message, its column counted in the file's line
                lead = len(text) - len(text.lstrip())
                where = f"line {err.lineno} column {err.colno + lead} (char {err.pos + lead})"
                raise PosttrainError(f"{path}:{number}: invalid JSON ({err.msg}: {where}); fix or remove this "
                                     "line") from None
            except (ValueError, RecursionError) as err:  # a number of over 4300 digits; nesting too deep
                why = "nested too deeply" if isinstance(err, RecursionError) else str(err).split(":")[0]
                raise PosttrainError(f"{path}:{number}: unreadable JSON ({why}); fix or remove this line") from None
            if not isinstance(row, dict):
                raise PosttrainError(f"{path}:{number}: each line must be a JSON object, got {kind_of(row)}")
            rows.append(row)
            origins.append(f"{path}:{number}")
    if not rows:
        raise _empty(path)
    return rows, origins


def _read_json(path: Path) -> tuple[list[dict], list[str]]:
    raw = path.read_bytes()
    _check_text(path, raw)
    text = _decode(path, raw)
    del raw
    if not text.strip():
        raise _empty(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise PosttrainError(f"{path}:{err.lineno}: invalid JSON ({err})") from None
    except (ValueError, RecursionError) as err:  # a number of over 4300 digits; nesting too deep
        why = "nested too deeply" if isinstance(err, RecursionError) else str(err).split(":")[0]
        raise PosttrainError(f"{path}: unreadable JSON ({why})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise PosttrainError(f"{path}: a .json dataset must be a list of objects (or use .jsonl, one per line)")
    return data, [f"{path}[{i}]" for i in range(len(data))]


def _csv_rows(path: Path, reader) -> tuple[list[dict], list[str]]:
    rows, origins = [], []
    for row in reader:
        fields = [v for value in row.values() for v in (value if isinstance(value, list) else [value])]
        line = reader.line_num - sum(v.count("\n") for v in fields if isinstance(v, str))  # where it starts
        if None in row:
            raise PosttrainError(f"{path}:{line}: more fields than the header has columns; "
                                 "quote fields that contain commas")
        if None in row.values():
            raise PosttrainError(f"{path}:{line}: fewer fields than the header has columns; the "
                                 "file may be cut short, or a quote left open")
        rows.append(dict(row))
        origins.append(f"{path}:{line}")
    return rows, origins


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    with path.open("rb") as handle:
        _check_text(path, handle.read(4096))
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, path.stat().st_size + 1))  # a long text field is fine (the default: 128 KB)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows, origins = _csv_rows(path, reader)
            header = reader.fieldnames or []
    except UnicodeDecodeError:
        _decode(path, path.read_bytes())  # raises, naming the line of the first bad byte
        raise
    except csv.Error as err:
        raise PosttrainError(f"{path}: invalid CSV ({err})") from None
    finally:
        csv.field_size_limit(limit)
    if not "".join(header).strip() and not any("".join(row.values()).strip() for row in rows):  # blank
        raise _empty(path)
    return rows, origins


def _read_parquet(path: Path) -> tuple[list[dict], list[str]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise PosttrainError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
    return rows, [f"{path} row {i}" for i in range(len(rows))]


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _read_hub(source: DataSource) -> tuple[list[dict], list[str]]:
    import datasets

    try:
        dataset = datasets.load_dataset(source.path, source.subset, split=source.split)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PosttrainError(
            f"data source {source.path!r}: no such local file or folder, and loading it as a hub dataset "
            f"(split={source.split!r}) failed: {first_line}. Offline? Point data.train at a local file."
        ) from None
    rows = dataset.to_list()
    return rows, [f"{source.path}[{source.split}] row {i}" for i in range(len(rows))]


def looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.endswith(FILE_SUFFIXES) or "\\" in text or text.count("/") > 1


def _read_file(path: Path) -> tuple[list[dict], list[str]]:
    try:
        return READERS[path.suffix](path)
    except OSError as err:  # permission denied, I/O error ...
        raise PosttrainError(f"{path}: cannot read the file ({err.strerror or err}); check its permissions") from None


def read_source(source: DataSource) -> tuple[list[dict], list[str]]:
    """All rows of one source, with their origins."""
    if source.path.startswith("tiny:"):
        from posttrain.tiny import tiny_rows

        rows = tiny_rows(source.path[len("tiny:"):], source.split)
        return rows, [f"{source.path}[{source.split}] row {i}" for i in range(len(rows))]
    try:
        path = Path(source.path).expanduser()
        is_dir, is_file, exists, resolved = path.is_dir(), path.is_file(), path.exists(), path.resolve()
    except (OSError, ValueError, RuntimeError) as err:  # a NUL byte, a name too long, ~unknown_user ...
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)[:200]
        raise PosttrainError(f"data source {source.path[:200]!r}: not a usable path ({why})") from None
    if is_dir:
        files = sorted(p for p in path.rglob("*") if p.suffix in READERS and p.is_file())
        if not files:
            raise PosttrainError(f"{path}: folder holds no {'/'.join(FILE_SUFFIXES)} files")
        rows, origins = [], []
        for file in files:
            more_rows, more_origins = _read_file(file)
            rows += more_rows
            origins += more_origins
        return rows, origins
    if is_file:
        if path.suffix not in READERS:
            raise PosttrainError(f"{path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}")
        return _read_file(path)
    if exists:
        raise PosttrainError(f"{path}: not a regular file or folder (a device, socket or pipe?); give a data file")
    if looks_like_path(source.path):
        raise PosttrainError(f"data file {source.path!r} does not exist (checked {str(resolved)!r})")
    return _read_hub(source)


def mix_sources(sources: list[DataSource], seed: int) -> tuple[list[dict], list[str]]:
    """Concatenate sources, each subsampled (fraction < 1) or repeated (fraction > 1)."""
    rng = random.Random(seed)
    rows, origins = [], []
    for source in sources:
        source_rows, source_origins = read_source(source)
        indices = list(range(len(source_rows)))
        if source.fraction > 1 and len(indices) * source.fraction > MAX_ROWS:
            raise PosttrainError(f"data source {source.path!r}: fraction {source.fraction} would make "
                                 f"{len(indices) * source.fraction:.3g} rows from its {len(indices)}; lower it")
        whole, part = divmod(source.fraction, 1.0)
        chosen = indices * int(whole) + rng.sample(indices, round(part * len(indices)))
        rows += [source_rows[i] for i in chosen]
        origins += [source_origins[i] for i in chosen]
    return rows, origins
