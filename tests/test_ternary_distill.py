"""Distillation into 1.58 bits (ternary recipe, `distill:` section): the loss terms, packing kept apart, the frozen
teacher, a teacher with another vocabulary refused before training, and two processes."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import posttrain
from posttrain.config.schema import DistillSettings, load_config
from posttrain.engine import distill as kd

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG = CONFIGS / "tiny" / "ternary-kd.yaml"


def tiny_pair(tiny_model_dir):
    """The tiny model as teacher and a perturbed copy of it as student (float32, eval: no dropout)."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    teacher.config.use_cache = False
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return teacher.eval(), student.eval()


def fake_trainer(teacher, student, **settings):
    return SimpleNamespace(teacher=teacher, model=student, distill=DistillSettings(**settings),
                           relation_heads=kd.relation_heads(student.config))


def test_kd_is_the_tempered_kl_over_supervised_positions_only():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), 3 * torch.randn(2, 5, 11, generator=g)
    keep = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    for temperature in (1.0, 2.0, 5.0):
        expected = torch.nn.functional.kl_div(torch.log_softmax(s[keep] / temperature, -1),
                                              torch.log_softmax(t[keep] / temperature, -1), log_target=True,
                                              reduction="sum") * temperature**2
        torch.testing.assert_close(kd.kd_sum(s, t, keep, temperature), expected)
    assert kd.kd_sum(t, t, keep, 5.0).abs() < 1e-5  # the teacher itself is perfect
    # a higher temperature softens a peaked teacher: less of the KL sits on its top token
    assert kd.kd_sum(s, t, keep, 5.0) / 25 < kd.kd_sum(s, t, keep, 1.0)
    changed = s.clone()
    changed[0, 2] += 100.0  # an unsupervised position: no KD there
    torch.testing.assert_close(kd.kd_sum(changed, t, keep, 2.0), kd.kd_sum(s, t, keep, 2.0))


def test_positions_documents_and_relation_mask():
    labels = torch.tensor([[-100, -100, 7, 8, -100, 9]])
    assert kd.supervised(labels).tolist() == [[False, True, True, False, True, False]]
    inputs = {"input_ids": torch.zeros(1, 5, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
    assert kd.documents(inputs).tolist() == [[1, 1, 1, 2, 2]]
    mask = kd.relation_mask(inputs)[0]
    assert mask[2, :3].all() and not mask[3, :3].any() and mask[4, 3:].all() and not mask[1, 2]  # causal, per doc
    padded = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0]])}
    assert kd.relation_mask(padded)[0].tolist() == [[True, False, False], [True, True, False], [True, True, False]]


def test_packed_row_distils_each_document_as_if_alone(tiny_model_dir):
    """The teacher sees the student's position_ids: a row of two packed documents gives every term the sum of the
    two documents' terms taken one at a time (nothing leaks across the boundary)."""
    teacher, student = tiny_pair(tiny_model_dir)
    trainer = fake_trainer(teacher, student, attention_weight=1.0, hidden_weight=1.0, layer=-1)
    docs = [([5, 9, 30, 41, 77, 12], [-100, -100, -100, 41, 77, 12]), ([8, 60, 61, 62], [-100, -100, 61, 62])]

    def batch(members):
        ids = [i for d in members for i in d[0]]
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([[x for d in members for x in d[1]]]),
                "position_ids": torch.tensor([[p for d in members for p in range(len(d[0]))]])}

    with torch.no_grad():
        packed, count = kd.distill_sums(trainer, student, batch(docs))
        alone = [kd.distill_sums(trainer, student, batch([d])) for d in docs]
    assert int(count) == sum(int(c) for _, c in alone) == 5
    for name in ("ce", "kd", "attention", "hidden"):
        assert packed[name] > 0
        torch.testing.assert_close(packed[name], sum(a[name] for a, _ in alone), rtol=1e-4, atol=1e-5)


def test_every_term_reaches_the_student_and_none_the_teacher(tiny_model_dir):
    teacher, student = tiny_pair(tiny_model_dir)
    teacher.requires_grad_(False)
    trainer = fake_trainer(teacher, student, attention_weight=1.0, hidden_weight=1.0, layer=0)
    ids = [5, 9, 30, 41, 77, 12]
    inputs = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([[-100, -100, *ids[2:]]])}
    for name in ("kd", "attention", "hidden"):
        student.zero_grad(set_to_none=True)
        kd.distill_sums(trainer, student, inputs)[0][name].backward()
        layer = student.model.layers[0].self_attn
        assert layer.q_proj.weight.grad is not None and layer.q_proj.weight.grad.abs().sum() > 0, name
        assert all(p.grad is None for p in teacher.parameters())


@pytest.fixture(scope="module")
def kd_run(tiny_sft_dir, tmp_path_factory):
    """30 steps of configs/tiny/ternary-kd.yaml with every term on, quantized from the first step; the teacher and
    the trainer are kept for inspection."""
    import posttrain.recipes.ternary as recipe

    out = tmp_path_factory.mktemp("kd") / "run"
    seen, make, patch = {}, recipe.distilling, pytest.MonkeyPatch()

    def recording(trainer_class):
        cls = make(trainer_class)

        def init(self, *args, **kwargs):
            cls.__init__(self, *args, **kwargs)
            seen["trainer"] = self

        return type(cls.__name__, (cls,), {"__init__": init})

    patch.setattr(recipe, "distilling", recording)
    try:
        metrics = posttrain.run(load_config(CONFIG, [
            f"model.name_or_path={tiny_sft_dir}", f"output_dir={out}", "train.max_steps=30", "train.logging_steps=5",
            "ternary.lambda_schedule=none", "distill.hidden_weight=1.0"]))
    finally:
        patch.undo()
    return out, metrics, seen["trainer"]


def test_distilled_run_trains_the_student_and_never_the_teacher(kd_run, tiny_sft_dir):
    out, metrics, trainer = kd_run
    assert metrics["steps"] == 30 and metrics["train_loss_last"] < metrics["train_loss_first"]
    start = load_file(tiny_sft_dir / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    student = dict(trainer.model.named_parameters())[name]
    assert not torch.equal(student.detach().cpu(), start[name])  # the student trained
    teacher = trainer.teacher
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert next(teacher.parameters()).dtype == student.dtype
    for key, value in teacher.state_dict().items():  # the teacher is the starting model, untouched
        if key in start:
            assert torch.equal(value.cpu(), start[key]), key
    assert type(teacher.model.layers[0].self_attn.q_proj).__name__ == "Linear"  # full precision
    assert (out / "model.safetensors").is_file() and json.loads((out / "config.json").read_text())[
        "quantization_config"]["quant_method"] == "bitnet"


def test_metrics_hold_each_loss_term_and_the_kd_term_falls(kd_run, tiny_sft_dir):
    _, metrics, _ = kd_run
    terms = metrics["distill"]
    assert terms["teacher"] == str(tiny_sft_dir)
    for name in ("ce", "kd", "attention", "hidden"):
        steps = [step for step, _ in terms[f"{name}_loss_history"]]
        assert steps == [step for step, _ in metrics["train_loss_history"]] and terms[f"{name}_loss_first"] > 0
    assert 0 < terms["kd_loss_last"] < terms["kd_loss_first"]
    assert terms["ce_loss_last"] < terms["ce_loss_first"]


@pytest.mark.parametrize("kd_weight,term", [(0.0, "ce"), (1.0, "kd")])
def test_kd_weight_blends_the_logged_terms_into_the_loss(kd_weight, term, tiny_sft_dir, tmp_path):
    """kd_weight 0 trains on cross-entropy alone, 1 on the KD alone: the logged loss is that term."""
    metrics = posttrain.run(load_config(CONFIG, [
        f"model.name_or_path={tiny_sft_dir}", f"output_dir={tmp_path / 'out'}", "train.max_steps=3",
        "train.logging_steps=1", f"distill.kd_weight={kd_weight}", "distill.attention_weight=0",
        "distill.temperature=2.0", "ternary.lambda_schedule=none"]))
    losses = [loss for _, loss in metrics["train_loss_history"]]
    assert losses == pytest.approx([v for _, v in metrics["distill"][f"{term}_loss_history"]], rel=1e-4)
    other = "kd" if term == "ce" else "ce"
    assert losses != pytest.approx([v for _, v in metrics["distill"][f"{other}_loss_history"]], rel=1e-2)


def test_a_teacher_with_another_vocabulary_fails_before_training(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.cli import main

    teacher = tmp_path / "teacher"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<extra_a>", "<extra_b>"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    out = tmp_path / "out"
    code = main(["run", str(CONFIG), f"model.name_or_path={tiny_model_dir}", f"distill.teacher={teacher}",
                 f"output_dir={out}"])
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("posttrain: error: ")]
    assert code == 2 and len(errors) == 1 and errors[0] == lines[-1], lines
    assert errors[0].startswith("posttrain: error: distill.teacher: ") and "vocabulary" in errors[0]
    assert not out.exists()  # refused before the run folder, the data and the models


def test_bad_distill_settings_name_the_key():
    from posttrain.errors import PosttrainError

    for override, key in [("distill.temperature=0", "distill.temperature"), ("distill.kd_weight=1.5",
                          "distill.kd_weight"), ("distill.attention_weight=-1", "distill.attention_weight")]:
        with pytest.raises(PosttrainError, match=key):
            load_config(CONFIG, [override])
    with pytest.raises(PosttrainError, match="distill is a section of recipe: ternary"):
        load_config(CONFIGS / "tiny" / "sft.yaml", ["distill.kd_weight=0.5"])


@pytest.mark.slow
def test_nproc_two_distils_with_a_teacher_per_process(tiny_sft_dir, tmp_path):
    out = tmp_path / "ddp"
    args = [str(CONFIG), f"output_dir={out}", "train.max_steps=4", "train.logging_steps=1", "train.batch_size=4",
            f"model.name_or_path={tiny_sft_dir}", "ternary.lambda_schedule=none"]
    result = subprocess.run([sys.executable, "-m", "posttrain", "run", *args, "--nproc", "2"], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching: -m accelerate.commands.launch --num_processes 2 --multi_gpu" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    assert len(metrics["distill"]["kd_loss_history"]) == 4 and metrics["distill"]["kd_loss_first"] > 0
