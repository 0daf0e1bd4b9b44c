"""Every private name of trl, transformers, accelerate and peft that posttrain uses (all in posttrain/integrations/)
still exists with the signature the code relies on. A release that renames one fails here, with the name, instead
of silently breaking a user's multi-GPU run. To raise a version bound in pyproject.toml, install the new version
and run this file (and the suite)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("trl", "transformers", "accelerate", "peft")


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_trainer_checkpoint_hooks():
    from transformers import Trainer

    assert parameters(Trainer._save_checkpoint) == ["self", "model", "trial"]
    assert parameters(Trainer._get_output_dir) == ["self", "trial"]
    assert parameters(Trainer._track_num_input_tokens) == ["self", "inputs"]
    # _save_checkpoint writes under the folder _get_output_dir returns (what the staging relies on)
    assert "self._get_output_dir(" in inspect.getsource(Trainer._save_checkpoint)
    # the Trainer counts tokens through the hook that posttrain moves to right after the forward
    assert "self._track_num_input_tokens(" in inspect.getsource(Trainer)


def test_accelerate_prepared_mark():
    import accelerate.accelerator
    from accelerate import Accelerator

    source = inspect.getsource(accelerate.accelerator)
    assert "_is_accelerate_prepared" in source  # the mark that an early evaluate() leaves on the bare model
    assert "self._models" in inspect.getsource(Accelerator.__init__)


def test_trl_dpo_internals():
    import trl.trainer.dpo_trainer as trl_dpo
    from trl import DPOTrainer

    assert parameters(DPOTrainer._prepare_dataset) == ["self", "dataset", "processing_class", "args", "dataset_name"]
    assert parameters(DPOTrainer._precompute_ref_logps) == ["self", "dataset", "name", "batch_size"]
    assert parameters(DPOTrainer.compute_ref_log_probs) == ["self", "model", "inputs"]
    assert callable(trl_dpo.hash_module)
    assert "hash_module(" in inspect.getsource(DPOTrainer.__init__)  # the call that posttrain skips


def test_trl_logged_metrics():
    """TRL's trainers keep the values of each log line in self._metrics[mode][name] and average them in log()."""
    from trl import DPOTrainer, SFTTrainer

    assert '_metrics[mode]["num_tokens"]' in inspect.getsource(SFTTrainer.compute_loss)
    for trainer_class in (SFTTrainer, DPOTrainer):
        assert "self._metrics[mode].items()" in inspect.getsource(trainer_class.log), trainer_class
    # distillation appends new names: each mode's metrics take any name
    assert '{"train": defaultdict(list), "eval": defaultdict(list)}' in inspect.getsource(SFTTrainer.__init__)


@pytest.mark.parametrize("name", ["GRPO", "RLOO"])
def test_trl_rl_trainer_internals(name):
    """What the grpo recipe relies on in TRL's RL trainers: the keyword arguments of the reward call (a user's reward
    is checked against them when the config loads), the batch keys the token count joins (rollout_tokens), the
    metrics that log() averages (replace_logged_metric), and one generation per optimizer step unless told
    otherwise (what keeps --resume exact: no checkpoint falls inside a buffer of completions)."""
    import trl

    from posttrain.config.functions import TRL_REWARD_KWARGS

    trainer, config = getattr(trl, f"{name}Trainer"), getattr(trl, f"{name}Config")
    rewards = inspect.getsource(trainer._calculate_rewards)
    assert "completion_ids=completion_ids_list, **reward_kwargs" in rewards
    assert all(f'reward_kwargs["{key}"]' in rewards for key in TRL_REWARD_KWARGS if key != "completion_ids")
    scored = inspect.getsource(trainer._generate_and_score_completions)
    assert all(f'"{key}":' in scored for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"))
    assert "self._metrics[mode].items()" in inspect.getsource(trainer.log)
    args = config(output_dir="x", use_cpu=True, bf16=False, per_device_train_batch_size=4, num_generations=4,
                  gradient_accumulation_steps=3)
    assert args.steps_per_generation == 3 and args.num_iterations == 1


@pytest.mark.parametrize("name", ["GRPO", "RLOO"])
def test_trl_rl_sampling_hooks(name):
    """What posttrain/integrations/trl_rl.py overrides in TRL's RL trainers, and what it reads there: the prompt
    tokenization, the single-turn sampling (GRPO's also takes num_generations and returns log-probs), the scoring of
    completions, and the switch that lets TRL's fused LM head score only the completion positions."""
    import trl
    import trl.trainer.utils as trl_utils

    trainer = getattr(trl, f"{name}Trainer")
    assert parameters(trainer._tokenize_prompts) == ["self", "prompts"]
    single_turn = ["self", "prompt_ids", "images", "multimodal_fields"]
    if name == "GRPO":
        single_turn += ["num_generations", "has_tool_images"]
        assert "return completion_ids, logprobs" in inspect.getsource(trainer._generate_single_turn)
    assert "self._get_per_token_logps_and_entropies(" in inspect.getsource(trainer._compute_loss)
    assert parameters(trainer._generate_single_turn) == single_turn
    source = inspect.getsource(trainer.__init__)
    assert all(f"self.{attr} =" in source for attr in ("eos_token_ids", "generation_config", "_is_vlm"))
    assert callable(trl_utils._use_triton)
    assert "compact = _use_triton(hidden_states.device)" in inspect.getsource(trl_utils.add_fused_lm_head)


def test_transformers_model_internals(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from posttrain.integrations.transformers_models import attention_implementation, flat_rows_needed

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    assert attention_implementation(model) == "sdpa" and not flat_rows_needed(model)
    import transformers.modeling_utils

    assert "_is_quantized" in inspect.getsource(transformers.modeling_utils)


def test_peft_custom_lora_layers():
    """peft's hook for LoRA layers of module types it does not know (the ternary-aware adapter): registered on the
    LoraConfig, consulted first when peft picks the layer class."""
    from peft import LoraConfig
    from peft.tuners.lora.model import LoraModel
    from torch import nn

    from posttrain.integrations.peft_lora import register_lora_layer, registered_lora_layers

    assert parameters(LoraConfig._register_custom_module) == ["self", "mapping"]
    source = inspect.getsource(LoraModel._create_new_module)
    assert "lora_config._custom_modules" in source and "config._custom_modules.items()" in source
    config = LoraConfig(r=2)
    assert registered_lora_layers(config) == {}
    register_lora_layer(config, nn.Identity, nn.Linear)
    assert registered_lora_layers(config) == {nn.Identity: nn.Linear}


def private_library_uses(path: Path) -> list[str]:
    """Accesses of `_name` attributes on trl/transformers/accelerate/peft objects, found as `super()._x`, overrides
    of a library class's `_x` method, and `_x` imported from those libraries."""
    uses = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
            uses += [f"from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "super":
                uses.append(f"super().{node.attr}")
            elif node.attr in KNOWN_PRIVATE:
                uses.append(node.attr)
    return uses


KNOWN_PRIVATE = {"_save_checkpoint", "_get_output_dir", "_track_num_input_tokens", "_is_accelerate_prepared",
                 "_models", "_attn_implementation", "_is_quantized", "_prepare_dataset", "_precompute_ref_logps",
                 "_metrics", "_register_custom_module", "_custom_modules", "_tokenize_prompts",
                 "_generate_single_turn", "_get_per_token_logps_and_entropies", "_use_triton", "_is_vlm"}
TORCH_OVERRIDES = {"super()._apply", "super()._load_from_state_dict"}  # torch.nn.Module's documented hooks


@pytest.mark.parametrize("path", sorted(p for p in [*ROOT.glob("posttrain/**/*.py"), *ROOT.glob("recipes/*.py")]
                                        if "integrations" not in p.parts), ids=lambda p: str(p.relative_to(ROOT)))
def test_private_names_only_in_integrations(path):
    outside = [u for u in private_library_uses(path) if u not in TORCH_OVERRIDES]
    assert not outside, f"{path.relative_to(ROOT)} touches library internals {outside}: move them to integrations/"
