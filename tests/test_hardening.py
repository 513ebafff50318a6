"""Every bad input and fault ends in a clear error or an exact recovery (one test per README row).

Rows covered elsewhere: malformed conversation JSON -> test_data.py::test_malformed_samples;
sample longer than max_len -> test_data.py::test_dataset_truncation_and_drop; kill + resume ->
test_train.py::test_kill_and_resume_reproduces_the_uninterrupted_run; tokenizers differ ->
test_stages.py::test_tokenizer_mismatch_is_a_clear_error (+ the training path below)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data
import shapes
import model as M
import train
import vat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hard") / "world")
    shapes.synthesize(out, seed=2, n_pretrain=48, n_instruct=96, n_images=48, n_sugarcrepe=2, n_vqa=4,
                    n_val_sugarcrepe=2, n_val_vqa=2, progress=False)
    return out


def _args(world, out, *extra, data_file="instruct.json"):
    return ["--stage", "llava", "--init", "preset:student", "--tokenizer", os.path.join(world, "tokenizer"),
            "--data", os.path.join(world, data_file), "--image-folder", world, "--out", out,
            "--trainable", "adapter+llm", "--global-batch", "8", "--micro-batch", "4", "--max-len", "256",
            "--lr", "3e-3", "--quiet", *extra]


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "step" in r]


def test_bad_images_stop_before_training_or_are_skipped_and_counted(world, tmp_path, monkeypatch):
    w = str(tmp_path / "w")
    shutil.copytree(world, w)
    samples = data.load_llava_json(os.path.join(w, "instruct.json"))
    with_img = [s for s in samples if s.get("image")]
    broken = {with_img[0]["image"], with_img[1]["image"], with_img[2]["image"]}
    broken = sorted(broken)
    os.remove(os.path.join(w, broken[0]))                                   # missing
    with open(os.path.join(w, broken[1]), "wb") as f:                      # corrupt
        f.write(b"\x89PNG\r\n\x1a\n this is not a png")
    Image.open(os.path.join(w, broken[2])).convert("L").save(os.path.join(w, broken[2]))  # not RGB
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError) as e:  # allow_non_rgb=False (--strict-rgb): grayscale is a bad image too
        data.validate_images(samples, w, cache_dir=cache, progress=False, allow_non_rgb=False)
    msg = str(e.value)
    first_bad = next(s["id"] for s in samples if s.get("image") in broken)
    assert first_bad in msg and "file not found" in msg and "not RGB" in msg and "unreadable" in msg
    kept, bad = data.validate_images(samples, w, skip_bad=True, cache_dir=cache, progress=False, allow_non_rgb=False)
    n_bad = sum(s.get("image") in broken for s in samples)
    assert len(bad) == n_bad and len(kept) == len(samples) - n_bad
    # cached: the second pass decodes nothing
    monkeypatch.setattr(data, "_check_image", lambda p: (_ for _ in ()).throw(AssertionError("re-validated")))
    data.validate_images(samples, w, skip_bad=True, cache_dir=cache, progress=False)
    monkeypatch.undo()
    # through training: the error comes before any step; with the flag the skips are counted
    monkeypatch.setenv("COMPODISTILL_CACHE", cache)
    out = str(tmp_path / "run")
    with pytest.raises(ValueError, match="bad image"):
        train.main(_args(w, out, "--max-steps", "1"))
    assert not os.path.exists(os.path.join(out, "log.jsonl")) or _log(out) == []
    train.main(_args(w, out, "--max-steps", "1", "--skip-bad-images", "--strict-rgb"))
    summary = json.load(open(os.path.join(out, "trainer_summary.json")))
    assert summary["skipped_bad_images"] == n_bad
    with open(os.path.join(out, "log.jsonl")) as f:
        assert json.loads(f.readline())["skipped_bad_images"] == n_bad


def test_text_only_batch_gives_no_vat_and_no_nan(world, tmp_path):
    tok = data.load_tokenizer(os.path.join(world, "tokenizer"))
    teacher = M.from_preset("teacher", tok)
    M.save_pretrained(teacher, str(tmp_path / "teacher"), tok)
    text = [s for s in data.load_llava_json(os.path.join(world, "instruct.json")) if not s.get("image")]
    text = (text * 8)[:16]
    with open(os.path.join(world, "text_only_batch.json"), "w") as f:
        json.dump([dict(s, id=f"{s['id']}_{i}") for i, s in enumerate(text)], f)
    out = str(tmp_path / "s2")
    train.main(["--stage", "2", "--init", "preset:student", "--tokenizer", os.path.join(world, "tokenizer"),
                "--teacher", str(tmp_path / "teacher"), "--data", os.path.join(world, "text_only_batch.json"),
                "--image-folder", world, "--out", out, "--global-batch", "8", "--micro-batch", "4",
                "--max-steps", "2", "--lora-r", "4", "--quiet"])
    for r in _log(out):
        assert r["vat"] == 0.0 and r["kd"] > 0 and r["lm"] > 0 and r["skipped"] == 0
        assert all(map(lambda v: v == v, (r["lm"], r["kd"], r["grad_norm"])))  # no NaN
    # and directly: a mixed batch's text-only sample adds nothing to L_ADL
    s = {1: torch.rand(2, 6, 3, requires_grad=True)}
    t = {2: torch.rand(2, 6, 3)}
    vm = torch.zeros(2, 6, dtype=torch.bool)
    vm[0, 1:4] = True
    full = vat.vat_loss(s, t, [[2]], [1], vm, torch.ones(2, 6))
    only = vat.vat_loss({1: s[1][:1]}, {2: t[2][:1]}, [[2]], [1], vm[:1], torch.ones(1, 6))
    assert torch.isfinite(full) and abs(full.item() - only.item()) < 1e-7


def test_teacher_with_another_tokenizer_stops_before_training(world, tmp_path):
    other = shapes.train_tokenizer(["other words only"] * 10 + ["<image> A B yes no"], str(tmp_path / "tok"), vocab_size=300)
    teacher = M.from_preset("teacher", other)
    M.save_pretrained(teacher, str(tmp_path / "teacher"), other)
    with pytest.raises(ValueError, match="tokenizers disagree"):
        train.main(["--stage", "1", "--init", "preset:student", "--tokenizer", os.path.join(world, "tokenizer"),
                    "--teacher", str(tmp_path / "teacher"), "--data", os.path.join(world, "pretrain.json"),
                    "--image-folder", world, "--out", str(tmp_path / "s1"), "--global-batch", "8", "--quiet"])
    assert not os.path.exists(tmp_path / "s1" / "log.jsonl")


def test_taf_with_another_vision_encoder_is_an_error(world):
    tok = data.load_tokenizer(os.path.join(world, "tokenizer"))
    teacher = M.from_preset("teacher", tok, seed=0)
    student = M.from_preset("student", tok, seed=5)  # another seed: other vision weights
    with pytest.raises(ValueError, match="vision"):
        train.apply_taf(student, teacher)
    train.apply_taf(M.from_preset("student", tok, seed=0), teacher)  # the same encoder is fine


def test_non_finite_steps_are_skipped_then_the_run_stops_with_the_checkpoint_intact(world, tmp_path, monkeypatch):
    real = train.lm_and_kd_loss
    calls = {"n": 0}

    def poisoned(*a, **k):  # micro-batches 2 per step: steps 3 and 4 (calls 5..8) are NaN, then all NaN from 7
        calls["n"] += 1
        lm, kd = real(*a, **k)
        bad = calls["n"] in (5, 6, 7, 8) or calls["n"] > 12
        return (lm * float("nan"), kd) if bad else (lm, kd)

    monkeypatch.setattr(train, "lm_and_kd_loss", poisoned)
    out = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match="consecutive non-finite"):
        train.main(_args(world, out, "--max-steps", "20", "--save-every", "1", "--max-nonfinite", "3"))
    log = _log(out)
    assert [r["skipped"] for r in log][:8] == [0, 0, 1, 2, 2, 2, 3, 4]
    state = torch.load(os.path.join(out, "checkpoint", "trainer_state.pt"), weights_only=True)
    assert state["step"] == 8  # the last step before the stop; its weights are the last good ones
    weights = train.find_checkpoint(out)
    from safetensors.torch import load_file
    assert all(torch.isfinite(v).all() for v in load_file(os.path.join(weights, "trainable.safetensors")).values())


def test_crash_during_checkpoint_write_leaves_the_previous_one_loadable(world, tmp_path, monkeypatch):
    out = str(tmp_path / "ck")
    train.main(_args(world, out, "--max-steps", "4", "--save-every", "2", "--stop-after", "3"))
    real_replace = os.replace

    def crash(src, dst):  # dies between moving the old checkpoint aside and moving the new one in
        if src.endswith("checkpoint.tmp"):
            raise KeyboardInterrupt("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(train.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(_args(world, out, "--max-steps", "8", "--save-every", "4", "--resume"))
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(out, "checkpoint"))
    ck = train.find_checkpoint(out)
    assert ck.endswith("checkpoint.old")
    assert torch.load(os.path.join(ck, "trainer_state.pt"), weights_only=True)["step"] == 2
    train.main(_args(world, out, "--max-steps", "8", "--save-every", "4", "--resume"))  # resumes from it
    assert _log(out)[-1]["step"] == 8


def test_checkpoint_from_another_model_or_stage_is_refused(world, tmp_path):
    out = str(tmp_path / "other")
    train.main(_args(world, out, "--max-steps", "2", "--save-every", "1", "--stop-after", "1"))
    args = _args(world, out, "--max-steps", "2", "--resume")
    args[args.index("preset:student")] = "preset:teacher"
    with pytest.raises(ValueError, match="written by another run: init"):
        train.main(args)
    with pytest.raises(ValueError, match="group_by_length"):  # other batches: not the same run
        train.main(_args(world, out, "--max-steps", "2", "--resume", "--group-by-length"))
    args = _args(world, out, "--max-steps", "2", "--resume", "--trainable", "adapter")
    with pytest.raises(ValueError, match="trainable"):
        train.main(args)


def test_out_of_memory_names_the_knobs(world, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(train, "lm_and_kd_loss", oom)
    with pytest.raises(RuntimeError, match="--micro-batch.*--grad-checkpointing.*--max-len"):
        train.main(_args(world, str(tmp_path / "oom"), "--max-steps", "1"))


def test_loading_never_unpickles_or_runs_remote_code():
    import ast
    for name in ("model.py", "train.py", "data.py", "evaluate.py", "vat.py", "taf.py", "shapes.py", "demo.py", "bench.py"):
        src = open(os.path.join(ROOT, name)).read()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kw.get("weights_only") == "True", (name, node.lineno)  # no arbitrary unpickling
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert ast.unparse(node.value) != "True", (name, "trust_remote_code hard-wired on")
    import inspect
    for fn in (M.load_pretrained, M.from_parts):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False


@pytest.mark.slow
def test_a_dead_rank_is_restarted_by_torchrun_and_resumes(world, tmp_path):
    """Rank 1 dies at step 3 (os._exit, first attempt only); torchrun --max-restarts=1 restarts both
    workers, which resume from the step-2 checkpoint: steps 3..6 equal an uninterrupted 1-process run."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train.main(_args(world, one, "--max-steps", "6"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
           f"--master_port={_free_port()}", os.path.join(ROOT, "train.py"),
           *_args(world, two, "--max-steps", "6", "--device", "cpu", "--save-every", "2", "--resume",
                  "--fail-at-step", "3", "--fail-rank", "1")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "exitcode: 17" in res.stderr, "rank 1 did not die at step 3 (the os._exit(17) hook)"
    log = _log(two)
    assert [r["step"] for r in log][-4:] == [3, 4, 5, 6]  # resumed from the step-2 checkpoint
    ref = {r["step"]: r for r in _log(one)}
    for r in log[-4:]:
        assert abs(r["lm"] - ref[r["step"]]["lm"]) <= 1e-5


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
