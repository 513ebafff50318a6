"""Shared fixtures: a tiny tokenizer trained on the synthetic world's words, and tiny preset models."""
import contextlib
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


def world_and_teacher(root, seed, **sizes):
    """A synthesised shapes world under root/world and a random teacher preset saved at root/teacher, on the
    world's tokenizer: what the stage tests train against. -> (world dir, teacher dir)."""
    import data
    import model as M
    import shapes
    world = os.path.join(str(root), "world")
    shapes.synthesize(world, seed=seed, progress=False, **sizes)
    tok = data.load_tokenizer(os.path.join(world, "tokenizer"))
    M.save_pretrained(M.from_preset("teacher", tok), os.path.join(str(root), "teacher"), tok)
    return world, os.path.join(str(root), "teacher")


@contextlib.contextmanager
def killed_after(step: int):
    """The training inside stops after `step` as a kill would leave it: no model saved, the checkpoint and
    the log as they were (runs.inject_fault, through $COMPODISTILL_FAULT)."""
    import runs
    os.environ[runs.FAULT_ENV] = f"stop_after={step}"
    try:
        with pytest.raises(runs.SimulatedKill):
            yield
    finally:
        del os.environ[runs.FAULT_ENV]
