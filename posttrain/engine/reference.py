"""DPO's reference log-probs, cached on disk: a later run with the same reference weights, tokenized pairs and
precision (a beta sweep, a rerun) loads them instead of running the reference model (data/ref_cache.py keeps the
files)."""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset

from posttrain import log
from posttrain.data import ref_cache
from posttrain.integrations.trl_dpo import REF_COLUMNS
from posttrain.models import adapter_base, is_adapter_dir, resolve_path, torch_dtype


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


@dataclass
class ReferenceLookup:
    """The train and eval pairs as Datasets, reference log-probs attached where the on-disk cache had them."""

    train_set: Dataset
    eval_set: Dataset | None
    missing: dict[str, str]  # "train"/"eval" -> the cache key of each split whose log-probs this run computes

    @property
    def all_cached(self) -> bool:
        return not self.missing


def look_up_reference(cfg, model_cfg, ref_name: str, ref_resolved: str, train_pairs: list[dict],
                      eval_pairs: list[dict] | None, dropped: str = "") -> ReferenceLookup:
    """Attach cached reference log-probs; the key holds the reference weights, the tokenized pairs and the precision
    (dtype, attention, and whether the base is 4-bit: a QLoRA base scores differently from the same weights).
    dropped: what the data layer dropped, said beside the number of pairs (data/examples.py, dropped_note)."""
    reference = reference_fingerprint(ref_name, ref_resolved, cfg.model.revision)
    quantized = cfg.adapter.quant_type if cfg.adapter and cfg.adapter.method == "qlora" else "full"
    dtype = f"{torch_dtype(cfg.model.dtype)}|{model_cfg.attn_implementation}|{quantized}"
    sets, missing = {"eval": None}, {}
    for split, pairs in (("train", train_pairs), ("eval", eval_pairs)):
        if pairs:
            sets[split], key, hit = with_cached_reference(pairs, reference, dtype)
            if not hit:
                missing[split] = key
    source = ("from cache" if not missing else "computed this run") if cfg.dpo.precompute_ref else "computed each step"
    log.info(f"{len(train_pairs)} pairs{dropped}; reference log-probs {source}")
    return ReferenceLookup(sets["train"], sets["eval"], missing)


def store_computed_reference(trainer, lookup: ReferenceLookup) -> None:
    """Write what the trainer's precompute pass just added to each split the cache lacked (a hit is on disk)."""
    datasets = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
    for split, key in lookup.missing.items():
        store_reference(datasets[split], key, trainer.accelerator.is_main_process)
