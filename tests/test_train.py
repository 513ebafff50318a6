"""train.py: the loop learns, resumes exactly, and 2 gloo processes match 1 process."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import losses
import shapes
import train
from conftest import killed_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    shapes.synthesize(str(out), seed=0, n_pretrain=96, n_instruct=192, n_images=96, n_sugarcrepe=4, n_vqa=8,
                    n_val_sugarcrepe=2, n_val_vqa=4, progress=False)
    return str(out)


def _args(world, out, *extra):
    return ["--stage", "llava", "--init", "preset:student", "--tokenizer", os.path.join(world, "tokenizer"),
            "--data", os.path.join(world, "instruct.json"), "--image-folder", world, "--out", out,
            "--trainable", "adapter+llm", "--global-batch", "8", "--micro-batch", "4", "--max-len", "256",
            "--lr", "3e-3", "--quiet", *extra]


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "step" in r]


def test_loss_falls(world, tmp_path):
    out = str(tmp_path / "run")
    train.main(_args(world, out, "--max-steps", "40"))
    lm = [r["lm"] for r in _log(out)]
    assert len(lm) == 40
    assert sum(lm[-5:]) / 5 < 0.6 * sum(lm[:3]) / 3, lm
    assert os.path.exists(os.path.join(out, "model.safetensors"))


def test_kill_and_resume_reproduces_the_uninterrupted_run(world, tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    train.main(_args(world, full, "--max-steps", "8", "--lora-dropout", "0.1"))
    # "killed" right after the step-4 checkpoint, then resumed in a fresh process state
    with killed_after(5):
        train.main(_args(world, cut, "--max-steps", "8", "--save-every", "4"))
    torch.manual_seed(12345)  # a resume must not depend on the RNG state it finds
    train.main(_args(world, cut, "--max-steps", "8", "--save-every", "4", "--resume"))
    a, b = _log(full), _log(cut)
    steps_b = [r["step"] for r in b]
    assert steps_b == [1, 2, 3, 4, 5, 6, 7, 8]  # step 5 ran before the kill and again after resume: logged once
    after = {r["step"]: r for r in b[4:]}
    for r in a[4:]:
        for k in ("lm", "grad_norm", "lr"):
            assert r[k] == after[r["step"]][k], (r["step"], k)  # bitwise on CPU


def test_dataloader_workers_change_no_loss_and_resume_exactly(world, tmp_path):
    """--num-workers 2 (items and collate in worker processes, prefetching ahead of the loop) gives bitwise the
    losses of --num-workers 0; killed after the step-4 checkpoint and resumed with workers, it equals the
    uninterrupted run (the checkpoint holds the position of the steps taken, not of what was prefetched)."""
    zero, two, cut = str(tmp_path / "zero"), str(tmp_path / "two"), str(tmp_path / "cut")
    train.main(_args(world, zero, "--max-steps", "8", "--num-workers", "0", "--group-by-length"))
    train.main(_args(world, two, "--max-steps", "8", "--num-workers", "2", "--group-by-length"))
    a, b = _log(zero), _log(two)
    assert [r["step"] for r in b] == list(range(1, 9))
    for r0, r2 in zip(a, b):
        for k in ("lm", "grad_norm", "lr"):
            assert r0[k] == r2[k], (r0["step"], k)  # bitwise on CPU
    w = ["--max-steps", "8", "--num-workers", "2", "--group-by-length", "--save-every", "4"]
    with killed_after(5):
        train.main(_args(world, cut, *w))
    torch.manual_seed(54321)
    train.main(_args(world, cut, *w, "--resume"))
    assert [r["step"] for r in _log(cut)] == list(range(1, 9))  # step 5 ran twice, is logged once
    after = {r["step"]: r for r in _log(cut)[4:]}
    assert sorted(after) == [5, 6, 7, 8]
    for r in a[4:]:
        for k in ("lm", "grad_norm", "lr"):
            assert r[k] == after[r["step"]][k], (r["step"], k)


def test_group_by_length_pads_less(world, tmp_path, monkeypatch):
    """--group-by-length reaches the sampler: the same steps see less right padding."""
    def padding(flag):
        seen = []
        collate = data.collate

        def spy(batch, pad_token_id):
            out = collate(batch, pad_token_id)
            seen.append((out["attention_mask"].numel(), int(out["attention_mask"].sum())))
            return out
        monkeypatch.setattr(data, "collate", spy)
        train.main(_args(world, str(tmp_path / f"run{len(flag)}"), "--max-steps", "6", *flag))
        monkeypatch.setattr(data, "collate", collate)
        return 1 - sum(r for _, r in seen) / sum(n for n, _ in seen)
    plain, grouped = padding([]), padding(["--group-by-length"])
    assert grouped < 0.5 * plain, (plain, grouped)


@pytest.mark.slow
def test_two_gloo_processes_match_one(world, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train.main(_args(world, one, "--max-steps", "4"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           os.path.join(ROOT, "train.py"), *_args(world, two, "--max-steps", "4", "--device", "cpu")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for r1, r2 in zip(_log(one), _log(two)):
        assert abs(r1["lm"] - r2["lm"]) <= 1e-5, (r1, r2)
        assert abs(r1["grad_norm"] - r2["grad_norm"]) <= 1e-5 * max(1, r1["grad_norm"])
    from safetensors.torch import load_file
    w1 = load_file(os.path.join(one, "model.safetensors"))
    w2 = load_file(os.path.join(two, "model.safetensors"))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-5


def test_in_loop_validation_matches_evaluate_and_leaves_training_alone(world, tmp_path):
    import evaluate as E
    plain, val = str(tmp_path / "plain"), str(tmp_path / "val")
    bench = os.path.join(world, "sugarcrepe")
    train.main(_args(world, plain, "--max-steps", "6", "--lora-dropout", "0.1"))
    train.main(_args(world, val, "--max-steps", "6", "--lora-dropout", "0.1", "--eval-sugarcrepe", bench,
                     "--eval-every", "3"))
    rows = [json.loads(line) for line in open(os.path.join(val, "log.jsonl"))]
    curve = [r for r in rows if "val_cr" in r]
    assert [r["step"] for r in curve] == [3, 6]
    # evaluating inside the loop changes nothing about training (RNG, train/eval mode)
    assert [r["lm"] for r in _log(plain) if "lm" in r] == [r["lm"] for r in rows if "lm" in r]
    # the last in-loop value is what evaluate.py measures on the saved model
    generate, _ = E.make_model_fns(val, batch_size=5, max_new_tokens=4)
    metrics, _ = E.eval_sugarcrepe(generate, E.read_sugarcrepe(bench))
    assert curve[-1]["val_cr"] == metrics["average"]


@pytest.mark.parametrize("head_trains", [False, True])
def test_the_chunked_loss_never_touches_the_teacher_in_the_backward(head_trains):
    """The teacher's logits need no gradient: lm_and_kd_loss computes them once per chunk in the forward pass
    and the backward pass reads neither the teacher's head nor its hidden states (before issue 38 each chunk's
    checkpoint recomputed them there). Every op of the backward is watched (a TorchDispatchMode) for an
    argument sharing the teacher's storage. The values and gradients still equal full logits in float64."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    torch.manual_seed(0)
    B, T, D, Dt, V = 2, 21, 8, 12, 50
    hs = torch.randn(B, T, D, requires_grad=True)
    ws = torch.randn(V, D).requires_grad_(head_trains)
    ht, wt = torch.randn(B, T, Dt), torch.randn(V + 3, Dt)
    labels = torch.randint(0, V, (B, T))
    labels[:, :3] = -100
    n = int((labels[:, 1:] != -100).sum())
    teacher = {ht.untyped_storage().data_ptr(), wt.untyped_storage().data_ptr()}

    class Watch(TorchDispatchMode):
        touched = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in teacher:
                    Watch.touched.append(str(func))
            return func(*args, **(kwargs or {}))

    lm, kd = losses.lm_and_kd_loss(hs, ws, labels, n, ht, wt, 1.3, chunk_size=5)
    with Watch():
        (0.7 * lm + 0.4 * kd).backward()
    assert Watch.touched == []
    hs64, ws64 = hs.detach().double().requires_grad_(), ws.detach().double().requires_grad_(head_trains)
    logits = hs64 @ ws64.t()
    keep = labels[:, 1:] != -100
    ref_lm = torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep], reduction="sum") / n
    ref_kd = losses.kd_loss_reference(logits, ht.double() @ wt.double().t(), labels, n, 1.3)
    (0.7 * ref_lm + 0.4 * ref_kd).backward()
    assert abs(lm.item() - ref_lm.item()) <= 1e-5 * ref_lm.item() and abs(kd.item() - ref_kd.item()) <= 1e-5 * ref_kd.item()
    torch.testing.assert_close(hs.grad.double(), hs64.grad, rtol=1e-4, atol=1e-6)
    if head_trains:
        torch.testing.assert_close(ws.grad.double(), ws64.grad, rtol=1e-4, atol=1e-6)
    else:
        assert ws.grad is None
