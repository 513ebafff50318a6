"""Peak memory per phase in log.jsonl (runs.peak_memory): what `python bench.py --rehearsal` reads to hold each
phase of a real-shape run to its budget. The measurement itself is checked against allocations of known size."""
import json
import os

import numpy as np
import torch

import runs
import shapes
import train
from conftest import killed_after


def test_peak_memory_sees_a_transient_allocation_and_then_starts_afresh():
    cpu = torch.device("cpu")
    runs.peak_memory(False, cpu)  # a fresh count from here
    a = np.ones(64 * 2 ** 20, dtype=np.float32)  # 256 MiB, touched
    del a
    during = runs.peak_memory(False, cpu)["host"][0]
    after = runs.peak_memory(False, cpu)["host"][0]  # nothing allocated since the last call
    assert during - after > 0.2, (during, after)  # the freed 0.25 GiB is in the first phase's peak only


def test_every_phase_of_a_run_is_logged_with_each_ranks_peak(tmp_path, monkeypatch):
    world = str(tmp_path / "world")
    shapes.synthesize(world, seed=0, n_pretrain=16, n_instruct=32, n_images=16, n_sugarcrepe=2, n_vqa=4,
                      n_val_sugarcrepe=2, n_val_vqa=4, progress=False)
    out = str(tmp_path / "run")
    args = ["--stage", "llava", "--init", "preset:student", "--tokenizer", os.path.join(world, "tokenizer"),
            "--data", os.path.join(world, "instruct.json"), "--image-folder", world, "--out", out,
            "--trainable", "adapter+llm", "--global-batch", "4", "--micro-batch", "4", "--max-len", "256", "--quiet",
            "--max-steps", "3", "--save-every", "1", "--eval-every", "1", "--eval-limit", "1",
            "--eval-sugarcrepe", os.path.join(world, "val", "sugarcrepe")]
    trims, trim = [], runs.release_freed_host_memory
    monkeypatch.setattr(runs, "release_freed_host_memory", lambda: trims.append(trim()))
    with killed_after(2):
        train.main(args)
    train.main([*args, "--resume"])
    # the heap's freed pages go back after loading the models and after the optimizer / resumed checkpoint
    assert len(trims) == 4 and all(t in (True, False) for t in trims)
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    starts = [r for r in recs if r.get("event") == "start"]
    assert [r["from_step"] for r in starts] == [0, 2]  # resumed from the step-2 checkpoint
    for r in starts:
        assert set(r["peak_gib"]) == {"load", "data", "optimizer"}
    steps = [r for r in recs if "lm" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    vals = [r for r in recs if "val_cr" in r]
    checkpoints = [r for r in recs if r.get("event") == "checkpoint"]
    # the kill came after step 2's checkpoint; the resumed run's last step saves no checkpoint, only the model
    assert [r["at_step"] for r in checkpoints] == [1, 2] and [r["step"] for r in vals] == [1, 2, 3]
    for r in [*steps, *vals, *checkpoints, *(s["peak_gib"][k] for s in starts for k in s["peak_gib"])]:
        peak = r["peak_gib"]["host"] if "peak_gib" in r else r["host"]
        assert len(peak) == 1 and 0.05 < peak[0] < 64, r  # one rank; a python + torch process, in GiB
    x, nums = runs.sink_numbers(checkpoints[0])  # the sinks get the per-rank numbers, at the checkpoint's step
    assert x == 1 and "peak_gib/host/0" in nums


def test_releasing_freed_memory_without_glibc_is_a_no_op(monkeypatch):
    import ctypes

    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    assert runs.release_freed_host_memory() is False
