"""DPO set-up costs: the reference pass (its batch size changes no log-prob, eval mode, no TRL model hash), its
batch size in the speed plan, and the weight-file fingerprints that key the reference cache."""

import hashlib
import os
import random
from pathlib import Path

import pytest
import torch
import trl.trainer.dpo_trainer as trl_dpo
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import DPOConfig

from posttrain.config.schema import load_config
from posttrain.data import ref_cache
from posttrain.data.packing import PaddingFreePreferenceCollator, prepare_model
from posttrain.engine import plan as speed
from posttrain.integrations.trl_dpo import REF_COLUMNS, CachedReferenceDPOTrainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PAD = 1  # the tiny tokenizer's <|pad|>


def pairs(n, seed=3):
    rng = random.Random(seed)
    words = lambda k: [rng.randrange(10, 300) for _ in range(k)]  # noqa: E731
    return [{"prompt_ids": words(rng.randint(1, 12)), "chosen_ids": words(rng.randint(1, 20)),
             "rejected_ids": words(rng.randint(1, 20))} for _ in range(n)]


def reference_pass(model_dir, tokenizer, examples, batch_size, tmp_path, train_mode=False):
    """The reference log-probs CachedReferenceDPOTrainer's constructor computes, and the trainer."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    prepare_model(model)
    model.train(train_mode)
    args = DPOConfig(output_dir=str(tmp_path / f"b{batch_size}"), per_device_train_batch_size=2, use_cpu=True,
                     report_to=[], precompute_ref_log_probs=True, precompute_ref_batch_size=batch_size, max_length=64)
    trainer = CachedReferenceDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                                        processing_class=tokenizer, data_collator=PaddingFreePreferenceCollator(PAD))
    return torch.tensor([trainer.train_dataset[c] for c in REF_COLUMNS], dtype=torch.float64), trainer


def test_reference_batch_size_changes_no_log_prob(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    hashed, modes = [], []

    def hash_spy(module):
        hashed.append(module)
        return "h"

    monkeypatch.setattr(trl_dpo, "hash_module", hash_spy)
    original = CachedReferenceDPOTrainer.compute_ref_log_probs

    def spy(self, model, inputs):
        modes.append(model.training)
        return original(self, model, inputs)

    monkeypatch.setattr(CachedReferenceDPOTrainer, "compute_ref_log_probs", spy)
    examples = pairs(13)
    small, trainer_small = reference_pass(tiny_model_dir, tiny_tokenizer, examples, 2, tmp_path, train_mode=True)
    large, trainer_large = reference_pass(tiny_model_dir, tiny_tokenizer, examples, 8, tmp_path)
    assert (trainer_small.reference_forwards, trainer_large.reference_forwards) == (7, 2)
    # A float64 model, so that only the stored float32 sums round (in fp32 the tiny model's sums of ~-100 already
    # differ by ~2e-3 between TRL's own padded passes at batch 1 and 2: the rows differ from batch to batch).
    torch.testing.assert_close(large, small, atol=0, rtol=1e-6)
    assert not any(modes)  # every reference forward in eval mode...
    assert trainer_small.model.training and not trainer_large.model.training  # ...and the mode given back after
    assert hashed == [] and trl_dpo.hash_module is hash_spy  # TRL's model hash skipped (no DeepSpeed), then restored


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_reference_pass_batch_is_larger_than_the_micro_batch_when_it_fits(tiny_model, monkeypatch, capsys):
    cfg = load_config(CONFIGS / "tiny" / "dpo.yaml", ["output_dir=x"])
    examples = pairs(40)
    plan = speed.plan_dpo(cfg, tiny_model, examples, reference_in_memory=False)
    assert plan.reference_batch_size == speed.REFERENCE_BATCH_FACTOR * plan.batch_size
    assert plan.as_dict()["reference_batch_size"] == plan.reference_batch_size
    plan.report()
    assert "[dpo.precompute_ref]" in capsys.readouterr().out
    assert speed.plan_dpo(cfg, tiny_model, examples, reference_in_memory=True).reference_batch_size is None
    # Memory for about twice the micro-batch's reference forward: halved once, never below the micro-batch.
    per_pair = 2 * cfg.train.max_length * speed._layer_activation_bytes(tiny_model, 4)[0]
    micro = plan.batch_size
    monkeypatch.setattr(speed, "available_memory",
                        lambda: (int(2.5 * micro * per_pair / speed.FIT_FRACTION), "test"))
    assert speed.reference_batch(cfg.train, tiny_model, micro, 2 * cfg.train.max_length)[0] == 2 * micro
    monkeypatch.setattr(speed, "available_memory", lambda: (1, "test"))
    assert speed.reference_batch(cfg.train, tiny_model, micro, 2 * cfg.train.max_length)[0] == micro


def test_weights_fingerprint_hashes_every_block_and_changes_with_any_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(ref_cache, "BLOCK_BYTES", 1024)
    monkeypatch.setattr(ref_cache, "READ_BYTES", 100)
    data = bytearray(random.Random(0).randbytes(10 * 1024 + 7))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(data)
    blocks = [hashlib.sha256(data[i:i + 1024]).digest() for i in range(0, len(data), 1024)]
    assert ref_cache._file_digest(weights, {}) == hashlib.sha256(b"".join(blocks)).hexdigest()
    (tmp_path / "config.json").write_text("{}")
    before = ref_cache.weights_fingerprint(str(tmp_path))
    assert ref_cache.weights_fingerprint(str(tmp_path)) == before  # memoized: the same id without rehashing
    data[9 * 1024 + 3] ^= 1  # one bit in the last full block; same size
    weights.write_bytes(data)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert ref_cache.weights_fingerprint(str(tmp_path)) != before
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert ref_cache._file_digest(empty, {}) == hashlib.sha256(hashlib.sha256(b"").digest()).hexdigest()
