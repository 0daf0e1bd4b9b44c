"""torch.compile per decoder layer ("regional" compilation), a speed setting of posttrain.engine.plan [train.compile].

Why: on a GPU, a step of a ~0.5B model on a few thousand tokens is likely host-bound. Eager PyTorch dispatches
~3,000 kernels per step for a 24-layer model (counted on the CPU: ~47 ops per layer forward, ~77 backward; RMSNorm,
RoPE, SwiGLU and residuals are several small kernels each), and issuing them can take longer than the GPU takes to
run them. Compiled, each layer is a few fused kernels. One layer's code serves every layer (parameters are graph
inputs), so compilation costs one layer's forward and backward, not the whole model's (once per mode: training,
and again for evaluation or DPO's reference pass in eval mode), and the compiled module keeps its parameter names
(state dicts and checkpoints are unchanged).

Shapes are compiled dynamic from the start: packed rows vary in length from batch to batch, and a static graph per
length would recompile again and again. A frame that fails to compile runs eagerly instead: this sets
torch._dynamo.config.suppress_errors for the whole process (torch logs each fallback), so compilation can make a
run slower than hoped but never stops it. Tested: one process (CPU). Not yet run: FSDP, DeepSpeed, a GPU.

Opt-in (train.compile: true). Two H200 runs of the Qwen2.5-0.5B shape's default SFT step (~4.4k tokens) disagreed:
compiled 44.0k vs eager 22.9k real tokens/s in one, 25.2k vs 33.0k in the other, with the same losses and a lower
peak (8.1 vs 9.6 GiB) in both; the host-bound step's rate followed the host's speed, which drifted more than
that between runs, and the slower run was each time the first after the machine started (docs/BENCHMARKS.md).
The first steps compile for ~25 s there. DPO measured 27.3 pairs/s compiled against 34.9 eager in one run,
a gap within that run-to-run spread; on the CPU compiled DPO steps were ~8% slower (a 24-layer narrow model).
On the CPU the compile time (~15 s for a small model) outweighs the gain in short runs.
"""

from __future__ import annotations

import torch
from torch import nn

from posttrain import log


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of decoder layers (Llama, Qwen2, Mistral, Gemma, Phi ... all keep it at model.layers)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile each decoder layer in place (nn.Module.compile: names and state dicts unchanged); prints and
    returns how many."""
    layers = decoder_layers(model)
    if layers is None:
        log.warning(f"train.compile found no decoder layers (model.layers) in {type(model).__name__}; training "
                    "eagerly", every_rank=False)
        return 0
    torch._dynamo.config.suppress_errors = True  # a frame that cannot compile runs eagerly
    for layer in layers:
        layer.compile(dynamic=True)
    log.info(f"speed: {len(layers)} decoder layers compiled (dynamic shapes; the first step compiles)")
    return len(layers)
