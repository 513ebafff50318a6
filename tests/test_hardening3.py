"""Hardening, round 3 (issue 41, items 1-5): README's recipe from bf16 hub-style checkpoints, --fsdp on a data
mix with text-only samples, SIGTERM to a job with DataLoader workers, --vat-layers auto's two windows, and a
checkpoint whose --init / --teacher was re-made under the same path. One test per row of
docs/what-happens-when.md."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import model as M
import runs
import shapes
import train
import vat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hard3") / "world")
    shapes.synthesize(out, seed=3, n_pretrain=32, n_instruct=64, n_images=32, n_sugarcrepe=2, n_vqa=4,
                      n_val_sugarcrepe=2, n_val_vqa=2, progress=False)
    return out


def _args(world, out, *extra, data_file="instruct.json"):
    return ["--stage", "llava", "--init", "preset:student", "--tokenizer", os.path.join(world, "tokenizer"),
            "--data", os.path.join(world, data_file), "--image-folder", world, "--out", out,
            "--trainable", "adapter+llm", "--global-batch", "8", "--micro-batch", "4", "--max-len", "256",
            "--lr", "3e-3", "--device", "cpu", "--quiet", *extra]


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "step" in r]


def _wait_for_a_logged_step(proc, out, timeout=180):
    log = os.path.join(out, "log.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if os.path.exists(log) and '"step"' in open(log).read():
            return
        time.sleep(0.2)
    raise AssertionError("no step was logged")


# -----------------------------------------------------------------------------
# Item 3: SIGTERM to every process of the job, DataLoader workers included

@pytest.mark.slow
def test_sigterm_to_the_whole_job_with_dataloader_workers_saves_and_exits_143(world, tmp_path):
    """What scancel / a preemption does: SIGTERM to every process of the job, the DataLoader workers
    included. The workers ignore it (data.data_loader's worker_init_fn); the main process finishes the
    step, saves a checkpoint and exits 143; --resume continues from it."""
    out = str(tmp_path / "preempted")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *_args(world, out, "--max-steps", "2000",
                                                                   "--num-workers", "2")]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # its own process group
    try:
        _wait_for_a_logged_step(proc, out)
        workers = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) >= 3, workers  # the main process and its 2 workers are in the group
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    assert "exited unexpectedly" not in err and "SIGTERM: stopped after step" in err
    step = torch.load(os.path.join(out, "checkpoint", "trainer_state.pt"), weights_only=True)["step"]
    assert step == _log(out)[-1]["step"] >= 1
    train.main(_args(world, out, "--max-steps", str(step + 1), "--resume", "--num-workers", "2"))
    assert _log(out)[-1]["step"] == step + 1 and runs.is_finished(out)
