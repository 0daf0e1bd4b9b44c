"""accelerate internals that posttrain clears (checked by tests/test_integrations.py)."""

from __future__ import annotations


def unmark_evaluation_prepare(trainer) -> None:
    """trainer.evaluate() before train() (DPO's starting metrics) lets accelerate prepare the bare model in
    evaluation mode and mark it prepared; train() then finds the mark and skips the DDP wrap, so under DDP the
    gradients are silently never averaged (found by tests/test_distributed.py: 2 processes != 2x accumulation).
    Clearing the mark lets train() wrap the model as it does without the early evaluate."""
    model = trainer.model
    if getattr(model, "_is_accelerate_prepared", False) and trainer.model_wrapped is model:
        model._is_accelerate_prepared = False
        if model in trainer.accelerator._models:
            trainer.accelerator._models.remove(model)
