"""Padding-free packing: isolation, exact per-document losses, label boundaries, loss normalization across
accumulation, the auto speed settings, and DPO's packed log-probs."""

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from posttrain.config.schema import load_config
from posttrain.data.packing import (
    PaddingFreeCollator,
    PaddingFreePreferenceCollator,
    best_fit_decreasing,
    pack_examples,
    packed_row,
    prepare_model,
    tightest_rows,
)
from posttrain.data.sft_tokenize import IGNORE
from posttrain.engine import plan as speed

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PAD = 1  # the tiny tokenizer's <|pad|>


def documents(n, seed=0, longest=60):
    """Token documents with a masked prompt of random length, as posttrain's tokenizer produces them."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        ids = [rng.randrange(10, 300) for _ in range(rng.randint(3, longest))]
        prompt = rng.randint(0, len(ids) - 2)
        docs.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return docs


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    prepare_model(model)
    return model.eval()


def token_losses(model, batch):
    """Per-position loss of predicting labels[t + 1] from position t (0 where ignored), fp32."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none")
    return losses * (labels != IGNORE)


def test_best_fit_decreasing_keeps_every_document_and_fills_rows():
    rng = random.Random(1)
    lengths = [rng.randint(1, 128) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert sum(lengths) / (128 * len(bins)) > 0.95
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing([129], 128)


def test_preference_rows_never_hold_more_slots_than_padding():
    rng = random.Random(2)
    for _ in range(50):
        lengths = [rng.randint(20, 200) for _ in range(16)]
        bins = tightest_rows(lengths)
        assert sorted(i for b in bins for i in b) == list(range(16))
        assert len(bins) * max(sum(lengths[i] for i in b) for b in bins) <= 16 * max(lengths)


def test_labels_at_document_boundaries_positions_and_no_attention_mask():
    a = {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [8, 9]}
    row = packed_row([a, b])
    # b's first token would be predicted from a's last token: ignored, as unpacked training never predicts it
    assert row["labels"] == [IGNORE, 6, 7, IGNORE, 9] and row["position_ids"] == [0, 1, 2, 0, 1]
    batch = PaddingFreeCollator(PAD)([row, packed_row([b])])
    assert "attention_mask" not in batch  # with one, transformers would not isolate the documents
    assert batch["input_ids"][1].tolist() == [8, 9, PAD, PAD, PAD]
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1, 2]  # the padding is a segment of its own
    assert batch["labels"][1].tolist() == [IGNORE, 9, IGNORE, IGNORE, IGNORE]
    unpacked = PaddingFreeCollator(PAD)([a, b])  # evaluation rows: padded with an attention mask
    assert unpacked["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]] and "position_ids" not in unpacked
    flat = PaddingFreeCollator(PAD, flatten=True)([row, packed_row([b])])  # flash-attention: one row, no padding
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 8, 9]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert flat["cu_seq_lens_q"].tolist() == [0, 3, 5, 7] and flat["max_length_q"] == 3
    assert flat["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9, IGNORE, 9]]


@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "one-row"])
def test_documents_in_a_packed_row_never_see_each_other(model, flatten):
    first, second = documents(2, seed=3)
    third = {"input_ids": [11, 12, 13], "labels": [11, 12, 13]}
    batch = PaddingFreeCollator(PAD, flatten)([packed_row([first, second]), packed_row([third])])
    start = len(first["input_ids"])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, start:]
        packed = packed[: len(second["input_ids"])]
        alone = model(input_ids=torch.tensor([second["input_ids"]])).logits[0]
        leaked = model(input_ids=batch["input_ids"]).logits[0, start: start + len(second["input_ids"])]
    assert (packed - alone).abs().max() < 1e-5
    assert (leaked - alone).abs().max() > 1e-3  # the check above can fail


def test_packed_and_unpacked_give_the_same_per_document_loss(model):
    docs = documents(24, seed=5)
    bins = best_fit_decreasing([len(d["input_ids"]) for d in docs], 128)
    rows = [packed_row([docs[i] for i in b]) for b in bins]
    losses = token_losses(model, PaddingFreeCollator(PAD)(rows))
    packed = {}
    for r, members in enumerate(bins):
        offset = 0
        for i in members:  # document i's predictions are positions offset .. offset + len - 2 of row r
            n = len(docs[i]["input_ids"])
            packed[i] = losses[r, offset: offset + n - 1].sum().item()
            offset += n
    padded = token_losses(model, PaddingFreeCollator(PAD)(docs))  # unpacked, padded, as TRL batches them
    for i, doc in enumerate(docs):
        alone = token_losses(model, PaddingFreeCollator(PAD)([doc])).sum().item()
        count = sum(label != IGNORE for label in doc["labels"][1:])
        assert packed[i] / count == pytest.approx(alone / count, abs=1e-5)
        assert padded[i].sum().item() / count == pytest.approx(alone / count, abs=1e-5)


def one_sgd_step(model_dir, dataset, tmp_path, batch_size, accum, collator):
    """One optimizer step (SGD, no clipping) through TRL's SFTTrainer: (logged loss, parameter change)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prepare_model(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch_size,
                     gradient_accumulation_steps=accum, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                     max_grad_norm=0.0, logging_steps=1, use_cpu=True, bf16=False, gradient_checkpointing=False,
                     report_to=[], save_strategy="no", remove_unused_columns=False,
                     dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(dataset), data_collator=collator)
    trainer.train()
    loss = next(log["loss"] for log in trainer.state.log_history if "loss" in log)
    return loss, {n: (p.detach() - before[n]) for n, p in model.named_parameters()}


def test_step_is_the_token_mean_packed_unpacked_and_accumulated(tiny_model_dir, tiny_tokenizer, tmp_path):
    """batch N == batch 1 x N accumulation, and packed == unpacked: one step over the same documents gives the
    same loss and the same update (mean over all supervised tokens of the step)."""
    docs = documents(12, seed=7)
    rows = pack_examples(docs, 128).rows
    assert 1 < len(rows) < len(docs)
    collator = PaddingFreeCollator(tiny_tokenizer.pad_token_id)
    unpacked = one_sgd_step(tiny_model_dir, docs, tmp_path / "u", len(docs), 1, None)
    packed = one_sgd_step(tiny_model_dir, rows, tmp_path / "p", len(rows), 1, collator)
    accumulated = one_sgd_step(tiny_model_dir, rows, tmp_path / "a", 1, len(rows), collator)
    for loss, update in (packed, accumulated):
        assert loss == pytest.approx(unpacked[0], abs=1e-5)
        assert max((update[n] - unpacked[1][n]).abs().max().item() for n in update) < 1e-5


def test_auto_settings_are_printed_and_each_key_overrides(model, monkeypatch, capsys):
    cfg = load_config(CONFIGS / "tiny" / "sft.yaml", ["output_dir=x"])
    docs = documents(200, seed=9)
    packed = pack_examples(docs, cfg.train.max_length)
    roomy = speed.plan_sft(cfg, model, docs, packed)
    assert (roomy.grad_accum, roomy.gradient_checkpointing, roomy.optim) == (1, False, "adamw_torch_fused")
    rows = roomy.batch_size
    assert rows == round(32 * packed.tokens / len(docs) / packed.mean_row_tokens) and rows > 2

    def need(r, checkpointing):
        return speed.estimate_bytes(model, r * 128, checkpointing, 4, None, True)

    # Memory for 2 rows at a time: the same step in more micro-batches, no checkpointing.
    monkeypatch.setattr(speed, "available_memory", lambda: (int(need(2, False) / speed.FIT_FRACTION) + 1, "test"))
    split = speed.plan_sft(cfg, model, docs, packed)
    assert (split.batch_size, split.grad_accum, split.gradient_checkpointing) == (2, -(-rows // 2), False)
    # Not even one row without checkpointing: checkpointing on.
    tight = int(need(1, True) / speed.FIT_FRACTION) + 1
    assert tight < need(1, False) / speed.FIT_FRACTION
    monkeypatch.setattr(speed, "available_memory", lambda: (tight, "test"))
    squeezed = speed.plan_sft(cfg, model, docs, packed)
    assert (squeezed.batch_size, squeezed.gradient_checkpointing) == (1, True)
    # Every decision yields to its key.
    cfg = load_config(CONFIGS / "tiny" / "sft.yaml", ["output_dir=x", "train.gradient_checkpointing=false",
                                                       "train.grad_accum=2", "train.optim=adamw_torch"])
    forced = speed.plan_sft(cfg, model, docs, packed)
    assert (forced.grad_accum, forced.gradient_checkpointing, forced.optim) == (2, False, "adamw_torch")
    forced.report()
    said = capsys.readouterr()
    for key in ("train.packing", "train.grad_accum", "train.gradient_checkpointing", "train.optim",
                "train.liger_kernels"):
        assert key in said.out
    assert "posttrain: warning: estimated memory:" in said.err and "may not fit" in said.err  # a warning, on stderr


def test_tokens_per_step_sets_the_step_budget(model):
    cfg = load_config(CONFIGS / "tiny" / "sft.yaml", ["output_dir=x", "train.tokens_per_step=1024"])
    docs = documents(200, seed=9)
    packed = pack_examples(docs, cfg.train.max_length)
    assert speed.plan_sft(cfg, model, docs, packed).batch_size == round(1024 / packed.mean_row_tokens)


@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "one-row"])
def test_padding_free_dpo_log_probs_equal_the_padded_ones(tiny_model_dir, flatten):
    from trl.trainer.utils import add_fused_lm_head

    from posttrain.integrations.trl_dpo import PackedForward, pop_packed

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    rng = random.Random(11)
    words = lambda k: [rng.randrange(10, 300) for _ in range(k)]  # noqa: E731
    pairs = [{"prompt_ids": words(rng.randint(1, 12)), "chosen_ids": words(rng.randint(1, 20)),
              "rejected_ids": words(rng.randint(1, 20))} for _ in range(6)]
    batch = PaddingFreePreferenceCollator(PAD, max_length=24, flatten=flatten)(pairs)
    packed = pop_packed(batch)
    assert packed["packed_input_ids"].numel() < batch["input_ids"].numel()  # padding removed
    assert (packed["packed_input_ids"].shape[0] == 1) == flatten
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels,
              "fused_lm_head": True, "use_cache": False}
    with torch.no_grad():
        padded = model(**kwargs)
        unpadded = PackedForward(model, packed)(**kwargs)
    torch.testing.assert_close(unpadded.log_probs.sum(1), padded.log_probs.sum(1), atol=1e-5, rtol=0)
    mask = batch["completion_mask"][:, 1:].bool()
    torch.testing.assert_close(unpadded.entropy[mask], padded.entropy[mask], atol=1e-5, rtol=0)
    assert torch.equal(unpadded.is_top1, padded.is_top1)


def test_dpo_padding_free_with_cached_reference_trains_like_padded_trl(tmp_path):
    """posttrain's DPO defaults (padding-free, reference log-probs precomputed) and TRL's way (padded, the
    reference run in every step) give the same losses step by step."""
    import posttrain

    def run(name, *overrides):
        cfg = load_config(CONFIGS / "tiny" / "dpo.yaml", [
            "model.name_or_path=tiny:llama", f"output_dir={tmp_path / name}", "data.eval=[]", "data.eval_fraction=0",
            "data.train={path: tiny:preference, fraction: 0.1}", "train.max_steps=3", "train.batch_size=8",
            "train.logging_steps=1", "train.warmup_ratio=0", *overrides])
        return posttrain.run(cfg)

    packed = run("packed")
    padded = run("padded", "train.packing=false", "dpo.precompute_ref=false")
    assert packed["speed"]["packing"] and packed["reference_forwards"] > 0
    assert [s for s, _ in packed["train_loss_history"]] == [1, 2, 3]
    for (_, ours), (_, theirs) in zip(packed["train_loss_history"], padded["train_loss_history"]):
        assert ours == pytest.approx(theirs, abs=1e-5)
    assert packed["last_train_log"]["rewards/margins"] == pytest.approx(padded["last_train_log"]["rewards/margins"],
                                                                        abs=1e-5)
