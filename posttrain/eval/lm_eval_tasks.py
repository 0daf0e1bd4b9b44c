"""Optional: run lm-eval tasks on an already-loaded variant so standard benchmarks join the same table.

The model object goes to lm-eval's HFLM as is (`HFLM(pretrained=model, tokenizer=tok)`), so adapters and BitNet
exports are scored exactly as posttrain loaded them. Results become `lm_eval/<task>/<metric>` (plus
`<metric>_stderr`); lm-eval's own higher_is_better decides the report's direction.
"""

from __future__ import annotations

from posttrain.errors import PosttrainError


def run_lm_eval_tasks(variant, section) -> tuple[dict[str, float], dict[str, bool]]:
    """(metrics, {metric key: higher_is_better}) for one variant."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PosttrainError(
            "the suite has an lm_eval: section but lm-eval is not installed: pip install 'lm-eval>=0.4.13'"
        ) from None
    manager = _task_manager(TaskManager, section)
    unknown = [t for t in section.tasks if t not in manager.all_tasks]
    if unknown:
        raise PosttrainError(f"lm_eval.tasks: unknown task(s) {unknown}; check the names or lm_eval.include_path")
    lm = HFLM(pretrained=variant.model, tokenizer=variant.tokenizer, batch_size=section.batch_size)
    out = simple_evaluate(
        model=lm,
        tasks=list(section.tasks),
        task_manager=manager,
        num_fewshot=section.num_fewshot,
        limit=section.limit,
        log_samples=False,
    )
    return flatten_results(out)


def _task_manager(task_manager_cls, section):
    # Indexing lm-eval's ~10k bundled task YAMLs takes ~20 s: skip it when include_path has every task asked for.
    if section.include_path:
        local = task_manager_cls(include_path=section.include_path, include_defaults=False)
        if all(t in local.all_tasks for t in section.tasks):
            return local
        return task_manager_cls(include_path=section.include_path)
    return task_manager_cls()


def flatten_results(out: dict) -> tuple[dict[str, float], dict[str, bool]]:
    metrics, directions = {}, {}
    for task, values in out["results"].items():
        higher = out.get("higher_is_better", {}).get(task, {})
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # 'alias', 'name', 'N/A' stderrs
            # a non-default filter (e.g. strict-match) goes on the task: `<metric>_stderr` stays next to `<metric>`
            suffix = "" if filter_name == "none" else f"[{filter_name}]"
            name = f"lm_eval/{task}{suffix}/{metric}"
            metrics[name] = float(value)
            base_metric = metric.removesuffix("_stderr")
            if base_metric in higher and not metric.endswith("_stderr"):
                directions[name] = bool(higher[base_metric])
    return metrics, directions
