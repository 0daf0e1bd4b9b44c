"""Work done once per launch, not once per process.

Under DDP every rank needs the same tokenized data. Tokenizing it on every rank costs N x the CPU time (and N
downloads racing for the hub cache); a disk cache keyed on the data risks serving stale rows when a file
changes in place. So the main process loads and tokenizes, and hands the result to the others over the process
group (torch.distributed.broadcast_object_list). A PosttrainError on the main process (bad data) reaches
every rank as the same error, so they all stop with one line instead of waiting forever.
"""

from __future__ import annotations

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
            print(f"posttrain: {compute.__name__} ran once, on the main process; shared with "
                  f"{state.num_processes - 1} other process(es)", flush=True)
        except Exception as err:  # noqa: BLE001 - told to the other ranks, then raised here as it was
            failure, box[0] = err, ("error", str(err) if isinstance(err, PosttrainError) else None)
    dist.broadcast_object_list(box, src=0, device=None if state.device.type == "cpu" else state.device)
    if failure is not None:
        raise failure
    status, value = box[0]
    if status == "error":
        raise PosttrainError(value or "the main process failed while preparing the data (its traceback says why)")
    return value
