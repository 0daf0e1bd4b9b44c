"""Measuring inside one variant's process of scripts/bench_train.py: the step clock, the profiler summary, peak
memory and the losses. Imported by bench_train.py (kept apart so that each file reads in one sitting)."""

from __future__ import annotations

import fcntl
import resource
import time


class Clock:
    """Counts the real tokens (the Trainer's non-padding count) of the steps after `warmup` and times them.

    One variant at a time (GPU): wall-clock from the end of the warm-up steps to the end of the last step, with
    a device synchronization at those two points only, as a user's run experiences it (data loading, logging
    and per-step bookkeeping included; the CPU may run ahead of the GPU as it would).
    Lockstep (CPU: the variants run at the same time but take turns through a lock file, so that background
    load on a shared CPU falls on every variant alike): only the time between the Trainer's step-begin and
    step-end events counts (forward, backward, optimizer; data loading excluded for every variant), since
    wall-clock there would include the other variants' turns."""

    def __init__(self, warmup: int, lock_path: str | None = None):
        self.warmup, self.seconds, self.all_seconds, self.tokens0, self.tokens1, self.steps = warmup, 0.0, 0.0, 0, 0, 0
        self.lock = open(lock_path, "a") if lock_path else None  # noqa: SIM115 (held for the process's life)
        self.held, self.step_start, self.start = False, 0.0, time.perf_counter()
        self.wall0 = None

    def hold(self) -> None:
        if self.lock and not self.held:
            fcntl.flock(self.lock, fcntl.LOCK_EX)
            self.held = True

    def release(self) -> None:
        if self.lock and self.held:
            fcntl.flock(self.lock, fcntl.LOCK_UN)
            self.held = False
            time.sleep(0.002)  # let a waiting variant take its turn

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock.hold()
                if clock.lock:
                    sync()
                    clock.step_start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                last = state.global_step in (clock.warmup, state.max_steps)
                if clock.lock or last:
                    sync()
                now = time.perf_counter()
                if clock.lock:
                    clock.all_seconds += now - clock.step_start
                    if state.global_step > clock.warmup:
                        clock.seconds += now - clock.step_start
                if state.global_step == clock.warmup:
                    clock.tokens0, clock.wall0 = state.num_input_tokens_seen, now
                elif not clock.lock and state.global_step == state.max_steps:
                    # a run no longer than its warm-up (wall0 unset) measures nothing: rates None, not a crash
                    clock.seconds = now - clock.wall0 if clock.wall0 is not None else 0.0
                    clock.all_seconds = now - clock.start
                clock.tokens1, clock.steps = state.num_input_tokens_seen, state.global_step
                clock.release()

            def on_train_end(self, args, state, control, **kwargs):  # stopped before max_steps (a guard, say)
                if not clock.lock and clock.wall0 is not None and state.global_step < state.max_steps:
                    sync()
                    now = time.perf_counter()
                    clock.seconds, clock.all_seconds = now - clock.wall0, now - clock.start

        return _Callback()

    def result(self, batch: int) -> dict:
        measured = self.steps - self.warmup
        rate = (lambda n: n / self.seconds) if self.seconds else (lambda n: None)  # None: no step after warm-up
        return {"tokens_per_s": rate(self.tokens1 - self.tokens0), "pairs_per_s": rate(measured * batch),
                "measured_steps": measured, "steps": self.steps, "measured_s": self.seconds,
                "all_steps_s": self.all_seconds, "timing": "step events (lockstep)" if self.lock else "wall-clock"}


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepProfile:
    """posttrain_profile: torch.profiler over steps warmup+1 .. warmup+PROFILED_STEPS of posttrain's defaults. The
    GPU's kernel time per step against the wall time per step (from the unprofiled posttrain run) says whether a
    step is GPU-bound (they are close) or host-bound (kernels fill a fraction of the step), and which ops dominate."""

    PROFILED_STEPS = 3

    def __init__(self, warmup: int):
        self.first, self.profiler, self.summary = warmup + 1, None, {}

    def callback(self):
        import torch
        from transformers import TrainerCallback

        profile = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step + 1 == profile.first:
                    activities = [torch.profiler.ProfilerActivity.CPU]
                    if torch.cuda.is_available():
                        activities.append(torch.profiler.ProfilerActivity.CUDA)
                    profile.profiler = torch.profiler.profile(activities=activities)
                    profile.profiler.__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                if profile.profiler is not None and state.global_step == profile.first + profile.PROFILED_STEPS - 1:
                    profile.stop(profile.PROFILED_STEPS)

            def on_train_end(self, args, state, control, **kwargs):  # a run shorter than the profiled steps
                if profile.profiler is not None:
                    profile.stop(state.global_step - profile.first + 1)

        return _Callback()

    def stop(self, steps: int) -> None:
        sync()
        self.profiler.__exit__(None, None, None)
        self.summarize(self.profiler.key_averages(), max(1, steps))
        self.profiler = None

    def summarize(self, averages, steps: int) -> None:
        """Only the GPU's own events (kernels, copies) count as GPU time: the CPU-side ops that launched them carry
        the same device time again (summing both reads ~3x too high), and so do
        record_function regions mirrored on the GPU (is_user_annotation: Optimizer.step#AdamW.step spans the
        optimizer's kernels), which torch's own table leaves out too."""
        from torch.autograd import DeviceType

        gpu = [e for e in averages if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        cpu = [e for e in averages if e.device_type != DeviceType.CUDA]
        per_step = lambda us: round(us / 1e3 / steps, 3)  # noqa: E731 - profiler times are microseconds
        self.summary = {
            "profiled_steps": steps,
            "gpu_kernel_ms_per_step": per_step(sum(e.self_device_time_total for e in gpu)),
            "gpu_events_per_step": sum(e.count for e in gpu) / steps,
            "cpu_ops_per_step": sum(e.count for e in cpu) / steps,
            "top_kernels_ms_per_step": top(gpu, "self_device_time_total", per_step),
            "top_cpu_ops_self_ms_per_step": top(cpu, "self_cpu_time_total", per_step)}


def top(events, field: str, per_step, n: int = 8, width: int = 80) -> dict:
    """The n largest by `field`, names cut to `width` characters; names equal once cut (templated CUDA kernels
    often are) are summed, not overwritten."""
    sums: dict[str, float] = {}
    for e in events:
        sums[e.key[:width]] = sums.get(e.key[:width], 0.0) + getattr(e, field)
    return {name: per_step(us) for name, us in sorted(sums.items(), key=lambda kv: kv[1], reverse=True)[:n]}


def instrument(clock: Clock, extra_callbacks=()) -> dict:
    """Every Trainer.train() in this process gets the clock and notes when it starts (the end of set-up)."""
    from transformers import Trainer

    marks, original = {}, Trainer.train

    def train(self, *args, **kwargs):
        self.add_callback(clock.callback())
        for callback in extra_callbacks:
            self.add_callback(callback)
        marks["train_start"] = clock.start = time.perf_counter()
        return original(self, *args, **kwargs)

    Trainer.train = train
    return marks


def peak_memory() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def held_out_loss(model, docs: list[list[int]]) -> float:
    """Exact per-token mean loss over the held-out documents (one at a time, no padding)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in docs:
            x = torch.tensor([ids], device=model.device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            total += F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
            count += len(ids) - 1
    return total / count


def late_loss(losses: list[float]) -> float:
    """Mean training loss over the last quarter of the steps."""
    tail = losses[-max(1, len(losses) // 4):]
    return sum(tail) / len(tail)


def device_flags() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"use_cpu": not cuda, "bf16": cuda}
