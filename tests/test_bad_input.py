"""Bad input, file by file and key by key: every case ends in ONE clear line, never a traceback.

The contract (posttrain/errors.py): a failure caused by the user's input is a `PosttrainError` whose message is
one line naming the file (and line or key where there is one) and how to fix it; the CLI prints it as
`posttrain: error: ...` and exits 2. Each case below is checked at the loader (the Python functions) and a
representative few through the CLI, in-process and as a real subprocess.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from posttrain.config.schema import Config, DataConfig, DataSource, build, load_config
from posttrain.data.formats import load_splits, normalize
from posttrain.data.sources import read_source
from posttrain.errors import PosttrainError

BASE = "recipe: sft\nmodel:\n  name_or_path: tiny:llama\ndata:\n  train: tiny:chat\noutput_dir: out\n"
MSG = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
GOOD = json.dumps({"messages": MSG})
RNG = random.Random(0)
GARBAGE = bytes(RNG.randrange(256) for _ in range(4096))  # fixed "random" bytes (holds NULs)


def one_line_error(call, *patterns: str) -> str:
    """`call()` raises PosttrainError with a one-line message matching every regex in `patterns`."""
    with pytest.raises(PosttrainError) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message and "Traceback" not in message, message
    assert len(message) < 1000, f"message too long ({len(message)} chars): {message[:300]}"
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    return message


def load_data(path, **data_cfg):
    """The whole data path of a run: read, mix, hold out, normalize."""
    cfg = DataConfig(train=[DataSource(str(path))], eval_fraction=0, **data_cfg)
    return load_splits(cfg, seed=0)[0]


def jsonl_text(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def parquet_bytes(rows, tmp_path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "_tmp.parquet"
    pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({"text": pa.array([], pa.string())}), path)
    data = path.read_bytes()
    path.unlink()
    return data


# ----------------------------------------------------------------------------------------------------------
# Data files: (id, file name, content, data-config overrides, expected regexes). Content is bytes, text, or a
# function of tmp_path returning bytes (parquet).

FULL_PARQUET = lambda t: parquet_bytes([{"text": "a" * 50}] * 40, t)  # noqa: E731

DATA_CASES = [
    # truncated (cut mid-record)
    ("truncated-jsonl", "d.jsonl", GOOD + "\n" + GOOD[:25], {}, [r"d\.jsonl:2: invalid JSON"]),
    ("truncated-json", "d.json", "[" + GOOD + ",\n" + GOOD[:25], {}, [r"d\.json:2: invalid JSON"]),
    ("truncated-csv-open-quote", "d.csv", 'prompt,completion\nq,a\n"q2,a2\nq3', {},
     [r"d\.csv:3: fewer fields than the header", "quote"]),
    ("truncated-csv-row", "d.csv", "prompt,completion\nq,a\nq2", {}, [r"d\.csv:3: fewer fields"]),
    ("truncated-parquet", "d.parquet", lambda t: FULL_PARQUET(t)[:300], {}, [r"d\.parquet: not a readable parquet"]),
    ("truncated-parquet-footer", "d.parquet", lambda t: FULL_PARQUET(t)[:-3], {},
     [r"d\.parquet: not a readable parquet"]),
    # binary garbage
    ("garbage-jsonl", "d.jsonl", GARBAGE, {}, [r"d\.jsonl: not UTF-8 text"]),
    ("garbage-json", "d.json", GARBAGE, {}, [r"d\.json: not UTF-8 text"]),
    ("garbage-csv", "d.csv", GARBAGE, {}, [r"d\.csv: not UTF-8 text"]),
    ("garbage-parquet", "d.parquet", GARBAGE, {}, [r"d\.parquet: not a readable parquet"]),
    ("gzip-jsonl", "d.jsonl", gzip.compress(GOOD.encode()), {}, [r"d\.jsonl: .*gzip-compressed"]),
    ("png-csv", "d.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + GARBAGE[:64], {}, [r"d\.csv: .*PNG"]),
    ("elf-json", "d.json", b"\x7fELF\x02\x01\x01\x00" + bytes(64), {}, [r"d\.json: .*ELF"]),
    ("elf-parquet", "d.parquet", b"\x7fELF\x02\x01\x01\x00" + bytes(64), {}, [r"d\.parquet: not a readable parquet"]),
    ("zip-jsonl", "d.jsonl", b"PK\x03\x04" + GARBAGE[:64], {}, [r"d\.jsonl: .*zip archive"]),
    ("jsonl-named-parquet", "d.parquet", GOOD + "\n", {}, [r"d\.parquet: not a readable parquet"]),
    # wrong encodings
    ("utf16-bom-jsonl", "d.jsonl", (GOOD + "\n").encode("utf-16"), {}, [r"d\.jsonl: not UTF-8 text.*UTF-16"]),
    ("utf16-no-bom-jsonl", "d.jsonl", (GOOD + "\n").encode("utf-16-le"), {}, [r"d\.jsonl: not UTF-8.*UTF-16"]),
    ("utf16-be-json", "d.json", ("[" + GOOD + "]").encode("utf-16-be"), {}, [r"d\.json: not UTF-8"]),
    ("utf16-bom-csv", "d.csv", "prompt,completion\nq,a\n".encode("utf-16"), {}, [r"d\.csv: not UTF-8"]),
    ("utf16-no-bom-csv", "d.csv", "prompt,completion\nq,a\n".encode("utf-16-le"), {}, [r"d\.csv: not UTF-8"]),
    ("utf32-jsonl", "d.jsonl", (GOOD + "\n").encode("utf-32"), {}, [r"d\.jsonl: not UTF-8"]),
    ("latin1-jsonl", "d.jsonl", (jsonl_text({"text": "ok"}) + '{"text": "caf\xe9"}\n').encode("latin-1"), {},
     [r"d\.jsonl:2: not UTF-8 text \(byte 0xe9\)", "Latin-1"]),
    ("latin1-json", "d.json", '[{"text": "ok"},\n {"text": "caf\xe9"}]'.encode("latin-1"), {},
     [r"d\.json:2: not UTF-8 text"]),
    ("latin1-csv", "d.csv", "prompt,completion\nq,a\ncaf\xe9,b\n".encode("latin-1"), {}, [r"d\.csv:3: not UTF-8"]),
    ("cp1252-quotes-jsonl", "d.jsonl", b'{"text": "\x93quoted\x94"}\n', {}, [r"d\.jsonl:1: not UTF-8 text"]),
    # empty and whitespace-only files
    ("empty-jsonl", "d.jsonl", b"", {}, [r"d\.jsonl: the file is empty"]),
    ("empty-json", "d.json", b"", {}, [r"d\.json: the file is empty"]),
    ("empty-csv", "d.csv", b"", {}, [r"d\.csv: the file is empty"]),
    ("empty-parquet-file", "d.parquet", b"", {}, [r"d\.parquet: not a readable parquet"]),
    ("zero-row-parquet", "d.parquet", lambda t: parquet_bytes([], t), {}, [r"data\.train: .*hold no rows"]),
    ("whitespace-jsonl", "d.jsonl", b"  \n\n\t\n", {}, [r"d\.jsonl: the file is empty"]),
    ("whitespace-json", "d.json", b" \n \n", {}, [r"d\.json: the file is empty"]),
    ("whitespace-csv", "d.csv", b"   \n\n ", {}, [r"d\.csv: the file is empty"]),
    ("header-only-csv", "d.csv", b"prompt,completion\n", {}, [r"hold no rows"]),
    ("empty-json-list", "d.json", b"[]", {}, [r"hold no rows"]),
    # structure a reader cannot use
    ("json-nested-too-deep", "d.json", "[" * 100_000 + "]" * 100_000, {}, [r"d\.json: unreadable JSON \(nested"]),
    ("jsonl-nested-too-deep", "d.jsonl", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}\n", {},
     [r"d\.jsonl:1: unreadable JSON \(nested"]),
    ("jsonl-5000-digit-number", "d.jsonl", '{"text": ' + "9" * 5000 + "}\n", {}, [r"d\.jsonl:1: unreadable JSON"]),
    ("jsonl-line-not-object", "d.jsonl", GOOD + "\n[1, 2]\n", {}, [r"d\.jsonl:2: each line must be a JSON object"]),
    ("jsonl-line-scalar", "d.jsonl", GOOD + '\n"just a string"\n', {}, [r"d\.jsonl:2: .*JSON object, got a string"]),
    ("json-top-level-object", "d.json", b'{"a": 1, "b": 2}', {}, [r"d\.json: a \.json dataset must be a list"]),
    ("json-list-of-numbers", "d.json", b"[1, 2, 3]", {}, [r"d\.json: a \.json dataset must be a list of objects"]),
    ("csv-extra-field", "d.csv", "prompt,completion\nq,a,extra\n", {}, [r"d\.csv:2: more fields than the header"]),
    # NaN / inf where a string is expected
    ("nan-text-jsonl", "d.jsonl", '{"text": NaN}\n', {}, [r"d\.jsonl:1: column 'text' must be a string, got nan"]),
    ("inf-completion-jsonl", "d.jsonl", '{"prompt": "q", "completion": Infinity}\n', {},
     [r"d\.jsonl:1: column 'completion' must be a string, got inf"]),
    ("nan-content-jsonl", "d.jsonl", '{"messages": [{"role": "user", "content": -Infinity}]}\n', {},
     [r"d\.jsonl:1: column 'messages\[0\]\.content' must be a string, got -inf"]),
    ("nan-parquet-cell", "d.parquet", lambda t: parquet_bytes([{"text": float("nan")}, {"text": 1.5}], t), {},
     [r"d\.parquet row 0: column 'text' must be a string, got nan"]),
    # a null is an empty value in every file type: the row is dropped and counted (here: every row)
    ("null-parquet-cell", "d.parquet", lambda t: parquet_bytes([{"text": None}, {"text": None}], t), {},
     [r"no rows left after filtering \(\{'empty_text': 2\}; the first: .*d\.parquet row 0"]),
    ("number-in-1e400-jsonl", "d.jsonl", '{"prompt": "q", "completion": 1e400}\n', {},
     [r"column 'completion' must be a string, got inf"]),
    # wrong types in rows
    ("content-number", "d.jsonl", jsonl_text({"messages": [{"role": "user", "content": 3}]}), {},
     [r"d\.jsonl:1: column 'messages\[0\]\.content' must be a string, got a number"]),
    ("content-list", "d.jsonl", jsonl_text({"messages": [{"role": "user", "content": [{"type": "text"}]}]}), {},
     [r"d\.jsonl:1: .*content' must be a string, got a list"]),
    ("content-null", "d.jsonl", jsonl_text({"messages": [{"role": "user", "content": None}]}), {},
     [r"no rows left after filtering \(\{'empty_prompt': 1\}; the first: .*d\.jsonl:1"]),
    ("messages-a-string", "d.jsonl", jsonl_text({"messages": "hi"}), {},
     [r"d\.jsonl:1: column 'messages' must be a non-empty list of messages, got a string"]),
    ("messages-an-object", "d.jsonl", jsonl_text({"messages": {"role": "user"}}), {},
     [r"d\.jsonl:1: column 'messages' must be a non-empty list"]),
    ("messages-empty", "d.jsonl", jsonl_text({"messages": []}), {}, [r"d\.jsonl:1: .*got an empty list"]),
    ("message-not-object", "d.jsonl", jsonl_text({"messages": ["hi"]}), {},
     [r"d\.jsonl:1: messages\[0\] must be an object with 'role' and 'content'"]),
    ("role-missing", "d.jsonl", jsonl_text({"messages": [{"content": "hi"}]}), {},
     [r"d\.jsonl:1: messages\[0\] must be an object with 'role'"]),
    ("role-unknown", "d.jsonl", jsonl_text({"messages": [{"role": "bot", "content": "hi"}]}), {},
     [r"d\.jsonl:1: messages\[0\] has unknown role 'bot'; allowed: system, user"]),
    ("role-a-list", "d.jsonl", jsonl_text({"messages": [{"role": ["user"], "content": "hi"}]}), {},
     [r"d\.jsonl:1: messages\[0\] has unknown role \(a list\)"]),
    ("role-null", "d.jsonl", jsonl_text({"messages": [{"role": None, "content": "hi"}]}), {},
     [r"d\.jsonl:1: messages\[0\] has unknown role \(null\)"]),
    ("sharegpt-role-object", "d.jsonl", jsonl_text({"conversations": [{"from": {"a": 1}, "value": "x"}]}), {},
     [r"d\.jsonl:1: conversations\[0\] has unknown role \(an object\); allowed: system, human"]),
    ("sharegpt-wrong-keys", "d.jsonl", jsonl_text({"conversations": [{"role": "user", "content": "x"}]}), {},
     [r"conversations\[0\] must be an object with 'from' and 'value'"]),
    ("chosen-a-number", "d.jsonl", jsonl_text({"prompt": "p", "chosen": 1, "rejected": "r"}), {},
     [r"d\.jsonl:1: column 'chosen' must be a string or a list of messages, got a number"]),
    ("rejected-null", "d.jsonl", jsonl_text({"prompt": "p", "chosen": "c", "rejected": None}), {},
     [r"no rows left after filtering \(\{'empty_chosen_rejected': 1\}; the first: .*d\.jsonl:1"]),
    ("chosen-str-rejected-list", "d.jsonl", jsonl_text({"prompt": "p", "chosen": "c", "rejected": MSG}), {},
     [r"d\.jsonl:1: chosen and rejected must both be strings or both be message lists"]),
    ("preference-prompt-object", "d.jsonl", jsonl_text({"prompt": {"a": 1}, "chosen": "c", "rejected": "r"}), {},
     [r"d\.jsonl:1: plain-text chosen/rejected need a string 'prompt'"]),
    ("preference-prompt-number", "d.jsonl", jsonl_text({"prompt": 7, "chosen": MSG, "rejected": MSG[:1]}), {},
     [r"d\.jsonl:1: column 'prompt' must be a string or a list of messages, got a number"]),
    ("prompt-completion-number", "d.jsonl", jsonl_text({"prompt": 5, "completion": "c"}), {},
     [r"d\.jsonl:1: column 'prompt' must be a non-empty list of messages, got a number"]),
    ("alpaca-input-list", "d.jsonl", jsonl_text({"instruction": "i", "output": "o", "input": [1]}), {},
     [r"d\.jsonl:1: column 'input' must be a string, got a list"]),
    ("text-a-bool", "d.jsonl", jsonl_text({"text": True}), {}, [r"d\.jsonl:1: column 'text' must be a string, got a"]),
    ("second-row-wrong", "d.jsonl", jsonl_text({"text": "a"}, {"text": "b"}, {"text": 3}), {},
     [r"d\.jsonl:3: column 'text' must be a string"]),
    ("unknown-columns", "d.jsonl", jsonl_text({"foo": 1}), {}, [r"d\.jsonl:1: cannot tell the data format"]),
    ("format-forced-mismatch", "d.jsonl", jsonl_text({"text": "a"}), {"format": "messages"},
     [r"d\.jsonl:1: missing column\(s\) \['messages'\] for format 'messages'"]),
    ("columns-map-to-missing", "d.jsonl", jsonl_text({"q": "a", "a": "b"}),
     {"columns": {"prompt": "question", "completion": "answer"}},
     [r"d\.jsonl:1: data\.columns maps 'prompt' to column 'question', which is not there; its columns: \['a', 'q'\]"]),
    ("csv-columns-map-to-missing", "d.csv", "q,a\nx,y\n", {"columns": {"prompt": "question", "completion": "a"}},
     [r"d\.csv:2: data\.columns maps 'prompt' to column 'question'"]),
]


@pytest.mark.parametrize("name, content, data_cfg, patterns", [c[1:] for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(tmp_path, name, content, data_cfg, patterns):
    path = tmp_path / name
    content = content(tmp_path) if callable(content) else content
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    started = time.perf_counter()
    one_line_error(lambda: load_data(path, **data_cfg), *patterns)
    assert time.perf_counter() - started < 10


def test_bad_file_in_a_folder_is_named(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text(jsonl_text({"text": "a"}))
    (folder / "b.csv").write_bytes("text\ncaf\xe9\n".encode("latin-1"))
    one_line_error(lambda: load_data(folder), r"data/b\.csv:2: not UTF-8 text")
    (folder / "b.csv").unlink()
    (folder / "c.json").write_text("")
    one_line_error(lambda: load_data(folder), r"data/c\.json: the file is empty")


def test_folder_holding_no_data_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(lambda: load_data(tmp_path), rf"{re.escape(str(tmp_path))}: folder holds no \.jsonl/\.json")


def test_a_folder_where_a_file_is_expected(tmp_path):
    (tmp_path / "d.jsonl").mkdir()  # named like a file
    one_line_error(lambda: load_data(tmp_path / "d.jsonl"), r"d\.jsonl: folder holds no")


@pytest.mark.parametrize("path, pattern", [
    ("./missing.jsonl", r"data file './missing\.jsonl' does not exist \(checked '/"),
    ("/no/such/dir/d.csv", r"data file '/no/such/dir/d\.csv' does not exist"),
    ("/dev/null", r"/dev/null: not a regular file or folder"),
    ("/tmp/nul\x00byte.jsonl", r"data source '/tmp/nul\\x00byte\.jsonl': not a usable path \(embedded null byte\)"),
    ("/tmp/" + "x" * 5000 + ".jsonl", r"data source '/tmp/xxxx.*': not a usable path \(.*File name too long"),
    ("~no_such_user_xyz/d.jsonl", r"no_such_user_xyz.*(not a usable path|does not exist)"),
    ("tiny:nope", r"unknown tiny dataset 'tiny:nope'"),
    ("d.txt", r"does not exist|unsupported file type|no such local file"),
])
def test_bad_data_paths(tmp_path, monkeypatch, path, pattern):
    monkeypatch.chdir(tmp_path)
    one_line_error(lambda: read_source(DataSource(path)), pattern)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "d.txt").write_text("hello\n")
    one_line_error(lambda: load_data(tmp_path / "d.txt"), r"d\.txt: unsupported file type; use one of \.jsonl")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_permission_denied(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_text(jsonl_text({"text": "a"}) if suffix == ".jsonl" else '[{"text": "a"}]' if suffix == ".json"
                    else "text\na\n")
    real_open, real_read_bytes = Path.open, Path.read_bytes

    def deny(self, *args, real=None, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: deny(self, *a, real=real_open, **k))
    monkeypatch.setattr(Path, "read_bytes", lambda self, *a, **k: deny(self, *a, real=real_read_bytes, **k))
    one_line_error(lambda: load_data(path), rf"d\{suffix}: cannot read the file \(Permission denied\)")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_permission_denied_for_real(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl_text({"text": "a"}))
    path.chmod(0)
    try:
        one_line_error(lambda: load_data(path), r"d\.jsonl: cannot read the file")
    finally:
        path.chmod(0o644)


def test_huge_fraction_is_refused_not_allocated(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl_text({"text": "a"}, {"text": "b"}))
    cfg = DataConfig(train=[DataSource(str(path), fraction=1e300)])
    one_line_error(lambda: load_splits(cfg, seed=0), r"d\.jsonl'?: fraction 1e\+300 would make")


# --- very long lines: they work (or fail clearly), quickly, without exhausting memory ----------------------

def test_one_50mb_jsonl_record_loads(tmp_path):
    path = tmp_path / "big.jsonl"
    with path.open("w") as handle:
        handle.write('{"text": "')
        for _ in range(50):
            handle.write("word " * 200_000)  # 1 MB at a time: 50 MB in one line
        handle.write('"}\n{"text": "short"}\n')
    started = time.perf_counter()
    rows = load_data(path).rows
    assert [len(r["text"]) for r in rows] == [50_000_000, 5] and time.perf_counter() - started < 30


def test_a_50mb_line_of_garbage_fails_on_its_line(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(GOOD + "\n" + "x" * 50_000_000 + "\n")
    one_line_error(lambda: load_data(path), r"big\.jsonl:2: invalid JSON")


def test_long_csv_field_loads(tmp_path):
    path = tmp_path / "long.csv"  # over csv's default 128 KB field limit
    path.write_text('prompt,completion\nq,"' + "a, b\n" * 100_000 + '"\n')
    rows = load_data(path).rows
    assert len(rows[0]["completion"]) == 500_000


def test_long_json_string_in_a_message(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"messages": [MSG[0], {"role": "assistant", "content": "é" * 5_000_000}]}]))
    assert len(load_data(path).rows[0]["messages"][1]["content"]) == 5_000_000


def test_normalize_preference_without_columns_is_an_error():
    from posttrain.data.formats import normalize_preference

    one_line_error(lambda: normalize_preference({"chosen": "a"}, "x.jsonl:3"),
                   r"x\.jsonl:3: missing column\(s\) \['rejected'\]")


def test_normalize_of_rows_without_a_format():
    rows = [{"foo": [1, 2]}, {"bar": None}]
    one_line_error(lambda: normalize(rows, ["f:1", "f:2"], DataConfig(train=[DataSource("x")]), "train"),
                   r"f:1: cannot tell the data format")


# ----------------------------------------------------------------------------------------------------------
# Configs (YAML).

def _bomb(levels=9, anchor_key="lol"):
    text = f'{anchor_key}0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels):
        text += f"{anchor_key}{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    return text


def _nested_bomb(key_path):
    """A billion-laughs list placed at `key_path` (train.x style), its anchors in an unknown-free place."""
    first, last = key_path.split(".")
    levels = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 9):
        levels.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return BASE + f"{first}:\n  {last}: [" + ", ".join(levels) + "]\n"


CONFIG_CASES = [
    ("truncated-flow", BASE + "train:\n  max_steps: [1, 2", [r"c\.yaml:8: invalid YAML: expected ',' or ']'"]),
    ("truncated-mid-key", BASE + "train:\n  max_st", [r"c\.yaml:7: train\.max_steps must be an integer, got 'max_st'"]),
    ("truncated-mid-string", BASE + 'output_dir: "runs/x', [r"c\.yaml:\d+: invalid YAML"]),
    ("tab-indent", BASE + "train:\n\tmax_steps: 3\n", [r"c\.yaml:8: invalid YAML: .*indent with spaces, not tabs"]),
    ("binary-garbage", GARBAGE, [r"c\.yaml: not UTF-8 text|c\.yaml:\d+: invalid YAML"]),
    ("nul-byte", BASE.encode() + b"seed: 1\x00\n", [r"c\.yaml:7: invalid YAML: unacceptable character #x0000"]),
    ("control-char", BASE + "output_dir: a\x07b\n", [r"c\.yaml:\d+: invalid YAML: unacceptable character #x0007"]),
    ("utf16", BASE.encode("utf-16"), [r"c\.yaml: not UTF-8 text"]),
    ("latin1", (BASE + "train:\n  seed: 1 # caf\xe9\n").encode("latin-1"), [r"c\.yaml: not UTF-8 text"]),
    ("billion-laughs-top", BASE + _bomb(), [r"c\.yaml:7: unknown key 'lol0'"]),
    ("billion-laughs-loss-type", _nested_bomb("dpo.loss_type"), [r"c\.yaml:8: dpo\.loss_type\[0\] must be a string"]),
    ("billion-laughs-target-modules", _nested_bomb("adapter.target_modules"),
     [r"c\.yaml:8: adapter\.target_modules\[0\] must be a string"]),
    ("billion-laughs-data-train", BASE.replace("  train: tiny:chat\n", "  train: [" + ", ".join(
        ["&a0 [lol, lol, lol]"] + [f"&a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 20)]) + "]\n"),
     [r"c\.yaml:5: data\.train\[0\] must be a mapping"]),
    ("recursive-alias", BASE + "dpo:\n  loss_type: &a [*a]\n", [r"c\.yaml:8: dpo\.loss_type\[0\] must be a string"]),
    ("top-level-list", "- a\n- b\n", [r"c\.yaml: the config must be a YAML mapping .*got list"]),
    ("top-level-scalar", "just text\n", [r"c\.yaml: the config must be a YAML mapping .*got str"]),
    ("top-level-number", "3\n", [r"c\.yaml: the config must be a YAML mapping .*got int"]),
    ("empty-file", "", [r"c\.yaml: output_dir is required"]),
    ("only-comments", "# nothing\n", [r"c\.yaml: output_dir is required"]),
    ("nested-too-deep", "train: " + "[" * 5000 + "]" * 5000 + "\n", [r"c\.yaml: invalid YAML: nested too deeply"]),
    ("5000-digit-int", BASE + "train:\n  max_steps: " + "9" * 5000 + "\n",
     [r"c\.yaml: invalid YAML: Exceeds the limit"]),
    ("bad-date", BASE + "train:\n  seed: 2024-13-45\n", [r"c\.yaml: invalid YAML: month must be in 1\.\.12"]),
    ("python-tag", BASE + "x: !!python/object/apply:os.system ['true']\n",
     [r"c\.yaml:7: invalid YAML: could not determine a constructor"]),
    ("unhashable-key", BASE + "? [a, b]\n: 1\n", [r"c\.yaml:\d+: invalid YAML: found unhashable key"]),
    ("duplicate-key-first", "recipe: sft\nrecipe: dpo\n" + BASE.replace("recipe: sft\n", ""),
     [r"c\.yaml:2: key 'recipe' is written twice"]),
    ("duplicate-nested-key", BASE + "train:\n  seed: 1\n  max_steps: 2\n  seed: 3\n",
     [r"c\.yaml:10: key 'train\.seed' is written twice"]),
    ("unknown-top-key", BASE + "trian:\n  seed: 1\n", [r"c\.yaml:7: unknown key 'trian': did you mean 'train'"]),
    ("unknown-nested-key", BASE + "train:\n  learnig_rate: 0.1\n",
     [r"c\.yaml:8: unknown key 'train\.learnig_rate': did you mean 'train\.learning_rate'"]),
    ("unknown-key-in-empty-section", BASE + "trian: {}\n", [r"c\.yaml:7: unknown key 'trian'"]),
    ("int-key", BASE + "1: 2\n", [r"c\.yaml:7: unknown key '1'"]),
    ("null-key", BASE + "~: 2\n", [r"c\.yaml: unknown key 'None'"]),
    ("empty-section", BASE + "train:\n", [r"c\.yaml:7: train must be a mapping, got null"]),
    ("section-a-list", BASE + "train: [1, 2]\n", [r"c\.yaml:7: train must be a mapping, got \[1, 2\]"]),
    ("section-a-number", "recipe: sft\nmodel: 5\n", [r"c\.yaml:2: model must be a mapping, got 5"]),
    ("columns-not-strings", BASE.replace("  train: tiny:chat\n", "  train: tiny:chat\n  columns: {prompt: 1}\n"),
     [r"c\.yaml:6: data\.columns must be a mapping"]),
    ("date-for-seed", BASE + "train:\n  seed: 2024-01-01\n", [r"c\.yaml:8: train\.seed must be an integer, got "]),
    ("binary-for-int", BASE + "train:\n  seed: !!binary aGVsbG8=\n", [r"c\.yaml:8: train\.seed must be an integer"]),
    ("max-steps-1e400", BASE + "train:\n  max_steps: 1e400\n", [r"c\.yaml:8: train\.max_steps must be an integer"]),
    ("max-steps-1.0e+400", BASE + "train:\n  max_steps: 1.0e+400\n",
     [r"c\.yaml:8: train\.max_steps must be an integer, got inf"]),
    ("max-steps-huge-int", BASE + "train:\n  max_steps: " + "9" * 40 + "\n",
     [r"c\.yaml:8: train\.max_steps is too large"]),
    ("max-steps-sign-soup", BASE + "train:\n  max_steps: '+-5'\n", [r"c\.yaml:8: train\.max_steps must be an integer"]),
    ("max-steps-superscript", BASE + "train:\n  max_steps: '²'\n", [r"c\.yaml:8: train\.max_steps must be an integer"]),
    ("lr-huge-int", BASE + "train:\n  learning_rate: " + "9" * 400 + "\n",
     [r"c\.yaml:8: train\.learning_rate must be a finite number"]),
    ("lr-1e400-string", BASE + "train:\n  learning_rate: 1e400\n",
     [r"c\.yaml:8: train\.learning_rate must be a finite"]),
    ("lr-inf", BASE + "train:\n  learning_rate: .inf\n", [r"c\.yaml:8: train\.learning_rate must be a finite number"]),
    ("batch-size-nan", BASE + "train:\n  batch_size: .nan\n", [r"c\.yaml:8: train\.batch_size must be an integer"]),
    ("batch-size-nan-word", BASE + "train:\n  batch_size: nan\n", [r"c\.yaml:8: train\.batch_size must be an integer"]),
    ("fraction-nan", BASE.replace("  train: tiny:chat\n", "  train:\n    - path: tiny:chat\n      fraction: .nan\n"),
     [r"c\.yaml:7: data\.train\[0\]\.fraction must be a finite number"]),
    ("fraction-negative", BASE.replace("  train: tiny:chat\n", "  train: [{path: tiny:chat, fraction: -1}]\n"),
     [r"c\.yaml:5: data\.train\[0\]\.fraction must be a positive number"]),
    ("seed-negative", BASE + "train:\n  seed: -1\n", [r"c\.yaml:8: train\.seed must be in \[0, 2\*\*32 - 1\]"]),
    ("seed-too-big", BASE + "train:\n  seed: 4294967296\n", [r"c\.yaml:8: train\.seed must be in"]),
    ("loss-weights-strings", BASE + "dpo:\n  loss_weights: [a]\n",
     [r"c\.yaml:8: dpo\.loss_weights\[0\] must be a number"]),
]


def write_config(tmp_path, content) -> Path:
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("content, patterns", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(tmp_path, content, patterns):
    path = write_config(tmp_path, content)
    started = time.perf_counter()
    one_line_error(lambda: load_config(path), *patterns)
    assert time.perf_counter() - started < 5  # the billion laughs included


def test_empty_mappings_and_anchors_still_load(tmp_path):
    text = ("recipe: sft\nmodel: &m {name_or_path: tiny:llama}\ndata:\n  train: tiny:chat\n  columns: {}\n"
            "adapter: {}\ntrain: &t {seed: 3}\noutput_dir: out\n")
    cfg = load_config(write_config(tmp_path, text))
    assert cfg.data.columns == {} and cfg.adapter.r == 16 and cfg.train.seed == 3


def test_very_long_config_line_loads(tmp_path):
    cfg = load_config(write_config(tmp_path, BASE.replace("output_dir: out", "output_dir: " + "o" * 1_000_000)))
    assert len(cfg.output_dir) == 1_000_000


def _numeric_fields():
    """(dotted key, type, a path to it in YAML) for every int/float field of every config section."""
    out = []
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    for section in sections:
        tp = hints[section]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        cls = args[0]
        if not dataclasses.is_dataclass(cls):
            continue
        for name, field_tp in typing.get_type_hints(cls).items():
            kinds = set(typing.get_args(field_tp)) | {field_tp}
            if int in kinds or float in kinds:
                out.append((f"{section}.{name}", int if int in kinds else float))
    return out


NUMERIC = _numeric_fields()
COUNTS_FROM_THE_END = {"distill.layer"}  # a negative layer is valid: -1 is the last decoder layer
RECIPE_OF_SECTION = {"distill": "ternary"}  # sections that only one recipe takes


def _section_text(key, value):
    section, name = key.split(".")
    extra = {"data": "  train: tiny:chat\n", "ternary": "", "adapter": ""}.get(section, "")
    base = BASE.replace("data:\n  train: tiny:chat\n", "") if section == "data" else BASE
    base = base.replace("recipe: sft", f"recipe: {RECIPE_OF_SECTION.get(section, 'sft')}")
    return base + f"{section}:\n{extra}  {name}: {value}\n"


@pytest.mark.parametrize("value", ["abc", "[1, 2]", "{a: 1}", "true", ".nan", ".inf", "-.inf", "1e999"])
@pytest.mark.parametrize("key, tp", NUMERIC, ids=[k for k, _ in NUMERIC])
def test_every_numeric_field_refuses_wrong_types_and_non_finite(tmp_path, key, tp, value):
    path = write_config(tmp_path, _section_text(key, value))
    one_line_error(lambda: load_config(path), rf"c\.yaml:\d+: {re.escape(key)}\b.*must be")


@pytest.mark.parametrize("key, tp", NUMERIC, ids=[k for k, _ in NUMERIC])
def test_every_numeric_field_refuses_negative_values(tmp_path, key, tp):
    path = write_config(tmp_path, _section_text(key, "-2" if tp is int else "-2.5"))
    if key in COUNTS_FROM_THE_END:
        section, name = key.split(".")
        assert getattr(getattr(load_config(path), section), name) == -2
        return
    one_line_error(lambda: load_config(path), rf"c\.yaml:\d+: {re.escape(key)}\b")


@pytest.mark.parametrize("key, tp", NUMERIC, ids=[k for k, _ in NUMERIC])
def test_every_numeric_field_and_huge_values(tmp_path, key, tp):
    """An integer beyond 64 bits is refused; a huge float either loads (no clipping, endless epochs: the user's
    call) or is refused by the field's own range, in one line."""
    path = write_config(tmp_path, _section_text(key, "9" * 30))
    if tp is int:
        one_line_error(lambda: load_config(path), rf"c\.yaml:\d+: {re.escape(key)} (is too large|must be an integer)")
        return
    try:
        load_config(path)
    except PosttrainError as err:
        assert re.search(rf"c\.yaml:\d+: {re.escape(key)}\b", str(err)) and "\n" not in str(err)


@pytest.mark.parametrize("override, pattern", [
    ("train.batch_size=abc", r"^command-line override: train\.batch_size must be an integer, got 'abc'"),
    ("train.learning_rate=.inf", r"^command-line override: train\.learning_rate must be a finite number"),
    ("train.learning_rate=nan", r"^command-line override: train\.learning_rate must be a finite number"),
    ("train.max_steps=1e400", r"^command-line override: train\.max_steps must be an integer"),
    ("train.max_steps=" + "9" * 5000, r"^override 'train\.max_steps=9+\.\.\.9+': the value is not valid YAML"),
    ("train.learning_rate=" + "9" * 400, r"^command-line override: train\.learning_rate must be a finite number"),
    ("train.seed=-1", r"^command-line override: train\.seed must be in"),
    ("train.batch_size=[1", r"^override 'train\.batch_size=\[1': the value is not valid YAML \(expected"),
    ("train.batch_size=\t3", r"the value is not valid YAML"),
    ("train.seed={a: 1}", r"^command-line override: train\.seed must be an integer, got \{'a': 1\}"),
    ("data.train=&a [*a]", r"^command-line override: data\.train\[0\] must be a mapping"),
    ("output_dir.x=1", r"^override 'output_dir\.x': 'output_dir' is not a section"),
    ("train.nope=1", r"unknown key 'train\.nope'"),
    ("train.max_steps", r"^override 'train\.max_steps' must look like key\.sub=value"),
    ("=3", r"^override '=3' must look like key\.sub=value"),
    ("recipe=!!python/name:os.system", r"the value is not valid YAML \(could not determine a constructor"),
])
def test_bad_overrides(tmp_path, override, pattern):
    path = write_config(tmp_path, BASE)
    one_line_error(lambda: load_config(path, [override]), pattern)


def test_config_paths(tmp_path, monkeypatch):
    one_line_error(lambda: load_config(tmp_path / "nope.yaml"), r"nope\.yaml: config file not found")
    one_line_error(lambda: load_config(tmp_path), rf"{re.escape(str(tmp_path))}: is a folder; give the config's YAML")
    path = write_config(tmp_path, BASE)
    real = Path.read_text

    def deny(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", deny)
    one_line_error(lambda: load_config(path), r"c\.yaml: cannot read the config \(Permission denied\)")


def test_build_with_odd_python_values():
    """build() itself (the Python API) on values YAML cannot even produce."""
    one_line_error(lambda: build(Config, {"train": {"max_steps": 10**5000}}), r"train\.max_steps is too large")
    one_line_error(lambda: build(Config, {"output_dir": 10**5000}), r"output_dir must be a string")
    loop: list = []
    loop.append(loop)
    one_line_error(lambda: build(Config, {"dpo": {"loss_type": loop}}), r"dpo\.loss_type\[0\] must be a string")


# ----------------------------------------------------------------------------------------------------------
# Model folders (models.py error paths): a damaged local model fails with one line naming the folder.

@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


@pytest.mark.parametrize("damage, pattern", [
    (lambda d: (d / "config.json").write_text('{"model_type": "lla'), r"model: cannot load the tokenizer .*damaged"),
    (lambda d: (d / "tokenizer.json").write_bytes(GARBAGE), r"model: cannot load the tokenizer"),
    (lambda d: (d / "tokenizer_config.json").write_text("{"), r"model: cannot load the tokenizer .*JSONDecodeError"),
    (lambda d: (d / "model.safetensors").write_bytes(GARBAGE), r"model: cannot load the model \(SafetensorError"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
     r"model: cannot load the model"),
], ids=["truncated-config", "garbage-tokenizer", "truncated-tokenizer-config", "garbage-weights",
        "truncated-weights"])
def test_damaged_model_folder(model_copy, damage, pattern):
    from posttrain.config.schema import ModelConfig
    from posttrain.models import load_model, load_tokenizer, resolve_path

    damage(model_copy)
    cfg = ModelConfig(name_or_path=str(model_copy))

    def load():
        resolved = resolve_path(cfg.name_or_path)
        load_model(cfg, resolved, load_tokenizer(cfg, resolved))

    one_line_error(load, pattern)


@pytest.mark.parametrize("template, pattern", [
    (b"\xff\xfe{{ messages }}", r"model\.chat_template: cannot read '.*t\.jinja' as UTF-8 text"),
    (b"{% for message in messages %}{{ message['content'] }}", r"model\.chat_template: invalid Jinja template, line"),
])
def test_bad_chat_template_file(tmp_path, tiny_model_dir, template, pattern):
    from posttrain.config.schema import ModelConfig
    from posttrain.models import load_tokenizer

    (tmp_path / "t.jinja").write_bytes(template)
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), chat_template=str(tmp_path / "t.jinja"))
    one_line_error(lambda: load_tokenizer(cfg, str(tiny_model_dir)), pattern)


# ----------------------------------------------------------------------------------------------------------
# The CLI: exit 2 and exactly one stderr line `posttrain: error: ...`. In-process for the many, and as real
# subprocesses (which import torch: seconds each) for a few.

def run_config(tmp_path, model_dir, data_path, extra="") -> Path:
    out = tmp_path / "out"
    text = (f"recipe: sft\nmodel: {{name_or_path: {model_dir}}}\ndata: {{train: {data_path}}}\n"
            f"train: {{max_steps: 1, batch_size: 1}}\noutput_dir: {out}\n{extra}")
    return write_config(tmp_path, text)


def assert_cli_error(stderr: str, code: int, *patterns: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert "Traceback" not in stderr and lines, stderr
    errors = [line for line in lines if line.startswith("posttrain: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], stderr
    for pattern in patterns:
        assert re.search(pattern, errors[0]), f"{pattern!r} not in {errors[0]!r}"


CLI_DATA_CASES = [("truncated-jsonl", "d.jsonl", GOOD + "\n" + GOOD[:25], r"d\.jsonl:2: invalid JSON"),
                  ("utf16-csv", "d.csv", "prompt,completion\nq,a\n".encode("utf-16"), r"d\.csv: not UTF-8"),
                  ("garbage-parquet", "d.parquet", GARBAGE, r"d\.parquet: not a readable parquet"),
                  ("content-number", "d.jsonl", jsonl_text({"messages": [{"role": "user", "content": 3}]}),
                   r"d\.jsonl:1: column 'messages\[0\]\.content' must be a string"),
                  ("empty-json", "d.json", b"", r"d\.json: the file is empty"),
                  ("role-a-list", "d.jsonl",
                   jsonl_text({"messages": MSG}, {"messages": [{"role": ["user"], "content": 1}]}),
                   r"d\.jsonl:2: messages\[0\] has unknown role \(a list\)")]


@pytest.mark.parametrize("name, content, pattern", [c[1:] for c in CLI_DATA_CASES], ids=[c[0] for c in CLI_DATA_CASES])
def test_cli_run_in_process(tmp_path, capsys, tiny_model_dir, name, content, pattern):
    from posttrain.cli import main

    (tmp_path / name).write_bytes(content.encode() if isinstance(content, str) else content)
    code = main(["run", str(run_config(tmp_path, tiny_model_dir, tmp_path / name))])
    assert_cli_error(capsys.readouterr().err, code, pattern)
    assert not (tmp_path / "out").exists()  # failed on the data: no output folder started


@pytest.mark.parametrize("content, overrides, pattern", [
    (BASE + "train:\n\tseed: 1\n", [], r"c\.yaml:8: invalid YAML: .*not tabs"),
    (BASE + _bomb(), [], r"c\.yaml:7: unknown key 'lol0'"),
    (GARBAGE, [], r"c\.yaml: not UTF-8"),
    (BASE, ["train.learning_rate=.inf"], r"command-line override: train\.learning_rate must be a finite number"),
    (BASE, ["train.max_steps=1e400"], r"command-line override: train\.max_steps must be an integer"),
], ids=["tabs", "billion-laughs", "garbage", "override-inf", "override-1e400"])
def test_cli_validate_in_process(tmp_path, capsys, content, overrides, pattern):
    from posttrain.cli import main

    code = main(["validate", str(write_config(tmp_path, content)), *overrides])
    assert_cli_error(capsys.readouterr().err, code, pattern)


def posttrain_cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "posttrain", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_cli_subprocess_bad_data_file(tmp_path, tiny_model_dir):
    (tmp_path / "d.jsonl").write_bytes(gzip.compress(GOOD.encode()))
    result = posttrain_cli("run", run_config(tmp_path, tiny_model_dir, tmp_path / "d.jsonl"), cwd=tmp_path)
    assert_cli_error(result.stderr, result.returncode, r"^posttrain: error: .*d\.jsonl: this is gzip-compressed")
    assert not (tmp_path / "out").exists()


def test_cli_subprocess_bad_configs(tmp_path):
    result = posttrain_cli("validate", write_config(tmp_path, BASE + "train:\n  batch_size: .nan\n"), cwd=tmp_path)
    assert_cli_error(result.stderr, result.returncode, r"c\.yaml:8: train\.batch_size must be an integer, got nan")
    result = posttrain_cli("validate", write_config(tmp_path, BASE + "x: &a [*a]\n" + _bomb()), cwd=tmp_path)
    assert_cli_error(result.stderr, result.returncode, r"c\.yaml:7: unknown key 'x'")
    result = posttrain_cli("validate", write_config(tmp_path, "- a\n"), "train.seed=1", cwd=tmp_path)
    assert_cli_error(result.stderr, result.returncode, r"must be a YAML mapping")

