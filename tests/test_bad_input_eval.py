# ruff: noqa: F401, F811  -- pytest fixtures are imported from test_eval_fixtures, then requested by name
"""What a new user hit with `posttrain merge`, `eval` and `bench`: adapters whose base path is relative to where
they were trained, a bad model found only after others were evaluated, bench figures that depended on the
order the models were listed in."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_eval_fixtures import one_torch_thread, tiny, tiny_adapter, tiny_data

from posttrain.cli import main
from posttrain.errors import PosttrainError
from posttrain.eval import load_variant, run_bench, run_eval
from posttrain.models import absolute_adapter_base, adapter_base, merge_adapter


def copy_adapter(adapter: Path, to: Path, base: str) -> Path:
    """A copy of a peft adapter folder whose adapter_config.json names `base`."""
    shutil.copytree(adapter, to)
    config_file = to / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base
    config_file.write_text(json.dumps(config))
    return to


@pytest.fixture
def project(tiny, tiny_adapter, tmp_path):
    """The demo's layout: proj/runs/demo/{base,lora}, the adapter naming its base `runs/demo/base` as training
    run in proj/ wrote it, and an unrelated folder to run from."""
    proj = tmp_path / "proj"
    shutil.copytree(tiny["base"], proj / "runs" / "demo" / "base")
    lora = copy_adapter(tiny_adapter, proj / "runs" / "demo" / "lora", "runs/demo/base")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return {"proj": proj, "lora": lora, "base": (proj / "runs" / "demo" / "base").resolve(), "elsewhere": elsewhere}


# 1. An adapter's relative base resolves from any current folder.


def test_relative_base_is_found_above_the_adapter_from_another_folder(project, monkeypatch):
    monkeypatch.chdir(project["elsewhere"])
    assert adapter_base(project["lora"]) == str(project["base"])
    monkeypatch.chdir(project["proj"])  # where it was trained: the path as written
    assert adapter_base(project["lora"]) == "runs/demo/base"


def test_current_folder_comes_before_the_adapter_folders(project, tiny, monkeypatch):
    shutil.copytree(tiny["other"], project["elsewhere"] / "runs" / "demo" / "base")
    monkeypatch.chdir(project["elsewhere"])
    assert adapter_base(project["lora"]) == "runs/demo/base"


def test_a_non_model_folder_near_the_adapter_does_not_shadow_the_base(project, monkeypatch):
    (project["proj"] / "runs" / "demo" / "lora" / "runs" / "demo" / "base").mkdir(parents=True)  # no config.json
    monkeypatch.chdir(project["elsewhere"])
    assert adapter_base(project["lora"]) == str(project["base"])


def test_relative_base_found_nowhere_names_the_adapter(tiny_adapter, tmp_path, monkeypatch):
    lost = copy_adapter(tiny_adapter, tmp_path / "lost", "runs/gone/base")
    hub = copy_adapter(tiny_adapter, tmp_path / "hub", "someorg/some-model")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PosttrainError, match=r"lost: its base model 'runs/gone/base' .* is not found from the "
                                             r"current folder nor from the adapter's folder or any folder above"):
        adapter_base(lost)
    assert adapter_base(hub) == "someorg/some-model"  # a hub name is left to the hub


def test_merge_from_another_folder(project, monkeypatch, capsys):
    monkeypatch.chdir(project["elsewhere"])
    out = project["elsewhere"] / "merged"
    assert main(["merge", str(project["lora"]), "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    merge_adapter(project["lora"], out, overwrite=True)  # the library call too


def test_eval_loads_the_adapter_from_another_folder(project, tiny_data, monkeypatch):
    monkeypatch.chdir(project["elsewhere"])
    variant = load_variant(f"lora={project['lora']}", device="cpu")
    assert variant.kind == "adapter" and variant.base_source == str(project["base"])
    suite = {"perplexity": {"data": str(tiny_data["text"]), "context": 16, "stride": 16}}
    results = run_eval([f"lora={project['lora']}"], suite, project["elsewhere"] / "eval")
    assert results["models"]["lora"]["base"] == str(project["base"])


def test_absolute_adapter_base_rewrites_a_local_base_only(project, tiny_adapter, tmp_path, monkeypatch):
    hub = copy_adapter(tiny_adapter, tmp_path / "hub", "someorg/some-model")
    monkeypatch.chdir(project["proj"])  # where the run started
    absolute_adapter_base(project["lora"])
    absolute_adapter_base(hub)
    absolute_adapter_base(project["proj"] / "runs" / "demo" / "base")  # a full model: nothing to do
    saved = json.loads((project["lora"] / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(project["base"])
    assert json.loads((hub / "adapter_config.json").read_text())["base_model_name_or_path"] == "someorg/some-model"
    assert not (project["proj"] / "runs" / "demo" / "base" / "adapter_config.json").exists()
    monkeypatch.chdir(project["elsewhere"])
    assert adapter_base(project["lora"]) == str(project["base"])


# 2. Every model is checked before any is loaded; the error names it.


def _no_base(tiny, tiny_adapter, tmp_path):
    return copy_adapter(tiny_adapter, tmp_path / "bad", "runs/gone/base")


def _no_adapter_weights(tiny, tiny_adapter, tmp_path):
    bad = copy_adapter(tiny_adapter, tmp_path / "bad", str(tiny["base"]))
    (bad / "adapter_model.safetensors").unlink()
    return bad


def _base_is_an_adapter(tiny, tiny_adapter, tmp_path):
    return copy_adapter(tiny_adapter, tmp_path / "bad", str(tiny_adapter))


def _no_weights(tiny, tiny_adapter, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny["base"], bad)
    (bad / "model.safetensors").unlink()
    return bad


LATE_FAILURES = [
    (_no_base, r"its base model 'runs/gone/base' .* is not found"),
    (_no_adapter_weights, r"has no adapter_model.safetensors"),
    (_base_is_an_adapter, r"is itself an adapter"),
    (_no_weights, r"has no \*.safetensors weights"),
]


@pytest.fixture
def loads(monkeypatch):
    """Records every model load (eval's and bench's both go through variants._load_full)."""
    import posttrain.eval.variants as variants

    calls = []
    real = variants._load_full

    def spy(source, *args, **kwargs):
        calls.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(variants, "_load_full", spy)
    return calls


@pytest.mark.parametrize("make_bad, why", LATE_FAILURES, ids=[f.__name__.strip("_") for f, _ in LATE_FAILURES])
def test_eval_checks_every_model_before_loading_any(make_bad, why, tiny, tiny_adapter, tiny_data, tmp_path, loads):
    bad = make_bad(tiny, tiny_adapter, tmp_path)
    suite = {"perplexity": {"data": str(tiny_data["text"]), "context": 16, "stride": 16}}
    models = [f"base={tiny['base']}", f"other={tiny['other']}", f"third={bad}"]
    with pytest.raises(PosttrainError, match=r"^model 'third': .*" + why):
        run_eval(models, suite, tmp_path / "out")
    assert loads == [] and not (tmp_path / "out").exists()


def test_bench_checks_every_model_before_loading_any(tiny, tiny_adapter, tmp_path, loads):
    bad = _no_base(tiny, tiny_adapter, tmp_path)
    with pytest.raises(PosttrainError, match=r"^model 'third': .*its base model 'runs/gone/base' .* is not found"):
        run_bench([f"base={tiny['base']}", f"lora={tiny_adapter}", f"third={bad}"], tmp_path / "out", device="cpu")
    assert loads == [] and not (tmp_path / "out").exists()


def test_suite_models_are_checked_and_named_too(tiny, tiny_adapter, tiny_data, tmp_path, loads):
    bad = _no_adapter_weights(tiny, tiny_adapter, tmp_path)
    suite = {"drift": {"base": str(bad), "data": str(tiny_data["text"]), "context": 16}}
    with pytest.raises(PosttrainError, match=r"^model 'drift.base': .*has no adapter_model.safetensors"):
        run_eval([str(tiny["base"])], suite, tmp_path / "out")
    assert loads == []


def test_cli_prints_one_line_naming_the_model(tiny, tiny_adapter, tiny_data, tmp_path, capsys):
    bad = _no_base(tiny, tiny_adapter, tmp_path)
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"perplexity: {{data: {tiny_data['text']}, context: 16, stride: 16}}\n")
    code = main(["eval", f"base={tiny['base']}", f"lora={bad}", "--suite", str(suite), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("posttrain: error: model 'lora': "), err


# 3. Bench figures do not depend on the order the models are listed in.

BENCH_IN_A_FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from posttrain.eval import run_bench
    results = run_bench(sys.argv[2:], sys.argv[1], prompt_tokens=8, new_tokens=4, repeats=1, warmup=0, device="cpu")
    print(json.dumps({name: [v["bench/load_seconds"], v["bench/peak_memory_bytes"]]
                      for name, v in results["variants"].items()}))
""")


def _bench_in_a_fresh_process(models: list[str], out: Path) -> dict:
    # A fresh process, as `posttrain bench` is: in this one, earlier tests have already paid the one-time costs.
    done = subprocess.run([sys.executable, "-c", BENCH_IN_A_FRESH_PROCESS, str(out), *models],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_bench_figures_do_not_depend_on_the_argument_order(tiny, tiny_adapter, tmp_path):
    models = [f"base={tiny['base']}", f"lora={tiny_adapter}"]
    forward = _bench_in_a_fresh_process(models, tmp_path / "forward")
    backward = _bench_in_a_fresh_process(models[::-1], tmp_path / "backward")
    for name in ("base", "lora"):
        (load_a, peak_a), (load_b, peak_b) = forward[name], backward[name]
        # Loose on purpose (a busy 2-core machine): before, the first-listed model read ~100x slower and
        # 100-300 MB larger than itself listed second; a model's own load here is tens of milliseconds and ~1 MB.
        assert max(load_a, load_b) <= 10 * min(load_a, load_b) + 0.25, (name, forward, backward)
        assert abs(peak_a - peak_b) <= 32 * 2**20, (name, forward, backward)
