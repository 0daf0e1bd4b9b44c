"""The dpo recipe on the tiny SFT model: preference learning, the reference cache, LoRA with one base copy."""

from pathlib import Path

import pytest
import torch

import posttrain
from posttrain.config.schema import load_config
from posttrain.data.formats import Rows
from posttrain.data.preference import tokenize_pairs
from posttrain.errors import PosttrainError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def sft_dir(tiny_sft_dir):
    return tiny_sft_dir


def run_dpo(name, sft_dir, out, *overrides):
    cfg = load_config(CONFIGS / "tiny" / f"{name}.yaml", [f"model.name_or_path={sft_dir}", f"output_dir={out}",
                                                           *overrides])
    return posttrain.run(cfg)


def test_dpo_raises_held_out_preference_accuracy(sft_dir, tmp_path):
    metrics = run_dpo("dpo", sft_dir, tmp_path / "dpo")
    start, end = metrics["eval_start"], metrics["eval"]
    # The SFT starting point is its own reference: zero implicit reward, accuracy 0 by TRL's strict definition.
    assert start["eval_rewards/accuracies"] == 0 and start["eval_rewards/margins"] == 0
    assert end["eval_rewards/accuracies"] > 0.6 and end["eval_rewards/margins"] > 0
    assert metrics["train_loss_last"] < metrics["train_loss_first"]


def test_second_run_reuses_cached_reference_log_probs(sft_dir, tmp_path):
    half = "data.train={path: tiny:preference, fraction: 0.5}"  # pairs no other test has scored
    first = run_dpo("dpo", sft_dir, tmp_path / "a", half, "train.max_steps=6", "train.logging_steps=1", "dpo.beta=0.3")
    second = run_dpo("dpo", sft_dir, tmp_path / "b", half, "train.max_steps=6", "train.logging_steps=1", "dpo.beta=0.3")
    assert first["reference_forwards"] > 0 and not first["reference_cache_hit"]
    assert second["reference_forwards"] == 0 and second["reference_cache_hit"]
    assert second["train_loss_history"] == first["train_loss_history"]
    assert second["eval"]["eval_loss"] == first["eval"]["eval_loss"]
    sweep = run_dpo("dpo", sft_dir, tmp_path / "c", half, "train.max_steps=2", "dpo.beta=0.5")  # beta: not in the key
    assert sweep["reference_forwards"] == 0
    changed = run_dpo("dpo", sft_dir, tmp_path / "d", half, "train.max_steps=2", "train.max_length=20")  # new tokens
    assert changed["reference_forwards"] > 0 and not changed["reference_cache_hit"]


def test_lora_dpo_keeps_one_copy_of_the_base(sft_dir, tmp_path, monkeypatch):
    from peft import PeftModel

    from posttrain.integrations.trl_dpo import CachedReferenceDPOTrainer

    seen = {}
    original_train = CachedReferenceDPOTrainer.train

    def spy(self, *args, **kwargs):
        seen["trainer"] = self
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(CachedReferenceDPOTrainer, "train", spy)
    metrics = run_dpo("dpo-lora", sft_dir, tmp_path / "lora", "train.max_steps=4", "dpo.precompute_ref=false")
    trainer = seen["trainer"]
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)
    # precompute off: TRL runs the reference inside every step as the base with the adapter disabled
    assert not trainer.precompute_ref_logps and trainer.reference_forwards == 0
    base_params = [p for n, p in trainer.model.named_parameters() if "lora_" not in n]
    from transformers import AutoModelForCausalLM

    one_copy = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(sft_dir).parameters())
    assert sum(p.numel() for p in base_params) == one_copy
    assert all(not p.requires_grad for p in base_params)
    assert metrics["steps"] == 4


def test_dpo_refuses_non_preference_data(sft_dir, tmp_path):
    with pytest.raises(PosttrainError, match="recipe dpo needs preference rows"):
        run_dpo("dpo", sft_dir, tmp_path / "x", "data.train=tiny:chat", "data.eval=[]")


def test_truncation_policy_is_counted(tiny_tokenizer):
    row = {"prompt": [{"role": "user", "content": "What is 12 + 30?"}],
           "chosen": [{"role": "assistant", "content": "42 " * 10}],
           "rejected": [{"role": "assistant", "content": "41"}]}
    rows = Rows(rows=[row, row], origins=["p:1", "p:2"], format="preference")
    pairs, counts = tokenize_pairs(tiny_tokenizer, rows, max_length=24)
    assert counts["truncated"] == 2 and all(len(p["prompt_ids"]) + len(p["chosen_ids"]) == 24 for p in pairs)
    with pytest.raises(PosttrainError, match="all 2 prompts fill train.max_length"):
        tokenize_pairs(tiny_tokenizer, rows, max_length=5)
    assert torch.tensor(pairs[0]["chosen_ids"]).numel() > 0


def test_explicit_reference_model_is_not_loaded_on_a_cache_hit(sft_dir, tmp_path, monkeypatch):
    from posttrain.registry import load_recipe

    args = ["data.train={path: tiny:preference, fraction: 0.25}", "data.eval=[]", "train.max_steps=1",
            f"dpo.ref_model={sft_dir}"]
    first = run_dpo("dpo", sft_dir, tmp_path / "a", *args)  # computes (with the reference loaded) and caches
    recipe = load_recipe("dpo")
    loaded, original = [], recipe.load_model

    def counting_load_model(cfg, *rest, **kwargs):
        loaded.append(cfg.name_or_path)
        return original(cfg, *rest, **kwargs)

    monkeypatch.setattr(recipe, "load_model", counting_load_model)
    second = run_dpo("dpo", sft_dir, tmp_path / "b", *args)
    assert first["reference_forwards"] > 0 and second["reference_cache_hit"]
    assert loaded == [str(sft_dir)]  # the policy only: the reference model was never loaded
