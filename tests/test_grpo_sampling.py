"""posttrain's RL sampling (posttrain/eval/sampling.py, hooked into TRL by posttrain/integrations/trl_rl.py) draws
exactly what TRL's `model.generate` path draws: the same completions from the same RNG state, over prompts of
different lengths repeated as TRL's sampler repeats them, with top-k/top-p, stop tokens and the length limit; and
the trainer's log-probs of completions, scored at the completion positions only, equal TRL's scoring of every
position."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from posttrain.eval.sampling import completions_through_stop, distinct_prompts, filter_logits, sample_completions


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def generate_reference(model, prompt_ids, stop_ids, pad_id, **settings):
    width = max(len(ids) for ids in prompt_ids)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    config = GenerationConfig(do_sample=True, pad_token_id=pad_id, eos_token_id=stop_ids, **settings)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return completions_through_stop(out[:, width:].tolist(), set(stop_ids))


@pytest.mark.parametrize("settings", [dict(temperature=1.0, top_k=0, top_p=1.0),
                                      dict(temperature=0.7, top_k=20, top_p=0.9),
                                      dict(temperature=1.3, top_k=0, top_p=0.5)])
@pytest.mark.parametrize("gather", [True, False], ids=["gathered-cache", "every-row-prefilled"])
def test_samples_equal_generate_from_the_same_rng_state(model, settings, gather, monkeypatch):
    """Both prefill paths: the distinct prompts' cache gathered out to their copies, and (a hybrid model's
    recurrent cache layers do not gather) every row prefilled."""
    import posttrain.eval.sampling as sampling

    if not gather:
        monkeypatch.setattr(sampling, "gatherable", lambda cache: False)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (length,), generator=generator).tolist() for length in (3, 9, 6)]
    prompt_ids = [p for p in prompts for _ in range(4)]  # TRL's sampler: each prompt num_generations times in a row
    stop_ids = [7, 11, 13, 17, 19, 23, 29, 31]  # frequent enough that some rows stop early
    stopped_early = 0
    for seed in range(5):
        torch.manual_seed(seed)
        expected = generate_reference(model, prompt_ids, stop_ids, 0, max_new_tokens=12, **settings)
        torch.manual_seed(seed)
        drawn = sample_completions(model, prompt_ids, max_new_tokens=12, stop_ids=stop_ids, pad_id=0, **settings)
        assert drawn == expected
        stopped_early += sum(len(row) < 12 for row in drawn)
        assert all(len(row) == 12 or row[-1] in stop_ids for row in drawn)
    assert stopped_early > 0


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    expected = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.6)(None, logits)))
    assert torch.equal(filter_logits(logits, 0.6, 10, 0.8), expected)


def test_gatherable_cache_layers_only():
    from transformers import DynamicCache, LlamaConfig

    from posttrain.eval.sampling import gatherable

    config = LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    assert gatherable(DynamicCache(config=config))
    hybrid = DynamicCache(config=config)
    hybrid.layers[1] = type("LinearAttentionLayer", (), {})()  # conv/recurrent state: no row gather
    assert not gatherable(hybrid) and not gatherable(object())


def test_generation_settings_merge_the_models_own_and_refuse_other_processors():
    """generate fills what TRL leaves unset from the model's generation_config; a processor the loop does not
    apply (there or in TRL's config) sends sampling down TRL's path."""
    from transformers import GenerationConfig

    from posttrain.integrations.trl_rl import sampling_settings

    trl = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.95, top_k=0,
                           repetition_penalty=1.0)
    assert sampling_settings(trl, GenerationConfig(temperature=0.3, top_k=40)) == {
        "max_new_tokens": 8, "temperature": 0.8, "top_k": 0, "top_p": 0.95}
    assert sampling_settings(GenerationConfig(max_new_tokens=4, do_sample=True), None) == {
        "max_new_tokens": 4, "temperature": 1.0, "top_k": 50, "top_p": 1.0}  # generate's defaults
    for own in (dict(min_p=0.05), dict(no_repeat_ngram_size=3), dict(typical_p=0.9), dict(suppress_tokens=[5])):
        assert sampling_settings(trl, GenerationConfig(**own)) is None, own
    assert sampling_settings(GenerationConfig(max_new_tokens=8, do_sample=True, repetition_penalty=1.1), None) is None
    assert sampling_settings(GenerationConfig(max_new_tokens=8, do_sample=True, num_beams=2), None) is None


def test_distinct_prompts_keep_first_seen_order():
    distinct, rows = distinct_prompts([[1, 2], [1, 2], [3], [1, 2], [3]])
    assert distinct == [[1, 2], [3]] and rows.tolist() == [0, 0, 1, 0, 1]


def test_completion_positions_only_scores_as_trl_scores_every_position(model):
    """TRL's fused LM head with and without the compaction that completion_positions_only switches on (the CPU
    path scores every position): the same per-token log-probs and entropies, and the same gradients."""
    import copy

    from trl.trainer.utils import add_fused_lm_head

    from posttrain.integrations.trl_rl import completion_positions_only

    fused = copy.deepcopy(model).train()
    add_fused_lm_head(fused, temperature=0.9, outputs=("log_probs", "entropy"))
    ids = torch.randint(5, 200, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-4] = -100
    results = []
    for compact in (False, True):
        fused.zero_grad()
        with completion_positions_only() if compact else torch.enable_grad():
            out = fused(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.log_probs[:, -4:].sum().backward()
        grads = [p.grad.clone() for p in fused.parameters() if p.grad is not None]
        results.append((out.log_probs[:, -4:].detach(), out.entropy[:, -4:].detach(), grads))
    (lp_full, ent_full, g_full), (lp_compact, ent_compact, g_compact) = results
    torch.testing.assert_close(lp_compact, lp_full, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_compact, ent_full, rtol=0, atol=1e-5)
    for a, b in zip(g_compact, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
