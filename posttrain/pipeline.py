"""Pipelines: stages that each start from an earlier stage's output, then one comparison report.

    recipe: pipeline
    output_dir: runs/demo
    stages:
      - {name: base, config: pretrain.yaml}                  # a run config (sft / dpo / ternary)
      - {name: sft, config: sft.yaml, model_from: base}      # model.name_or_path <- runs/demo/base
      - {name: ptq, quantize: sft}                           # post-training ternarization of a stage
      - {name: report, compare: [base, sft, ptq], suite: ../eval/tiny.yaml,
         suite_overrides: [preference.reference=base], baseline: sft,
         summary: [gen/add/exact_match]}                      # eval + bench of stages, one report

Each stage writes `output_dir/<name>/`. Rerunning the pipeline skips every stage whose output is complete
(metrics.json for a run, quantize.json for a quantization, compare.json for a comparison — each written last)
and redoes an interrupted one from its start (its unfinished folder is cleared). Config paths are relative
to the pipeline file; `overrides` are dotted overrides for the stage's config.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from posttrain import log
from posttrain.config.strict import apply_overrides, build, read_yaml, where_in
from posttrain.errors import PosttrainError
from posttrain.files import check_writable


@dataclass
class Stage:
    name: str = ""
    config: str | None = None  # a run config file, relative to the pipeline file
    quantize: str | None = None  # the stage whose model is ternarized without training
    compare: list[str] = field(default_factory=list)  # stages to evaluate side by side
    suite: str | None = None  # the eval suite for compare, relative to the pipeline file
    suite_overrides: list[str] = field(default_factory=list)  # key=value; a value naming a stage -> its folder
    baseline: str | None = None  # the compared stage the others are tested against (default: the first)
    summary: list[str] = field(default_factory=list)  # metric keys of the short table printed at the end
    model_from: str | None = None  # this stage starts from that stage's output
    overrides: list[str] = field(default_factory=list)

    def problems(self) -> list[tuple[str, str]]:
        kinds = [k for k in ("config", "quantize", "compare") if getattr(self, k)]
        if not self.name:
            return [("name", "is required")]
        if len(kinds) != 1:
            return [("config", "a stage needs exactly one of config, quantize or compare")]
        if self.compare and not self.suite:
            return [("suite", "is required with compare")]
        if self.baseline is not None and self.baseline not in self.compare:
            return [("baseline", f"{self.baseline!r} is not one of the compared stages {self.compare}")]
        return []


@dataclass
class PipelineConfig:
    recipe: Literal["pipeline"] = "pipeline"
    output_dir: str = ""
    stages: list[Stage] = field(default_factory=list)

    def problems(self) -> list[tuple[str, str]]:
        if not self.output_dir:
            return [("output_dir", "is required")]
        seen: list[str] = []
        for i, stage in enumerate(self.stages):
            for ref in [stage.model_from, stage.quantize, *stage.compare]:
                if ref is not None and ref not in seen:
                    return [(f"stages[{i}]", f"refers to {ref!r}, which is not an earlier stage ({seen})")]
            if stage.name in seen:
                return [(f"stages[{i}].name", f"{stage.name!r} is used twice")]
            seen.append(stage.name)
        return [] if self.stages else [("stages", "needs at least one stage")]


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    tree, text = read_yaml(path)
    apply_overrides(tree, list(overrides or []), str(path))
    return build(PipelineConfig, tree, where_in(path, text, overrides))


def stage_done(stage: Stage, folder: Path) -> bool:
    marker = "metrics.json" if stage.config else "quantize.json" if stage.quantize else "compare.json"
    return (folder / marker).is_file()


def _stage_value(override: str, out: Path) -> str:
    """`preference.reference=base` -> `preference.reference=<out>/base` when a stage folder of that name exists."""
    key, _, value = override.partition("=")
    return f"{key}={out / value}" if value and (out / value).is_dir() else override


def stage_overrides(stage: Stage, out: Path) -> list[str]:
    """The overrides a run stage's config gets: its own, its starting model (an earlier stage's folder), its
    folder, and overwrite (an interrupted stage restarts from its beginning)."""
    made = [f"model.name_or_path={out / stage.model_from}"] if stage.model_from else []
    return [*stage.overrides, *made, f"output_dir={out / stage.name}", "overwrite=true"]


def _run_stage(stage: Stage, folder: Path, root: Path, out: Path) -> None:
    from posttrain.config.schema import load_config
    from posttrain.registry import run_named_recipe

    if stage.config:
        run_named_recipe(load_config(root / stage.config, stage_overrides(stage, out)))
    elif stage.quantize:
        from posttrain.ternary.ptq import quantize

        quantize(str(out / stage.quantize), folder, overwrite=True)
    else:
        _run_compare(stage, folder, root, out)


def _run_compare(stage: Stage, folder: Path, root: Path, out: Path) -> None:
    """Bench and eval of the compared stages into one report; compare.json, written last, marks it complete
    (a report.md alone may be the bench's half of an interrupted stage)."""
    from posttrain.eval import run_bench, run_eval
    from posttrain.eval.report import render_summary

    (folder / "compare.json").unlink(missing_ok=True)
    suite, _ = read_yaml(root / stage.suite)
    named = [f"{name}={out / name}" for name in stage.compare]
    apply_overrides(suite, [_stage_value(o, out) for o in stage.suite_overrides], str(root / stage.suite))
    run_bench(named, folder, prompt_tokens=32, new_tokens=16, repeats=3)
    results = run_eval(named, suite, folder, baseline=stage.baseline)
    if stage.summary:
        table = render_summary(results, stage.summary)
        (folder / "summary.md").write_text(table)
        log.info(f"stage {stage.name}: {folder / 'report.html'}\n{table}")
    baseline = (results.get("stats") or {}).get("baseline")
    (folder / "compare.json").write_text(json.dumps({"compare": stage.compare, "baseline": baseline}) + "\n")


def run_pipeline(path: str | Path, overrides: list[str] | None = None) -> Path:
    """Run (or finish) a pipeline; returns its output folder."""
    cfg = load_pipeline(path, overrides)
    root, out = Path(path).resolve().parent, check_writable(cfg.output_dir, "output_dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.yaml").write_text(yaml.safe_dump({"source": str(path), "overrides": overrides or []}))
    for stage in cfg.stages:
        folder = out / stage.name
        if stage_done(stage, folder):
            log.info(f"stage {stage.name}: finished earlier, skipped")
            continue
        started = time.perf_counter()
        log.info(f"stage {stage.name}: running")
        try:
            _run_stage(stage, folder, root, out)
        except PosttrainError as err:
            raise PosttrainError(f"stage {stage.name}: {err}") from None
        log.info(f"stage {stage.name}: done in {time.perf_counter() - started:.0f} s")
    return out


def run(cfg, overrides: list[str] | None = None, resume: bool = False) -> dict:
    """Run a config: a loaded Config, or a path (or bundled name such as tiny/sft) of a run config or a pipeline.
    Returns the run's metrics (also in output_dir/metrics.json); for a pipeline, {"pipeline": its folder}.
    resume: continue an unfinished run from its latest complete checkpoint."""
    from posttrain.config.bundled import resolve_config_path
    from posttrain.config.schema import Config, load_config
    from posttrain.registry import run_named_recipe

    if not isinstance(cfg, Config):
        path = resolve_config_path(cfg)
        if read_yaml(path)[0].get("recipe") == "pipeline":
            if resume:
                raise PosttrainError(f"{path}: --resume is for one run; rerun the pipeline without it (finished "
                                     "stages are skipped, an interrupted one restarts from its beginning)")
            return {"pipeline": str(run_pipeline(path, overrides))}
        cfg = load_config(path, overrides)
    return run_named_recipe(cfg, resume=resume)
