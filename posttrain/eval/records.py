"""Per-item records: one row per evaluated item, so that every number in the table can be traced to its items.

A row is {"id": origin, "prompt": str, "reference": ..., "metrics": {per-item values}} plus, by task,
"output" (generation) or "choice_scores"/"choice" (multiple choice). `id` is the origin read_rows gives
(`data.jsonl:12`, `tiny:chat[test] row 3`), so a row leads back to its line of data. Task names are
`gen-<name>`, `mc-<name>`, `preference`, `perplexity` and `drift`; on disk a variant's rows of one task are
`samples/<variant>/<task>.jsonl`. This module also reads the training curves of variants that are posttrain run
folders (their metrics.json), for the report's curves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def generation_records(origins: list[str], rows: list[dict], prompts: list[str], outputs: list[str],
                       items: list[dict]) -> list[dict]:
    """prompts: the text the model was given (its chat template applied), outputs: its greedy continuations."""
    return [
        {"id": origin, "prompt": prompt, "reference": row["answer"], "output": output, "metrics": metrics}
        for origin, row, prompt, output, metrics in zip(origins, rows, prompts, outputs, items)
    ]


def mc_records(origins: list[str], scores) -> list[dict]:
    """scores: a multiple_choice.ChoiceScores. `choice` is acc's pick, `choice_norm` acc_norm's."""
    out = []
    for origin, q, lls, item in zip(origins, scores.questions, scores.loglikelihoods, scores.items()):
        out.append({
            "id": origin, "prompt": q.context, "reference": q.choices[q.answer], "choices": q.choices,
            "answer": q.answer, "choice_scores": lls, "choice": item["choice"], "choice_norm": item["choice_norm"],
            "metrics": {"acc": item["acc"], "acc_norm": item["acc_norm"]},
        })
    return out


def preference_records(pairs, kept: list[int], items: list[dict]) -> list[dict]:
    """pairs: the normalized Rows; kept: the index of each scored pair in them (preference.kept_pair_sequences)."""
    out = []
    for index, metrics in zip(kept, items):
        row = pairs.rows[index]
        reference = {"chosen": as_text(row["chosen"]), "rejected": as_text(row["rejected"])}
        out.append({"id": pairs.origins[index], "prompt": as_text(row["prompt"]), "reference": reference,
                    "metrics": metrics})
    return out


def text_records(origins: list[str], texts: list[str], items: list[dict]) -> list[dict]:
    """Perplexity and drift: the text is the prompt; there is no reference."""
    return [{"id": o, "prompt": t, "reference": None, "metrics": m} for o, t, m in zip(origins, texts, items)]


def as_text(value) -> str:
    """A string as it is; a chat (list of messages) as `role: content` lines; anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(f"{m.get('role', '?')}: {m['content']}" for m in value)
    return json.dumps(value, ensure_ascii=False)


def json_safe(obj, text=None):
    """NaN/inf become null and other objects their str(): the files stay strict JSON. text: applied to every
    string (the HTML report shortens long ones)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v, text) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, text) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, str) and text is not None:
        return text(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def write_samples(samples: dict, folder: Path) -> None:
    """samples {variant: {task: [row, ...]}} -> folder/<variant>/<task>.jsonl, one row per line."""
    for variant, tasks in samples.items():
        (folder / variant).mkdir(parents=True, exist_ok=True)
        for task, rows in tasks.items():
            lines = [json.dumps(json_safe(row), ensure_ascii=False, allow_nan=False) for row in rows]
            (folder / variant / f"{task}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def read_samples(folder: Path) -> dict:
    """The samples a previous eval wrote into folder (samples/), as write_samples wrote them; {} if none."""
    out: dict = {}
    if not folder.is_dir():
        return out
    for variant_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        tasks = {}
        for file in sorted(variant_dir.glob("*.jsonl")):
            try:
                tasks[file.stem] = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line]
            except (OSError, json.JSONDecodeError):
                continue  # an unreadable old file is left out of the HTML view, not fatal
        out[variant_dir.name] = tasks
    return out


def training_curves(models: dict) -> dict:
    """{variant: {"train_loss": [[step, loss], ...], "eval": [{"step": ..., key: value}, ...]}} for every variant
    whose folder (an adapter's own folder for an adapter) holds a posttrain run's metrics.json."""
    out = {}
    for name, info in models.items():
        source = info.get("source")
        file = Path(source) / "metrics.json" if source else None
        if file is None or not file.is_file():
            continue
        try:
            metrics = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # not a run folder's metrics.json after all: no curves, not an error
        if isinstance(metrics, dict):
            out[name] = {"train_loss": metrics.get("train_loss_history") or [],
                         "eval": metrics.get("eval_history") or []}
    return out
