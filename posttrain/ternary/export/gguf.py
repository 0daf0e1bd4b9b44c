"""GGUF export of ternary models for llama.cpp: decoder linears in TQ1_0 / TQ2_0, the rest as llama.cpp expects.

`export_gguf(model, tokenizer, out_dir, "gguf-tq2")` writes out_dir/model-tq2_0.gguf (gguf-tq1: model-tq1_0.gguf)
for a Llama- or Qwen2-architecture model whose decoder linears are posttrain BitLinear layers, with the
metadata and tensor layout of llama.cpp's convert_hf_to_gguf.py, so that llama.cpp (llama-cli, llama-server,
llama-cpp-python) runs it with no posttrain code.

Tensors: ternary linears (q/k/v/o, gate/up/down) in TQ2_0 (2.0625 bits/weight) or TQ1_0 (1.6875) when
in_features is a multiple of 256 (the TQ block), else Q8_0 (8.5; in_features % 32 == 0) or F16, each fallback
reported (Qwen2.5-0.5B, hidden 896: only down_proj fits, ~6.6 bits/weight over its ternary layers).
Embeddings, output head (absent when tied: llama.cpp then reuses token_embd) and skipped linears in
`dense_type`: f16 by default (posttrain keeps them high precision, so llama.cpp computes what posttrain
computes), q8_0 (about half the size, a small extra error) or f32. Norms, biases, rope_freqs: F32.
Values: every ternary tensor holds codes x scale (dequantize(ternary_codes(W))). TQ types store per 256-block
an fp16 scale d = max|block| = s and codes in {-1, 0, 1}, so llama.cpp's weights are codes x fp16(s): exact
codes, the scale rounded to fp16 (relative error <= 2^-11). The Q8_0 fallback stores 127 x fp16(s / 127) for
the non-zero codes (same size of error). Llama q/k rows are permuted as convert_hf_to_gguf's
`LlamaModel.permute` does (llama.cpp's rope pairs adjacent dimensions, transformers' rotate_half the two
halves); a row permutation keeps the values ternary. Qwen2 uses NEOX rope: no permutation.

Activations: llama.cpp quantizes them to 8 bits per block of 256 values (Q8_K) for TQ matmuls, not per token
as BitNet/posttrain does (F16/Q8_0 matmuls see f16/Q8_0 activations), so logits differ slightly: measured on
tests/test_ternary_gguf.py's fitted hidden-256 models, max |logit diff| ~0.06, perplexity equal to 4 digits,
11-12 of 12 greedy generations identical. Weight-only BitLinears (act_bits=None) get those 8-bit activations.

Metadata: general.architecture (llama | qwen2), {arch}.context_length, embedding_length, block_count,
feed_forward_length, attention.head_count(_kv), attention.key/value_length, rope.freq_base (+ rope scaling:
linear, yarn, and Llama-3's rope_freqs tensor), attention.layer_norm_rms_epsilon, vocab_size and
rope.dimension_count (llama), general.file_type (MOSTLY_TQ1_0/TQ2_0), general.quantization_version;
tokenizer.ggml.model = gpt2 (byte-level BPE), .pre, .tokens, .token_type, .merges, bos/eos/unk/pad ids,
add_bos/add_eos, chat_template; posttrain.ternary_tensors (names of the ternary tensors, for bit accounting).
tokenizer.ggml.pre is chosen as convert_hf_to_gguf does (hash of the tokenization of its check text: Llama-3
-> llama-bpe, Qwen1.5/2/2.5/3 -> qwen2, SmolLM -> smollm, GPT-2 -> gpt-2), else from the tokenizer.json
pre-tokenizer (Llama-3 / Qwen2 split regex, byte-level GPT-2, or digits-then-byte-level = smollm, which is
posttrain's tiny tokenizer); anything else is refused rather than tokenized differently by llama.cpp.

Refused with a PosttrainError: other architectures, BitLinear use_rms_norm (no place for it in llama.cpp's
graph), group scales not a multiple of 256, Qwen2 sliding window, unknown rope scaling or tokenizers. The file
is written under a temporary name and renamed at the end: a crash never leaves a complete-looking .gguf.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch
from torch import nn

from posttrain.errors import PosttrainError
from posttrain.ternary.qat.bitlinear import bitlinear_layers
from posttrain.ternary.quant import dequantize

GGUF_FORMATS = {"gguf-tq1": "TQ1_0", "gguf-tq2": "TQ2_0"}
DENSE_TYPES = {"f16": "F16", "q8_0": "Q8_0", "f32": "F32"}
ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2"}
TERNARY_KEY = "posttrain.ternary_tensors"
QK_K, QK8_0 = 256, 32

# convert_hf_to_gguf.py get_vocab_base_pre: sha256 of str(tokenizer.encode(CHKTXT)) -> tokenizer.ggml.pre
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B (3.x)
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B (Qwen2, 2.5)
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}
_SPLIT_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_BY_SPLIT_REGEX = {  # tokenizer.json Split patterns (followed by ByteLevel without regex)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _SPLIT_TAIL: "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _SPLIT_TAIL: "qwen2",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise PosttrainError("GGUF export needs the gguf package: pip install 'posttrain[gguf]'") from None
    return gguf


def gguf_filename(fmt: str) -> str:
    """model-tq2_0.gguf for gguf-tq2, model-tq1_0.gguf for gguf-tq1."""
    return f"model-{GGUF_FORMATS[fmt].lower()}.gguf"


def check_gguf_options(fmt: str, dense_type: str) -> None:
    """Fail before any model is loaded: unknown format or dense type, or no gguf package."""
    if fmt not in GGUF_FORMATS:
        raise PosttrainError(f"GGUF format {fmt!r} is unknown: use one of {', '.join(GGUF_FORMATS)}")
    if dense_type not in DENSE_TYPES:
        raise PosttrainError(f"GGUF dense type {dense_type!r} is unknown: use one of {', '.join(DENSE_TYPES)}")
    _gguf()


def _check_model(model: nn.Module) -> tuple[str, dict[str, nn.Module]]:
    """(model_type, {weight key: BitLinear}) after refusing what llama.cpp cannot run as posttrain does."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise PosttrainError(f"GGUF export supports Llama and Qwen2 architectures, not {model_type!r}")
    layers = bitlinear_layers(model)
    if not layers:
        raise PosttrainError("GGUF export: the model has no BitLinear layers: run posttrain.ternary.convert first")
    for name, layer in layers:
        if layer.rms_norm is not None:
            raise PosttrainError(f"layer {name} uses use_rms_norm, which llama.cpp's {model_type} graph has no "
                                 "place for: convert with use_rms_norm=False to export GGUF")
        if layer.granularity == "group" and layer.group_size % QK_K:
            raise PosttrainError(f"layer {name} has group_size={layer.group_size}; GGUF TQ blocks hold one scale per "
                                 f"{QK_K} weights: use granularity 'tensor' or 'channel', or a multiple of {QK_K}")
    if any(layer.quant_lambda < 1.0 for _, layer in layers):
        warnings.warn("GGUF export: quant_lambda < 1 (mid warm-up); the file holds the fully quantized model",
                      stacklevel=3)
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise PosttrainError("Qwen2 use_sliding_window=true is not supported by llama.cpp's qwen2 graph")
    return model_type, {f"{name}.weight": layer for name, layer in layers}


def _rope(config, arch: str) -> tuple[dict, torch.Tensor | None]:
    """(rope keys, llama3 rope_freqs tensor or None), as convert_hf_to_gguf writes them."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params = params.get("full_attention", params)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind, factor = params.get("rope_type", params.get("type", "default")), params.get("factor")
    keys: dict = {"freq_base": float(theta)}
    if kind in (None, "default"):
        return keys, None
    if kind == "linear":
        return {**keys, "scaling": ("LINEAR", factor)}, None
    if kind == "yarn":
        orig = params.get("original_max_position_embeddings", config.max_position_embeddings)
        return {**keys, "scaling": ("YARN", factor), "orig_ctx": orig}, None  # beta/attn factors: defaults
    if kind == "llama3" and arch == "llama":
        dim = _head_dim(config)
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        old = params.get("original_max_position_embeddings", 8192)
        low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
        out = []
        for freq in freqs.tolist():
            wavelen = 2 * math.pi / freq
            if wavelen < old / high:
                out.append(1.0)
            elif wavelen > old / low:
                out.append(float(factor))
            else:
                smooth = (old / wavelen - low) / (high - low)
                out.append(1.0 / ((1 - smooth) / factor + smooth))
        return keys, torch.tensor(out, dtype=torch.float32)
    raise PosttrainError(f"rope scaling type {kind!r} is not supported by posttrain's GGUF export "
                         "(default, linear, yarn, llama3 are)")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_hparams(w, gguf, config, arch: str, n_vocab: int, ftype) -> torch.Tensor | None:
    head_dim = _head_dim(config)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope, rope_freqs = _rope(config, arch)
    w.add_rope_freq_base(rope["freq_base"])
    if "scaling" in rope:
        kind, factor = rope["scaling"]
        w.add_rope_scaling_type(getattr(gguf.RopeScalingType, kind))
        w.add_rope_scaling_factor(factor)
        if "orig_ctx" in rope:
            w.add_rope_scaling_orig_ctx_len(rope["orig_ctx"])
    if arch == "llama":
        w.add_vocab_size(n_vocab)
        w.add_rope_dimension_count(head_dim)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return rope_freqs


def tokenizer_pre(tokenizer) -> str:
    """llama.cpp's tokenizer.ggml.pre for a byte-level BPE tokenizer (see the module docstring)."""
    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh in PRE_BY_HASH:
        return PRE_BY_HASH[chkhsh]
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if steps[-1].get("add_prefix_space"):  # llama.cpp's gpt2-type vocab never adds a prefix space
        kinds.append("add_prefix_space")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # llama.cpp: split \p{N} one by one, then the GPT-2 regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        found = PRE_BY_SPLIT_REGEX.get(steps[0].get("pattern", {}).get("Regex"))
        # llama.cpp's llama-bpe looks whole words up first, as tokenizers' ignore_merges does
        if found and (found == "llama-bpe") == bool(spec["model"].get("ignore_merges")):
            return found
    raise PosttrainError(f"tokenizer pre-tokenizer {kinds} (check hash {chkhsh[:16]}...) is not one llama.cpp is "
                         "known to reproduce; posttrain's GGUF export handles Llama-3, Qwen2, GPT-2 and SmolLM-style "
                         "byte-level BPE tokenizers")


def _merges(spec: dict) -> list[str]:
    merges = spec["model"].get("merges") or []
    if merges and not isinstance(merges[0], str):  # [a, b] pairs: spaces inside encoded as in gguf SpecialVocab
        merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                  for pair in merges]
    return merges


def _write_vocab(w, gguf, tokenizer, n_vocab: int) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"].get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise PosttrainError("GGUF export needs a byte-level BPE tokenizer (Llama-3, Qwen2, GPT-2 style); "
                             f"this one is {spec['model'].get('type')} with decoder {spec.get('decoder')}")
    pre = tokenizer_pre(tokenizer)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise PosttrainError(f"the tokenizer has ids up to {max(vocab.values())} but the embeddings only "
                             f"{n_vocab} rows: resize the model's token embeddings first")
    reverse, added = {i: t for t, i in vocab.items()}, tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        token, kind = reverse.get(i, f"[PAD{i}]"), gguf.TokenType.NORMAL
        if i not in reverse:
            kind = gguf.TokenType.UNUSED
        elif i in added:  # as convert_hf_to_gguf: non-normalized added tokens pre-normalized, "<|...|>" is control
            if not added[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = added[i].special or (token.startswith("<|") and token.endswith("|>"))
            kind = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(kind)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_merges(spec))
    for kind in ("bos", "eos", "unk", "pad"):
        if (tid := getattr(tokenizer, f"{kind}_token_id", None)) is not None:
            getattr(w, f"add_{kind}_token_id")(tid)
    with_special, plain = tokenizer("a").input_ids, tokenizer("a", add_special_tokens=False).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    w.add_add_bos_token(bos is not None and with_special[:1] == [bos] and plain[:1] != [bos])
    w.add_add_eos_token(eos is not None and with_special[-1:] == [eos] and plain[-1:] != [eos])
    if isinstance(tokenizer.chat_template, str):
        w.add_chat_template(tokenizer.chat_template)


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute (rows of q/k weights or biases): rotate_half -> adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@torch.no_grad()
def _tensors(model, ternary: dict, arch: str) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(HF key, float32 values as llama.cpp must see them, is_ternary) for every tensor to write."""
    from posttrain.ternary.export.hf import _state_tensors

    config = model.config
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    # tied lm_head is dropped by _state_tensors: without output.weight llama.cpp uses token_embd as the output
    for key, tensor in _state_tensors(model).items():
        layer = ternary.get(key)
        if layer is not None:
            codes, scale = layer.ternary()
            if scale.min() < 2**-14:  # below fp16's normal range: the block scale d loses precision
                warnings.warn(f"GGUF export: {key} has a scale {scale.min().item():.3g} below fp16's normal "
                              "range; its GGUF block scales are imprecise", stacklevel=4)
        values = dequantize(codes, scale) if layer is not None else tensor.float()
        if arch == "llama" and key.endswith(("q_proj.weight", "q_proj.bias")):
            values = llama_permute(values, n_head)
        elif arch == "llama" and key.endswith(("k_proj.weight", "k_proj.bias")):
            values = llama_permute(values, n_kv)
        yield key, values.cpu().contiguous(), layer is not None


def _pick_type(gguf, values: torch.Tensor, is_ternary: bool, tq: str, dense: str):
    q = gguf.GGMLQuantizationType
    if values.dim() < 2:
        return q.F32
    cols = values.shape[-1]
    if is_ternary and cols % QK_K == 0:
        return getattr(q, tq)
    if is_ternary or dense == "Q8_0":
        return q.Q8_0 if cols % QK8_0 == 0 else q.F16
    return getattr(q, dense)


def _add_tensor(w, gguf, name: str, values: torch.Tensor, qtype) -> None:
    array = values.numpy().astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, array)
    elif qtype == gguf.GGMLQuantizationType.F16:
        w.add_tensor(name, array.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def _write_atomically(w, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)


def export_gguf(model: nn.Module, tokenizer, out_dir: str | os.PathLike, fmt: str = "gguf-tq2", *,
                dense_type: str = "f16", overwrite: bool = False) -> Path:
    """Write out_dir/model-tq{1,2}_0.gguf for llama.cpp (see the module docstring); return its path."""
    check_gguf_options(fmt, dense_type)
    gguf = _gguf()
    arch, ternary = _check_model(model)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PosttrainError(f"GGUF export target {out} is a file: give a folder")
    path = out / gguf_filename(fmt)
    if path.exists() and not overwrite:
        raise PosttrainError(f"{path} exists: pick another folder or pass overwrite=True")
    out.mkdir(parents=True, exist_ok=True)
    arch_enum = getattr(gguf.MODEL_ARCH, ARCHITECTURES[arch])
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch_enum])
    w.add_name(Path(str(getattr(model.config, "name_or_path", "") or arch)).name)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    ftype = getattr(gguf.LlamaFileType, f"MOSTLY_{GGUF_FORMATS[fmt]}")
    rope_freqs = _write_hparams(w, gguf, model.config, arch, n_vocab, ftype)
    _write_vocab(w, gguf, tokenizer, n_vocab)
    names = gguf.get_tensor_name_map(arch_enum, model.config.num_hidden_layers)
    written, fallback = [], []
    for key, values, is_ternary in _tensors(model, ternary, arch):
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PosttrainError(f"tensor {key} has no llama.cpp {arch} counterpart; GGUF export cannot place it")
        qtype = _pick_type(gguf, values, is_ternary, GGUF_FORMATS[fmt], DENSE_TYPES[dense_type])
        _add_tensor(w, gguf, name, values, qtype)
        if is_ternary:
            written.append(name)
            fallback += [f"{name} ({qtype.name})"] if qtype.name not in GGUF_FORMATS.values() else []
    if rope_freqs is not None:
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs.numpy())
    w.add_array(TERNARY_KEY, written)
    if fallback:
        warnings.warn(f"GGUF export: {len(fallback)} of {len(written)} ternary tensors have in_features not a "
                      f"multiple of {QK_K} and are stored as Q8_0/F16 of ternary x scale, e.g. {fallback[0]}",
                      stacklevel=2)
    _write_atomically(w, path)
    return path


def gguf_bits_per_weight(path: str | os.PathLike) -> dict:
    """Bits per weight of a GGUF file, from its tensor table (nothing is dequantized).

    quantized_layers_bpw = 8 * bytes / weights over the ternary tensors (those named in posttrain.ternary_tensors,
    else the TQ-typed ones), fallbacks (Q8_0/F16) included; by_type gives each GGUF type's share;
    whole_file_bpw = 8 * file size / all weights (metadata and vocabulary count as overhead).
    """
    gguf = _gguf()
    reader = gguf.GGUFReader(path)
    field = reader.get_field(TERNARY_KEY)
    ternary = set(field.contents()) if field is not None else None
    by_type: dict[str, dict] = {}
    ternary_types: dict[str, int] = {}
    q_weights = q_bytes = total = 0
    for t in reader.tensors:
        kind, n, nbytes = t.tensor_type.name, int(t.n_elements), int(t.n_bytes)
        entry = by_type.setdefault(kind, {"tensors": 0, "weights": 0, "bytes": 0})
        for field_name, value in (("tensors", 1), ("weights", n), ("bytes", nbytes)):
            entry[field_name] += value
        total += n
        if (t.name in ternary) if ternary is not None else kind in GGUF_FORMATS.values():
            q_weights, q_bytes = q_weights + n, q_bytes + nbytes
            ternary_types[kind] = ternary_types.get(kind, 0) + 1
    for entry in by_type.values():
        entry["bpw"] = 8.0 * entry["bytes"] / entry["weights"]
    file_bytes = Path(path).stat().st_size
    return {
        "quantized_layers_bpw": 8.0 * q_bytes / q_weights if q_weights else float("nan"),
        "whole_file_bpw": 8.0 * file_bytes / total,
        "quantized_weights": q_weights,
        "total_weights": total,
        "file_bytes": file_bytes,
        "ternary_tensor_types": ternary_types,
        "by_type": by_type,
    }
