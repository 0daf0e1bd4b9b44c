"""TRL's per-log metrics, which posttrain corrects before they are logged (checked by tests/test_integrations.py).

- `_metrics[mode][name]`: the values that TRL's SFTTrainer and DPOTrainer average into each log line (their
  `log()`), then clear. Both put `num_tokens` there, a running total that they count from the batch they see (the
  attention_mask, or one row's length when there is none, as in posttrain's packed rows) and that restarts at 0 on
  resume. posttrain logs the Trainer's own count instead (engine/checkpoints.py, GuardedTrainerMixin.log).
  The ternary recipe's distillation adds its loss terms (ce_loss, kd_loss, ...) there, so that they are averaged
  into the same log lines (`_metrics` holds a defaultdict(list) per mode).
"""

from __future__ import annotations


def replace_logged_metric(trainer, name: str, value: float) -> None:
    """Make the next training log line's `name` read value, when the trainer logs that metric at all."""
    metrics = getattr(trainer, "_metrics", None)
    train = metrics.get("train") if isinstance(metrics, dict) else None
    if train is not None and name in train:
        train[name] = [value]


def append_logged_metric(trainer, name: str, value: float) -> None:
    """One micro-batch's value of `name`, averaged with the others into the next training log line."""
    trainer._metrics["train"][name].append(value)
