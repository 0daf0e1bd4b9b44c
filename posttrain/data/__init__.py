"""Data, from files or the hub to tokenized examples: sources.py reads, formats.py normalizes every dataset format,
sft_tokenize.py and preference.py tokenize with exact loss masks, examples.py is each objective's entry point,
packing.py packs documents into rows, ref_cache.py keeps DPO's reference log-probs on disk."""
