"""Model loading guards and the CLI's contract: --help everywhere, one-line errors, exit codes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.config.schema import ModelConfig
from posttrain.errors import PosttrainError
from posttrain.models import load_model, load_tokenizer, resolve_path

ROOT = Path(__file__).resolve().parent.parent
VERBS = ["run", "validate", "ls", "init-tiny", "merge", "quantize", "eval", "bench"]


def cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          env=env, timeout=300)


def test_missing_local_path_and_offline_hub_name(tmp_path):
    with pytest.raises(PosttrainError, match=r"model path '\./no/such/model' does not exist"):
        resolve_path("./no/such/model")
    with pytest.raises(PosttrainError, match=r"model 'someone/no-such-model' is not a local folder .*offline"):
        cfg = ModelConfig(name_or_path="someone/no-such-model")
        load_tokenizer(cfg, resolve_path(cfg.name_or_path))


def test_pickle_only_checkpoint_needs_opt_in(tmp_path, tiny_model_dir):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(PosttrainError, match="holds only pickle weights.*allow_pickle: true"):
        resolve_path(str(folder))
    cfg = ModelConfig(name_or_path=str(folder), allow_pickle=True)
    model = load_model(cfg, resolve_path(str(folder), allow_pickle=True))
    assert model.config.vocab_size > 0


def test_pad_differs_from_eos_even_when_the_tokenizer_pads_with_eos(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(ModelConfig(name_or_path=str(tmp_path)), str(tmp_path))
    assert loaded.pad_token == "<|pad|>" and loaded.pad_token_id != loaded.eos_token_id


def test_default_chat_template_for_base_models(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    loaded = load_tokenizer(ModelConfig(name_or_path=str(tmp_path)), str(tmp_path))
    text = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|endoftext|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("verb", [None, *VERBS])
def test_every_verb_has_help(verb):
    result = cli(*([verb] if verb else []), "--help")
    assert result.returncode == 0 and "usage: posttrain" in result.stdout


def test_cli_errors_are_one_line_with_exit_2(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("recipe: sft\nmodel: {name_or_path: tiny:llama}\ndata: {train: tiny:chat}\n"
                      "output_dir: out\ntrain: {lr: 0.1}\n")
    result = cli("run", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"posttrain: error: {config}:5: unknown key 'train.lr': known: " + result.stderr.split("known: ")[1].strip()]
    missing = cli("run", str(config).replace("bad", "absent"))
    assert missing.returncode == 2 and "config file not found" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_cli_bad_data_file_names_the_line(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "fine"}\n{"text": oops}\n')
    result = cli("run", "configs/tiny/sft.yaml", f"data.train={data}", f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"posttrain: error: {data}:2: invalid JSON (Expecting value: line 1 column 10 (char 9)); "
        "fix or remove this line")
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_ls_lists_recipes_and_configs():
    result = cli("ls")
    assert result.returncode == 0 and "sft" in result.stdout and "tiny/sft.yaml" in result.stdout
    runnable, others = result.stdout.split("bundled settings for other flags")
    assert "tiny/sft.yaml" in runnable and "accelerate/" not in runnable and "eval/" not in runnable
    assert "accelerate/fsdp.yaml" in others and "eval/tiny.yaml" in others


def test_load_config_takes_a_bundled_name_as_the_cli_does():
    from posttrain.config.schema import load_config

    assert load_config("tiny/sft").recipe == "sft"
    assert load_config("configs/tiny/dpo.yaml", ["train.max_steps=3"]).train.max_steps == 3


@pytest.mark.parametrize("verb,options", [("init-tiny", ["out_dir", "--arch", "default: llama"]),
                                          ("merge", ["--dtype", "default: float32"]),
                                          ("quantize", ["--method", "--overwrite", "default: ternary"]),
                                          ("bench", ["--prompt-tokens", "default: 128", "--repeats", "default: 5"])])
def test_help_describes_every_option_with_its_default(verb, options):
    result = cli(verb, "--help")
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert result.returncode == 0 and all(option in text for option in options), text


def test_init_tiny(tmp_path):
    result = cli("init-tiny", str(tmp_path / "tiny"), "--arch", "qwen2")
    assert result.returncode == 0, result.stderr
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(tmp_path / "tiny").model_type == "qwen2"
    assert AutoTokenizer.from_pretrained(tmp_path / "tiny").chat_template
