"""`posttrain run` across machines: the multi-node flags on the accelerate launch line, and two "machines" of one
process each on localhost (loopback only) that rendezvous and train to the weights of one machine with
`--nproc 2` (the same 2-process DDP on gloo; CPU)."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import STEPS, common, env
from test_launch import parse

from posttrain.cli import main
from posttrain.engine.launch import launch_command

IP = ["--main-process-ip", "127.0.0.1"]  # loopback only


def flag_value(command, flag):
    return command[command.index(flag) + 1]


@pytest.mark.parametrize("rank", [0, 1])
def test_launch_line_c10d_rendezvous_hosted_by_machine_0(rank):
    command = launch_command(parse("--num-machines", "2", "--machine-rank", str(rank), *IP,
                                   "--main-process-port", "29400", "--rdzv-backend", "c10d"))
    assert flag_value(command, "--num_processes") == "2" and flag_value(command, "--num_machines") == "2"
    assert flag_value(command, "--machine_rank") == str(rank)
    assert flag_value(command, "--rdzv_backend") == "c10d"
    assert flag_value(command, "--rdzv_conf") == f"is_host={int(rank == 0)}"
    assert flag_value(command, "--main_process_port") == "29400"
    assert command.index("--rdzv_conf") < command.index("-m", 2)  # launcher flags, not posttrain's


def test_launch_line_static_rendezvous_by_default_and_port_on_one_machine():
    command = launch_command(parse("--num-machines", "2", "--main-process-ip", "10.0.0.1"))
    assert flag_value(command, "--rdzv_backend") == "static" and "--rdzv_conf" not in command
    assert "--main_process_port" not in command  # accelerate's default, 29500
    command = launch_command(parse("--nproc", "2", "--main-process-port", "29401"))
    assert flag_value(command, "--main_process_port") == "29401" and "--num_machines" not in command


@pytest.mark.parametrize("argv,message", [
    (["--num-machines", "2", "--machine-rank", "2", *IP], "--machine-rank 2: must be 0 to 1"),
    (["--nproc", "2", "--machine-rank", "1"], "--machine-rank: multi-node settings"),
    (["--nproc", "2", "--rdzv-backend", "c10d", *IP], "--main-process-ip, --rdzv-backend: multi-node settings"),
    (["--num-machines", "2", *IP, "--main-process-port", "0"], "works on one machine only"),
    (["--nproc", "2", "--main-process-port", "70000"], "--main-process-port 70000: not a port number"),
])
def test_bad_multi_node_flags_one_line(argv, message, capsys):
    assert main(["run", "tiny/sft", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("posttrain: error:") and message in err[0], err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weights_and_losses(out):
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == STEPS
    return load_file(out / "model.safetensors"), [loss for _, loss in metrics["train_loss_history"]]


@pytest.fixture(scope="module")
def nproc_2_run(tmp_path_factory, tiny_model_dir):
    """sft on one machine with `--nproc 2`: the weights the two machines must reach."""
    out = tmp_path_factory.mktemp("multinode") / "nproc2"
    port = ["--main-process-port", "0"]  # a free one: another test run may hold accelerate's default, 29500
    result = subprocess.run([sys.executable, "-m", "posttrain", "run", *common("sft", out, tiny_model_dir),
                             "--nproc", "2", *port], capture_output=True, text=True, timeout=600, env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    return weights_and_losses(out)


@pytest.mark.parametrize("backend", ["c10d", "static"])
def test_two_machines_on_localhost_equal_nproc_2(backend, tmp_path, tiny_model_dir, nproc_2_run):
    """Machine 1 starts first (it waits for machine 0's store); both write to one output_dir, as on a shared
    filesystem, and only the global main process writes into it. static is the default backend."""
    out, port = tmp_path / "nodes", free_port()
    flags = ["--num-machines", "2", *IP, "--main-process-port", str(port),
             *(["--rdzv-backend", backend] if backend != "static" else [])]
    nodes, logs = [], [tmp_path / f"machine{rank}.log" for rank in (0, 1)]
    try:
        for rank in (1, 0):
            with open(logs[rank], "w") as log:  # files, not pipes: a full pipe would stall one machine
                nodes.append(subprocess.Popen(
                    [sys.executable, "-m", "posttrain", "run", *common("sft", out, tiny_model_dir), *flags,
                     "--machine-rank", str(rank)], stdout=log, stderr=subprocess.STDOUT, text=True, env=env(),
                    start_new_session=True))
        codes = [node.wait(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)  # its own session: the launcher and its worker
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in text)
    for rank in (0, 1):
        assert f"--machine_rank {rank} --main_process_ip 127.0.0.1 --rdzv_backend {backend}" in text[rank]
    weights, losses = weights_and_losses(out)
    ref_weights, ref_losses = nproc_2_run
    assert len(losses) == STEPS and losses == pytest.approx(ref_losses, abs=1e-5), (losses, ref_losses)
    assert losses[0] != losses[-1]  # it trained
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], ref_weights[name], atol=1e-5, rtol=0)
    assert not list(out.glob(".final*"))
