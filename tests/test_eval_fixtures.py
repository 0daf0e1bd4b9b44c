"""Offline tiny models, tokenizers and JSONL tasks shared by the tests/test_eval_*.py files.

This module holds builders and fixtures only (pytest collects it and finds no tests). The other eval test
modules import the fixtures from here; a shared `tiny_model_dir` in tests/conftest.py may replace them later.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

WORDS = (
    "the a cat dog bird fish runs eats sleeps jumps over under near far red blue green small big "
    "one two three four five six seven eight nine ten river tree house road sun moon star sky"
).split()

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def random_sentences(n: int, seed: int = 0, lo: int = 4, hi: int = 14) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
    return out


def build_tokenizer(out_dir: Path, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained offline, with eos/pad and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(random_sentences(2000, seed=1), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", chat_template=CHATML
    )
    fast.save_pretrained(out_dir)
    return fast


def build_bos_tokenizer(tokenizer, out_dir: Path):
    """The same vocabulary, but encode() prepends a BOS (like Llama's tokenizers): exercises lm-eval's BOS paths."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    bos = "<|im_start|>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir: Path, tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2, dtype=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def build_bitnet_export(src: Path, out: Path) -> Path:
    """src's decoder linears ternarized (absmean, as BitNet b1.58) and packed in transformers' BitNet format."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitnet import pack_weights

    model = AutoModelForCausalLM.from_pretrained(src)
    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith(".weight") and ".layers." in name and t.ndim == 2:
            scale = t.abs().mean().clamp(min=1e-5)
            tensors[name] = pack_weights(torch.clamp(torch.round(t / scale), -1, 1).to(torch.int8))
            tensors[name.removesuffix(".weight") + ".weight_scale"] = scale.reshape(1)
        else:
            tensors[name] = t.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitnet",
        "linear_class": "bitlinear",
        "quantization_mode": "offline",
    }
    (out / "config.json").write_text(json.dumps(config))
    for f in src.glob("*.json"):
        if f.name != "config.json":
            shutil.copy(f, out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mc_rows(n: int, seed: int = 0, n_choices: int = 4) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20)))
        # Some contexts end with a space, some with "?": exercises lm-eval's whitespace handling.
        question = f"Question: {question}?" + (" Answer:" if i % 3 else " Answer: ")
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(n_choices)]
        rows.append({"question": question, "choices": choices, "answer": rng.randrange(n_choices)})
    return rows


def text_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(random_sentences(rng.randint(1, 12), seed=seed * 1000 + i))} for i in range(n)]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    sents = random_sentences(3 * n, seed=seed)
    return [
        {"prompt": sents[3 * i], "chosen": " " + sents[3 * i + 1], "rejected": " " + sents[3 * i + 2]} for i in range(n)
    ]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and OpenMP workers spinning on a busy 2-core CPU slow every matmul
    down ~100x; each eval test module imports this, so the setting is restored when the module ends."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """{'tokenizer', 'base' (dir), 'model' (object), 'other' (a second random model's dir)}."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer(root / "tokenizer")
    model = build_model(root / "base", tokenizer, seed=0)
    build_model(root / "other", tokenizer, seed=1)
    return {"tokenizer": tokenizer, "base": root / "base", "model": model, "other": root / "other", "root": root}


@pytest.fixture(scope="session")
def tiny_adapter(tiny):
    """A LoRA adapter on the tiny base with non-zero B matrices (so it changes the outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny["base"])
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    out = tiny["root"] / "adapter"
    peft_model.save_pretrained(out)
    tiny["tokenizer"].save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_data(tiny):
    root = tiny["root"] / "data"
    root.mkdir(exist_ok=True)
    gen = [{"prompt": s, "answer": "cat"} for s in random_sentences(4, seed=7)]
    return {
        "text": write_jsonl(root / "text.jsonl", text_rows(12, seed=2)),
        "mc": write_jsonl(root / "mc.jsonl", mc_rows(24, seed=3)),
        "pref": write_jsonl(root / "pref.jsonl", preference_rows(8, seed=4)),
        "gen": write_jsonl(root / "gen.jsonl", gen),
        "root": root,
    }
