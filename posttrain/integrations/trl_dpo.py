"""TRL's DPOTrainer, taking posttrain's tokenized pairs and cached reference log-probs as they are.

Two small overrides, nothing else: a dataset that is already tokenized (prompt_ids/chosen_ids/rejected_ids)
skips TRL's preparation, and a dataset that already carries ref_chosen_logps/ref_rejected_logps (from
posttrain's on-disk cache, see posttrain.data.ref_cache) skips TRL's reference pass. Every reference forward
pass of the precompute goes through `compute_ref_log_probs`, which counts them (`reference_forwards`) so
tests and logs can show that a cached run ran none. (With dpo.precompute_ref off, TRL runs the reference
inside every training step instead, uncounted.)

Padding-free batches (train.packing, posttrain.data.packing.PaddingFreePreferenceCollator): the batch carries TRL's
padded layout plus the same sequences packed into rows. `compute_loss` and `compute_ref_log_probs` hand TRL a
`PackedForward` in place of the model: it runs the packed rows (documents isolated by position_ids) and returns
TRL's fused-head outputs scattered back into the padded layout, so TRL's loss, metrics and every loss_type run
unchanged on per-sequence sums that equal the padded ones up to float rounding. (TRL 1.16 disables its own
`padding_free` for DPO.) Not packed: the reference forward of a PEFT policy with precompute_ref off, which TRL
runs on `self.model` directly, padded.

Set-up cost: TRL hashes every weight of the reference in its constructor (`hash_module`) only to name the datasets
cache file of its own reference pass; posttrain's pass keeps its result in memory and its disk cache is keyed by the
weight files, so that hash (seconds for a 0.5B model) is skipped unless TRL's own pass runs (DeepSpeed).
"""

from __future__ import annotations

import contextlib

import torch
import trl.trainer.dpo_trainer as trl_dpo
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from trl import DPOTrainer

from posttrain import log
from posttrain.data.packing import PACKED_KEYS
from posttrain.integrations.transformers_warnings import no_is_gradient_checkpointing_warning

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
PER_TOKEN_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


class PackedForward:
    """Stands in for the model inside TRL's DPO loss: TRL calls it with its padded batch and fused_lm_head=True;
    it runs the packed rows instead and returns the per-token outputs in TRL's padded layout."""

    def __init__(self, model, packed: dict):
        self.model, self.packed = model, packed

    def __call__(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:  # TRL's (deprecated) return_outputs path wants logits: the padded forward
            return self.model(*args, labels=labels, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "position_ids")}
        kwargs["use_cache"] = False  # with a cache the packed sequences would attend to each other
        p = self.packed
        outputs = self.model(input_ids=p["packed_input_ids"], position_ids=p["packed_position_ids"],
                             labels=p["packed_labels"], fused_lm_head=True, **kwargs)
        index, missing = p["packed_index"].clamp(min=0), p["packed_index"] < 0
        for name in PER_TOKEN_OUTPUTS:
            value = getattr(outputs, name, None)
            if value is not None:  # zero where TRL's padded layout has no token, as TRL's own outputs are
                setattr(outputs, name, value.reshape(-1)[index].masked_fill(missing, 0))
        return outputs


def pop_packed(inputs: dict) -> dict | None:
    """The packed tensors of a padding-free batch, removed from `inputs` (TRL would pass them to the model)."""
    if PACKED_KEYS[0] not in inputs:
        return None
    return {key: inputs.pop(key) for key in PACKED_KEYS}


@contextlib.contextmanager
def _model_hash_for_deepspeed_only(trainer):
    """While TRL's constructor runs: its `hash_module` (the reference's state_dict copied to the CPU, upcast to fp32 and
    sha256'd, tied embeddings twice: ~2.5 GB for Qwen2.5-0.5B) runs only where TRL's own reference pass will use it."""
    original = getattr(trl_dpo, "hash_module", None)
    if original is None:  # a TRL without it: nothing to skip
        yield
        return
    def hash_module(module):
        return original(module) if trainer.is_deepspeed_enabled else None

    trl_dpo.hash_module = hash_module
    try:
        yield
    finally:
        if trl_dpo.hash_module is hash_module:  # another constructor's swap in between keeps its own restore
            trl_dpo.hash_module = original


class CachedReferenceDPOTrainer(DPOTrainer):
    def __init__(self, *args, **kwargs):
        self.reference_forwards = 0  # set first: TRL's constructor already runs the reference pass
        with _model_hash_for_deepspeed_only(self):
            super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's reference pass, keeping the result in memory: TRL round-trips it through a datasets cache file
        that, for an in-memory dataset, lives in a per-process temp dir, so other DDP ranks cannot find it.
        batch_size is dpo's precompute_ref_batch_size (posttrain.engine.plan.plan_dpo: larger than the training
        micro-batch, as no activations are kept). The model runs in eval mode (TRL's compute_ref_log_probs adds
        no_grad), and the results stay on the device until the end: one copy to the host, not one per batch."""
        if all(c in dataset.column_names for c in REF_COLUMNS):
            return dataset
        if self.is_deepspeed_enabled:  # ZeRO needs TRL's inference-engine wrapping
            return super()._precompute_ref_logps(dataset, name, batch_size)
        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False))
        model = self.ref_model or self.model
        was_training = model.training
        model.eval()
        chosen, rejected = [], []
        try:
            for batch in tqdm(loader, desc=f"reference log-probs ({name})",
                              disable=log.progress_disabled()):
                pair = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
                chosen.append(pair[0])
                rejected.append(pair[1])
        finally:
            model.train(was_training)
        return dataset.add_column(REF_COLUMNS[0], torch.cat(chosen).float().cpu().tolist()).add_column(
            REF_COLUMNS[1], torch.cat(rejected).float().cpu().tolist())

    def compute_ref_log_probs(self, model, inputs):
        self.reference_forwards += 1
        packed = pop_packed(inputs)
        with no_is_gradient_checkpointing_warning():  # TRL reads transformers' deprecated name around it
            return super().compute_ref_log_probs(model if packed is None else PackedForward(model, packed), inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        packed = pop_packed(inputs)
        if packed is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ref_model = self.ref_model  # a separate reference (precompute_ref off) runs packed too
        self.ref_model = None if ref_model is None else PackedForward(ref_model, packed)
        try:
            return super().compute_loss(PackedForward(model, packed), inputs, return_outputs, num_items_in_batch)
        finally:
            self.ref_model = ref_model
