"""TRL's GRPOTrainer / RLOOTrainer with posttrain's sampling: two private hooks, nothing else changed.

- `_tokenize_prompts`: TRL's sampler repeats each prompt num_generations times in a row and TRL renders the chat
  template for every copy; the override renders each distinct prompt once and hands the ids back in TRL's order.
- `_generate_single_turn`: the completions come from posttrain.eval.sampling.sample_completions (one prefill per
  distinct prompt, the LM head on the last position only, a plain decode loop) in place of `model.generate`,
  with the same distribution (TRL's generation_config: temperature, top-k, top-p, stop tokens, length).

TRL's own path runs instead wherever it does something the loop does not: vLLM or transformers' continuous
batching, images or other multimodal inputs, DeepSpeed or FSDP (whose parameters are gathered by TRL's context),
generation_kwargs, repetition_penalty or min_p. tests/test_integrations.py checks that the hooked names and their
parameters still exist; tests/test_grpo_recipe.py that the two paths sample the same distribution.
"""

from __future__ import annotations

import contextlib
import json

import torch
import trl.trainer.utils as trl_utils
from trl.models import unwrap_model_for_generation


def distinct_positions(prompts: list) -> tuple[list, list[int]]:
    """(the distinct prompts, for each prompt the position of its copy among them)."""
    index: dict[str, int] = {}
    keys = [json.dumps(prompt, sort_keys=True, default=str) for prompt in prompts]
    positions = [index.setdefault(key, len(index)) for key in keys]
    first = {position: prompt for position, prompt in zip(positions, prompts)}
    return [first[i] for i in range(len(index))], positions


def fast_path_applies(trainer, images, multimodal_fields) -> bool:
    config = trainer.generation_config
    return not (trainer.use_vllm or getattr(trainer, "use_transformers_continuous_batching", False)
                or images is not None or multimodal_fields or trainer._is_vlm
                or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled or trainer.args.generation_kwargs
                or (config.repetition_penalty or 1.0) != 1.0 or config.min_p is not None)


def with_posttrain_sampling(trainer_class, sample_completions):
    """A subclass of TRL's GRPOTrainer or RLOOTrainer whose sampling goes through sample_completions(model,
    prompt_ids, max_new_tokens=, stop_ids=, pad_id=, temperature=, top_k=, top_p=) -> completion id lists."""
    returns_logprobs = trainer_class.__name__.startswith("GRPO")  # GRPO's hook returns (ids, sampling log-probs)

    def _tokenize_prompts(self, prompts):
        if self._is_vlm or getattr(self, "environment_factories", None) is not None:
            return trainer_class._tokenize_prompts(self, prompts)
        distinct, positions = distinct_positions(prompts)
        prompt_ids, images, multimodal_fields = trainer_class._tokenize_prompts(self, distinct)
        if images is not None or multimodal_fields:
            return trainer_class._tokenize_prompts(self, prompts)
        return [list(prompt_ids[i]) for i in positions], None, {}

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
        if not fast_path_applies(self, images, multimodal_fields):
            return trainer_class._generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs)
        config = self.generation_config
        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          generation_kwargs=self.generation_kwargs,
                                          gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
              as model, torch.no_grad()):
            completion_ids = sample_completions(
                model, prompt_ids, max_new_tokens=config.max_new_tokens, stop_ids=list(self.eos_token_ids),
                pad_id=config.pad_token_id, temperature=config.temperature, top_k=config.top_k,
                top_p=config.top_p if config.top_p is not None else 1.0)
        return (completion_ids, None) if returns_logprobs else completion_ids

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        with completion_positions_only():
            return trainer_class._get_per_token_logps_and_entropies(self, *args, **kwargs)

    return type(trainer_class.__name__, (trainer_class,),
                {"_tokenize_prompts": _tokenize_prompts, "_generate_single_turn": _generate_single_turn,
                 "_get_per_token_logps_and_entropies": _get_per_token_logps_and_entropies})


@contextlib.contextmanager
def completion_positions_only():
    """TRL's fused LM head scores only the labelled (completion) positions where it runs Triton and every position
    elsewhere, to keep one tile shape for compilers such as Neuron's; on the CPU that costs the LM head and the
    log-softmax of every prompt token. Inside this context the head scores the completion positions on every device
    (the function it runs is the same; only the rows it is given differ)."""
    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original
