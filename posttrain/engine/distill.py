"""Distillation into 1.58 bits (BitDistill, 2025): a frozen full-precision teacher teaches the ternary student.

The terms, each summed over the supervised next-token positions (labels != -100 one step ahead, as the
cross-entropy sees them) and divided by the step's supervised-token count, as TRL divides the cross-entropy:

- logits KD: T^2 * KL(softmax(teacher / T) || softmax(student / T)) per position; the T^2 keeps its gradients
  the size of the cross-entropy's (Hinton et al.). It is blended with the cross-entropy by kd_weight.
- attention relations (MiniLM v2, as BitDistill uses them): at one decoder layer, the Q, K and V projections
  are split into heads, and each head's softmax(X X^T / sqrt(d)) over the earlier positions of the same document
  is matched (KL, teacher || student, averaged over heads and over Q, K, V). Relations are sequence x sequence, so
  the teacher's width may differ; its head count must divide by the student's relation heads.
- hidden states: the mean squared difference of the decoder layer's output, per position.

Packed rows: the teacher gets the same input_ids and position_ids as the student (so its documents stay apart
exactly as the student's do), and a relation never reaches into another document (document ids come from the
position_ids restarting at 0).

The teacher is frozen: eval() (no dropout), requires_grad False, forward under no_grad, the student's dtype (the
same model.dtype setting), moved to the trainer's device. Under DDP each process holds its own copy, outside the
DDP wrapper: it has no gradients to average. Evaluation stays plain cross-entropy (TRL's), so eval_loss compares
with an undistilled run.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from posttrain import log
from posttrain.data.packing import prepare_model
from posttrain.data.sft_tokenize import IGNORE
from posttrain.engine.plan import fastest_attention
from posttrain.errors import PosttrainError
from posttrain.integrations.trl_metrics import append_logged_metric
from posttrain.models import load_model, load_tokenizer, resolve_path

TERMS = ("ce", "kd", "attention", "hidden")


def teacher_path(cfg) -> str:
    """distill.teacher resolved; null means the starting model (before ternarization)."""
    return resolve_path(cfg.distill.teacher or cfg.model.name_or_path, cfg.model.allow_pickle)


def _text_config(path: str, cfg):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code).get_text_config()


def relation_heads(text_config) -> int:
    return getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads


def check_teacher(cfg, tokenizer, student_path: str) -> str:
    """The teacher's folder, checked against the student before anything trains: the same vocabulary (tokenizer
    and logits width), the layer of the relation and hidden terms in range, widths that those terms can compare.
    Each mismatch is one line naming the key."""
    path = teacher_path(cfg)
    teacher_tok = load_tokenizer(dataclasses.replace(cfg.model, name_or_path=cfg.distill.teacher or
                                                     cfg.model.name_or_path), path)
    student, teacher = _text_config(student_path, cfg), _text_config(path, cfg)
    widths = [max(c.vocab_size, len(t)) for c, t in ((student, tokenizer), (teacher, teacher_tok))]
    if widths[0] != widths[1] or teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise PosttrainError(f"distill.teacher: {path} has another vocabulary than the student {student_path} "
                             f"({len(teacher_tok)} tokens, logits of {widths[1]}, against {len(tokenizer)} and "
                             f"{widths[0]}); logits KD needs the same tokenizer: give a teacher of the same family")
    d = cfg.distill
    if d.attention_weight or d.hidden_weight:
        for name, c in (("student", student), ("teacher", teacher)):
            if not -c.num_hidden_layers <= d.layer < c.num_hidden_layers:
                raise PosttrainError(f"distill.layer: {d.layer} is outside the {name}'s {c.num_hidden_layers} "
                                     "decoder layers (negative counts from the last)")
    heads = relation_heads(student)
    if d.attention_weight and (teacher.num_attention_heads % heads or relation_heads(teacher) % heads):
        raise PosttrainError(f"distill.attention_weight: the teacher's heads ({teacher.num_attention_heads} query, "
                             f"{relation_heads(teacher)} key/value) do not split into the student's {heads} relation "
                             "heads; set it to 0 or pick a teacher of the same shape")
    if d.hidden_weight and teacher.hidden_size != student.hidden_size:
        raise PosttrainError(f"distill.hidden_weight: the teacher's hidden size ({teacher.hidden_size}) is not the "
                             f"student's ({student.hidden_size}); set it to 0 or pick a teacher of the same width")
    return path


def load_teacher(cfg, path: str, tokenizer):
    """The teacher, frozen: eval mode, no gradients, the student's dtype and attention, no KV cache."""
    model = load_model(fastest_attention(dataclasses.replace(cfg.model, name_or_path=path)), path, tokenizer)
    prepare_model(model)  # no cache: packed documents stay isolated in the teacher too
    model.eval().requires_grad_(False)
    log.info(f"distillation: teacher {path}, T {cfg.distill.temperature}, kd_weight {cfg.distill.kd_weight}, "
             f"attention_weight {cfg.distill.attention_weight}, hidden_weight {cfg.distill.hidden_weight} "
             f"at layer {cfg.distill.layer}")
    return model


@contextmanager
def captured(model, layer: int, attention: bool, hidden: bool):
    """The Q, K, V projections and the output of decoder layer `layer`, kept for the length of one forward (the
    hooks go before a checkpointed backward recomputes the layer)."""
    block = model.get_decoder().layers[layer]
    store, hooks = {}, []

    def keep(name):
        return lambda module, args, output: store.__setitem__(name, output[0] if isinstance(output, tuple)
                                                              else output)

    if attention:
        hooks += [getattr(block.self_attn, f"{n}_proj").register_forward_hook(keep(n)) for n in "qkv"]
    if hidden:
        hooks.append(block.register_forward_hook(keep("hidden")))
    try:
        yield store
    finally:
        for hook in hooks:
            hook.remove()


def documents(inputs: dict) -> torch.Tensor:
    """Each token's document within its row: position_ids restart at 0 for every packed document."""
    positions = inputs.get("position_ids")
    if positions is None:
        return torch.zeros_like(inputs["input_ids"])
    return (positions == 0).long().cumsum(dim=-1)


def relation_mask(inputs: dict) -> torch.Tensor:
    """(batch, query, key): key at or before query, in the same document, not padding."""
    doc = documents(inputs)
    length = doc.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=doc.device).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    if inputs.get("attention_mask") is not None:
        mask &= inputs["attention_mask"].bool()[:, None, :]
    return mask


def log_relations(x: torch.Tensor, heads: int, mask: torch.Tensor) -> torch.Tensor:
    """log softmax(X X^T / sqrt(d)) per head over the allowed keys; 0 where not allowed."""
    batch, length, width = x.shape
    x = x.float().view(batch, length, heads, width // heads).transpose(1, 2)
    scores = (x @ x.transpose(-1, -2)) / math.sqrt(width // heads)
    allowed = mask[:, None]
    return torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).masked_fill(~allowed, 0.0)


def relation_kl(student: dict, teacher: dict, heads: int, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Sum over the kept positions of KL(teacher || student) of the Q-Q, K-K and V-V relations, averaged over
    heads and over the three."""
    total = 0.0
    for name in "qkv":
        s, t = log_relations(student[name], heads, mask), log_relations(teacher[name], heads, mask)
        per_position = (t.exp() * (t - s)).sum(-1).mean(1)  # (batch, query)
        total = total + per_position[keep].sum() / 3
    return total


def supervised(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is supervised (the model predicts labels[t + 1] at t)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def kd_sum(student_logits, teacher_logits, keep, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, summed over the kept positions."""
    s = torch.log_softmax(student_logits[keep].float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits[keep].float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum() * temperature**2


def distill_sums(trainer, model, inputs: dict) -> tuple[dict, torch.Tensor]:
    """Each term summed over the supervised positions of this micro-batch, and their count. The teacher and the
    student see the same inputs (packed position_ids included)."""
    d, labels = trainer.distill, inputs["labels"]
    forward = {**{k: v for k, v in inputs.items() if k != "labels"}, "use_cache": False}
    keep = supervised(labels)
    attention, hidden = d.attention_weight > 0, d.hidden_weight > 0
    with torch.no_grad(), captured(trainer.teacher, d.layer, attention, hidden) as taught:
        teacher_logits = trainer.teacher(**forward).logits
    with captured(trainer.model, d.layer, attention, hidden) as learned:
        student_logits = model(**forward).logits
    sums = {"ce": F.cross_entropy(student_logits[keep].float(), labels[:, 1:][keep[:, :-1]], reduction="sum"),
            "kd": kd_sum(student_logits, teacher_logits, keep, d.temperature)}
    if attention:
        sums["attention"] = relation_kl(learned, taught, trainer.relation_heads, relation_mask(inputs), keep)
    if hidden:
        diff = learned["hidden"].float() - taught["hidden"].float()
        sums["hidden"] = diff.pow(2).mean(-1)[keep].sum()
    return sums, keep.sum()


class DistillingTrainerMixin:
    """Mixed in before TRL's SFTTrainer: the training loss is the distillation loss; evaluation stays TRL's."""

    def __init__(self, *args, teacher, distill, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.distill = teacher.to(self.args.device), distill
        self.relation_heads = relation_heads(self.model.config.get_text_config())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.model.training:  # eval_loss: plain cross-entropy, comparable across runs
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        d = self.distill
        sums, count = distill_sums(self, model, inputs)
        weights = {"ce": 1 - d.kd_weight, "kd": d.kd_weight, "attention": d.attention_weight,
                   "hidden": d.hidden_weight}
        total = sum(weights[name] * value for name, value in sums.items())
        # As TRL's cross-entropy: divided by the step's supervised tokens (all micro-batches, all processes), and
        # multiplied back by the process count that DDP's gradient averaging divides by.
        tokens = count if num_items_in_batch is None else num_items_in_batch
        loss = total / torch.as_tensor(tokens, device=total.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        self.log_terms(sums, count)
        return loss

    def log_terms(self, sums: dict, count: torch.Tensor) -> None:
        """Each term per supervised token, over every process, into the next log line (ce_loss, kd_loss, ...)."""
        values = torch.stack([*(v.detach().float() for v in sums.values()), count.float()])
        values = self.accelerator.gather_for_metrics(values[None]).sum(0).tolist()
        for name, value in zip(sums, values):
            append_logged_metric(self, f"{name}_loss", value / max(values[-1], 1.0))


def distilling(trainer_class):
    """`distilling(SFTTrainer)`: the trainer class whose training loss distils from a teacher (trainer kwargs
    teacher= and distill=)."""
    return type(f"Distilling{trainer_class.__name__}", (DistillingTrainerMixin, trainer_class), {})


def loss_terms(log_history: list[dict]) -> dict:
    """metrics.json's distillation entries: each logged term's history (step, value), first and last."""
    out = {}
    for name in TERMS:
        history = [(entry["step"], float(entry[f"{name}_loss"])) for entry in log_history if f"{name}_loss" in entry]
        if history:
            out[f"{name}_loss_history"] = history
            out[f"{name}_loss_first"], out[f"{name}_loss_last"] = history[0][1], history[-1][1]
    return out
