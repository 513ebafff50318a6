"""Shared fixtures: a tiny tokenizer trained on the synthetic world's words, and tiny preset models."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests (still run in CI)")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    import shapes
    out = tmp_path_factory.mktemp("tok")
    shapes.train_tokenizer(shapes.world_vocabulary_corpus(), str(out))
    return str(out)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    import data
    return data.load_tokenizer(tokenizer_dir)
