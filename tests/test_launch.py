"""`posttrain run --nproc`: the accelerate launch line, and the bundled accelerate configs."""

from pathlib import Path

import pytest

from posttrain.cli import build_parser, main
from posttrain.engine.launch import BUNDLED, launch_command

ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"


def parse(*argv):
    return build_parser().parse_args(["run", "tiny/sft", "train.max_steps=3", *argv])


def test_launch_line_ddp_by_default_and_overrides_kept():
    command = launch_command(parse("--nproc", "4", "--resume"))
    assert command[1:6] == ["-m", "accelerate.commands.launch", "--num_processes", "4", "--multi_gpu"]
    assert command[-5:] == ["posttrain", "run", "tiny/sft", "train.max_steps=3", "--resume"]


def test_launch_line_bundled_config_and_multi_node_flags():
    flags = ["--nproc", "8", "--accelerate-config", "fsdp", "--num-machines", "2", "--machine-rank", "1",
             "--main-process-ip", "10.0.0.1", "--main-process-port", "29500"]
    command = launch_command(parse(*flags))
    assert command[command.index("--num_processes") + 1] == "16"  # 8 per machine x 2 machines
    assert Path(command[command.index("--config_file") + 1]) == ACCELERATE_CONFIGS / "fsdp.yaml"
    assert "--multi_gpu" not in command
    for flag, value in (("--num_machines", "2"), ("--machine_rank", "1"), ("--main_process_ip", "10.0.0.1"),
                        ("--main_process_port", "29500")):
        assert command[command.index(flag) + 1] == value


@pytest.mark.parametrize("argv,message", [
    (["--nproc", "2", "--accelerate-config", "nope.yaml"], "--accelerate-config nope.yaml: no such file"),
    (["--num-machines", "2"], "needs --main-process-ip"),
    (["--nproc", "0"], "must be >= 1"),
])
def test_bad_launch_flags_one_line(argv, message, capsys):
    assert main(["run", "tiny/sft", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("posttrain: error:") and message in err[0]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_accelerate_configs_load_in_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ACCELERATE_CONFIGS / f"{name}.yaml"
    assert path.read_text().startswith("# posttrain run CONFIG ")
    config = load_config_from_file(str(path))
    expected = {"single": "NO", "ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}[name]
    assert str(config.distributed_type).split(".")[-1] == expected
    assert config.mixed_precision == "no"  # train.precision decides
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
        assert "gradient_accumulation_steps" not in config.deepspeed_config  # "auto": the Trainer fills it
