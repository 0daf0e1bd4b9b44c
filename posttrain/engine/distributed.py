"""Work done once per launch, not once per process.

Under DDP every rank needs the same tokenized data. Tokenizing it on every rank costs N x the CPU time (and N
downloads racing for the hub cache); a disk cache keyed on the data risks serving stale rows when a file
changes in place. So the main process loads and tokenizes, and hands the result to the others over the process
group (torch.distributed.broadcast_object_list). A PosttrainError on the main process (bad data) reaches
every rank as the same error, so they all stop with one line instead of waiting forever.
"""

from __future__ import annotations

import contextlib

from posttrain.errors import PosttrainError


def process_state():
    """accelerate's view of this process (sets up the CPU process group too, which accelerate skips by default)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def on_main_then_shared(compute, *args, **kwargs):
    """compute(*args, **kwargs) on the main process only; every process returns its result."""
    import torch.distributed as dist

    state = process_state()
    if state.num_processes == 1:
        return compute(*args, **kwargs)
    box, failure = [None], None
    if state.is_main_process:
        try:
            box[0] = ("ok", compute(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 - told to the other ranks, then raised here as it was
            failure, box[0] = err, ("error", str(err) if isinstance(err, PosttrainError) else None)
    dist.broadcast_object_list(box, src=0, device=None if state.device.type == "cpu" else state.device)
    if failure is not None:
        raise failure
    status, value = box[0]
    if status == "error":
        raise PosttrainError(value or "the main process failed while preparing the data (its traceback says why)")
    return value


@contextlib.contextmanager
def whole_model(trainer, rebuild):
    """Yields the trained model, whole, on the main process (None on the others); every process must enter it.

    - one process or DDP: every process holds the whole model already.
    - DeepSpeed ZeRO-3: parameters are partitioned; deepspeed.zero.GatheredParameters gathers them in place for the
      length of the block (collective), so writers that walk the model's modules (the ternary export) see whole
      tensors. ZeRO-1/2 partition only optimizer state: nothing to gather.
    - FSDP: the full state is gathered collectively (accelerate's get_state_dict) and loaded, on the main process,
      into rebuild(): the same architecture on the CPU, whose own weights it replaces."""
    should_write = trainer.args.should_save
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if getattr(trainer, "is_deepspeed_enabled", False) and plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield model if should_write else None
    elif getattr(trainer, "is_fsdp_enabled", False):
        state = trainer.accelerator.get_state_dict(trainer.model)  # collective: every process takes part
        yield _loaded(rebuild(), state) if should_write else None
    else:
        yield trainer.accelerator.unwrap_model(trainer.model) if should_write else None


def _loaded(model, state: dict):
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # a tied lm_head comes back through the embedding
        raise RuntimeError(f"gathered weights do not fit the rebuilt model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model
