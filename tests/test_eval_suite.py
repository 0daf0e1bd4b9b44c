# ruff: noqa: F401, F811  -- pytest fixtures are imported from test_eval_fixtures, then requested by name
"""The suite YAML schema (strict keys, types, paths) and MODEL spec parsing/loading errors."""

from __future__ import annotations

import pytest
from test_eval_fixtures import one_torch_thread, tiny, tiny_data, write_jsonl

from posttrain.errors import PosttrainError
from posttrain.eval.suite import load_suite
from posttrain.eval.variants import load_variant, split_model_spec, variant_names


def _write(tmp_path, text: str):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


def test_full_suite_parses_into_typed_sections(tmp_path, tiny_data):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "t.jsonl", [{"text": "a b"}])
    suite = load_suite(
        _write(
            tmp_path,
            f"""
perplexity: {{data: data/t.jsonl, context: 64, stride: 32}}
multiple_choice: [{{name: mc, data: {tiny_data["mc"]}}}]
generation: [{{name: gen, data: {tiny_data["gen"]}, max_new_tokens: 4, chat_template: false}}]
preference: {{data: {tiny_data["pref"]}, reference: ref_model, beta: 0.2}}
drift: {{base: base_model, data: data/t.jsonl}}
seed: 3
""",
        )
    )
    assert suite.perplexity.context == 64 and suite.perplexity.stride == 32
    assert suite.perplexity.data.path == str((tmp_path / "data" / "t.jsonl").resolve())  # relative to the suite file
    assert suite.multiple_choice[0].target_delimiter == " "
    assert suite.generation[0].chat_template is False
    assert suite.preference.beta == 0.2 and suite.preference.reference == "ref_model"
    assert suite.drift.context == 512 and suite.seed == 3
    assert suite.to_dict()["perplexity"]["stride"] == 32


@pytest.mark.parametrize(
    "text,needle",
    [
        ("perplexty: {data: x}", "unknown key 'perplexty': did you mean 'perplexity'?"),
        (
            "multiple_choice: [{nmae: a, data: x}]",
            "unknown key 'multiple_choice[0].nmae': did you mean 'multiple_choice[0].name'?",
        ),
        ("perplexity: {data: D, strid: 4}", "unknown key 'perplexity.strid': did you mean 'perplexity.stride'?"),
        ("perplexity: {data: D, context: big}", "perplexity.context must be an integer"),
        ("perplexity: {context: 8}", "perplexity.data is required"),
        ("perplexity: {data: D, context: 8, stride: 16}", "1 <= stride <= context"),
        ("perplexity: {data: no/such/file.jsonl}", "'data: no/such/file.jsonl' not found"),
        ("multiple_choice: {name: a}", "multiple_choice[0].data is required"),  # one mapping: a one-item list,
        ("dtype: float8", "dtype must be one of 'auto'"),
        ("- just a list", "must be a YAML mapping"),
        ("perplexity: [unclosed", "invalid YAML"),
    ],
)
def test_bad_suites_name_the_key(tmp_path, tiny_data, text, needle):
    path = _write(tmp_path, text.replace("data: D", f"data: {tiny_data['text']}"))
    with pytest.raises(PosttrainError) as err:
        load_suite(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value) or "suite file" in str(err.value)


def test_missing_suite_file(tmp_path):
    with pytest.raises(PosttrainError, match="does not exist"):
        load_suite(tmp_path / "nope.yaml")


def test_model_specs():
    assert split_model_spec("sft=runs/sft") == ("sft", "runs/sft")
    assert split_model_spec("runs/sft") == ("", "runs/sft")
    assert split_model_spec("runs/a=b") == ("", "runs/a=b")  # a '/' before '=': the '=' belongs to the path
    assert variant_names(["runs/base", "lora=runs/x/adapter", "org/model"]) == ["base", "lora", "model"]
    with pytest.raises(PosttrainError, match="both be called 'base'"):
        variant_names(["a/base", "b/base"])


@pytest.mark.parametrize("spec", ["/no/such/model", "./missing-model", "../x/y/z"])
def test_missing_model_path_says_it_looked_like_a_path(spec):
    with pytest.raises(PosttrainError, match="model path '.*' does not exist"):
        load_variant(spec)


def test_unloadable_hub_name_says_it_was_taken_as_a_hub_id(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(PosttrainError, match="not a local folder and loading it from the hub failed"):
        load_variant("some-org/some-model-that-is-not-here")


def test_folder_checks(tmp_path, tiny):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PosttrainError, match="is not a model folder"):
        load_variant(str(empty))
    binonly = tmp_path / "binonly"
    binonly.mkdir()
    (binonly / "config.json").write_text((tiny["base"] / "config.json").read_text())
    (binonly / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(PosttrainError, match="only pickle weights"):
        load_variant(str(binonly))
    with pytest.raises(PosttrainError, match="is a file"):
        load_variant(str(tiny["base"] / "config.json"))


def test_errors_carry_the_line_of_the_key(tmp_path):
    path = _write(tmp_path, "seed: 1\nperplexity:\n  data: tiny:text\n  context: 8\n  stride: 16\n")
    with pytest.raises(PosttrainError, match=r"suite.yaml:5: perplexity.stride needs context >= 2"):
        load_suite(path)


def test_data_sources_are_posttrain_data_sources(tmp_path, tiny_data):
    from posttrain.config.schema import DataSource

    suite = load_suite(
        {
            "generation": [{"name": "g", "data": "tiny:chat"}],
            "multiple_choice": [{"name": "m", "data": {"path": "tiny:multiple_choice", "split": "test"}}],
            "preference": {"data": str(tiny_data["pref"]), "reference": "tiny:llama"},
        }
    )
    assert suite.generation[0].data == DataSource(path="tiny:chat")  # a string is shorthand for {path: ...}
    assert suite.multiple_choice[0].data.split == "test"
    with pytest.raises(PosttrainError, match=r"preference.data.fraction is not used by eval"):
        load_suite({"preference": {"data": {"path": "tiny:preference", "fraction": 0.5}, "reference": "x"}})


def test_bundled_tiny_suite_loads():
    from pathlib import Path

    suite = load_suite(Path(__file__).resolve().parent.parent / "configs" / "eval" / "tiny.yaml")
    assert [t.data.path for t in suite.generation] == ["tiny:chat"]
    assert suite.multiple_choice[0].data.split == "test"


def test_data_rows_are_checked_naming_the_row(tmp_path):
    from posttrain.eval.runner import SuiteRun

    bad_mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}, {"answer": 1}])
    with pytest.raises(PosttrainError, match=r"mc.jsonl:2: missing column\(s\) \['choices'\]"):
        SuiteRun(load_suite({"multiple_choice": [{"name": "m", "data": str(bad_mc)}]}))
    no_answer = write_jsonl(tmp_path / "gen.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(PosttrainError, match=r"gen.jsonl:1: a generation row needs 'answer'"):
        SuiteRun(load_suite({"generation": [{"name": "g", "data": str(no_answer)}]}))


def test_chat_rows_become_prompt_and_answer():
    from posttrain.eval.generation import generation_rows
    from posttrain.tiny import tiny_rows

    rows = tiny_rows("chat", "test")[:2]
    out = generation_rows(rows, ["r0", "r1"])
    for row, converted in zip(rows, out):
        assert converted["messages"] == row["messages"][:-1]
        assert converted["answer"] == row["messages"][-1]["content"]


def test_tiny_multiple_choice_rows():
    from posttrain.tiny import tiny_rows

    rows = tiny_rows("multiple_choice", "test")
    assert rows == tiny_rows("multiple_choice", "test")  # deterministic
    for row in rows:
        a, b = (int(x) for x in row["question"].removeprefix("What is ").removesuffix("?").split(" + "))
        assert len(row["choices"]) == 4 == len(set(row["choices"]))
        assert row["choices"][row["answer"]] == str(a + b)
    assert len({r["answer"] for r in rows}) == 4  # the right answer is not always in the same place
