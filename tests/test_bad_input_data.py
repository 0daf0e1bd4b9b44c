"""Bad input data, continued: where an override's misspelling is blamed, missing values in every file type,
JSON positions, dropped pairs in the DPO pairs line, TRL's is_gradient_checkpointing warning, and the modes of
written files."""

from __future__ import annotations

import csv
import json
import os
import re
import stat
import warnings
from pathlib import Path

import pytest

from posttrain.config.schema import DataConfig, DataSource, load_config
from posttrain.data.formats import load_splits
from posttrain.errors import PosttrainError

ROOT = Path(__file__).resolve().parent.parent
SFT_CONFIG = ROOT / "configs" / "tiny" / "sft.yaml"
BASE = "recipe: sft\nmodel:\n  name_or_path: tiny:llama\ndata:\n  train: tiny:chat\noutput_dir: out\n"


def error_of(call) -> str:
    with pytest.raises(PosttrainError) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def write_config(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------------------
# 1. A misspelled key that only an override names is the override's, not the file's.

@pytest.mark.parametrize("override, pattern", [
    ("trian.max_steps=3", r"^command-line override: unknown key 'trian': did you mean 'train'\?$"),
    ("trian=3", r"^command-line override: unknown key 'trian': did you mean 'train'\?$"),
    ("train.max_stesp=3", r"^command-line override: unknown key 'train\.max_stesp': did you mean 'train\.max_steps'"),
    ("dat.train.path=x", r"^command-line override: unknown key 'dat': did you mean 'data'\?$"),
])
def test_misspelled_override_is_blamed_on_the_override(override, pattern):
    message = error_of(lambda: load_config(SFT_CONFIG, [override]))
    assert re.search(pattern, message) and "sft.yaml" not in message, message


def test_misspelled_key_in_the_file_is_still_the_files(tmp_path):
    path = write_config(tmp_path, BASE + "trian: {}\n")
    assert re.match(r".*c\.yaml:7: unknown key 'trian'", error_of(lambda: load_config(path, ["train.max_steps=3"])))
    # written in the file and extended by an override: the file's line is where it was misspelled
    assert re.match(r".*c\.yaml:7: unknown key 'trian'", error_of(lambda: load_config(path, ["trian.max_steps=3"])))


def test_cli_names_the_override(capsys):
    from posttrain.cli import main

    code = main(["validate", str(SFT_CONFIG), "trian.max_steps=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == ("posttrain: error: command-line override: unknown key 'trian': "
                                     "did you mean 'train'?"), err


# ----------------------------------------------------------------------------------------------------------
# 2. Missing values: one rule whatever the file type. A blank or null thing to learn (completion, assistant
# answer, chosen/rejected, text) drops the row and is counted; a plain prompt may be empty.

def write_rows(path: Path, rows: list[dict]) -> Path:
    """rows in the file type that path's suffix names; None is a JSON/parquet null and an empty CSV cell."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(list(rows[0]))
            writer.writerows([["" if v is None else v for v in r.values()] for r in rows])
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load_file(path: Path, **data_cfg):
    return load_splits(DataConfig(train=[DataSource(str(path))], eval_fraction=0, **data_cfg), seed=0)[0]


MISSING = [None, "", "   ", "\n\t"]
SUFFIXES = [".jsonl", ".json", ".csv", ".parquet"]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("missing", MISSING, ids=["null", "empty", "blank", "whitespace"])
def test_missing_completion_is_dropped_in_every_file_type(tmp_path, suffix, missing):
    rows = [{"prompt": "Q1", "completion": "A1"}, {"prompt": "Q2", "completion": missing}]
    out = load_file(write_rows(tmp_path / f"d{suffix}", rows))
    assert out.rows == [{"prompt": "Q1", "completion": "A1"}] and out.dropped == {"empty_completion": 1}
    assert len(out.origins) == 1


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("missing", MISSING[:2], ids=["null", "empty"])
def test_missing_text_is_dropped_in_every_file_type(tmp_path, suffix, missing):
    out = load_file(write_rows(tmp_path / f"d{suffix}", [{"text": "a"}, {"text": missing}, {"text": "b"}]))
    assert out.rows == [{"text": "a"}, {"text": "b"}] and out.dropped == {"empty_text": 1}


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("missing", MISSING[:2], ids=["null", "empty"])
def test_empty_plain_prompt_is_kept(tmp_path, suffix, missing):
    out = load_file(write_rows(tmp_path / f"d{suffix}", [{"prompt": missing, "completion": "A"}]))
    assert out.rows == [{"prompt": "", "completion": "A"}] and out.dropped == {}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("missing", MISSING[:3], ids=["null", "empty", "blank"])
def test_missing_chosen_or_rejected_is_dropped(tmp_path, suffix, missing):
    rows = [{"prompt": "Q", "chosen": "good", "rejected": "bad"},
            {"prompt": "Q", "chosen": "good", "rejected": missing},
            {"prompt": missing, "chosen": "good", "rejected": "bad"}]  # a plain prompt may be empty
    out = load_file(write_rows(tmp_path / f"d{suffix}", rows))
    assert out.dropped == {"empty_chosen_rejected": 1}
    assert out.rows == [{"prompt": "Q", "chosen": "good", "rejected": "bad"},
                        {"prompt": missing or "", "chosen": "good", "rejected": "bad"}]  # null -> ""


USER, ANSWER = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}


@pytest.mark.parametrize("row, reason", [
    ({"messages": [USER, {"role": "assistant", "content": None}]}, "empty_answer"),
    ({"messages": [USER, {"role": "assistant", "content": " "}]}, "empty_answer"),
    ({"messages": [USER, ANSWER, USER, {"role": "assistant", "content": ""}]}, "empty_answer"),
    ({"messages": [{"role": "user", "content": None}, ANSWER]}, "empty_prompt"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]}, "empty_answer"),
    ({"instruction": "Add.", "input": "1 and 2", "output": None}, "empty_answer"),
    ({"instruction": "", "input": None, "output": "3"}, "empty_prompt"),
    ({"prompt": [USER], "completion": [{"role": "assistant", "content": ""}]}, "empty_answer"),
    ({"chosen": [USER, ANSWER], "rejected": [USER, {"role": "assistant", "content": None}]},
     "empty_chosen_rejected"),
    ({"prompt": "Q", "chosen": None, "rejected": [USER, ANSWER]}, "empty_chosen_rejected"),
], ids=["answer-null", "answer-blank", "second-answer-empty", "user-null", "sharegpt", "alpaca-output",
        "alpaca-no-instruction", "conversational-completion", "chosen-list", "chosen-null-rejected-list"])
def test_missing_answers_in_chats_are_dropped(tmp_path, row, reason):
    path = write_rows(tmp_path / "d.jsonl", [row])
    message = error_of(lambda: load_file(path))  # its one row dropped: none left
    assert re.search(rf"no rows left after filtering \(\{{'{reason}': 1\}}.*d\.jsonl:1", message), message


def test_empty_system_message_is_kept(tmp_path):
    row = {"messages": [{"role": "system", "content": None}, USER, ANSWER]}
    out = load_file(write_rows(tmp_path / "d.jsonl", [row]))
    assert out.dropped == {} and out.rows[0]["messages"][0] == {"role": "system", "content": ""}


def test_all_rows_dropped_is_the_no_rows_left_error(tmp_path):
    path = write_rows(tmp_path / "d.csv", [{"prompt": "Q", "completion": None}, {"prompt": "Q", "completion": ""}])
    message = error_of(lambda: load_file(path))
    assert re.search(r"data\.train: no rows left after filtering \(\{'empty_completion': 2\}.*d\.csv:2", message)


def test_dropped_rows_reach_the_counts_of_metrics_json(tmp_path, tiny_tokenizer):
    from posttrain.data.examples import sft_examples

    data = write_rows(tmp_path / "d.parquet", [{"prompt": f"Q{i}", "completion": None if i == 3 else f"A{i}"}
                                               for i in range(8)])
    path = write_config(tmp_path, f"recipe: sft\nmodel: {{name_or_path: tiny:llama}}\ndata: {{train: {data}, "
                                  "eval_fraction: 0}\noutput_dir: out\n")
    _, _, counts = sft_examples(load_config(path), tiny_tokenizer)
    assert counts["empty_completion"] == 1 and counts["rows"] == 7


# ----------------------------------------------------------------------------------------------------------
# 3. Invalid JSON says where: the file's line, and json's own line/column/char.

def test_truncated_jsonl_line_names_the_column(tmp_path):
    good = json.dumps({"messages": [USER, ANSWER]})
    path = tmp_path / "d.jsonl"
    path.write_text(good + "\n" + "  " + good[:25])
    message = error_of(lambda: load_file(path))
    assert re.search(r"d\.jsonl:2: invalid JSON \(Unterminated string starting at: line 1 column 26 \(char 25\)\)",
                     message), message


def test_invalid_json_file_names_the_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"},\n {"text": "b",}]')
    message = error_of(lambda: load_file(path))
    assert re.search(r"d\.json:2: invalid JSON \(.*: line 2 column 15 \(char 30\)\)", message), message


# ----------------------------------------------------------------------------------------------------------
# 4. The DPO pairs line can say what was dropped.

def test_preference_counts_and_dropped_note(tmp_path, tiny_tokenizer):
    from posttrain.data.examples import dropped_note, preference_examples

    rows = [{"prompt": f"Q{i}", "chosen": "yes", "rejected": f"no {i}"} for i in range(18)]
    rows.append({"prompt": "Q", "chosen": "same", "rejected": "same"})
    data = write_rows(tmp_path / "p.jsonl", rows)
    path = write_config(tmp_path, f"recipe: dpo\nmodel: {{name_or_path: tiny:llama}}\ndata: {{train: {data}, "
                                  "eval_fraction: 0}\noutput_dir: out\n")
    train, _, counts = preference_examples(load_config(path), tiny_tokenizer)
    assert counts["identical_chosen_rejected"] == 1
    assert f"{len(train)} pairs{dropped_note(counts)}" == "18 pairs (1 identical pair dropped)"
    assert dropped_note({"pairs": 5, "truncated": 2, "prompt_too_long": 0}) == ""
    several = {"identical_chosen_rejected": 2, "empty_chosen_rejected": 1, "prompt_too_long": 3}
    assert dropped_note(several) == (" (2 identical pairs, 1 pair with an empty answer, 3 pairs whose prompt fills "
                                     "train.max_length dropped)")


# ----------------------------------------------------------------------------------------------------------
# 5. TRL's reference pass reads the deprecated is_gradient_checkpointing: silenced there, and only that.

def test_is_gradient_checkpointing_warning_is_silenced_narrowly(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from trl.models.utils import disable_gradient_checkpointing

    from posttrain.integrations.transformers_warnings import no_is_gradient_checkpointing_warning

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings(record=True) as unfiltered:
        warnings.simplefilter("always")
        with disable_gradient_checkpointing(model):  # what DPOTrainer.compute_ref_log_probs enters
            pass
    assert any("is_gradient_checkpointing" in str(w.message) for w in unfiltered), (
        "TRL no longer reads is_gradient_checkpointing: remove no_is_gradient_checkpointing_warning")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with no_is_gradient_checkpointing_warning():
            with disable_gradient_checkpointing(model):
                pass
            warnings.warn("another deprecation", FutureWarning, stacklevel=1)
            warnings.warn("`is_gradient_checkpointing` is deprecated", UserWarning, stacklevel=1)
    assert [(str(w.message), w.category) for w in caught] == [
        ("another deprecation", FutureWarning), ("`is_gradient_checkpointing` is deprecated", UserWarning)]


# ----------------------------------------------------------------------------------------------------------
# 6. Every file posttrain writes gets the mode a plain open() gives it.

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o022
    os.umask(old)


def assert_umask_modes(folder: Path, umask: int) -> None:
    wrong = {}
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != (0o777 if path.is_dir() else 0o666) & ~umask:
            wrong[str(path.relative_to(folder))] = oct(mode)
    assert not wrong, wrong


def test_tiny_model_files_get_umask_modes(tmp_path, umask_022):
    from posttrain.tiny import build_tiny

    assert_umask_modes(build_tiny(tmp_path / "tiny"), umask_022)


def test_run_files_get_umask_modes(tiny_sft_dir):
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tiny_sft_dir / "model.safetensors").is_file()
    assert_umask_modes(tiny_sft_dir, umask)


def test_reference_cache_files_get_umask_modes(tmp_path, umask_022, monkeypatch):
    from posttrain.data import ref_cache

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    path = ref_cache.save("k" * 16, [0.0, 1.0], [1.0, 0.0])
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
