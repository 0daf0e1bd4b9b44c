import json

import pytest

from posttrain.config.schema import DataConfig, DataSource
from posttrain.data.formats import load_splits, normalize
from posttrain.data.sources import read_source
from posttrain.errors import PosttrainError


def jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tmp_path, rows, **kwargs):
    cfg = DataConfig(train=[DataSource(jsonl(tmp_path, rows))], eval_fraction=0, **kwargs)
    return load_splits(cfg, seed=0)[0]


MSG = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize("row, fmt, expected", [
    ({"messages": MSG}, "messages", {"messages": MSG, "train_from": 0}),
    ({"prompt": "Q:", "completion": " A"}, "prompt_completion", {"prompt": "Q:", "completion": " A"}),
    ({"prompt": MSG[:1], "completion": MSG[1:]}, "prompt_completion", {"messages": MSG, "train_from": 1}),
    ({"instruction": "Add.", "input": "1 and 2", "output": "3"}, "alpaca",
     {"messages": [{"role": "user", "content": "Add.\n\n1 and 2"}, {"role": "assistant", "content": "3"}],
      "train_from": 0}),
    ({"instruction": "Say hi.", "output": "hi"}, "alpaca",
     {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}], "train_from": 0}),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}, "sharegpt",
     {"messages": MSG, "train_from": 0}),
    ({"text": "plain text"}, "text", {"text": "plain text"}),
    ({"prompt": "Q", "chosen": "good", "rejected": "bad"}, "preference",
     {"prompt": "Q", "chosen": "good", "rejected": "bad"}),
])
def test_every_format_is_detected_and_normalized(tmp_path, row, fmt, expected):
    rows = load(tmp_path, [row])
    assert rows.format == fmt and rows.rows == [expected]


def test_preference_shapes(tmp_path):
    user = {"role": "user", "content": "2+2?"}
    good, bad = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}
    implicit = load(tmp_path, [{"chosen": [user, good], "rejected": [user, bad]}]).rows[0]
    assert implicit == {"prompt": [user], "chosen": [good], "rejected": [bad]}
    ultrafeedback = load(tmp_path, [{"prompt": "2+2?", "chosen": [user, good], "rejected": [user, bad]}]).rows[0]
    assert ultrafeedback == implicit
    explicit = load(tmp_path, [{"prompt": [user], "chosen": [good], "rejected": [bad]}]).rows[0]
    assert explicit == implicit


def test_identical_pairs_are_counted_and_dropped(tmp_path):
    same, different = {"prompt": "Q", "chosen": "a", "rejected": "a"}, {"prompt": "Q", "chosen": "a", "rejected": "b"}
    rows = load(tmp_path, [same, different])
    assert len(rows.rows) == 1 and rows.dropped == {"identical_chosen_rejected": 1}
    with pytest.raises(PosttrainError, match="no rows left after filtering"):
        load(tmp_path, [{"prompt": "Q", "chosen": "a", "rejected": "a"}])


def test_preference_prompts_that_differ(tmp_path):
    with pytest.raises(PosttrainError, match=r"d\.jsonl:1: chosen and rejected share no prompt"):
        load(tmp_path, [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                         "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}])


def test_column_mapping_and_system_prompt(tmp_path):
    rows = load(tmp_path, [{"question": "Q?", "answer": "A"}], columns={"prompt": "question", "completion": "answer"})
    assert rows.format == "prompt_completion" and rows.rows[0] == {"prompt": "Q?", "completion": "A"}
    chat = load(tmp_path, [{"messages": MSG}], system_prompt="Be brief.")
    assert chat.rows[0]["messages"][0] == {"role": "system", "content": "Be brief."} and chat.rows[0]["train_from"] == 1


def test_file_types_and_folder(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(3)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    jsonl(tmp_path, rows)
    for name in ("d.json", "d.csv", "d.parquet", "d.jsonl"):
        got, origins = read_source(DataSource(str(tmp_path / name)))
        assert got == rows, name
    assert origins[1].endswith("d.jsonl:2")
    all_rows, _ = read_source(DataSource(str(tmp_path)))
    assert len(all_rows) == 12


def test_mixing_fractions_and_held_out_split(tmp_path):
    a = jsonl(tmp_path, [{"text": f"a{i}"} for i in range(100)], "a.jsonl")
    b = jsonl(tmp_path, [{"text": f"b{i}"} for i in range(10)], "b.jsonl")
    cfg = DataConfig(train=[DataSource(a, fraction=0.5), DataSource(b, fraction=2.0)], eval_fraction=0.1)
    train, held = load_splits(cfg, seed=1)
    texts = [r["text"] for r in train.rows] + [r["text"] for r in held.rows]
    assert len(texts) == 70 and sum(t.startswith("b") for t in texts) == 20
    assert len(held.rows) == 7
    again_train, _ = load_splits(cfg, seed=1)
    assert again_train.rows == train.rows  # seeded


def test_tiny_sources_have_disjoint_splits():
    train, _ = read_source(DataSource("tiny:chat"))
    test, _ = read_source(DataSource("tiny:chat", split="test"))
    question = lambda r: r["messages"][-2]["content"]  # noqa: E731
    assert not {question(r) for r in train} & {question(r) for r in test}


# --- bad input: one clear line naming file/line/key ---------------------------------------------------------

def test_malformed_jsonl_reports_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(PosttrainError, match=r"bad\.jsonl:2: invalid JSON"):
        read_source(DataSource(str(path)))


def test_non_utf8_and_non_object_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n\xff\xfe garbage\n')
    with pytest.raises(PosttrainError, match=r"bad\.jsonl:2: not UTF-8"):
        read_source(DataSource(str(path)))
    path.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(PosttrainError, match=r"bad\.jsonl:2: each line must be a JSON object"):
        read_source(DataSource(str(path)))


def test_missing_fields_and_unknown_role(tmp_path):
    with pytest.raises(PosttrainError, match=r"d\.jsonl:2: missing column\(s\) \['completion'\]"):
        load(tmp_path, [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    bad_role = [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]
    with pytest.raises(PosttrainError, match=r"d\.jsonl:1: messages\[1\] has unknown role 'bot'; allowed: system"):
        load(tmp_path, [{"messages": bad_role}])
    with pytest.raises(PosttrainError, match=r"column 'completion' must be a string"):
        load(tmp_path, [{"prompt": "a", "completion": 3}])
    with pytest.raises(PosttrainError, match=r"cannot tell the data format from columns \['foo'\]"):
        load(tmp_path, [{"foo": 1}])


def test_empty_dataset_and_missing_file(tmp_path):
    with pytest.raises(PosttrainError, match="hold no rows"):
        load(tmp_path, [])
    with pytest.raises(PosttrainError, match="data file './nope.jsonl' does not exist"):
        read_source(DataSource("./nope.jsonl"))


def test_hub_dataset_while_offline_says_so():
    with pytest.raises(PosttrainError, match="no such local file or folder, and loading it as a hub dataset"):
        read_source(DataSource("someone/not-a-dataset-xyz"))


def test_normalize_rejects_empty():
    with pytest.raises(PosttrainError, match="hold no rows"):
        normalize([], [], DataConfig(train=[DataSource("x")]), "train")


def test_bom_is_accepted_and_csv_extra_fields_are_reported(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    assert read_source(DataSource(str(bom)))[0] == [{"text": "a"}, {"text": "b"}]
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfprompt,completion\nq,a\n")
    assert read_source(DataSource(str(tmp_path / "bom.csv")))[0] == [{"prompt": "q", "completion": "a"}]
    (tmp_path / "extra.csv").write_text("prompt,completion\nq,a,surprise\n")
    with pytest.raises(PosttrainError, match=r"extra\.csv:2: more fields than the header"):
        read_source(DataSource(str(tmp_path / "extra.csv")))


def test_held_out_rows_never_leak_into_train_when_repeated(tmp_path):
    path = jsonl(tmp_path, [{"text": f"t{i}"} for i in range(40)])
    train, held = load_splits(DataConfig(train=[DataSource(path, fraction=3.0)], eval_fraction=0.1), seed=0)
    assert held.rows and not {r["text"] for r in held.rows} & {r["text"] for r in train.rows}
