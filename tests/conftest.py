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


def small_world(tmp_path_factory, name: str, seed: int, n_images: int, n_sugarcrepe=2, n_vqa=2, n_val=2) -> str:
    """A small synthesised shapes world (n_images images, as many pre-training captions, twice as many
    instruction samples, the held-out and validation benchmarks at the sizes given) in a fresh directory."""
    import shapes
    out = str(tmp_path_factory.mktemp(name) / "world")
    shapes.synthesize(out, seed=seed, n_pretrain=n_images, n_instruct=2 * n_images, n_images=n_images,
                      n_sugarcrepe=n_sugarcrepe, n_vqa=n_vqa, n_val_sugarcrepe=n_val, n_val_vqa=n_val, progress=False)
    return out


def llava_args(world, out, *extra, init="preset:student", tokenizer=True, trainable="adapter+llm", lr="3e-3",
               data_file="instruct.json") -> list:
    """train.py's arguments for a short LLaVA-recipe run on a small_world: global batch 8 in micro-batches of
    4, --max-len 256, quiet; `extra` last (so it overrides)."""
    tok = ["--tokenizer", os.path.join(world, "tokenizer")] if tokenizer else []
    return ["--stage", "llava", "--init", init, *tok, "--data", os.path.join(world, data_file),
            "--image-folder", world, "--out", out, "--trainable", trainable, "--global-batch", "8",
            "--micro-batch", "4", "--max-len", "256", "--lr", lr, "--quiet", *extra]


def logged_steps(out) -> list:
    """The step records of a run's log.jsonl."""
    import json
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "step" in r]


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
