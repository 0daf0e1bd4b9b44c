"""`posttrain eval` and `posttrain bench`: every variant through the same measurements, one report.

Order of work, chosen so that mistakes surface before minutes of compute: the suite and all its data files are
read and checked first; the reference model's log-probs for the preference pairs are computed once and the
reference is freed; then each variant is loaded, measured, and freed before the next (only the drift base
stays loaded, since KL needs its full distributions). Every measurement also keeps one record per item
(posttrain.eval.records); the intervals and the paired tests against the baseline (posttrain.eval.stats) run on
those records once every variant is done. Nothing is written until then.
"""

from __future__ import annotations

import datetime
import gc
import platform
import subprocess
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from posttrain.errors import PosttrainError
from posttrain.eval import metric_catalog as cat
from posttrain.eval.bench import bench_variant, size_metrics
from posttrain.eval.drift import drift_measure
from posttrain.eval.generation import (
    build_prompts,
    generate_greedy,
    generation_items,
    generation_metrics,
    generation_rows,
)
from posttrain.eval.multiple_choice import questions_from_rows, score_choices
from posttrain.eval.perplexity import text_loglikelihoods
from posttrain.eval.preference import (
    as_pairs,
    completion_logps,
    kept_pair_sequences,
    preference_items,
    preference_metrics,
)
from posttrain.eval.records import (
    generation_records,
    mc_records,
    preference_records,
    text_records,
    training_curves,
)
from posttrain.eval.report import merge_results, write_report
from posttrain.eval.suite import Suite, load_suite, read_rows
from posttrain.eval.tokenization import model_max_length, vocab_guard
from posttrain.eval.variants import check_model_specs, load_variant, pick_device, variant_names


def run_eval(
    models: list[str], suite: str | Path | dict, out_dir: str | Path, baseline: str | None = None
) -> dict:
    """Evaluate MODEL specs on SUITE; write results.json, report.md, report.html, plots and the per-item records
    (samples/) into out_dir; return the results. baseline: the variant the others are tested against (default:
    the suite's `baseline`, else the first MODEL)."""
    if not models:
        raise PosttrainError("posttrain eval needs at least one MODEL (a folder, an adapter folder, or name=path)")
    _check_out_dir(out_dir)
    suite = load_suite(suite)
    names = variant_names(models)
    baseline = _baseline(baseline, suite, names)
    check_model_specs(models, names)
    shared = [(s, key) for s, key in ((_spec(suite.preference, "reference"), "preference.reference"),
                                      (_spec(suite.drift, "base"), "drift.base")) if s]
    check_model_specs([s for s, _ in shared], [key for _, key in shared])
    torch.manual_seed(suite.seed)
    run = SuiteRun(suite)
    per_variant, sources, samples = {}, {}, {}
    for spec, name in tqdm(list(zip(models, names)), desc="variants", disable=len(models) < 2):
        variant = load_variant(spec, suite.device, suite.dtype, name=name)
        metrics, samples[name] = run.evaluate_items(variant)
        per_variant[name] = {**metrics, **_prefixed("size", size_metrics(variant))}
        sources[name] = _describe(variant)
        del variant
        gc.collect()
    run.close()
    results = _assemble(
        per_variant, sources, {"suite": suite.to_dict(), "suite_file": suite.source}, run.directions, suite.device
    )
    from posttrain.eval.stats import compute_stats  # scipy and statsmodels load only when eval runs

    results["stats"] = compute_stats(samples, baseline, seed=suite.seed)
    results = merge_results(results, Path(out_dir), owns=lambda key: cat.family(key) != "bench")
    write_report(results, out_dir, samples)
    return results


def _baseline(flag: str | None, suite: Suite, names: list[str]) -> str:
    """The variant the others are tested against: --baseline, else the suite's `baseline`, else the first."""
    baseline = flag or suite.baseline or names[0]
    if baseline not in names:
        where = "--baseline" if flag else f"{suite.source}: baseline:"
        raise PosttrainError(
            f"{where} {baseline!r} is not a variant of this run {names}: name one of them (default: the first, "
            f"{names[0]!r})"
        )
    return baseline


def run_bench(
    models: list[str],
    out_dir: str | Path,
    *,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """Size, load time, peak memory and batch-1 prefill/decode speed of each MODEL; merged into out_dir's report."""
    if not models:
        raise PosttrainError("posttrain bench needs at least one MODEL (a folder, an adapter folder, or name=path)")
    if min(prompt_tokens, new_tokens, repeats) < 1 or warmup < 0:
        raise PosttrainError("bench: prompt_tokens, new_tokens and repeats must be >= 1 and warmup >= 0")
    _check_out_dir(out_dir)
    names = variant_names(models)
    check_model_specs(models, names)
    per_variant, sources = {}, {}
    for spec, name in tqdm(list(zip(models, names)), desc="bench", disable=len(models) < 2):
        variant, bench = bench_variant(spec, name, device, dtype, prompt_tokens, new_tokens, repeats, warmup)
        per_variant[name] = {**_prefixed("size", size_metrics(variant)), **_prefixed("bench", bench)}
        sources[name] = _describe(variant)
        del variant
    settings = {
        "bench": dict(
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            repeats=repeats,
            warmup=warmup,
            device=str(pick_device(device)),
            dtype=dtype,
        )
    }
    results = _assemble(per_variant, sources, settings, {}, device)
    results = merge_results(results, Path(out_dir), owns=lambda key: cat.family(key) in ("bench", "size"))
    write_report(results, out_dir)
    return results


class SuiteRun:
    """The suite's data, read once, and the models shared by all variants (reference log-probs, drift base)."""

    def __init__(self, suite: Suite):
        self.suite = suite
        self.directions: dict[str, bool] = {}
        self._read_data()
        self.reference_logps = self._reference_logps() if suite.preference else None
        self.drift_base = None
        if suite.drift:
            self.drift_base = load_variant(suite.drift.base, suite.device, suite.dtype, name="drift base")

    def _read_data(self) -> None:
        s = self.suite
        with _naming("perplexity.data", s.source):
            self.ppl_texts = _texts(s.perplexity)
        with _naming("drift.data", s.source):
            self.drift_texts = _texts(s.drift)
        self.mc, self.gen = {}, {}
        for i, t in enumerate(s.multiple_choice):
            with _naming(f"multiple_choice[{i}].data", s.source):
                rows, origins = read_rows(t.data, ("choices", "answer"), t.limit)
                self.mc[t.name] = questions_from_rows(rows, t.data.path, origins), origins
        for i, t in enumerate(s.generation):
            with _naming(f"generation[{i}].data", s.source):
                rows, origins = read_rows(t.data, (), t.limit)
                self.gen[t.name] = generation_rows(rows, origins), origins
        if s.preference:
            with _naming("preference.data", s.source):
                self.pref_rows = as_pairs(*read_rows(s.preference.data, ("chosen", "rejected"), s.preference.limit))

    def _reference_logps(self) -> list[float]:
        section = self.suite.preference
        reference = load_variant(section.reference, self.suite.device, self.suite.dtype, name="reference")
        self.pref_reference = reference  # kept for the vocabulary check only: its model is dropped below
        max_length = model_max_length(reference.model)
        self.pref_sequences, self.pref_kept = kept_pair_sequences(reference.tokenizer, self.pref_rows, max_length)
        logps = completion_logps(reference.model, self.pref_sequences, section.batch_size, desc="reference logps")
        reference.model = None
        gc.collect()
        return logps

    def evaluate(self, variant) -> dict[str, float]:
        """Every section of the suite on one variant, as {`<family>/...`: value}."""
        return self.evaluate_items(variant)[0]

    def evaluate_items(self, variant) -> tuple[dict[str, float], dict[str, list[dict]]]:
        """(evaluate's metrics, the per-item records {task: [row, ...]}, task `gen-<name>`, `mc-<name>`,
        `preference`, `perplexity` or `drift`; see posttrain.eval.records)."""
        out, samples = {}, {}
        parts = [("perplexity", "perplexity", self._perplexity)] if self.suite.perplexity else []
        parts += [(f"mc/{t.name}", f"mc-{t.name}", partial(self._multiple_choice, task=t))
                  for t in self.suite.multiple_choice]
        parts += [(f"gen/{t.name}", f"gen-{t.name}", partial(self._generation, task=t)) for t in self.suite.generation]
        parts += [("preference", "preference", self._preference)] if self.suite.preference else []
        parts += [("drift", "drift", self._drift)] if self.suite.drift else []
        for prefix, task, measure in parts:
            metrics, samples[task] = measure(variant)
            out.update(_prefixed(prefix, metrics))
        if self.suite.lm_eval:
            from posttrain.eval.lm_eval_tasks import run_lm_eval_tasks

            metrics, directions = run_lm_eval_tasks(variant, self.suite.lm_eval)
            out.update(metrics)
            self.directions.update(directions)
        return out, samples

    def _perplexity(self, variant) -> tuple[dict, list[dict]]:
        p, (texts, origins) = self.suite.perplexity, self.ppl_texts
        desc = f"perplexity {variant.name}"
        lls = text_loglikelihoods(variant.model, variant.tokenizer, texts, p.context, p.stride, p.batch_size, desc=desc)
        return lls.metrics(), text_records(origins, texts, lls.items())

    def _multiple_choice(self, variant, task) -> tuple[dict, list[dict]]:
        (questions, origins), desc = self.mc[task.name], f"{task.name} {variant.name}"
        scores = score_choices(
            variant.model, variant.tokenizer, questions, task.target_delimiter, task.batch_size, desc=desc
        )
        return scores.metrics(), mc_records(origins, scores)

    def _generation(self, variant, task) -> tuple[dict, list[dict]]:
        (rows, origins), desc = self.gen[task.name], f"{task.name} {variant.name}"
        prompts, add_special = build_prompts(variant.tokenizer, rows, task.chat_template, origins)
        outputs = generate_greedy(
            variant.model, variant.tokenizer, prompts, add_special, task.max_new_tokens, task.batch_size, desc=desc
        )
        items = generation_items(outputs, rows)
        return generation_metrics(outputs, rows), generation_records(origins, rows, prompts, outputs, items)

    def _preference(self, variant) -> tuple[dict, list[dict]]:
        section = self.suite.preference
        vocab_guard(self.pref_reference, variant, "preference")
        desc = f"logps {variant.name}"
        policy = completion_logps(variant.model, self.pref_sequences, section.batch_size, desc=desc)
        items = preference_items(policy, self.reference_logps, section.beta)
        metrics = preference_metrics(policy, self.reference_logps, section.beta)
        return metrics, preference_records(self.pref_rows, self.pref_kept, items)

    def _drift(self, variant) -> tuple[dict, list[dict]]:
        vocab_guard(self.drift_base, variant, "drift")
        d, (texts, origins) = self.suite.drift, self.drift_texts
        metrics, items = drift_measure(self.drift_base, variant, texts, d.context, d.batch_size)
        return metrics, text_records(origins, texts, items)

    def close(self) -> None:
        self.drift_base = None
        gc.collect()


@contextmanager
def _naming(key: str, source: str):
    """A data error inside says which suite key's data it is about."""
    try:
        yield
    except PosttrainError as err:
        raise PosttrainError(f"{source}: {key}: {err}") from None


def _texts(section) -> tuple[list[str], list[str]]:
    """(texts, origins) of a text section; empty when the suite has no such section."""
    if section is None:
        return [], []
    rows, origins = read_rows(section.data, ("text",), section.limit)
    return [r["text"] for r in rows], origins


def _spec(section, key: str) -> str | None:
    return getattr(section, key) if section is not None else None


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


def _check_out_dir(out_dir) -> None:
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise PosttrainError(f"--out {out_dir} is a file: pass a folder for results.json, report.md and the plots")


def _describe(variant) -> dict:
    info = {"source": variant.source, "kind": variant.kind}
    return {**info, "base": variant.base_source} if variant.base_source else info


def _assemble(per_variant: dict, sources: dict, settings: dict, overrides: dict, device: str) -> dict:
    keys = {k for m in per_variant.values() for k in m if not cat.is_stderr(k)}
    directions = {k: cat.higher_is_better(k, overrides) for k in sorted(keys)}
    return {
        "variants": per_variant,
        "models": sources,
        "directions": directions,
        "settings": settings,
        "environment": environment(device),
        "training": training_curves(sources),
    }


def environment(device: str = "auto") -> dict:
    """Versions and machine facts that a number in the report depends on."""
    import importlib.metadata as md

    env = {
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for dist, key in (
        ("posttrain", "posttrain"),
        ("torch", "torch"),
        ("transformers", "transformers"),
        ("peft", "peft"),
        ("trl", "trl"),
        ("lm-eval", "lm_eval"),
    ):
        try:
            env[key] = md.version(dist)
        except md.PackageNotFoundError:
            env[key] = _module_version(key)
    dev = pick_device(device)
    env["device"] = (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} torch threads"
    )
    env["git_revision"] = _git_revision()
    return env


def _module_version(name: str) -> str | None:
    # posttrain run from a checkout is not an installed distribution; its __version__ still says what it is.
    try:
        return getattr(__import__(name), "__version__", None)
    except ImportError:
        return None


def _git_revision() -> str | None:
    # The revision of the posttrain checkout that produced the numbers, when it runs from one.
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
