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
import runs
import train
from conftest import killed_after, llava_args, logged_steps, small_world
import vat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory, "hard", seed=2, n_images=48, n_vqa=4)


_args = llava_args
_log = logged_steps


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
    # steps 3-4 and 7-9 are NaN (--save-every 1): checkpoints at 1, 2, 5, 6, none during a streak
    real = train.lm_and_kd_loss
    calls = {"n": 0}

    def poisoned(*a, **k):  # micro-batches 2 per step: steps 3 and 4 (calls 5..8) are NaN, then all NaN from 7
        calls["n"] += 1
        lm, kd = real(*a, **k)
        bad = calls["n"] in (5, 6, 7, 8) or calls["n"] > 12
        return (lm * float("nan"), kd) if bad else (lm, kd)

    monkeypatch.setattr(train, "lm_and_kd_loss", poisoned)
    out = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match=r"consecutive non-finite.*L_LM.*checkpoint.*\(step 6\).*--lr"):
        train.main(_args(world, out, "--max-steps", "20", "--save-every", "1", "--max-nonfinite", "3"))
    log = _log(out)
    assert [r["skipped"] for r in log][:8] == [0, 0, 1, 2, 2, 2, 3, 4]
    state = torch.load(os.path.join(out, "checkpoint", "trainer_state.pt"), weights_only=True)
    assert state["step"] == 6  # the last step before the streak: none is saved while a streak is open
    weights = runs.find_checkpoint(out)
    from safetensors.torch import load_file
    assert all(torch.isfinite(v).all() for v in load_file(os.path.join(weights, "trainable.safetensors")).values())


def test_crash_during_checkpoint_write_leaves_the_previous_one_loadable(world, tmp_path, monkeypatch):
    out = str(tmp_path / "ck")
    with killed_after(3):
        train.main(_args(world, out, "--max-steps", "4", "--save-every", "2"))
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
    ck = runs.find_checkpoint(out)
    assert ck.endswith("checkpoint.old")
    assert torch.load(os.path.join(ck, "trainer_state.pt"), weights_only=True)["step"] == 2
    train.main(_args(world, out, "--max-steps", "8", "--save-every", "4", "--resume"))  # resumes from it
    assert _log(out)[-1]["step"] == 8


def test_checkpoint_from_another_model_or_stage_is_refused(world, tmp_path):
    out = str(tmp_path / "other")
    with killed_after(1):
        train.main(_args(world, out, "--max-steps", "2", "--save-every", "1"))
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
    env = dict(os.environ, OMP_NUM_THREADS="1", **{runs.FAULT_ENV: "die_at=3,rank=1"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
           f"--master_port={_free_port()}", os.path.join(ROOT, "train.py"),
           *_args(world, two, "--max-steps", "6", "--device", "cpu", "--save-every", "2", "--resume")]
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


def test_dist_timeout_reaches_the_process_group(world, tmp_path, monkeypatch):
    """--dist-timeout (minutes, default 30) is the process group's own timeout, read back from the group that
    train.set_up joins (a real 1-process gloo group, as torchrun --nproc_per_node 1 --fsdp makes): it once
    reached only the TCP store, and NCCL's default of 10 minutes killed a job whose rank 0 was still saving."""
    import datetime
    import torch.distributed as dist
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    seen = []
    for extra, minutes in (((), 30), (("--dist-timeout", "90"), 90)):
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        args = train.get_parser().parse_args(_args(world, str(tmp_path / f"t{minutes}"), "--fsdp", *extra))
        assert not runs.check_args(args)
        train.set_up(args)
        try:
            seen.append(dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout)
        finally:
            dist.destroy_process_group()
    assert seen == [datetime.timedelta(minutes=30), datetime.timedelta(minutes=90)]


# -----------------------------------------------------------------------------
# Round 2 (issue 18): the faults found outside the first table

def _teacher(world, path, poison=False):
    tok = data.load_tokenizer(os.path.join(world, "tokenizer"))
    teacher = M.from_preset("teacher", tok)
    if poison:  # a teacher whose hidden states are NaN (e.g. an overflowed bf16 export)
        with torch.no_grad():
            teacher.language_model.model.norm.weight.fill_(float("nan"))
    M.save_pretrained(teacher, path, tok)
    return path


@pytest.mark.parametrize("flag,value", [("--global-batch", "-8"), ("--global-batch", "0"), ("--micro-batch", "0"),
                                        ("--log-every", "0"), ("--kd-chunk", "0"), ("--epochs", "0"),
                                        ("--kd-temperature", "0"), ("--lr", "nan"), ("--max-len", "0"),
                                        ("--lora-dropout", "1.5"), ("--save-every", "-1"),
                                        ("--dist-timeout", "0")])
def test_bad_sizes_counts_and_rates_are_refused_before_anything_loads(world, tmp_path, monkeypatch, capsys, flag, value):
    monkeypatch.setattr(train, "build_student", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(SystemExit) as e:
        train.main(_args(world, str(tmp_path / "x"), flag, value))
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_epochs_that_give_no_step_are_an_error(world, tmp_path):
    with pytest.raises(ValueError, match="--epochs 0.01 .* 0 optimizer steps"):
        train.main(_args(world, str(tmp_path / "x"), "--epochs", "0.01"))
    assert not os.path.exists(tmp_path / "x" / "model.safetensors")


def test_out_equal_to_the_teacher_or_the_init_is_refused(world, tmp_path, capsys):
    t = _teacher(world, str(tmp_path / "teacher"))
    before = open(os.path.join(t, "model.safetensors"), "rb").read()
    argv = ["--stage", "1", "--init", "preset:student", "--tokenizer", os.path.join(world, "tokenizer"),
            "--teacher", t, "--data", os.path.join(world, "pretrain.json"), "--image-folder", world,
            "--out", t + "/", "--global-batch", "8", "--max-steps", "1", "--quiet"]
    with pytest.raises(SystemExit):
        train.main(argv)
    assert "--out" in capsys.readouterr().err and open(os.path.join(t, "model.safetensors"), "rb").read() == before
    argv = _args(world, t, "--max-steps", "1", "--overwrite")
    argv[argv.index("preset:student")] = t
    with pytest.raises(SystemExit):
        train.main(argv)
    assert "--init" in capsys.readouterr().err and open(os.path.join(t, "model.safetensors"), "rb").read() == before


def test_a_fresh_run_into_a_previous_runs_directory_is_refused_unless_overwrite(world, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    train.main(_args(world, out, "--max-steps", "1"))
    assert runs.is_finished(out)
    with pytest.raises(ValueError, match="holds a previous run.*--resume.*--overwrite"):
        train.main(_args(world, out, "--max-steps", "1"))
    assert runs.is_finished(out)  # untouched
    monkeypatch.setattr(train, "lm_and_kd_loss", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("died")))
    with pytest.raises(RuntimeError, match="died"):  # --overwrite clears the old run first; this one dies
        train.main(_args(world, out, "--max-steps", "1", "--overwrite"))
    monkeypatch.undo()
    left = set(os.listdir(out))
    assert not left & {"model.safetensors", "trainer_summary.json", "checkpoint"} and not runs.is_finished(out)
    train.main(_args(world, out, "--max-steps", "1", "--overwrite"))
    assert runs.is_finished(out)
    args = json.load(open(os.path.join(out, "args.json")))
    assert "overwrite" not in args and args["run_id"] == json.load(open(os.path.join(out, "trainer_summary.json")))["run_id"]
    with open(os.path.join(out, "args.json"), "w") as f:  # the summary of another run: not finished
        json.dump(dict(args, run_id="someone-else"), f)
    assert not runs.is_finished(out)


def test_a_second_run_on_a_locked_out_stops_and_sigterm_saves_a_checkpoint(world, tmp_path):
    """One training in a subprocess: a second one on its --out stops with a clear error (the lock);
    SIGTERM makes it finish the step, save a checkpoint and exit 143; --resume continues from it."""
    import signal
    import time
    out = str(tmp_path / "long")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *_args(world, out, "--max-steps", "2000")]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while time.time() - t0 < 120 and '"step"' not in (open(os.path.join(out, "log.jsonl")).read()
                                                          if os.path.exists(os.path.join(out, "log.jsonl")) else ""):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        for extra in (["--resume"], ["--overwrite"]):
            with pytest.raises(RuntimeError, match="another training.*holds the lock"):
                train.main(_args(world, out, "--max-steps", "3", *extra))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM" in err
    step = torch.load(os.path.join(out, "checkpoint", "trainer_state.pt"), weights_only=True)["step"]
    assert step == _log(out)[-1]["step"] >= 1
    train.main(_args(world, out, "--max-steps", str(step + 1), "--resume"))
    assert _log(out)[-1]["step"] == step + 1 and runs.is_finished(out)


def test_resume_with_nothing_usable_says_so_and_keeps_the_log(world, tmp_path):
    out = str(tmp_path / "r")
    with killed_after(2):
        train.main(_args(world, out, "--max-steps", "3"))  # no --save-every: no checkpoint
    log = open(os.path.join(out, "log.jsonl")).read()
    with pytest.raises(ValueError, match="nothing to resume.*no checkpoint"):
        train.main(_args(world, out, "--max-steps", "3", "--resume"))
    os.makedirs(os.path.join(out, "checkpoint"))  # a checkpoint without its trainer state
    with pytest.raises(ValueError, match=r"checkpoint.*trainer_state\.pt"):
        train.main(_args(world, out, "--max-steps", "3", "--resume"))
    os.rename(os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.tmp"))
    open(os.path.join(out, "checkpoint.tmp", "trainer_state.pt"), "wb").close()  # only an unfinished write
    with pytest.raises(ValueError, match=r"checkpoint\.tmp"):
        train.main(_args(world, out, "--max-steps", "3", "--resume"))
    assert open(os.path.join(out, "log.jsonl")).read() == log
    fresh = str(tmp_path / "fresh")  # --resume on an empty --out starts fresh (torchrun --max-restarts)
    train.main(_args(world, fresh, "--max-steps", "1", "--resume"))
    assert runs.is_finished(fresh)


def test_resume_with_other_hyperparameters_or_changed_data_is_refused(world, tmp_path):
    w = str(tmp_path / "w")
    shutil.copytree(world, w)
    out = str(tmp_path / "hp")
    with killed_after(1):
        train.main(_args(w, out, "--max-steps", "3", "--save-every", "1"))
    for flag, value in (("--lr", "1e-3"), ("--w-lm", "0.5"), ("--w-kl", "2"), ("--w-vat", "3"),
                        ("--kd-temperature", "2"), ("--max-len", "200")):
        with pytest.raises(ValueError, match=f"written by another run: .*{flag[2:].replace('-', '_')}"):
            train.main(_args(w, out, "--max-steps", "3", "--resume", flag, value))
    path = os.path.join(w, "instruct.json")
    original = open(path, "rb").read()
    samples = json.loads(original)
    a, b = samples[0]["conversations"][-1]["value"], samples[1]["conversations"][-1]["value"]
    samples[0]["conversations"][-1]["value"], samples[1]["conversations"][-1]["value"] = b, a
    changed = json.dumps(samples).encode()
    with open(path, "wb") as f:  # same path, other answers
        f.write(changed)
    with pytest.raises(ValueError, match="data_sha256"):
        train.main(_args(w, out, "--max-steps", "3", "--resume"))
    with open(path, "wb") as f:
        f.write(original)
    train.main(_args(w, out, "--max-steps", "3", "--resume"))


def test_a_nan_teacher_is_named_and_no_checkpoint_is_claimed(world, tmp_path):
    t = _teacher(world, str(tmp_path / "nan_teacher"), poison=True)
    out = str(tmp_path / "s1")
    with pytest.raises(FloatingPointError) as e:
        train.main(["--stage", "1", "--init", "preset:student", "--tokenizer", os.path.join(world, "tokenizer"),
                    "--teacher", t, "--data", os.path.join(world, "pretrain.json"), "--image-folder", world,
                    "--out", out, "--global-batch", "8", "--max-steps", "6", "--save-every", "1",
                    "--max-nonfinite", "2", "--quiet"])
    msg = str(e.value)
    assert "consecutive non-finite" in msg and "teacher" in msg and "--lr" not in msg
    assert "no checkpoint" in msg and not os.path.exists(os.path.join(out, "checkpoint"))


def test_corrupt_checkpoint_and_full_disk_say_so(world, tmp_path, monkeypatch):
    import errno
    out = str(tmp_path / "c")
    with killed_after(1):
        train.main(_args(world, out, "--max-steps", "3", "--save-every", "1"))
    ck = os.path.join(out, "checkpoint")
    shutil.copytree(ck, os.path.join(out, "checkpoint.old"))
    with open(os.path.join(ck, "trainer_state.pt"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(RuntimeError) as e:
        train.main(_args(world, out, "--max-steps", "3", "--resume"))
    msg = str(e.value)
    assert "corrupt" in msg and os.path.join(ck, "trainer_state.pt") in msg and "checkpoint.old" in msg
    assert "weights_only" not in msg
    full = str(tmp_path / "full")

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train.torch, "save", no_space)
    with pytest.raises(OSError, match=r"disk full \(ENOSPC\).*checkpoint\.tmp") as e:
        train.main(_args(world, full, "--max-steps", "3", "--save-every", "1"))
    assert e.value.errno == errno.ENOSPC


def test_truncated_model_files_and_a_missing_tokenizer_name_the_file(world, tmp_path):
    tok = data.load_tokenizer(os.path.join(world, "tokenizer"))
    d = str(tmp_path / "m")
    M.save_pretrained(M.from_preset("student", tok), d, tok)
    st = os.path.join(d, "model.safetensors")
    blob = open(st, "rb").read()
    open(st, "wb").write(blob[:len(blob) // 2])
    with pytest.raises(ValueError, match=re.escape(st)):
        M.load_pretrained(d)
    open(st, "wb").write(blob)
    cfg = os.path.join(d, "config.json")
    text = open(cfg).read()
    open(cfg, "w").write(text[:len(text) // 2])
    with pytest.raises(ValueError, match=re.escape(cfg)):
        M.load_pretrained(d)
    open(cfg, "w").write(text)
    for name in os.listdir(d):
        if name not in ("model.safetensors", "config.json"):
            os.remove(os.path.join(d, name))
    with pytest.raises(FileNotFoundError, match="no tokenizer files") as e:
        M.load_pretrained(d)
    assert "sentencepiece" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        data.load_tokenizer(d)


@pytest.mark.slow
def test_ddp_resume_is_exact_with_per_rank_dropout(world, tmp_path):
    """LoRA dropout draws different random numbers on each rank: every rank's RNG is saved and restored,
    so a 2-process run killed at step 3 and restarted by torchrun equals the uninterrupted 2-process run."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    lora = ["--trainable", "adapter+lora", "--lora-r", "4", "--lora-dropout", "0.3", "--device", "cpu",
            "--max-steps", "5", "--group-by-length"]
    logs = {}
    for name, extra, fault in (("ref", [], {}), ("cut", ["--save-every", "2", "--resume"],
                                                 {runs.FAULT_ENV: "die_at=3,rank=1"})):
        out = str(tmp_path / name)
        args = _args(world, out, *lora, *extra)
        args.remove("adapter+llm")
        args.remove("--trainable")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
               f"--master_port={_free_port()}", os.path.join(ROOT, "train.py"), *args]
        res = subprocess.run(cmd, env={**env, **fault}, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        logs[name] = {r["step"]: r for r in _log(out)}
    assert sorted(logs["cut"]) == [1, 2, 3, 4, 5]
    for s in (3, 4, 5):
        for k in ("lm", "grad_norm"):
            assert logs["cut"][s][k] == logs["ref"][s][k], (s, k, logs["cut"][s][k], logs["ref"][s][k])
