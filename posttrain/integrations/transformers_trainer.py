"""The Hugging Face Trainer's private methods that posttrain overrides (checked by tests/test_integrations.py).

- `_save_checkpoint(model, trial)` and `_get_output_dir(trial)`: the Trainer writes `checkpoint-N/` in place,
  file by file. posttrain points the output folder at a staging folder for the length of one save and renames
  the finished checkpoint into place (engine/checkpoints.py says why).
- `_track_num_input_tokens(inputs)`: the Trainer counts input tokens after the backward, which makes the host wait
  for the GPU; posttrain counts them right after the forward instead (count_input_tokens) and turns the
  Trainer's own call into a no-op.
"""

from __future__ import annotations


class TrainerInternals:
    """Mixed in before a transformers/TRL Trainer class (after posttrain's guards)."""

    _staging_root: str | None = None

    def save_checkpoint_atomically(self, save) -> None:  # provided by the guards (engine/checkpoints.py)
        raise NotImplementedError

    def _get_output_dir(self, trial):
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        def save(staging_root: str) -> None:
            self._staging_root = staging_root
            try:
                super(TrainerInternals, self)._save_checkpoint(model, trial)
            finally:
                self._staging_root = None

        self.save_checkpoint_atomically(save)

    def count_input_tokens(self, inputs) -> None:
        """The Trainer's per-micro-step count of input tokens (include_num_input_tokens_seen), called by posttrain."""
        count = getattr(super(), "_track_num_input_tokens", None)
        if count is not None:
            count(rollout_tokens(inputs) if "completion_ids" in inputs and "input_ids" not in inputs else inputs)

    def _track_num_input_tokens(self, inputs):
        """The Trainer calls this after the backward; count_input_tokens has already counted these tokens."""


def rollout_tokens(inputs: dict) -> dict:
    """GRPO/RLOO batches hold prompts and sampled completions apart (prompt_ids/completion_ids, each with its mask);
    the Trainer counts `input_ids` with their `attention_mask`, so the two are joined for it."""
    import torch

    return {"input_ids": torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)}
