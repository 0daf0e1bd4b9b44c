"""Tokenization exactly as lm-eval 0.4.13's HFLM does it, so that scores are comparable number for number.

Mirrors `lm_eval.api.model.TemplateLM._encode_pair`, `HFLM.tok_encode` and `HFLM.prefix_token_id`:
- text is encoded with the tokenizer's default special tokens (a BOS-adding tokenizer adds its BOS), except
  when the text already starts with the prefix token's string;
- a context's trailing whitespace moves to the continuation, then `encode(context + continuation)` is split
  at `len(encode(context))`, because BPE merges across the boundary would otherwise drop or double a space;
- an empty context is replaced by the prefix token (BOS, else EOS), which also opens every perplexity text.
"""

from __future__ import annotations


def prefix_token_id(tokenizer) -> int:
    """The token that conditions the first real token: BOS when the tokenizer has one, else EOS."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")
    return tokenizer.eos_token_id


def encode(tokenizer, text: str) -> list[int]:
    """HFLM.tok_encode: default special tokens unless `text` already starts with the prefix token's text."""
    prefix_text = tokenizer.decode(prefix_token_id(tokenizer))
    if prefix_text and text.startswith(prefix_text):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for scoring log p(continuation | context), lm-eval style."""
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def model_max_length(model) -> int:
    """lm-eval's HFLM.max_length: the first of these config attributes that is set, else 2048."""
    config = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return 2048


def vocab_guard(base, other, what: str) -> None:
    """Comparing two models token by token only means something when they share one vocabulary."""
    from posttrain.errors import PosttrainError

    if base.tokenizer.get_vocab() != other.tokenizer.get_vocab():
        raise PosttrainError(
            f"{what}: {other.name} and {base.name} use different tokenizers; compare models that share a vocabulary"
        )
