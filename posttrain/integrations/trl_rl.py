"""TRL's GRPOTrainer / RLOOTrainer with posttrain's sampling: three private hooks, nothing else changed.

- `_tokenize_prompts`: TRL's sampler repeats each prompt num_generations times in a row and TRL renders the chat
  template for every copy; the override renders each distinct prompt once and hands the ids back in TRL's order.
- `_generate_single_turn`: the completions come from posttrain.eval.sampling.sample_completions (one prefill per
  distinct prompt, the LM head on the last position only, a plain decode loop) in place of `model.generate`,
  with the same distribution (TRL's generation_config: temperature, top-k, top-p, stop tokens, length).
- `_get_per_token_logps_and_entropies`: TRL's fused LM head scores the completion positions only, on the CPU too.

TRL's own path runs instead wherever it does something the loop does not: vLLM or transformers' continuous
batching, images or other multimodal inputs, DeepSpeed or FSDP (whose parameters are gathered by TRL's context),
generation_kwargs, or a logits processor besides temperature, top-k and top-p (repetition_penalty, min_p, ...,
also where the model's own generation_config.json sets one: generate merges it in). tests/test_integrations.py
checks that the hooked names and their parameters still exist; tests/test_grpo_sampling.py that the loop draws
what generate draws and that the compact scoring equals TRL's.
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
    return not (trainer.use_vllm or getattr(trainer, "use_transformers_continuous_batching", False)
                or getattr(trainer, "generation_config", None) is None
                or images is not None or multimodal_fields or trainer._is_vlm
                or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled or trainer.args.generation_kwargs)


# generate's logits processors that the decode loop does not apply, each with the value at which it is off.
OTHER_PROCESSORS = {"min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None,
                    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
                    "begin_suppress_tokens": None, "sequence_bias": None, "min_new_tokens": 0, "min_length": 0,
                    "forced_bos_token_id": None, "forced_eos_token_id": None,
                    "exponential_decay_length_penalty": None, "renormalize_logits": False, "guidance_scale": 1.0,
                    "diversity_penalty": 0.0, "watermarking_config": None}


def sampling_settings(trl_config, model_config) -> dict | None:
    """What `generate` samples with: TRL's generation config, its unset fields filled from the model's own (as
    generate merges them); None where generate would apply a logits processor the decode loop does not (a
    checkpoint's generation_config.json may set min_p or no_repeat_ngram_size, say)."""
    def value(name):
        mine = getattr(trl_config, name, None)
        return mine if mine is not None else getattr(model_config, name, None)

    def off(name, neutral):
        v = value(name)
        return v is None or v == neutral or (isinstance(v, (list, dict)) and not v)

    if not all(off(name, neutral) for name, neutral in OTHER_PROCESSORS.items()):
        return None
    if value("num_beams") not in (None, 1) or value("do_sample") is False:
        return None
    settings = {name: value(name) for name in ("temperature", "top_k", "top_p")}
    # what generate uses where neither config sets one (GenerationConfig's global defaults)
    defaults = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
    return {"max_new_tokens": value("max_new_tokens"),
            **{name: defaults[name] if v is None else v for name, v in settings.items()}}


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
        settings = None
        if fast_path_applies(self, images, multimodal_fields):
            model = self.accelerator.unwrap_model(self.model_wrapped)
            settings = sampling_settings(self.generation_config, getattr(model, "generation_config", None))
        if settings is None:
            return trainer_class._generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs)
        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          generation_kwargs=self.generation_kwargs,
                                          gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
              as model, torch.no_grad()):
            completion_ids = sample_completions(model, prompt_ids, stop_ids=list(self.eos_token_ids),
                                                pad_id=self.generation_config.pad_token_id, **settings)
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
    log-softmax of every prompt token. Inside this context the head scores the completion positions on the CPU too
    (the function it runs is the same; only the rows it is given differ)."""
    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: original(device) or device.type == "cpu"
    try:
        yield
    finally:
        trl_utils._use_triton = original
