"""Deprecation warnings that transformers raises about code in TRL, which a posttrain user can do nothing about
(checked by tests/test_bad_input_data.py against the installed versions: when TRL stops triggering one, that test
says to remove its filter)."""

from __future__ import annotations

import contextlib
import warnings

# transformers 5 renamed PreTrainedModel.is_gradient_checkpointing to is_activation_checkpointing and made the
# old name warn; TRL's disable_gradient_checkpointing (trl/models/utils.py), which DPOTrainer enters around
# every reference forward (compute_ref_log_probs, and compute_loss when the reference is not precomputed), still
# reads the old name.
IS_GRADIENT_CHECKPOINTING = r"`is_gradient_checkpointing` is deprecated"


@contextlib.contextmanager
def no_is_gradient_checkpointing_warning():
    """Silence that one FutureWarning (matched by its message and category) for the calls inside: it names
    TRL's code, not the user's, and the alias still works until transformers 6, so printing it only adds noise
    to every DPO run. Every other warning still shows, and this one still shows outside these calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=IS_GRADIENT_CHECKPOINTING, category=FutureWarning)
        yield
