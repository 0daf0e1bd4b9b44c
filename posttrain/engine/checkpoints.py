"""Checkpoints that survive faults, and the guards around a training loop.

What the Hugging Face Trainer does well, it keeps doing: it saves model, optimizer, scheduler, RNG states and
its own state (global step, so the data position and the ternary lambda) and restores them on resume. What it
does not do, posttrain adds here:

- Atomic checkpoints. transformers writes `checkpoint-N/` in place, file by file, and its resume picks the
  highest-numbered folder whether or not it is whole. posttrain lets every process write into
  `checkpoints/.saving/checkpoint-N/`, waits for all of them, then renames the folder into place in one step:
  a crash while saving leaves the previous checkpoint intact and nothing half-written that looks complete.
- Free disk space is checked before each save (estimate: the model's and the optimizer state's bytes).
- A non-finite loss stops the run before the optimizer applies it, so the last checkpoint is a good one.
- SIGTERM / SIGINT (a scheduler's pre-emption, Ctrl-C) finish the current step, save a checkpoint and stop;
  the run then exits non-zero, unfinished (no metrics.json), ready for `--resume`. A second Ctrl-C aborts.

Flags are agreed across processes (one tiny all-reduce per micro-step) so that under DDP every rank stops at
the same step instead of one waiting forever for the others.

Where they are read matters on a GPU. Reading a value the GPU computes (`.item()`, `bool(tensor)`) makes the host
wait until the GPU has run everything queued so far. TRL's compute_loss already waits like this for its metrics,
right after the forward. So the loss guard and the Trainer's token count (`include_num_input_tokens_seen`) are read
there, where nothing is left to wait for. The Trainer reads both after the backward, which would make the host wait
for the whole backward pass before it queues the optimizer step and loads the next batch. With this placement,
nothing reads the GPU between the backward and the next forward (engine/trainer_args.py also turns off the
Trainer's NaN-filtered logging, which read there too; a test checks this).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

from posttrain import log
from posttrain.engine.distributed import on_main_then_shared
from posttrain.errors import PosttrainError
from posttrain.integrations.accelerate_state import unmark_evaluation_prepare
from posttrain.integrations.transformers_trainer import TrainerInternals
from posttrain.integrations.transformers_warnings import no_is_gradient_checkpointing_warning
from posttrain.integrations.trl_metrics import replace_logged_metric

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".saving"  # inside the checkpoints folder; never matched by CHECKPOINT, so never resumed from


class RunInterrupted(PosttrainError):
    """SIGTERM/SIGINT stopped the run after saving a checkpoint; it can continue with --resume."""

    exit_code = 143


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The highest-step complete checkpoint (a renamed-in folder holding trainer_state.json), or None."""
    folder = Path(checkpoints_dir)
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.match(p.name))
             and (p / "trainer_state.json").is_file()] if folder.is_dir() else []
    return max(found)[1] if found else None


def any_process(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag, True when it is set on any process (one all-reduce MAX when distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flags
    value = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in value.tolist()]


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class StopRequest:
    """SIGTERM/SIGINT set a flag instead of killing the process mid-step; a second signal aborts at once."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        log.warning(f"{self.signal_name} received: saving a checkpoint after this step, then stopping "
            "(send it again to abort without saving)")
        for number, handler in self._previous.items():  # the second signal takes the default path
            signal.signal(number, handler)

    def __enter__(self):
        for number in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: no handlers, plain behaviour
                pass
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


class _StopAtStepEnd(TrainerCallback):
    """Turns an agreed stop request into 'save now, then stop' at the end of the optimizer step."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.stop_agreed:
            control.should_save = True
            control.should_training_stop = True
        return control


class _LogLastStep(TrainerCallback):
    """Logs the step where training ends. The Trainer logs every logging_steps only, so a run whose last step
    falls between two would report an earlier step's loss as its last (and lose the steps after it)."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_training_stop or state.global_step >= state.max_steps:
            control.should_log = True
        return control


class GuardedTrainerMixin(TrainerInternals):
    """Mixed in before a transformers/TRL trainer class: atomic saves, disk check, finite-loss and stop guards."""

    def __init__(self, *args, **kwargs):
        with no_is_gradient_checkpointing_warning():  # peft reads the deprecated name while wrapping LoRA
            super().__init__(*args, **kwargs)
        self.stop_request = StopRequest()
        self.stop_agreed = False
        self._staging_root: str | None = None
        self.add_callback(_StopAtStepEnd(self))
        self.add_callback(_LogLastStep())  # after _StopAtStepEnd: a stop it requests is logged too

    def log(self, logs, start_time=None):
        # One token count everywhere: TRL's num_tokens counts what it sees of the batch (one packed row's length
        # per micro-batch without an attention_mask) and restarts at 0 on resume; the Trainer's count is counted
        # after every forward (count_input_tokens) and restored from the checkpoint.
        replace_logged_metric(self, "num_tokens", self.state.num_input_tokens_seen)
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with no_is_gradient_checkpointing_warning():  # TRL's reference forward reads the deprecated name
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        if self.model.training:  # after the forward, not the backward: see the module docstring
            self.count_input_tokens(inputs)
            self._check_loss(result[0] if return_outputs else result)
        return result

    def _check_loss(self, loss: torch.Tensor) -> None:
        bad, stop = any_process([not bool(torch.isfinite(loss).all()), self.stop_request.signal_name is not None],
                                 loss.device)
        if bad:
            last = latest_checkpoint(self.args.output_dir)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
            raise PosttrainError(
                f"training loss became {loss.item()} at step {self.state.global_step + 1}; stopped before the "
                f"optimizer applied it ({kept}); lower train.learning_rate or check the data, then rerun"
                + (" with --resume" if last else ""))
        self.stop_agreed = self.stop_agreed or stop

    def save_checkpoint_atomically(self, save):
        """save(): the Trainer's own checkpoint save, written into a staging folder and renamed into place."""
        final_root = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        staging_root = final_root / STAGING
        self._check_disk_space(final_root)
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # what a crash mid-save left behind
            staging_root.mkdir(parents=True)
        _barrier()
        save(str(staging_root))
        _barrier()  # every process has written its part (RNG states, shards) into the staging folder
        if self.args.should_save:
            target = final_root / name
            if target.exists():  # the same step saved twice (a stop request on a save step)
                shutil.rmtree(target)
            os.replace(staging_root / name, target)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(str(final_root), save_total_limit=self.args.save_total_limit)
        _barrier()

    def _check_disk_space(self, folder: Path) -> None:
        model = self.model
        needed = _tensor_bytes(p for p in model.parameters() if p.requires_grad or not hasattr(model, "peft_config"))
        if self.optimizer is not None:
            needed += sum(_tensor_bytes(s.values()) for s in self.optimizer.state.values())
        needed = int(needed * 1.1) + (64 << 20)  # tokenizer, states, filesystem slack
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if any_process([free < needed], self.args.device)[0]:
            last = latest_checkpoint(folder)
            raise PosttrainError(
                f"not enough free disk space in {folder} for checkpoint-{self.state.global_step}: about "
                f"{needed / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free; the last good checkpoint is "
                f"{last or 'none'}; free some space or lower train.save_total_limit, then rerun with --resume")


def guarded(trainer_class):
    """`guarded(SFTTrainer)`: the trainer class with posttrain's checkpoint and stop guards mixed in."""
    return type(f"Guarded{trainer_class.__name__}", (GuardedTrainerMixin, trainer_class), {})


def train(trainer):
    """trainer.train(), continuing from the latest complete checkpoint in the run folder; raises RunInterrupted
    when a signal stopped it (its checkpoint saved), so that the run is not finished as if complete.

    The run folder decides: prepare_run_dir (engine/run_dir.py) keeps an unfinished run's
    checkpoints only when this run continues it (--resume, or a rerun with the same settings), says so, and
    otherwise starts from an empty folder."""
    checkpoint = on_main_then_shared(latest_checkpoint, trainer.args.output_dir)  # one choice for every process
    unseen = checkpoint is not None and not (checkpoint / "trainer_state.json").is_file()
    if any_process([unseen], trainer.args.device)[0]:
        raise PosttrainError(f"{checkpoint} is not on every machine; resuming needs the run folder on a filesystem "
                             "that every machine shares")
    unmark_evaluation_prepare(trainer)
    with trainer.stop_request:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if trainer.stop_agreed and trainer.state.global_step < trainer.state.max_steps:
        saved = latest_checkpoint(trainer.args.output_dir)
        stopped = RunInterrupted(f"stopped by {trainer.stop_request.signal_name or 'a signal on another process'} "
                                 f"at step {trainer.state.global_step}; {saved} saved; continue with the same "
                                 "command and --resume")
        stopped.exit_code = 130 if trainer.stop_request.signal_name == "SIGINT" else 143  # the shells' 128 + signal
        raise stopped
    return output
