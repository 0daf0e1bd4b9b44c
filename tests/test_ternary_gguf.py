"""GGUF export for llama.cpp: the file holds exactly the ternary weights (read back with gguf.GGUFReader and
dequantized), the metadata llama.cpp reads, honest bits per weight, refusals, atomic writes, the CLI; and,
when llama-cpp-python is installed, llama.cpp's tokenization, perplexity and greedy generations against
posttrain's on the same ternary weights.

Models: posttrain.tiny.build_model with hidden_size=256 (rows are multiples of the 256-value TQ block; the
default tiny model's 64 is not, and exercises the Q8_0 fallback).
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from posttrain.errors import PosttrainError
from posttrain.ternary import bitlinear_layers, convert, export_bitnet, load_ternary
from posttrain.tiny import build_model, build_tokenizer, tiny_rows

gguf = pytest.importorskip("gguf")

from posttrain.ternary.export.gguf import export_gguf, gguf_bits_per_weight, tokenizer_pre  # noqa: E402

TQ = {"gguf-tq1": "TQ1_0", "gguf-tq2": "TQ2_0"}
BPW = {"TQ1_0": 1.6875, "TQ2_0": 2.0625, "Q8_0": 8.5}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def ternary_model(tokenizer, arch="llama", hidden=256, seed=0, **convert_options):
    model = build_model(tokenizer, arch, hidden_size=hidden, num_layers=2, seed=seed)
    convert(model, **convert_options)
    return model.eval()


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute (written independently of the exporter's)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read(path):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return tensors, fields


def stored_values(tensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).float()


def gguf_name(model, key):
    arch = getattr(gguf.MODEL_ARCH, model.config.model_type.upper())
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    return names.get_name(key, try_suffixes=(".weight", ".bias"))


def as_stored(model, key, values):
    """Undo the Llama q/k row permutation of a tensor read back from the file."""
    config = model.config
    if config.model_type == "llama" and ".q_proj." in key:
        return unpermute(values, config.num_attention_heads)
    if config.model_type == "llama" and ".k_proj." in key:
        return unpermute(values, config.num_key_value_heads)
    return values


# ---- (a) what the file holds --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("fmt", ["gguf-tq1", "gguf-tq2"])
def test_gguf_holds_exactly_the_ternary_weights(tokenizer, arch, fmt, tmp_path):
    model = ternary_model(tokenizer, arch)
    path = export_gguf(model, tokenizer, tmp_path, fmt)
    assert path.name == f"model-{TQ[fmt].lower()}.gguf" and [p.name for p in tmp_path.iterdir()] == [path.name]
    tensors, _ = read(path)
    for name, layer in bitlinear_layers(model):
        t = tensors[gguf_name(model, f"{name}.weight")]
        assert t.tensor_type.name == TQ[fmt], name
        codes, scale = layer.ternary()
        got = as_stored(model, name + ".", stored_values(t))
        # exact codes; the per-256-block scale is fp16 in GGUF TQ blocks
        assert torch.equal(got, codes.float() * scale.half().float()), name
        assert torch.equal(torch.sign(got).to(torch.int8), codes), name
    for key, tensor in model.state_dict().items():
        if key.endswith(tuple(f"{n}.weight" for n, _ in bitlinear_layers(model))):
            continue
        t = tensors[gguf_name(model, key)]
        expect = as_stored(model, key, tensor.float())
        if tensor.dim() == 1:  # norms and (Qwen2) q/k/v biases
            assert t.tensor_type.name == "F32" and torch.equal(stored_values(t), expect), key
        else:  # embeddings and head: f16 by default
            assert t.tensor_type.name == "F16" and torch.equal(stored_values(t), expect.half().float()), key
    assert len(tensors) == len(model.state_dict())  # untied: output.weight is there


def test_gguf_metadata_is_what_llama_cpp_reads(tokenizer, tmp_path):
    model = ternary_model(tokenizer, "llama")
    _, f = read(export_gguf(model, tokenizer, tmp_path, "gguf-tq2"))
    c = model.config
    assert f["general.architecture"] == "llama" and f["general.file_type"] == gguf.LlamaFileType.MOSTLY_TQ2_0
    assert f["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    expected = {"block_count": 2, "context_length": c.max_position_embeddings, "embedding_length": 256,
                "feed_forward_length": 768, "attention.head_count": 4, "attention.head_count_kv": 2,
                "attention.key_length": 64, "attention.value_length": 64, "vocab_size": len(tokenizer),
                "rope.dimension_count": 64}
    assert {k: f[f"llama.{k}"] for k in expected} == expected
    assert f["llama.rope.freq_base"] == c.rope_parameters["rope_theta"]
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "smollm"
    assert f["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = f["tokenizer.ggml.token_type"]
    assert types[:4] == [gguf.TokenType.CONTROL] * 4 and set(types[4:]) == {gguf.TokenType.NORMAL}
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert f["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert f["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert "tokenizer.ggml.bos_token_id" not in f and f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == tokenizer.chat_template
    assert len(f["posttrain.ternary_tensors"]) == 14


def test_qwen2_metadata_biases_and_tied_embeddings(tokenizer, tmp_path):
    model = ternary_model(tokenizer, "qwen2")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    tensors, f = read(export_gguf(model, tokenizer, tmp_path, "gguf-tq1"))
    assert f["general.architecture"] == "qwen2" and f["general.file_type"] == gguf.LlamaFileType.MOSTLY_TQ1_0
    assert f["qwen2.embedding_length"] == 256 and "qwen2.vocab_size" not in f  # as convert_hf_to_gguf
    assert "output.weight" not in tensors and "token_embd.weight" in tensors  # llama.cpp reuses token_embd
    assert {f"blk.{i}.attn_{p}.bias" for i in range(2) for p in "qkv"} <= set(tensors)


def test_bits_per_weight_and_dense_q8_0(tokenizer, tmp_path):
    model = ternary_model(tokenizer, "llama")
    for fmt in TQ:
        path = export_gguf(model, tokenizer, tmp_path / fmt, fmt, dense_type="q8_0")
        bpw = gguf_bits_per_weight(path)
        n = sum(layer.weight.numel() for _, layer in bitlinear_layers(model))
        assert bpw["quantized_layers_bpw"] == BPW[TQ[fmt]] and bpw["quantized_weights"] == n
        assert bpw["ternary_tensor_types"] == {TQ[fmt]: 14}
        assert bpw["by_type"]["Q8_0"]["tensors"] == 2 and bpw["by_type"]["Q8_0"]["bpw"] == 8.5
        assert bpw["whole_file_bpw"] == 8 * path.stat().st_size / bpw["total_weights"]
        tensors, _ = read(path)
        embed = model.model.embed_tokens.weight.float()
        assert torch.allclose(stored_values(tensors["token_embd.weight"]), embed, atol=embed.abs().max().item() / 200)


def test_rows_not_a_multiple_of_256_fall_back_to_q8_0_of_ternary_values(tokenizer, tmp_path):
    model = ternary_model(tokenizer, "llama", hidden=64)  # in_features 64 or 192: no TQ block fits
    with pytest.warns(UserWarning, match="14 of 14 ternary tensors .* Q8_0"):
        path = export_gguf(model, tokenizer, tmp_path, "gguf-tq2")
    tensors, _ = read(path)
    for name, layer in bitlinear_layers(model):
        t = tensors[gguf_name(model, f"{name}.weight")]
        codes, scale = layer.ternary()
        assert t.tensor_type.name == "Q8_0"
        got = as_stored(model, name + ".", stored_values(t))
        assert torch.equal(torch.sign(got).to(torch.int8), codes)
        assert torch.allclose(got, codes.float() * scale, rtol=2**-10, atol=0)
    bpw = gguf_bits_per_weight(path)
    assert bpw["quantized_layers_bpw"] == 8.5 and bpw["ternary_tensor_types"] == {"Q8_0": 14}


def test_skipped_layers_stay_dense_and_channel_scales_are_exact(tokenizer, tmp_path):
    model = ternary_model(tokenizer, "llama", skip=["down_proj"], granularity="channel")
    tensors, f = read(export_gguf(model, tokenizer, tmp_path, "gguf-tq2"))
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "F16"
    assert "blk.0.ffn_down.weight" not in f["posttrain.ternary_tensors"]
    layer = model.model.layers[0].self_attn.q_proj
    codes, scale = layer.ternary()
    got = as_stored(model, "self_attn.q_proj.", stored_values(tensors["blk.0.attn_q.weight"]))
    assert torch.equal(got, codes.float() * scale.half().float())


def test_refusals(tokenizer, tmp_path):
    with pytest.raises(PosttrainError, match="use_rms_norm"):
        export_gguf(ternary_model(tokenizer, use_rms_norm=True), tokenizer, tmp_path, "gguf-tq2")
    with pytest.raises(PosttrainError, match="no BitLinear layers"):
        export_gguf(build_model(tokenizer, hidden_size=256), tokenizer, tmp_path, "gguf-tq2")
    with pytest.raises(PosttrainError, match="GGUF format 'gguf-q4' is unknown"):
        export_gguf(ternary_model(tokenizer), tokenizer, tmp_path, "gguf-q4")
    model = ternary_model(tokenizer)
    model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(PosttrainError, match="rope scaling type 'dynamic'"):
        export_gguf(model, tokenizer, tmp_path, "gguf-tq2")
    from tokenizers import pre_tokenizers

    odd = build_tokenizer()
    odd.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(PosttrainError, match="not one llama.cpp is known to reproduce"):
        tokenizer_pre(odd)
    assert not list(tmp_path.glob("*.gguf"))


def test_a_crash_leaves_no_gguf(tokenizer, tmp_path, monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(ternary_model(tokenizer), tokenizer, tmp_path, "gguf-tq2")
    assert list(tmp_path.iterdir()) == []


def test_cli_quantizes_dense_and_ternary_sources(tokenizer, tmp_path):
    from posttrain.cli import main

    dense = tmp_path / "dense"
    build_model(tokenizer, "qwen2", hidden_size=256, num_layers=2).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    assert main(["quantize", str(dense), "--method", "ternary", "--out", str(tmp_path / "a"),
                 "--format", "gguf-tq2"]) == 0
    report = json.loads((tmp_path / "a" / "quantize.json").read_text())
    assert report["method"] == "ternary-ptq" and report["file"] == "model-tq2_0.gguf" and report["ternary_layers"] == 14
    assert report["bits_per_weight"]["quantized_layers_bpw"] == 2.0625
    # a BitNet export: its ternary weights go into the file as they are
    model = ternary_model(tokenizer, "llama", seed=3)
    export_bitnet(model, tokenizer, tmp_path / "bitnet")
    assert main(["quantize", str(tmp_path / "bitnet"), "--out", str(tmp_path / "b"), "--format", "gguf-tq1",
                 "--gguf-dense", "q8_0"]) == 0
    report = json.loads((tmp_path / "b" / "quantize.json").read_text())
    assert report["method"] == "ternary (source weights)" and report["gguf_dense"] == "q8_0"
    tensors, _ = read(tmp_path / "b" / "model-tq1_0.gguf")
    for name, layer in bitlinear_layers(model):
        codes, scale = layer.ternary()
        got = as_stored(model, name + ".", stored_values(tensors[gguf_name(model, f"{name}.weight")]))
        assert torch.equal(got, codes.float() * scale.half().float()), name
    with pytest.raises(SystemExit):  # argparse choices: refused before any work
        main(["quantize", str(dense), "--out", str(tmp_path / "c"), "--format", "gguf-tq2", "--gguf-dense", "q4"])


def test_rope_scaling_keys_and_llama3_rope_freqs(tokenizer, tmp_path):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model = ternary_model(tokenizer, "llama")
    theta = model.config.rope_parameters["rope_theta"]
    model.config.rope_parameters = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
                                    "rope_theta": theta}
    tensors, f = read(export_gguf(model, tokenizer, tmp_path / "llama3", "gguf-tq2"))
    # llama.cpp divides each rope frequency by rope_freqs: that must give transformers' llama3 inv_freq
    factors = stored_values(tensors["rope_freqs.weight"])
    base = 1.0 / (theta ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    hf = LlamaRotaryEmbedding(model.config).inv_freq
    assert factors.min() == 1.0 and factors.max() == 8.0
    assert torch.allclose(base / factors, hf, rtol=1e-5)
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": theta}
    tensors, f = read(export_gguf(model, tokenizer, tmp_path / "linear", "gguf-tq2"))
    assert f["llama.rope.scaling.type"] == "linear" and f["llama.rope.scaling.factor"] == 2.0
    assert "rope_freqs.weight" not in tensors
    model.config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                    "rope_theta": theta}
    _, f = read(export_gguf(model, tokenizer, tmp_path / "yarn", "gguf-tq2"))
    assert f["llama.rope.scaling.type"] == "yarn" and f["llama.rope.scaling.original_context_length"] == 256


# ---- (b) llama.cpp runs it as posttrain does (optional: needs llama-cpp-python) -----------------------------

PROMPTS = [r["text"].split("?")[0] + "?" for r in tiny_rows("text", "test")[:6]] + [
    r["text"].split("?")[0] + "? It is" for r in tiny_rows("text", "test")[6:12]]
EVAL_TEXTS = [r["text"] for r in tiny_rows("text", "test")[12:20]]
TOKENIZER_TEXTS = EVAL_TEXTS[:3] + PROMPTS[:2] + [
    "<|im_start|>user\nWhat is 23 + 4?<|im_end|>\n<|im_start|>assistant\n27<|im_end|>\n",
    "Hello, world!  It's (x+y)...\n\n\tdone: 2024 -- 3.14 'RE   ok?",
]


def fit(model, tokenizer, steps=400, batch=8, lr=2e-3):
    """A quick QAT fit on the tiny text task, so that generations copy the numbers (attention, hence rope and
    the q/k permutation, matters) instead of being random."""
    texts = [r["text"] for r in tiny_rows("text")]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (batch,), generator=generator)
        ids, mask = enc.input_ids[idx], enc.attention_mask[idx]
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: on a shared 2-core machine torch's 2-thread element-wise ops were measured ~100x slower
    than 1 thread (OpenMP waits on a busy core); the fit takes ~20 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_llama(tokenizer, one_thread):
    pytest.importorskip("llama_cpp")
    return fit(ternary_model(tokenizer, "llama", seed=1), tokenizer)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tokenizer, trained_llama, one_thread, tmp_path_factory):
    """(posttrain model, llama.cpp Llama) on the same ternary weights. llama: through a BitNet export, then
    `posttrain quantize --format gguf-tq2` of it, and load_ternary of the export; qwen2: the trained weights in
    a Qwen2 model (plus random q/k/v biases), exported from memory."""
    import llama_cpp

    from posttrain.ternary.ptq import quantize

    out = tmp_path_factory.mktemp(f"llama-cpp-{request.param}")
    if request.param == "llama":
        export_bitnet(trained_llama, tokenizer, out / "bitnet")
        path = out / "gguf" / quantize(str(out / "bitnet"), out / "gguf", fmt="gguf-tq2")["file"]
        ours = load_ternary(out / "bitnet").eval()
    else:
        ours = ternary_model(tokenizer, "qwen2", seed=2)
        missing, unexpected = ours.load_state_dict(trained_llama.state_dict(), strict=False)
        assert not unexpected and {k.rsplit(".", 2)[-2:][1] for k in missing} == {"bias"}
        with torch.no_grad():
            for layer in ours.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.02)
        path = export_gguf(ours, tokenizer, out, "gguf-tq2")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=1, seed=0, verbose=False)
    yield ours, llm
    llm.close()


def llama_cpp_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.asarray(llm.scores[: len(ids)])).float()


@pytest.mark.slow
def test_llama_cpp_tokenizes_as_the_hf_tokenizer(tokenizer, pair):
    _, llm = pair
    for text in TOKENIZER_TEXTS:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert llm.detokenize(ids, special=True).decode() == text
        assert llm.tokenize(text.encode(), add_bos=True) == tokenizer(text).input_ids or "<|" in text  # no BOS


@pytest.mark.slow
def test_llama_cpp_perplexity_matches_posttrain(tokenizer, pair):
    ours, llm = pair
    nll_ours = nll_cpp = count = 0.0
    max_diff = 0.0
    for text in EVAL_TEXTS:
        ids = tokenizer(text).input_ids
        with torch.no_grad():
            mine = ours(torch.tensor([ids])).logits[0].float()
        theirs = llama_cpp_logits(llm, ids)
        target = torch.tensor(ids[1:])
        nll_ours += F.cross_entropy(mine[:-1], target, reduction="sum").item()
        nll_cpp += F.cross_entropy(theirs[:-1], target, reduction="sum").item()
        count += len(ids) - 1
        max_diff = max(max_diff, (mine - theirs).abs().max().item())
    ppl_ours, ppl_cpp = math.exp(nll_ours / count), math.exp(nll_cpp / count)
    print(f"{ours.config.model_type}: perplexity posttrain {ppl_ours:.5f} llama.cpp {ppl_cpp:.5f} "
          f"(max |logit diff| {max_diff:.4f}) on {len(EVAL_TEXTS)} held-out texts, {int(count)} tokens")
    assert ppl_ours < 2.5  # the fit learned to copy: attention (rope, q/k layout) matters
    assert ppl_cpp == pytest.approx(ppl_ours, rel=0.01)  # llama.cpp: 8-bit activations per 256-block
    assert max_diff < 0.5


def greedy_llama_cpp(llm, ids: list[int], steps: int, stop: set[int]) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token in stop:
            break
        llm.eval([token])
    return out


@pytest.mark.slow
def test_llama_cpp_greedy_generations_match_posttrain(tokenizer, pair):
    ours, llm = pair
    stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    same = 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            out = ours.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=list(stop),
                                pad_token_id=tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True)
        mine = out.sequences[0, len(ids):].tolist()
        same += greedy_llama_cpp(llm, ids, 12, stop) == mine
        # teacher-forced on posttrain's sequence: llama.cpp picks the same token wherever posttrain is not at a
        # near-tie (the logits differ by < 0.5, measured ~0.1: activation quantization per block, not per token)
        theirs = llama_cpp_logits(llm, ids + mine)[len(ids) - 1 : len(ids) - 1 + len(mine)]
        for step, (scores, token) in enumerate(zip(out.scores, mine)):
            top2 = scores[0].float().topk(2).values
            if top2[0] - top2[1] > 0.5:
                assert int(theirs[step].argmax()) == token, (prompt, step)
    print(f"{ours.config.model_type}: {same}/{len(PROMPTS)} greedy generations identical, e.g. "
          f"{prompt!r} -> {tokenizer.decode(mine)!r}")
    assert same >= len(PROMPTS) - 2


@pytest.mark.parametrize("style", ["llama-bpe", "qwen2"])
def test_llama3_and_qwen2_style_tokenizers_tokenize_alike_in_llama_cpp(style, tmp_path):
    """Byte-level BPEs with Llama-3's / Qwen2's split regex (trained here: the real ones are not offline) are
    recognised from their tokenizer.json and tokenized by llama.cpp as by transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from posttrain.ternary.export.gguf import PRE_BY_SPLIT_REGEX
    from posttrain.tiny import SPECIAL_TOKENS, _corpus

    pattern = next(p for p, name in PRE_BY_SPLIT_REGEX.items() if name == style)
    core = Tokenizer(models.BPE(ignore_merges=style == "llama-bpe"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(_corpus() + TOKENIZER_TEXTS * 4, trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|pad|>")
    assert tokenizer_pre(tok) == style
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export_gguf(ternary_model(tok, "llama"), tok, tmp_path, "gguf-tq2")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in TOKENIZER_TEXTS + [" 12345 + 678 =  9?\n\n  it's OK", "I'VE  don't\r\n\t(a)b"]:
            ids = tok(text, add_special_tokens=False).input_ids
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
    finally:
        llm.close()
