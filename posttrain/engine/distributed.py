"""Work done once per launch, not once per process.

Under DDP every rank needs the same tokenized data. Tokenizing it on every rank costs N x the CPU time (and N
downloads racing for the hub cache); a disk cache keyed on the data risks serving stale rows when a file
changes in place. So the main process loads and tokenizes, and hands the result to the others over the process
group (torch.distributed.broadcast_object_list). A PosttrainError on the main process (bad data) reaches
every rank as the same error, so they all stop with one line instead of waiting forever.
"""

from __future__ import annotations

from posttrain import log
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
            log.info(f"{compute.__name__} ran once, on the main process; shared with "
                f"{state.num_processes - 1} other process(es)")
        except Exception as err:  # noqa: BLE001 - told to the other ranks, then raised here as it was
            failure, box[0] = err, ("error", str(err) if isinstance(err, PosttrainError) else None)
    dist.broadcast_object_list(box, src=0, device=None if state.device.type == "cpu" else state.device)
    if failure is not None:
        raise failure
    status, value = box[0]
    if status == "error":
        raise PosttrainError(value or "the main process failed while preparing the data (its traceback says why)")
    return value


def gathered_model(trainer, rebuild):
    """The trained model, whole, on the main process (None elsewhere); every process must call it.

    Under DDP or on one process each process already holds the whole model. Under FSDP or ZeRO-3 each holds a
    shard: the full state is gathered collectively (accelerate's get_state_dict) and loaded, on the main process,
    into rebuild() (an empty CPU copy of the architecture), so that writers which walk the model's modules (the
    ternary export) see real tensors, not shards."""
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    if not sharded:
        return trainer.accelerator.unwrap_model(trainer.model)
    state = trainer.accelerator.get_state_dict(trainer.model)  # collective: every process takes part
    if not trainer.args.should_save:
        return None
    model = rebuild()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # a tied lm_head comes back through the embedding
        raise RuntimeError(f"gathered weights do not fit the rebuilt model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model
