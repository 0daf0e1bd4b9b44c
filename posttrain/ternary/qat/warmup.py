"""Trainer callback that drives the BitLinear warm-up lambda (kept apart: importing the Trainer stack is slow)."""

from __future__ import annotations

from transformers import TrainerCallback

from posttrain.ternary.qat.bitlinear import set_quant_lambda
from posttrain.ternary.quant import lambda_at


class TernaryLambdaCallback(TrainerCallback):
    """transformers/TRL Trainer callback: lam = lambda_at(global_step, warmup_steps, schedule) before each step.

    on_train_begin covers the first step and resumed runs (global_step is restored from the checkpoint).
    """

    def __init__(self, warmup_steps: int, schedule: str = "linear") -> None:
        lambda_at(0, warmup_steps, schedule)  # validate the schedule name now, not at step 0
        self.warmup_steps = warmup_steps
        self.schedule = schedule

    def _apply(self, state, model) -> None:
        if model is not None:
            set_quant_lambda(model, lambda_at(state.global_step, self.warmup_steps, self.schedule))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)
