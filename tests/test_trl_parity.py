"""The same rows through posttrain and through a plain TRL SFTTrainer script give the same first-step loss,
unpacked and packed (the packed step holds the same documents: the step's token budget is the batch's tokens)."""

import json

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import posttrain
from posttrain.config.schema import load_config
from posttrain.tiny import tiny_rows

TAGGED_CHATML = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}{{- '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def plain_trl_first_loss(model_dir, rows, out, chat_template=None):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if chat_template:
        tokenizer.chat_template = chat_template
    args = SFTConfig(output_dir=str(out), max_steps=1, per_device_train_batch_size=len(rows), learning_rate=1e-3,
                     logging_steps=1, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
                     seed=42, save_strategy="no", assistant_only_loss=chat_template is not None)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    return next(log["loss"] for log in trainer.state.log_history if "loss" in log)


def posttrain_first_loss(rows, tmp_path, packing=False):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(_tiny_sft(), [
        f"data.train={data}", "data.eval=[]", "data.eval_fraction=0", f"output_dir={tmp_path / 'pt'}",
        "train.max_steps=1", f"train.batch_size={len(rows)}", "train.learning_rate=1e-3", "train.logging_steps=1",
        f"train.packing={str(packing).lower()}"])
    return posttrain.run(cfg)["train_loss_first"]


def _tiny_sft():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "configs" / "tiny" / "sft.yaml"


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("task", ["prompt_completion", "chat"])
def test_first_step_loss_matches_plain_trl(task, packing, tmp_path, tiny_model_dir):
    rows = tiny_rows(task)[:8]
    # TRL needs {% generation %} tags to mask chat rows; posttrain gets the same mask from the untagged template.
    template = TAGGED_CHATML if task == "chat" else None
    theirs = plain_trl_first_loss(tiny_model_dir, rows, tmp_path / "trl", template)
    ours = posttrain_first_loss(rows, tmp_path, packing)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6)
