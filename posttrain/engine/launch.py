"""`posttrain run CONFIG --nproc N`: the same command, re-executed under `accelerate launch`.

accelerate does the process spawning, rendezvous, and DDP / FSDP2 / DeepSpeed wrapping; posttrain only builds
the launch line. The config is validated first, in this process, so a typo fails once, not once per rank.
`accelerate launch -m posttrain run CONFIG` works as well; this is a shortcut for it.

Bundled accelerate configs (configs/accelerate/): single, ddp, fsdp (FSDP2, wrapping the model's decoder
layers, taken from the model's `_no_split_modules`), zero2, zero3 (DeepSpeed; `pip install deepspeed`).
Precision comes from `train.precision`, not from the accelerate config (its mixed_precision is 'no').
`--nproc` counts processes per machine; with `--num-machines M` accelerate gets N x M processes in all.

Several machines: the same command on each, with `--num-machines M --machine-rank R --main-process-ip IP`
(the machine-rank-0 machine's address; it hosts the rendezvous store on `--main-process-port`, default 29500).
`--rdzv-backend static` (accelerate's and torchrun's `--node_rank` way) keeps the machine ranks as given, so
machine 0 holds global rank 0 and writes output_dir; `c10d` (torchrun's elastic rendezvous) numbers the machines
itself (global rank 0, the writer, may then be on any machine).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from posttrain import log
from posttrain.errors import PosttrainError

BUNDLED = ("single", "ddp", "fsdp", "zero2", "zero3")


def accelerate_config_path(name_or_path: str) -> Path:
    from posttrain.config.bundled import configs_dir

    if name_or_path in BUNDLED:
        return configs_dir() / "accelerate" / f"{name_or_path}.yaml"
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise PosttrainError(f"--accelerate-config {name_or_path}: no such file; use one of {', '.join(BUNDLED)} "
                             "or the path of an accelerate config file (`accelerate config` writes one)")
    return path


def check_launch_flags(args) -> None:
    """One clear error for a launch flag that cannot work, before anything is started."""
    nodes, rank = args.num_machines, args.machine_rank
    backend, ip, port = getattr(args, "rdzv_backend", None), args.main_process_ip, args.main_process_port
    if args.nproc < 1 or nodes < 1:
        raise PosttrainError("--nproc and --num-machines must be >= 1")
    if port is not None and not 0 <= port <= 65535:
        raise PosttrainError(f"--main-process-port {port}: not a port number (1-65535)")
    if nodes == 1:
        given = [flag for flag, value in (("--machine-rank", rank != 0), ("--main-process-ip", ip is not None),
                                          ("--rdzv-backend", backend is not None)) if value]
        if given:
            raise PosttrainError(f"{', '.join(given)}: multi-node settings, for --num-machines 2 or more "
                                 "(one machine needs only --nproc)")
        return
    if not ip:
        raise PosttrainError("--num-machines > 1 needs --main-process-ip (the rank-0 machine's address)")
    if not 0 <= rank < nodes:
        raise PosttrainError(f"--machine-rank {rank}: must be 0 to {nodes - 1} with --num-machines {nodes}")
    if port == 0:
        raise PosttrainError("--main-process-port 0 (a free port, picked at random) works on one machine only; "
                             "give every machine the same port")


def launch_command(args) -> list[str]:
    """The `accelerate launch` command line for these parsed `posttrain run` arguments."""
    check_launch_flags(args)
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--num_processes", str(args.nproc * args.num_machines)]
    if args.accelerate_config:
        command += ["--config_file", str(accelerate_config_path(args.accelerate_config))]
    else:
        command += ["--multi_gpu"]  # plain DDP; on CPU too (gloo) - `--cpu` would silently run one process
    if args.num_machines > 1:
        backend = getattr(args, "rdzv_backend", None) or "static"
        command += ["--num_machines", str(args.num_machines), "--machine_rank", str(args.machine_rank),
                    "--main_process_ip", args.main_process_ip, "--rdzv_backend", backend]
        if backend == "c10d":
            # The rank-0 machine hosts the store. (torch's guess - "the endpoint is one of my addresses" - picks
            # every machine when all run on one host, and accelerate's port check on machine 0 then fails.)
            command += ["--rdzv_conf", f"is_host={int(args.machine_rank == 0)}"]
    if args.main_process_port is not None:
        command += ["--main_process_port", str(args.main_process_port)]
    command += ["-m", "posttrain", "run", str(args.config), *args.overrides]
    return command + (["--resume"] if args.resume else [])


def relaunch(args) -> None:
    """Validate the config here, then replace this process with `accelerate launch` (signals reach it)."""
    from posttrain.config.bundled import resolve_config_path
    from posttrain.config.schema import load_config, read_yaml

    path = resolve_config_path(args.config)
    if read_yaml(path)[0].get("recipe") == "pipeline":
        raise PosttrainError(f"{path}: --nproc launches one recipe; run a pipeline's stages one by one with --nproc")
    load_config(path, args.overrides)
    command = launch_command(args)
    if shutil.which(command[0]) is None and not Path(command[0]).is_file():
        raise PosttrainError(f"cannot find the Python interpreter {command[0]} to launch accelerate")
    log.info("launching: " + " ".join(command[1:]))
    os.execv(command[0], command)
