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
