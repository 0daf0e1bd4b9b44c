"""Run folders that never look complete unless they are.

Contract (README.md, "What a run looks like"): `output_dir/` holds the model or adapter, `posttrain.yaml` (resolved
config, written first), a model card `README.md`, and `metrics.json`, written LAST. metrics.json is the
completeness marker: the final artifacts are written into a staging folder and moved in before it, so a crash at
any point leaves no metrics.json and the folder reads as unfinished.

An output_dir holding a finished run is refused unless `overwrite: true`; one holding an unfinished run of
posttrain's is continued from its latest complete checkpoint when it was started with the same model, data and
objective (SAME_RUN_SECTIONS), as with `--resume`, and replaced otherwise or with `overwrite: true`; a non-empty
folder that posttrain did not write is never touched, nor one that holds the run's own model or data. Which way a
run goes is said in one line. A replaced run is moved aside to `.NAME.replaced` and deleted only once the new
run has finished, so a failed overwrite (a typo in the data path, a crash) loses nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from posttrain import log
from posttrain.config.schema import Config, dump_yaml
from posttrain.engine.distributed import on_main_then_shared
from posttrain.engine.distributed import process_state as _process  # only the main process writes files
from posttrain.errors import PosttrainError
from posttrain.files import give_default_modes, write_json_atomic, write_text_atomic

CONFIG_FILE, METRICS_FILE, CARD_FILE = "posttrain.yaml", "metrics.json", "README.md"


def is_complete(run_dir: str | Path) -> bool:
    return (Path(run_dir) / METRICS_FILE).is_file()


def prepare_run_dir(cfg: Config, resume: bool = False) -> Path:
    """The run folder, ready for this run. An unfinished run of the same model, data and objective is continued
    in place (its checkpoints kept) with resume, and without it unless overwrite is set; otherwise the folder
    starts empty, so any checkpoint in it afterwards is one this run continues (engine/checkpoints.py train)."""
    out = Path(cfg.output_dir).expanduser()
    process = _process()
    if resume:
        _check_resumable(cfg, out)  # --resume's own refusals come before the generic ones
    _check_run_dir(cfg, out)  # every process checks (read-only), so all fail alike instead of hanging
    # Decided before anything moves, by the main process (it says why in one line), and shared: machines without a
    # shared filesystem would otherwise each decide from their own disk.
    continuing = on_main_then_shared(_continues, cfg, out, resume)
    process.wait_for_everyone()
    if process.is_main_process and continuing:
        write_text_atomic(out / CONFIG_FILE, dump_yaml(cfg))
    elif process.is_main_process:
        if out.is_dir() and _replaced(out).exists():
            shutil.rmtree(out)  # an unfinished overwrite; the run it replaces is still kept aside
        elif out.is_dir():  # our own unfinished run, or a finished one with overwrite: kept until this one finishes
            os.replace(out, _replaced(out))
        out.mkdir(parents=True)
        write_text_atomic(out / CONFIG_FILE, dump_yaml(cfg))
    process.wait_for_everyone()
    return out


# What a resumed run must share with the run it continues; train.* may change (e.g. a larger max_steps).
SAME_RUN_SECTIONS = ("recipe", "model", "data", "adapter", "dpo", "ternary", "rl")
CHECKPOINTS = "checkpoints"  # the Trainer's output_dir inside the run folder (engine/trainer_args.py)


def _saved_config(out: Path) -> dict | None:
    """The resolved config of the unfinished posttrain run in out, or None when out holds none."""
    import yaml

    if is_complete(out) or not (out / CONFIG_FILE).is_file():
        return None
    return yaml.safe_load((out / CONFIG_FILE).read_text(encoding="utf-8")) or {}


def _differences(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """(SAME_RUN_SECTIONS that differ, train settings that differ) between a saved config and this one."""
    import yaml

    current = yaml.safe_load(dump_yaml(cfg))
    differ = [k for k in SAME_RUN_SECTIONS if saved.get(k) != current.get(k)]
    train = saved.get("train") or {}
    return differ, sorted(k for k in current.get("train", {}) if train.get(k) != current["train"][k])


def _check_resumable(cfg: Config, out: Path) -> None:
    """--resume refuses a finished run and an unfinished one of another model, data or objective."""
    if is_complete(out):
        raise PosttrainError(f"--resume: {out} already holds a finished run (metrics.json); nothing to resume")
    saved = _saved_config(out)
    differ = _differences(saved, cfg)[0] if saved is not None else []
    if differ:
        raise PosttrainError(f"--resume: the run in {out} was started with different {', '.join(differ)} "
                             f"settings (see {out / CONFIG_FILE}); resume with the same config or choose another "
                             "output_dir")


def _continues(cfg: Config, out: Path, resume: bool) -> bool:
    """Whether this run continues the unfinished run in out from its latest complete checkpoint; says which way
    it goes in one line whenever out already holds a run (a new folder needs no word)."""
    from posttrain.engine.checkpoints import latest_checkpoint  # torch: only once a run is being prepared

    saved = _saved_config(out)
    if saved is None:
        if resume:
            log.info(f"--resume: no unfinished run in {out}; starting from the beginning")
        elif cfg.overwrite and is_complete(out):
            log.info(f"overwrite=true: starting over; the finished run in {out} is replaced when this one finishes")
        return False
    checkpoint = latest_checkpoint(out / CHECKPOINTS)
    differ, changed = _differences(saved, cfg)
    discarded = (f"; its checkpoints (latest {checkpoint.name}) are discarded once this run finishes (until then "
                 f"the old run is kept in {_replaced(out)})" if checkpoint else "")
    if cfg.overwrite and not resume:
        log.info(f"overwrite=true: starting over; the unfinished run in {out} is replaced{discarded}")
        return False
    if differ:  # only without --resume, which refuses a different run
        log.warning(f"starting over: the unfinished run in {out} used different {', '.join(differ)} settings "
                    f"(see {out / CONFIG_FILE}){discarded}")
        return False
    if checkpoint is None:
        log.info(f"{'--resume: ' if resume else ''}the unfinished run in {out} has no complete checkpoint yet; "
                 "starting from the beginning")
        return False
    note = f" with changed train settings ({', '.join(changed)})" if changed else ""
    hint = "" if resume else "; pass overwrite=true to start over"
    log.info(f"resuming from {checkpoint.name} of the unfinished run in {out}{note}{hint}")
    return True


def _replaced(out: Path) -> Path:
    return out.with_name(f".{out.name}.replaced")


def _check_run_dir(cfg: Config, out: Path) -> None:
    inputs = [cfg.model.name_or_path, *(s.path for s in cfg.data.train + cfg.data.eval)]
    for given in inputs:
        path = Path(given).expanduser()
        if path.exists() and (path.resolve() == out.resolve() or out.resolve() in path.resolve().parents):
            raise PosttrainError(f"output_dir {out} holds this run's own input {given!r}; choose another output_dir")
    if out.exists() and not out.is_dir():
        raise PosttrainError(f"output_dir {out} is a file; choose a folder")
    if is_complete(out) and not cfg.overwrite:
        raise PosttrainError(
            f"output_dir {out} already holds a finished run (metrics.json); set overwrite: true "
            "(e.g. add overwrite=true to the command) or choose another output_dir"
        )
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise PosttrainError(f"output_dir {out} is not empty and was not written by posttrain; choose another")


def finish_run(run_dir: Path, save_artifacts, metrics: dict, card: str) -> None:
    """Stage artifacts, move them in, then metrics.json. save_artifacts(folder) runs on EVERY process (FSDP and
    ZeRO-3 gather the full weights collectively) and must write on the main process only, as
    Trainer.save_model does; everything else here is the main process's."""
    process = _process()
    staging = run_dir / ".final"
    if process.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run that crashed while saving
        staging.mkdir()
    process.wait_for_everyone()
    try:
        save_artifacts(staging)
        process.wait_for_everyone()
        if process.is_main_process:
            _finish(run_dir, staging, metrics, card)
    finally:
        if process.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
    process.wait_for_everyone()


def _finish(run_dir: Path, staging: Path, metrics: dict, card: str) -> None:
    (staging / CARD_FILE).write_text(card, encoding="utf-8")
    give_default_modes(staging)
    for item in staging.iterdir():
        destination = run_dir / item.name
        if destination.is_dir():
            shutil.rmtree(destination)
        os.replace(item, destination)
    write_json_atomic(run_dir / METRICS_FILE, metrics)
    shutil.rmtree(_replaced(run_dir), ignore_errors=True)  # the run this one overwrote, now superseded


def load_result(run_dir: str | Path) -> dict:
    """The metrics of a finished run; fails clearly on an unfinished one."""
    run_dir = Path(run_dir)
    if not is_complete(run_dir):
        raise PosttrainError(f"{run_dir} holds no finished run (no {METRICS_FILE}); it crashed or is running")
    return json.loads((run_dir / METRICS_FILE).read_text())
