"""Fast ternary inference: the Triton kernels (run on the CPU by TRITON_INTERPRET=1), the C CPU kernel, the
torch fallback, TernaryLinear and load_fast_ternary, all against the pure-torch reference and against posttrain's
and transformers' BitLinear. Integer accumulators must be equal; float outputs too (bit for bit: every backend
computes the same float operations as the reference)."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.integrations.bitnet import BitLinear as HFBitLinear

from posttrain.errors import PosttrainError
from posttrain.ternary import (
    BitLinear,
    TernaryLinear,
    activation_codes,
    convert,
    export_bitnet,
    fuse_shared_inputs,
    load_fast_ternary,
    pack_ternary,
    ternary_linear_reference,
)
from posttrain.ternary.infer import cpu as cpu_kernel
from posttrain.ternary.infer.linear import _SharedInputGroup

# (m, K, N): decode m = 1 and 16, a prefill m spanning several 16-row blocks; K = 200 and 96 are not multiples
# of the 64-wide K block the interpreter runs with, N = 32 is a single 16-row packed block
SHAPES = [(1, 200, 64), (16, 96, 128), (40, 200, 32)]
DTYPES = [torch.float32, torch.bfloat16]


def random_layer(K, N, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (N, K), generator=g)
    weight_scale = (torch.rand(1, generator=g) * 40 + 1).to(dtype)  # 1 / mean|W|
    bias = (torch.randn(N, generator=g) * 0.1).to(dtype)
    return pack_ternary(codes), weight_scale, bias


def activations(m, K, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=g) * 3
    # token 0: absmax 127 makes a = 1 exactly, so x * a hits .5 ties (round half to even: 2.5 -> 2, 3.5 -> 4)
    x[0, :7] = torch.tensor([127.0, 2.5, 3.5, -2.5, -3.5, 0.5, 1.5])
    if m > 2:
        x[1] = 0.0  # an all-zero token: absmax clamps to 1e-5
    return x.to(dtype)


def scales(weight_scale, N):
    return weight_scale.float().expand(N).contiguous()


# TRITON_INTERPRET must be set before triton is first imported (triton.language's own helpers are jit'd at
# import), which in a shared pytest session has usually happened already: the test_interpreted_* tests run in a
# child pytest started by test_triton_kernels_under_interpreter with the variable set from the start.
IN_CHILD = os.environ.get("POSTTRAIN_TRITON_CHILD") == "1"


@pytest.mark.skipif(IN_CHILD, reason="this is the interpreter child")
def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "POSTTRAIN_TRITON_CHILD": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings", __file__]
    proc = subprocess.run(
        [*cmd, "-k", "interpreted"],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def _compile_for(target_arch, jit_fn, types: dict, constants: dict, options: dict):
    """Compile a kernel to machine code for an NVIDIA architecture without a GPU (triton bundles ptxas)."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature = {name: "constexpr" if name in constants else types[name] for name in jit_fn.arg_names}
    source = triton.compiler.ASTSource(fn=jit_fn, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", target_arch, 32), options=options)


@pytest.mark.skipif(IN_CHILD, reason="compiles the GPU kernels; the child only interprets")
@pytest.mark.parametrize("arch", [90, 80])
def test_triton_kernels_compile_for_nvidia_gpus(arch):
    """The interpreter accepts code the GPU compiler rejects (triton 3.6, torch 2.11's, refused an int8 tl.dot into
    an int32 accumulator without out_dtype=tl.int32; the interpreter and triton 3.9 let it through): compile every
    decode and prefill config for Hopper and Ampere with the installed triton, no GPU needed."""
    pytest.importorskip("triton")
    from posttrain.ternary.infer import kernel

    if kernel.interpreting():
        pytest.skip("TRITON_INTERPRET is set")
    kernels = kernel._kernels()
    quant = {"x_ptr": "*bf16", "q_ptr": "*i8", "a_ptr": "*fp32", "s_ptr": "*i32", "K": "i32", "stride_xm": "i32",
             "stride_qm": "i32"}
    _compile_for(arch, kernels["act_quant"], quant, {"IS_BF16": True, "BLOCK_K": 4096},
                 {"enable_fp_fusion": False, "num_warps": 4})
    for i, config in enumerate(kernel._configs(small=True) + kernel._configs(small=False)):
        out = ("bf16", "fp16", "fp32")[i % 3]
        flags = {"HAS_MAP": i % 2 == 1, "HAS_BIAS": i % 4 < 2, "INT_OUT": i == 0, "ROUND_BF16": out == "bf16"}
        types = {"q_ptr": "*i8", "a_ptr": "*fp32", "s_ptr": "*i32", "w_ptr": "*u8", "ws_ptr": "*fp32",
                 "b_ptr": f"*{out}", "y_ptr": "*i32" if flags["INT_OUT"] else f"*{out}", "base_ptr": "*i32",
                 "step_ptr": "*i32", **dict.fromkeys(["M", "R", "K", "stride_qm", "stride_wr", "stride_ym",
                                                      "M_BUCKET"], "i32")}
        compiled = _compile_for(arch, kernels["mm"], types, {**flags, **config.kwargs},
                                {"num_warps": config.num_warps, "num_stages": config.num_stages})
        assert compiled.asm.get("cubin"), config
    from posttrain.ternary.infer import gemv

    for i, config in enumerate(gemv.GEMV_CONFIGS):  # one token: dp4a PTX
        out = ("bf16", "fp32")[i % 2]
        flags = {"HAS_MAP": i % 2 == 1, "HAS_BIAS": i % 4 < 2, "INT_OUT": i == 0, "ROUND_BF16": out == "bf16",
                 "IS_BF16": out == "bf16", "USE_DP4A": True}
        types = {"x_ptr": f"*{out}", "w_ptr": "*u8", "ws_ptr": "*fp32", "b_ptr": f"*{out}",
                 "y_ptr": "*i32" if flags["INT_OUT"] else f"*{out}", "base_ptr": "*i32", "step_ptr": "*i32",
                 "R": "i32", "K": "i32", "stride_wr": "i32"}
        compiled = _compile_for(arch, gemv._kernels()["gemv"], types,
                                {**flags, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                                 "QUANT_BLOCK": config.quant_block, "ACC_2D": config.acc_2d,
                                 "PREFETCH": config.prefetch},
                                {"num_warps": config.num_warps, "num_stages": config.num_stages,
                                 "enable_fp_fusion": False})
        assert "dp4a" in compiled.asm["ptx"] and compiled.asm.get("cubin")


@pytest.fixture
def triton_interpret():
    if not IN_CHILD:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of test_triton_kernels_under_interpreter")
    pytest.importorskip("triton")
    from posttrain.ternary.infer import kernel

    assert kernel.interpreting()
    return kernel


@pytest.mark.parametrize("dtype", DTYPES)
def test_interpreted_triton_kernels_exact(triton_interpret, dtype):
    kernel = triton_interpret
    for i, (m, K, N) in enumerate(SHAPES):
        packed, ws, bias = random_layer(K, N, seed=i, dtype=dtype)
        x = activations(m, K, seed=i, dtype=dtype)
        q, a, qsum = kernel.act_quant(x)
        ref_q, ref_a = activation_codes(x)
        assert torch.equal(q.float(), ref_q) and torch.equal(a, ref_a.float().flatten())
        assert torch.equal(qsum, ref_q.sum(-1).int())
        acc = kernel.ternary_linear_triton(x, packed, scales(ws, N), return_acc=True)
        assert torch.equal(acc, ternary_linear_reference(x, packed, ws, return_acc=True)), (m, K, N)
        with_bias = i % 2 == 0
        y = kernel.ternary_linear_triton(x, packed, scales(ws, N), bias if with_bias else None)
        ref = ternary_linear_reference(x, packed, ws, bias if with_bias else None)
        assert y.dtype == dtype and torch.equal(y, ref), (m, K, N, (y.float() - ref.float()).abs().max())
    # a prefill-sized tile config (32 x 32 packed rows x 128) on the same kernel
    packed, ws, _ = random_layer(200, 128, seed=7, dtype=dtype)
    x = activations(40, 200, seed=7, dtype=dtype)
    config = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 2}
    y = kernel.ternary_linear_triton(x, packed, scales(ws, 128), config=config)
    assert torch.equal(y, ternary_linear_reference(x, packed, ws))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_kernel_exact(dtype):
    if not cpu_kernel.available():
        pytest.skip("no C compiler for the ternary CPU kernel")
    for i, (m, K, N) in enumerate([*SHAPES, (3, 64, 192)]):
        packed, ws, bias = random_layer(K, N, seed=i, dtype=dtype)
        x = activations(m, K, seed=i, dtype=dtype).view(m, 1, K)  # leading dims are kept
        acc = cpu_kernel.ternary_linear_cpu(x, packed, ws, return_acc=True)
        assert torch.equal(acc, ternary_linear_reference(x, packed, ws, return_acc=True))
        for b in (None, bias):
            y = cpu_kernel.ternary_linear_cpu(x, packed, ws, b)
            assert y.shape == (m, 1, N) and torch.equal(y, ternary_linear_reference(x, packed, ws, b))
    layer = cpu_kernel.CpuTernaryLinear(packed, scales(ws, N), None, dtype)
    with pytest.raises(ValueError):
        layer(torch.zeros(2, K + 1, dtype=dtype))


def hf_bitlinear(packed, ws, bias, dtype):
    layer = HFBitLinear(packed.shape[1], packed.shape[0] * 4, bias=bias is not None, dtype=dtype)
    layer.weight.copy_(packed)
    layer.weight_scale.copy_(ws)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
def test_ternary_linear_matches_bitlinears(dtype):
    """TernaryLinear (every CPU backend) == reference == posttrain's BitLinear (== transformers' in fp32)."""
    torch.manual_seed(0)
    qat = BitLinear(96, 64, bias=True, dtype=dtype)
    fast = {b: TernaryLinear.from_qat(qat, backend=b) for b in ("auto", "torch")}
    x = (torch.randn(2, 5, 96) * 2).to(dtype)
    with torch.no_grad():
        expected = qat(x)
    ref = ternary_linear_reference(x, fast["auto"].weight, fast["auto"].weight_scale, fast["auto"].bias)
    assert torch.equal(ref, expected)
    for backend, layer in fast.items():
        assert torch.equal(layer(x), expected), backend
        assert torch.equal(layer(x[:, :1]), expected[:, :1]), backend  # decode shape
    hf = hf_bitlinear(fast["auto"].weight, fast["auto"].weight_scale, fast["auto"].bias, dtype)
    from_hf = TernaryLinear.from_bitlinear(hf)
    assert from_hf.weight is hf.weight  # shared, not copied
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # transformers' helpers are torch.compile'd
        hf_y = hf(x)
    if dtype == torch.float32:
        assert torch.equal(hf_y, expected) and torch.equal(from_hf(x), hf_y)
    else:  # eager transformers rounds x * a to bf16 before rounding to an integer (quant.py): close, not equal
        diff = (from_hf(x).float() - hf_y.float()).abs().max()
        assert diff <= 0.02 * hf_y.float().abs().max(), diff


def test_ternary_linear_refusals():
    with pytest.raises(PosttrainError, match="% 4"):
        TernaryLinear(8, 6)
    with pytest.raises(PosttrainError, match="backend"):
        TernaryLinear(8, 8, backend="fpga")
    with pytest.raises(PosttrainError, match="granularity"):
        TernaryLinear.from_qat(BitLinear(8, 8, granularity="channel"))


def fused_pair():
    torch.manual_seed(0)
    parent = nn.Module()
    for name, n in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):
        setattr(parent, name, TernaryLinear.from_qat(BitLinear(96, n, bias=name == "k_proj"), backend="torch"))
    return parent


def test_shared_input_group_reuses_only_the_same_unmodified_tensor():
    parent = fused_pair()
    x = torch.randn(1, 3, 96)
    alone = [getattr(parent, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
    assert fuse_shared_inputs(parent) == 1
    group = parent.q_proj._group
    assert isinstance(group, _SharedInputGroup) and parent.v_proj._group is group
    outs = [getattr(parent, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
    assert all(torch.equal(a, b) for a, b in zip(alone, outs)) and group._x is None  # all consumed, released
    assert parent.k_proj.weight.data_ptr() == group._fused["packed"].data_ptr() + 16 * 96  # views, no copy
    assert torch.equal(parent.q_proj(x), alone[0])
    x.mul_(2)  # modified in place between the sibling calls: k must be recomputed, not served stale
    k = parent.k_proj
    assert torch.equal(k(x), ternary_linear_reference(x, k.weight, k.weight_scale, k.bias))
    assert not torch.equal(k(x), alone[1])


@pytest.mark.parametrize("tokens", [2, 1])  # 1: the decode GEMV with the column map
def test_interpreted_fused_groups(triton_interpret, tokens):
    parent = fused_pair()
    x = torch.randn(tokens, 96)
    alone = [getattr(parent, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
    fuse_shared_inputs(parent)
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(parent, name).backend = "triton"
    outs = [getattr(parent, n)(x) for n in ("q_proj", "k_proj", "v_proj")]  # one kernel call, column map
    assert all(torch.equal(a, b) for a, b in zip(alone, outs))


@pytest.mark.parametrize("config", [(16, 64, 4, 1, False, False, 1024), (16, 64, 4, 1, True, False, 64),
                                    (4, 128, 1, 1, False, True, 128), (8, 64, 2, 1, True, True, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_interpreted_gemv_exact(triton_interpret, dtype, config, monkeypatch):
    """One token takes the fused one-launch kernel (32-bit words, byte dot products), in both accumulator layouts,
    with and without the one-step-ahead weight loads: exact against the reference, with K not a multiple of the K
    block (and K shorter than one block), the token's scale over one or several tiles, with and without bias;
    K % 4 != 0 falls back to the two-kernel path."""
    from posttrain.ternary.infer import gemv

    kernel = triton_interpret
    config = gemv.GemvConfig(*config)
    monkeypatch.setattr(gemv, "INTERPRET_GEMV_CONFIG", config)
    monkeypatch.setattr(gemv, "_GEMV_TUNED", {})
    calls = []
    original = gemv.launch
    monkeypatch.setattr(gemv, "launch", lambda *a, **k: calls.append(k["config"]) or original(*a, **k))
    for K, N, seed in ((200, 64, 3), (1028, 32, 4), (96, 128, 5)):
        packed, ws, bias = random_layer(K, N, seed=seed, dtype=dtype)
        x = activations(1, K, seed=seed, dtype=dtype)
        acc = kernel.ternary_linear_triton(x, packed, scales(ws, N), return_acc=True)
        assert torch.equal(acc, ternary_linear_reference(x, packed, ws, return_acc=True)), K
        for b in (None, bias):
            y = kernel.ternary_linear_triton(x, packed, scales(ws, N), b)
            assert y.dtype == dtype and torch.equal(y, ternary_linear_reference(x, packed, ws, b)), K
    assert calls == [config] * 9
    packed, ws, _ = random_layer(98, 32, seed=6, dtype=dtype)  # K % 4 != 0: words would straddle rows
    x = activations(1, 98, seed=6, dtype=dtype)
    assert torch.equal(kernel.ternary_linear_triton(x, packed, scales(ws, 32)), ternary_linear_reference(x, packed, ws))
    assert len(calls) == 9
    with pytest.raises(ValueError, match="K % 4 == 0"):
        gemv.ternary_gemv(x, packed, scales(ws, 32), out_dtype=dtype, config=gemv.INTERPRET_GEMV_CONFIG)


@pytest.fixture(scope="module")
def ternary_export(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    convert(model)
    return model, export_bitnet(model, tiny_tokenizer, tmp_path_factory.mktemp("tern") / "tiny-bitnet")


def greedy(model, ids, n=12):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def test_load_fast_ternary_generates_like_transformers(ternary_export, tiny_tokenizer):
    qat, folder = ternary_export
    ids = tiny_tokenizer("What is 12 + 7?", return_tensors="pt").input_ids
    with torch.compiler.set_stance("force_eager"):
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        expected, hf_logits = greedy(hf, ids), hf(ids).logits
    for backend in ("auto", "torch"):
        fast = load_fast_ternary(folder, backend=backend)
        kinds = {type(m).__name__ for m in fast.modules()}
        assert "TernaryLinear" in kinds and "BitLinear" not in kinds
        assert torch.equal(greedy(fast, ids), expected), backend
        assert torch.equal(fast(ids).logits, hf_logits), backend
    in_memory = load_fast_ternary(copy.deepcopy(qat), device="cpu")  # posttrain's QAT BitLinear, swapped in place
    assert torch.equal(greedy(in_memory, ids), expected)


def test_load_fast_ternary_bf16_equals_posttrain_bitlinear(tiny_model_dir, tiny_tokenizer):
    qat = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    convert(qat)
    ids = tiny_tokenizer("What is 12 + 7?", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = qat(ids).logits
    for backend in ("auto", "torch"):
        fast = load_fast_ternary(copy.deepcopy(qat), backend=backend)
        assert torch.equal(fast(ids).logits, expected), backend


def test_interpreted_load_fast_ternary_forward(ternary_export, tiny_tokenizer, triton_interpret):
    _, folder = ternary_export
    ids = tiny_tokenizer("What is 12 + 7?", return_tensors="pt").input_ids
    with torch.compiler.set_stance("force_eager"), torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
        fast = load_fast_ternary(folder, backend="triton")  # fused q/k/v and gate/up: 8 kernel calls
        assert torch.equal(fast(ids).logits, expected)


def test_load_fast_ternary_refuses_dense_checkpoints(tiny_model_dir):
    with pytest.raises(PosttrainError, match="bitnet"):
        load_fast_ternary(tiny_model_dir)
    with pytest.raises(PosttrainError, match="no BitLinear"):
        load_fast_ternary(AutoModelForCausalLM.from_pretrained(tiny_model_dir))


def test_gemv_self_check_drops_wrong_or_failing_configs(monkeypatch):
    """On first use per device and dtype every one-token configuration is checked against the reference: one
    that disagrees (e.g. a GPU whose dp4a path misbehaves) or raises is dropped with a warning; with none left the
    one-token path is off (ready_config returns None: the two-kernel path serves single tokens)."""
    from posttrain.ternary.infer import gemv

    monkeypatch.setattr(gemv, "interpreting", lambda: False)
    monkeypatch.setattr(gemv, "_GEMV_GOOD", {})

    def reference(x, packed, scales, *, out_dtype, config, **_):
        if config == gemv.GEMV_CONFIGS[1]:
            raise RuntimeError("out of registers")
        y = ternary_linear_reference(x, packed, scales[:1].to(out_dtype))
        return y + 1 if config == gemv.GEMV_CONFIGS[2] else y

    monkeypatch.setattr(gemv, "ternary_gemv", reference)
    with pytest.warns(UserWarning, match="dropped"):
        good = gemv.gemv_configs(torch.device("cpu"), torch.float32)
    assert good == [c for i, c in enumerate(gemv.GEMV_CONFIGS) if i not in (1, 2)]
    monkeypatch.setattr(gemv, "ternary_gemv", lambda *a, **k: reference(*a, **k) + 1)
    with pytest.warns(UserWarning, match="two-kernel path"):
        assert gemv.gemv_configs(torch.device("cpu"), torch.bfloat16) == []
    x, packed = torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(16, 64, dtype=torch.uint8)
    assert gemv.ready_config(x, packed, torch.bfloat16, None, None, False) is None


def test_host_grid_arithmetic_matches_triton():
    """kernel.cdiv / next_power_of_2 replace triton's constexpr functions in host code (each call through triton's
    wrapper costs microseconds a decode step cannot hide): the same values."""
    triton = pytest.importorskip("triton")
    from posttrain.ternary.infer import kernel

    for a in range(1, 300):
        assert kernel.next_power_of_2(a) == triton.next_power_of_2(a)
        for b in (1, 3, 8, 16, 64):
            assert kernel.cdiv(a, b) == triton.cdiv(a, b)
    assert kernel.next_power_of_2(4096) == 4096 and kernel.next_power_of_2(14336) == 16384
