"""Shared fixtures: everything offline, the tiny model built once per session into a temp cache."""

import os
import tempfile

os.environ.setdefault("POSTTRAIN_CACHE", tempfile.mkdtemp(prefix="posttrain-test-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir():
    """Folder of the offline tiny Llama (model + tokenizer + ChatML template without generation tags)."""
    from posttrain.tiny import resolve_tiny_model

    return resolve_tiny_model("tiny:llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~30 s on a 2-core CPU")


@pytest.fixture(scope="session")
def tiny_sft_dir(tmp_path_factory):
    """The tiny model after configs/tiny/sft.yaml (once per session): the start of DPO and ternary tests."""
    from pathlib import Path

    import posttrain
    from posttrain.config.schema import load_config

    out = tmp_path_factory.mktemp("shared") / "tiny-sft"
    config = Path(__file__).resolve().parent.parent / "configs" / "tiny" / "sft.yaml"
    posttrain.run(load_config(config, [f"output_dir={out}"]))
    return out
