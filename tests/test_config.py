from pathlib import Path

import pytest
import yaml

from posttrain.config.schema import Config, load_config
from posttrain.errors import PosttrainError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RUN_CONFIGS = [p for p in sorted(CONFIGS.rglob("*.yaml")) if p.parent.name not in ("accelerate", "eval")]


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


BASE = "recipe: sft\nmodel:\n  name_or_path: tiny:llama\ndata:\n  train: tiny:chat\noutput_dir: out\n"


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_bundled_config_loads(path):
    first_line = path.read_text().splitlines()[0]
    if yaml.safe_load(path.read_text()).get("recipe") == "pipeline":
        from posttrain.pipeline import load_pipeline

        assert first_line.startswith("# posttrain ") and load_pipeline(path).stages
        return
    assert first_line.startswith("# posttrain run ") and str(path.relative_to(CONFIGS.parent)) in first_line
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.model.name_or_path and cfg.output_dir


def test_bundled_configs_exist():
    names = {str(p.relative_to(CONFIGS)) for p in RUN_CONFIGS}
    assert {"tiny/sft.yaml", "tiny/lora.yaml", "tiny/qlora.yaml"} <= names
    assert any(n.startswith("qwen2.5-0.5b/") for n in names) and any(n.startswith("llama-3.2-1b/") for n in names)


def test_defaults_and_shorthand(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.train.learning_rate == 2e-5 and cfg.model.trust_remote_code is False
    assert cfg.data.train[0].path == "tiny:chat" and cfg.data.train[0].fraction == 1.0
    assert cfg.adapter is None


def test_overrides_parse_types(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.learning_rate=1e-4", "train.max_steps=7",
                                              "adapter.method=qlora", "adapter.target_modules=[q_proj,v_proj]"])
    assert cfg.train.learning_rate == pytest.approx(1e-4) and cfg.train.max_steps == 7
    assert cfg.adapter.method == "qlora" and cfg.adapter.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_names_path_line_and_suggestion(tmp_path):
    path = write(tmp_path, BASE + "train:\n  learnig_rate: 0.1\n")
    expected = r"c\.yaml:8: unknown key 'train\.learnig_rate': did you mean 'train\.learning_rate'"
    with pytest.raises(PosttrainError, match=expected):
        load_config(path)


def test_unknown_override_key(tmp_path):
    with pytest.raises(PosttrainError, match="unknown key 'train.batchsize'.*train.batch_size"):
        load_config(write(tmp_path, BASE), ["train.batchsize=4"])


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=four", r"train\.batch_size must be an integer, got 'four'"),
    ("train.learning_rate=fast", r"train\.learning_rate must be a number"),
    ("train.learning_rate=5", r"train\.learning_rate must be in \(0, 1\)"),
    ("train.max_steps=0", r"train\.max_steps must be -1"),
    ("model.trust_remote_code=yes please", r"model\.trust_remote_code must be true/false"),
    ("model.dtype=fp64", r"model\.dtype must be one of .*'float32'"),
    ("recipe=sfd", r"did you mean 'sft'"),
    ("train.learning_rate=.nan", r"finite"),
    ("data.train=[]", r"data\.train is required"),
    ("adapter.r=0", r"adapter\.r must be >= 1"),
])
def test_wrong_values_name_the_key(tmp_path, override, message):
    with pytest.raises(PosttrainError, match=message):
        load_config(write(tmp_path, BASE), [override])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(PosttrainError, match=r"c\.yaml:\d+: invalid YAML"):
        load_config(write(tmp_path, "recipe: sft\nmodel: [unclosed\n"))
    with pytest.raises(PosttrainError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(PosttrainError, match="must be a YAML mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(PosttrainError, match="must look like key.sub=value"):
        load_config(write(tmp_path, BASE), ["train.max_steps"])


def test_validate_prints_resolved_config(tmp_path, capsys):
    from posttrain.cli import main

    assert main(["validate", str(write(tmp_path, BASE)), "train.seed=3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["seed"] == 3 and resolved["train"]["batch_size"] == 8


def test_ci_runs_the_readme_test_command():
    root = CONFIGS.parent
    readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
    command = 'pip install torch==2.13.0 && pip install -e ".[dev]" && pytest -q'
    assert command in readme and command in ci


def test_config_reference_is_generated_and_current():
    from posttrain.config.reference import reference

    assert (CONFIGS.parent / "docs" / "CONFIG.md").read_text() == reference(), \
        "docs/CONFIG.md is stale: python -m posttrain.config.reference > docs/CONFIG.md"
    assert "lambda_warmup_steps: 100" in reference() and "# sft | dpo | ternary" in reference()


def test_duplicate_keys_and_override_provenance(tmp_path):
    path = write(tmp_path, BASE + "train:\n  seed: 1\ntrain:\n  seed: 2\n")
    with pytest.raises(PosttrainError, match=r"c\.yaml:9: key 'train' is written twice"):
        load_config(path)
    with pytest.raises(PosttrainError, match=r"^command-line override: train\.batch_size must be >= 1"):
        load_config(write(tmp_path, BASE), ["train.batch_size=0"])
    with pytest.raises(PosttrainError, match="ternary.granularity must be tensor"):
        load_config(write(tmp_path, BASE), ["ternary.granularity=channel"])


@pytest.mark.parametrize("path", sorted((CONFIGS / "eval").glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_eval_suite_loads(path):
    from posttrain.eval import load_suite

    assert path.read_text().startswith("# posttrain eval ")
    assert load_suite(path)
