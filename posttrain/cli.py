"""`posttrain <verb>`: parse the command line, call the library, print one line on a user error.

Every verb has --help. A PosttrainError (bad config, data, path ...) prints `posttrain: error: ...` and exits
2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from posttrain.errors import PosttrainError


def _run(args) -> None:
    from posttrain.engine.launch import check_launch_flags, relaunch
    from posttrain.pipeline import run

    check_launch_flags(args)  # also with one process: a multi-node flag alone is a mistake, not a no-op
    if args.nproc > 1 or args.num_machines > 1:
        relaunch(args)  # does not return: this process becomes `accelerate launch ... -m posttrain run ...`
    metrics = run(args.config, args.overrides, resume=args.resume)
    first, last = metrics.get("train_loss_first"), metrics.get("train_loss_last")
    if first is not None and last is not None:
        rewards = metrics.get("reward_first"), metrics.get("reward_last")  # RL: the number that shows progress
        reward = f", mean reward {rewards[0]:.4f} -> {rewards[1]:.4f}" if None not in rewards else ""
        print(f"posttrain: done: train loss {first:.4f} -> {last:.4f}{reward}, {metrics['steps']} steps")


def _validate(args) -> None:
    from posttrain.config.bundled import resolve_config_path
    from posttrain.config.schema import dump_yaml, load_config, read_yaml

    path = resolve_config_path(args.config)
    if read_yaml(path)[0].get("recipe") == "pipeline":
        from posttrain.pipeline import load_pipeline

        cfg = load_pipeline(path, args.overrides)
        _check_pipeline_paths(cfg, path)
    else:
        cfg = load_config(path, args.overrides)
        _check_paths(cfg)
    print(dump_yaml(cfg), end="")


def _check_paths(cfg, model_made_earlier: bool = False) -> None:
    """What `run` would fail on that is known without training: the model path (a hub name is not fetched, a
    `tiny:` model not built), local data files (hub datasets are not fetched), and output_dir (a file in the
    way, a place that cannot be written, a finished run without overwrite: the run folder's own check)."""
    from pathlib import Path

    from posttrain.data.sources import looks_like_path
    from posttrain.engine.run_dir import _check_run_dir
    from posttrain.files import check_writable
    from posttrain.models import resolve_path

    if not (model_made_earlier or cfg.model.name_or_path.startswith("tiny:")):
        resolve_path(cfg.model.name_or_path, cfg.model.allow_pickle)
    for source in cfg.data.train + cfg.data.eval:
        if source.path.startswith("tiny:") or not looks_like_path(source.path):
            continue
        try:
            data = Path(source.path).expanduser()
            missing, checked = not data.exists(), data.resolve()
        except (OSError, ValueError, RuntimeError):  # a NUL byte, ~unknown_user ...: reading it says why
            continue
        if missing:
            raise PosttrainError(f"data file {source.path!r} does not exist (checked {str(checked)!r})")
    _check_run_dir(cfg, check_writable(cfg.output_dir, "output_dir"))


def _check_pipeline_paths(pipeline, path) -> None:
    """Each stage checked as _check_paths checks a run config, with the overrides the pipeline gives it
    (pipeline.stage_overrides); a model an earlier stage makes is not there yet, so it is not checked."""
    from pathlib import Path

    from posttrain.config.schema import load_config
    from posttrain.files import check_writable
    from posttrain.pipeline import stage_overrides

    root, out = Path(path).resolve().parent, check_writable(pipeline.output_dir, "output_dir")
    for stage in pipeline.stages:
        try:
            if stage.config:
                cfg = load_config(root / stage.config, stage_overrides(stage, out))
                _check_paths(cfg, model_made_earlier=bool(stage.model_from))
            elif stage.suite and not (root / stage.suite).is_file():
                raise PosttrainError(f"suite {stage.suite!r} not found (checked {root / stage.suite})")
        except PosttrainError as err:
            raise PosttrainError(f"stage {stage.name}: {err}") from None


def _ls(args) -> None:
    from posttrain.config.bundled import bundled_configs, configs_dir
    from posttrain.registry import recipe_names

    print("recipes: " + ", ".join(recipe_names()))
    print(f"bundled configs, for `posttrain run` ({configs_dir()}):")
    for name in bundled_configs(runnable=True):
        print(f"  {name}")
    print("bundled settings for other flags (--accelerate-config NAME, eval --suite PATH):")
    for name in bundled_configs(runnable=False):
        print(f"  {name}")


def _init_tiny(args) -> None:
    from posttrain.tiny import build_tiny

    out = build_tiny(args.out_dir, args.arch, overwrite=args.overwrite)
    print(f"posttrain: tiny {args.arch} model written to {out}")


def _merge(args) -> None:
    from posttrain.models import merge_adapter

    out = merge_adapter(args.adapter_dir, args.out, args.dtype, args.allow_pickle, args.trust_remote_code,
                        args.overwrite, args.format)
    print(f"posttrain: merged model written to {out}")


def _quantize(args) -> None:
    from posttrain.ternary.ptq import quantize

    report = quantize(args.model, args.out, args.method, args.format, args.skip, args.dtype, args.overwrite,
                      args.allow_pickle, args.gguf_dense)
    bpw = report["bits_per_weight"]
    detail = f", {bpw['quantized_layers_bpw']:.3f} bits/weight in ternary layers" if bpw else ""
    where = f"{args.out}/{report['file']}" if report.get("file") else args.out
    print(f"posttrain: {report['ternary_layers']} layers ternarized{detail}; written to {where}")


def _eval(args) -> None:
    from posttrain.eval import run_eval

    run_eval(args.models, args.suite, args.out, baseline=args.baseline)
    print(f"posttrain: report written to {args.out}/report.html (report.md, results.json, plots beside it)")


def _bench(args) -> None:
    from posttrain.eval import run_bench

    run_bench(args.models, args.out, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
              repeats=args.repeats)
    print(f"posttrain: report written to {args.out}/report.html (report.md, results.json, plots beside it)")


def _demo(args) -> None:
    import time

    from posttrain.config.bundled import configs_dir
    from posttrain.pipeline import run_pipeline

    started = time.perf_counter()
    out = run_pipeline(configs_dir() / "demo" / "pipeline.yaml", [f"output_dir={args.out}"])
    report = out / "report"
    print(f"posttrain: demo finished in {time.perf_counter() - started:.0f} s; open {report / 'report.html'} "
          f"(report.md, results.json, plots and per-item samples/ beside it); every stage's model in {out}")


def _add_launch_arguments(sub) -> None:
    sub.add_argument("--resume", action="store_true",
                     help="continue an unfinished run in output_dir from its latest complete checkpoint")
    group = sub.add_argument_group("multi-GPU / multi-node (re-executes under `accelerate launch`)")
    group.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per machine (default 1)")
    group.add_argument("--accelerate-config", metavar="NAME|PATH",
                       help="single, ddp, fsdp, zero2, zero3 (bundled, configs/accelerate/) or an accelerate "
                            "config file; default: DDP")
    group.add_argument("--num-machines", type=int, default=1, help="machines (multi-node)")
    group.add_argument("--machine-rank", type=int, default=0, help="this machine's rank (multi-node)")
    group.add_argument("--main-process-ip", help="rank-0 machine's address (multi-node)")
    group.add_argument("--main-process-port", type=int, help="rank-0 machine's port (multi-node; default 29500)")
    group.add_argument("--rdzv-backend", choices=["static", "c10d"],
                       help="multi-node rendezvous: static (machine ranks as given; default) or c10d (torchrun's "
                            "elastic rendezvous; it numbers the machines itself)")


def _add_merge_arguments(sub) -> None:
    sub.add_argument("adapter_dir")
    sub.add_argument("--out", required=True, help="folder for the merged model")
    sub.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                     help="dtype the merged weights are saved in")
    sub.add_argument("--allow-pickle", action="store_true", help="allow .bin base weights (pickle)")
    sub.add_argument("--trust-remote-code", action="store_true", help="run the base model's own code from the hub")
    sub.add_argument("--format", default="hf", choices=["hf", "gguf-tq1", "gguf-tq2"],
                     help="hf: a transformers model folder (BitNet format for an adapter on a ternary base); "
                          "gguf-tq1 / gguf-tq2: llama.cpp GGUF, for an adapter trained with adapter.ternary_merge")
    sub.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")


class HelpWithDefaults(argparse.HelpFormatter):
    """Shows an option's default, unless it has none worth saying (None, a flag's False) or the help says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=__import__("posttrain").__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=__import__("posttrain").__version__)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name, func, help_text):
        sub = verbs.add_parser(name, help=help_text, description=help_text, formatter_class=HelpWithDefaults)
        sub.set_defaults(func=func)
        sub.add_argument("--quiet", action="store_true",
                         help="print only errors and the final summary (no progress bars, no informational lines)")
        return sub

    for name, func, help_text in (("run", _run, "run the recipe that a config names"),
                                  ("validate", _validate, "resolve and validate a config; print the result")):
        sub = verb(name, func, help_text)
        sub.add_argument("config", help="YAML config file (or a bundled config name such as tiny/sft)")
        sub.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides")
    _add_launch_arguments(verbs.choices["run"])
    verb("ls", _ls, "list recipes and bundled configs")
    sub = verb("init-tiny", _init_tiny, "write an offline tiny model + tokenizer with a chat template")
    sub.add_argument("out_dir", help="new or empty folder for the model (config, safetensors, tokenizer)")
    sub.add_argument("--arch", choices=["llama", "qwen2"], default="llama", help="architecture of the tiny model")
    sub.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir folder")
    _add_merge_arguments(verb("merge", _merge, "merge a LoRA/QLoRA adapter into its base model -> a full model "
                                               "folder (a ternary one for an adapter on a ternary base)"))
    sub = verb("quantize", _quantize, "post-training ternarization (BitNet b1.58, no training) and export")
    sub.add_argument("model", help="model folder, LoRA adapter folder, or hub name")
    sub.add_argument("--method", default="ternary", choices=["ternary"],
                     help="quantization method: ternary (BitNet b1.58 absmean, one scale per tensor)")
    sub.add_argument("--out", required=True, help="output folder")
    sub.add_argument("--format", default="hf", help="hf (transformers BitNet, packed 2-bit), fake-quant (dense), or "
                     "gguf-tq1 / gguf-tq2 (llama.cpp GGUF, TQ1_0 1.69 / TQ2_0 2.06 bits/weight)")
    sub.add_argument("--gguf-dense", choices=["f16", "q8_0", "f32"], default="f16",
                     help="GGUF type of the embeddings, output head and other dense matrices (default f16)")
    sub.add_argument("--skip", nargs="*", default=[], help="module-name patterns to keep dense")
    sub.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                     help="dtype of the dense tensors and scales (auto: the model's)")
    sub.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    sub.add_argument("--allow-pickle", action="store_true", help="allow .bin weights (pickle)")
    sub = verb("eval", _eval, "evaluate models side by side (quality, preference, drift) into one report")
    sub.add_argument("models", nargs="+", metavar="MODEL", help="[name=]path: model, adapter, ternary export or hub")
    sub.add_argument("--suite", required=True, help="suite YAML (see configs/eval/)")
    sub.add_argument("--out", required=True, help="folder for results.json, report.md and plots")
    sub.add_argument("--baseline", metavar="NAME", help="variant the others are tested against (default: the first)")
    sub = verb("bench", _bench, "size, load time, memory, prefill/decode speed of models, into the same report")
    sub.add_argument("models", nargs="+", metavar="MODEL", help="[name=]path: model, adapter, ternary export or hub")
    sub.add_argument("--out", required=True, help="folder for results.json, report.md and plots")
    sub.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for the prefill measurement")
    sub.add_argument("--new-tokens", type=int, default=32, help="tokens generated for the decode measurement")
    sub.add_argument("--repeats", type=int, default=5, help="timed repetitions per model (the median is reported)")
    sub = verb("demo", _demo, "the whole pipeline offline on a tiny model (pretrain, SFT, LoRA, DPO, 1.58-bit) "
                              "and the report comparing every variant; a rerun skips finished stages")
    sub.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    return parser


def looks_like_override(token: str) -> bool:
    key, sep, _ = token.partition("=")
    return bool(sep) and not token.startswith("-") and all(part.isidentifier() for part in key.split("."))


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """argparse, with dotted overrides accepted anywhere on the line: `run cfg.yaml --nproc 2 output_dir=x` too
    (argparse stops filling a positional list at the first flag; what it leaves over is collected here)."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all(looks_like_override(t) for t in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    import logging

    # bitsandbytes warns on every CPU import that an optional kernels package is missing: noise, not news.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    args = parse_arguments(build_parser(), sys.argv[1:] if argv is None else argv)
    if getattr(args, "quiet", False):
        from posttrain import log

        log.set_quiet()
    try:
        args.func(args)
    except PosttrainError as err:
        print(f"posttrain: error: {' '.join(str(err).splitlines())}", file=sys.stderr)  # always one line
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print("posttrain: interrupted", file=sys.stderr)
        return 130
    return 0
