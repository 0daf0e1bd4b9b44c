"""TRL's DPOTrainer, taking posttrain's tokenized pairs and cached reference log-probs as they are.

Two small overrides, nothing else: a dataset that is already tokenized (prompt_ids/chosen_ids/rejected_ids)
skips TRL's preparation, and a dataset that already carries ref_chosen_logps/ref_rejected_logps (from
posttrain's on-disk cache, see posttrain.ref_cache) skips TRL's reference pass. Every reference forward
pass of the precompute goes through `compute_ref_log_probs`, which counts them (`reference_forwards`) so
tests and logs can show that a cached run ran none. (With dpo.precompute_ref off, TRL runs the reference
inside every training step instead, uncounted.)
"""

from __future__ import annotations

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from trl import DPOTrainer

from posttrain import ref_cache
from posttrain.models import adapter_base, is_adapter_dir, resolve_path

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


class CachedReferenceDPOTrainer(DPOTrainer):
    def __init__(self, *args, **kwargs):
        self.reference_forwards = 0  # set first: TRL's constructor already runs the reference pass
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's reference pass, keeping the result in memory: TRL round-trips it through a datasets cache file
        that, for an in-memory dataset, lives in a per-process temp dir, so other DDP ranks cannot find it."""
        if all(c in dataset.column_names for c in REF_COLUMNS):
            return dataset
        if self.is_deepspeed_enabled:  # ZeRO needs TRL's inference-engine wrapping
            return super()._precompute_ref_logps(dataset, name, batch_size)
        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False))
        model = self.ref_model or self.model
        chosen, rejected = [], []
        for batch in tqdm(loader, desc=f"reference log-probs ({name})", disable=not self.accelerator.is_main_process):
            pair = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
            chosen.append(pair[0].float().cpu())
            rejected.append(pair[1].float().cpu())
        return dataset.add_column(REF_COLUMNS[0], torch.cat(chosen).tolist()).add_column(
            REF_COLUMNS[1], torch.cat(rejected).tolist())

    def compute_ref_log_probs(self, model, inputs):
        self.reference_forwards += 1
        return super().compute_ref_log_probs(model, inputs)


def reference_fingerprint(name_or_path: str, resolved: str, revision: str | None) -> str:
    """Fingerprint of the reference weights; an adapter folder also fingerprints its base."""
    own = ref_cache.weights_fingerprint(resolved, revision)
    if is_adapter_dir(resolved):
        base = adapter_base(resolved)
        own += "+" + ref_cache.weights_fingerprint(resolve_path(base), None)
    return own


def with_cached_reference(examples: list[dict], reference: str, dtype: str) -> tuple[Dataset, str, bool]:
    """The pairs as a Dataset, with reference log-probs attached when the cache has them; (dataset, key, hit)."""
    key = ref_cache.cache_key(reference, examples, dtype)
    cached = ref_cache.load(key)
    dataset = Dataset.from_list(examples)
    if cached is None or len(cached[0]) != len(examples):
        return dataset, key, False
    chosen, rejected = cached
    dataset = dataset.add_column(REF_COLUMNS[0], chosen.tolist()).add_column(REF_COLUMNS[1], rejected.tolist())
    return dataset, key, True


def store_reference(dataset: Dataset, key: str, is_main_process: bool = True) -> None:
    """Save the reference log-probs just computed for `dataset` under `key` (once, by the main process)."""
    if is_main_process and all(c in dataset.column_names for c in REF_COLUMNS):
        ref_cache.save(key, dataset[REF_COLUMNS[0]], dataset[REF_COLUMNS[1]])
