"""Fuzzing the config and data loaders (hypothesis): the only exception they ever raise is `PosttrainError`.

That is posttrain's documented error contract (posttrain/errors.py, README "Errors"): whatever bytes a config or
data file holds, whatever values a config names, loading either succeeds or raises `PosttrainError` with a
one-line message; anything else escaping (TypeError, RecursionError, ValueError ...) is a bug. The examples are
derandomized (a fixed seed per test) and bounded, so the file is deterministic in CI and runs in well under a
minute.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Literal, Union

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from posttrain.config.schema import Config, DataConfig, DataSource, build, dump_yaml, load_config, to_dict
from posttrain.data.formats import (
    REQUIRED,
    SHAREGPT_ROLES,
    load_splits,
    normalize,
    normalize_preference,
    parse_messages,
)
from posttrain.data.sources import read_source
from posttrain.errors import PosttrainError

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])
BASE = "recipe: sft\nmodel:\n  name_or_path: tiny:llama\ndata:\n  train: tiny:chat\noutput_dir: out\n"


def only_posttrain_errors(call):
    """Run `call`; a PosttrainError is fine (one line), any other exception fails the test. Returns the result."""
    try:
        return call()
    except PosttrainError as err:
        assert str(err) and "\n" not in str(err), repr(str(err))
        return None


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ----------------------------------------------------------------------------------------------------------
# Values of every kind, including the awkward ones.

SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**400), max_value=10**400)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["", "auto", "nan", ".inf", "1e400", "-1", "0", "1e-4", "+-5", "²", "tiny:chat", "~"]))
ANY = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                      max_size=4), max_leaves=12)


def _value_for(tp):
    """Values shaped like a config field of type `tp`, often plausible, sometimes anything at all."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return st.one_of(_tree_for(tp), st.text(max_size=12), ANY)
    if origin is Literal:
        return st.one_of(st.sampled_from(typing.get_args(tp)), ANY)
    if origin in (Union, types.UnionType):
        return st.one_of(*[_value_for(a) for a in typing.get_args(tp)])
    if origin is list:
        return st.one_of(st.lists(_value_for(typing.get_args(tp)[0]), max_size=3), ANY)
    if origin is dict:
        return st.one_of(st.dictionaries(st.sampled_from(["prompt", "completion", "messages", "text"]),
                                         st.text(max_size=6), max_size=3), ANY)
    plausible = {int: st.integers(min_value=-3, max_value=2**70), float: st.floats(), bool: st.booleans(),
                 str: st.text(max_size=12), type(None): st.none()}.get(tp, st.nothing())
    return st.one_of(plausible, ANY)


def _tree_for(cls):
    fields = typing.get_type_hints(cls)
    known = st.fixed_dictionaries({}, optional={name: st.deferred(lambda tp=tp: _value_for(tp))
                                                for name, tp in fields.items()})
    return st.one_of(known, st.builds(lambda a, b: {**a, **b}, known, st.dictionaries(st.text(max_size=8), ANY,
                                                                                       max_size=2)))


CONFIG_TREES = _tree_for(Config)


def _dotted_keys(cls, prefix=""):
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        keys.append(prefix + name)
        if dataclasses.is_dataclass(args[0]):
            keys += _dotted_keys(args[0], f"{prefix}{name}.")
    return keys


DOTTED = _dotted_keys(Config)
OVERRIDES = st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(DOTTED) | st.text(max_size=10),
                               st.text(max_size=16) | st.sampled_from(["[1", "{a: 1}", ".nan", "1e400", "&a [*a]",
                                                                       "!!binary aGk=", "null", "-1", "9" * 30])),
                     max_size=3)


# ----------------------------------------------------------------------------------------------------------
# (a) configs

@FUZZ
@given(tree=CONFIG_TREES)
def test_build_from_any_structure(tree):
    cfg = only_posttrain_errors(lambda: build(Config, tree))
    if cfg is not None:  # what validate prints loads back to the same config
        assert to_dict(build(Config, yaml.safe_load(dump_yaml(cfg)))) == to_dict(cfg)


@FUZZ
@given(tree=CONFIG_TREES, overrides=OVERRIDES)
def test_load_config_of_any_dumped_structure(work, tree, overrides):
    path = work / "tree.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    only_posttrain_errors(lambda: load_config(path, overrides))


YAML_CHARS = st.sampled_from(list("abcdefgh01239 :-[]{},&*!|>'\"#?%@`~.\t\n") + ["\x00", "\x85", "é", "\ufeff",
                                                                                    "train", "model", "&a", "*a"])


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.lists(YAML_CHARS, max_size=60).map("".join),
                      st.tuples(st.integers(0, len(BASE)), st.lists(YAML_CHARS, max_size=8).map("".join)).map(
                          lambda cut: BASE[: cut[0]] + cut[1] + BASE[cut[0]:])))
def test_load_config_of_any_text(work, text):
    path = work / "text.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    only_posttrain_errors(lambda: load_config(path))


@FUZZ
@given(data=st.binary(max_size=300))
def test_load_config_of_any_bytes(work, data):
    path = work / "bytes.yaml"
    path.write_bytes(data)
    only_posttrain_errors(lambda: load_config(path))


# ----------------------------------------------------------------------------------------------------------
# (b) data

COLUMNS = sorted({c for cols in REQUIRED.values() for c in cols} | {"input", "system", "question", "answer"})
ROLES = st.sampled_from(["system", "user", "assistant", "tool", "bot", "", *SHAREGPT_ROLES])
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": ROLES | SCALARS, "content": st.text(max_size=8) | SCALARS}),
    st.fixed_dictionaries({"from": ROLES | SCALARS, "value": st.text(max_size=8) | SCALARS}),
    ANY,
)
CELL = st.one_of(st.text(max_size=10), st.lists(MESSAGE, max_size=4), SCALARS, ANY)
RECORD = st.dictionaries(st.sampled_from(COLUMNS) | st.text(max_size=6), CELL, max_size=5)
DATA_CFG = st.builds(
    lambda fmt, frac, columns, system: dict(format=fmt, eval_fraction=frac, columns=columns, system_prompt=system),
    st.sampled_from(typing.get_args(typing.get_type_hints(DataConfig)["format"])), st.sampled_from([0.0, 0.5]),
    st.dictionaries(st.sampled_from(COLUMNS), st.sampled_from(COLUMNS) | st.text(max_size=4), max_size=2),
    st.none() | st.text(max_size=6))


def _load(path, data_cfg):
    cfg = DataConfig(train=[DataSource(str(path))], **data_cfg)
    return load_splits(cfg, seed=0)


def _write(path: Path, records: list[dict]) -> bool:
    """Write records in the file's format; False where that format cannot hold them (then the case is moot)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".csv":
        names = sorted({k for r in records for k in r})
        if not names:
            return False
        with path.open("w", newline="", encoding="utf-8", errors="surrogatepass") as handle:
            writer = csv.DictWriter(handle, fieldnames=names)
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if not isinstance(v, str) else v for k, v in r.items()}
                             for r in records)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pq.write_table(pa.Table.from_pylist(records), path)
        except (pa.ArrowException, ValueError, TypeError, OverflowError):
            return False
    return True


@FUZZ
@given(records=st.lists(RECORD, min_size=1, max_size=4), suffix=st.sampled_from([".jsonl", ".json", ".csv"]),
       data_cfg=DATA_CFG)
def test_load_any_records(work, records, suffix, data_cfg):
    path = work / f"records{suffix}"
    try:
        written = _write(path, records)
    except (ValueError, UnicodeEncodeError, OverflowError):  # e.g. a lone surrogate, a 400-digit int in csv
        written = False
    assume(written)
    only_posttrain_errors(lambda: _load(path, data_cfg))


@settings(FUZZ, max_examples=40)
@given(records=st.lists(RECORD, min_size=1, max_size=3), data_cfg=DATA_CFG)
def test_load_any_parquet_records(work, records, data_cfg):
    path = work / "records.parquet"
    assume(_write(path, records))
    only_posttrain_errors(lambda: _load(path, data_cfg))


@FUZZ
@given(data=st.one_of(st.binary(max_size=400), st.text(max_size=200).map(lambda t: t.encode("utf-8", "replace")),
                      st.text(max_size=100).map(lambda t: t.encode("utf-16", "replace"))),
       suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_read_any_bytes(work, data, suffix):
    path = work / f"bytes{suffix}"
    path.write_bytes(data)
    only_posttrain_errors(lambda: _load(path, {}))


@FUZZ
@given(rows=st.lists(RECORD, min_size=0, max_size=4), data_cfg=DATA_CFG)
def test_normalize_any_rows(rows, data_cfg):
    cfg = DataConfig(train=[DataSource("x")], **data_cfg)
    only_posttrain_errors(lambda: normalize(rows, [f"rows:{i}" for i in range(len(rows))], cfg, "train"))


@FUZZ
@given(row=RECORD)
def test_normalize_preference_of_any_row(row):
    only_posttrain_errors(lambda: normalize_preference(row, "row:1"))


@FUZZ
@given(value=st.one_of(st.lists(MESSAGE, max_size=5), ANY), sharegpt=st.booleans())
def test_parse_messages_of_anything(value, sharegpt):
    messages = only_posttrain_errors(lambda: parse_messages(value, "row:1", "messages",
                                                            SHAREGPT_ROLES if sharegpt else None))
    if messages is not None:
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in messages)


@FUZZ
@given(path=st.text(max_size=40).map(lambda p: "./" + p))
def test_read_source_of_any_local_path(work, path, monkeypatch):
    assume(".." not in path)  # stay inside the fuzz folder
    monkeypatch.chdir(work)  # path-like names only: nothing here reaches for the hub
    only_posttrain_errors(lambda: read_source(DataSource(path)))
