"""--fsdp (PyTorch FSDP2, fully_shard) against DDP: 2 gloo processes on the CPU, stage 2 with L_KL, VAT and
TAF, gradient accumulation over micro-batches; the same losses, gradient norms and saved model within 1e-5;
a checkpoint written by one resumes under the other and at another world size; an --fsdp checkpoint is
written shard by shard (torch.distributed.checkpoint), no rank gathering the whole state."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import runs
import train
from conftest import world_and_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    world, teacher = world_and_teacher(root, seed=2, n_pretrain=32, n_instruct=64, n_images=32, n_sugarcrepe=4,
                                       n_vqa=4, n_val_sugarcrepe=2, n_val_vqa=2)
    return world, teacher, root


def _args(world, teacher, out, *extra):
    # per rank 4 samples in 2 micro-batches: the gradient accumulation path (DDP no_sync / FSDP2's sync flag)
    return ["--stage", "2", "--init", "preset:student", "--tokenizer", os.path.join(world, "tokenizer"),
            "--teacher", teacher, "--data", os.path.join(world, "instruct.json"), "--image-folder", world,
            "--out", out, "--global-batch", "8", "--micro-batch", "2", "--max-len", "256", "--lora-r", "4",
            "--lora-alpha", "8", "--lora-dropout", "0", "--lr", "1e-3", "--device", "cpu", "--quiet", *extra]


def _torchrun(args, port, fault=None, nproc=2):
    """train.py under torchrun, `nproc` gloo processes; `fault`: runs.inject_fault's spec (stop_after=N: killed
    after step N)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           os.path.join(ROOT, "train.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", **({runs.FAULT_ENV: fault} if fault else {}))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _records(out):
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "step" in r]


def _same_run(a, b, tol=1e-5):
    ra, rb = _records(a), _records(b)
    assert [(r["step"], "val_cr" in r) for r in ra] == [(r["step"], "val_cr" in r) for r in rb]
    for x, y in zip(ra, rb):
        for k in ("lm", "kd", "vat", "grad_norm", "val_cr"):
            if k in x:
                assert abs(x[k] - y[k]) <= tol * max(1.0, abs(x[k])), (k, x, y)
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert set(wa) == set(wb)  # tied embeddings stored once in both
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) <= tol


def test_fsdp_outside_torchrun_is_refused_before_loading(setup, monkeypatch, capsys):
    world, teacher, root = setup
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        train.main(_args(world, teacher, str(root / "nope"), "--max-steps", "1", "--fsdp"))
    assert "--fsdp shards over the processes torchrun starts" in capsys.readouterr().err
    assert not os.path.exists(root / "nope")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Block(torch.nn.Module):  # one fully_shard unit
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.lin(x))


def _tiny(seed, shard):
    """A frozen input layer, two trainable blocks, a trainable head, AdamW + LambdaLR; sharded when `shard`."""
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), _Block(), _Block(), torch.nn.Linear(8, 3))
    model[0].requires_grad_(False)
    if shard:
        for block in (model[1], model[2]):
            fully_shard(block)
        fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))


def _train_step(model, opt, sched, seed):
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(6, 4, generator=g)).square().mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def test_fsdp_checkpoint_is_written_shard_by_shard_and_resumes_sharded_or_whole(tmp_path, monkeypatch):
    """--fsdp checkpoints go through torch.distributed.checkpoint: while saving no rank gathers a whole tensor
    (DTensor.full_tensor fails here; a 7B full-LLM student's weights + Adam moments were 84 GB per rank), the
    weights and moments are in sharded/, trainer_state.pt holds the rest. The checkpoint resumes an FSDP2 model
    to the same weights, moments and next step, a plain (DDP-like) model too, also with no process group, and
    reads whole in one process (evaluate.py RUN/checkpoint). A full disk says so and keeps the previous
    checkpoint; a truncated shard is "corrupt". One gloo process (FSDP2 needs a group)."""
    import argparse
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    import distributed
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    distributed.setup("cpu", fsdp=True)
    try:
        a, opt_a, sched_a = _tiny(0, shard=True)
        for s in range(2):
            _train_step(a, opt_a, sched_a, s)
        out = str(tmp_path / "run")
        os.makedirs(out)
        args = argparse.Namespace(out=out, fsdp=True)
        with monkeypatch.context() as m:
            m.setattr(DTensor, "full_tensor", lambda self, *x, **y: (_ for _ in ()).throw(AssertionError("gathered")))
            runs.checkpoint_all_ranks(args, a, opt_a, sched_a, 2, 10, {"stage": "t"}, ddp=True, master=True)
        ck = os.path.join(out, "checkpoint")
        assert sorted(os.listdir(ck)) == ["sharded", "trainer_state.pt"]
        assert sorted(os.listdir(os.path.join(ck, "sharded"))) == [".metadata", "__0_0.distcp"]
        state = torch.load(os.path.join(ck, "trainer_state.pt"), weights_only=True)
        assert "optimizer" not in state and state["step"] == 2 and state["sampler"] == {"epoch": 0, "step": 2}
        trained = {k: _local(p).detach().clone() for k, p in a.named_parameters()}
        moments = {k: {n: _local(v).clone() for n, v in opt_a.state[p].items()}
                   for k, p in a.named_parameters() if p.requires_grad}
        assert set(moments) == {"1.lin.weight", "1.lin.bias", "2.lin.weight", "2.lin.bias", "3.weight", "3.bias"}
        for shard in (True, False):  # an FSDP2 run resumes it, and a DDP / 1-process one
            b, opt_b, sched_b = _tiny(1, shard=shard)
            with torch.no_grad():  # the frozen layer is not in the checkpoint: the run's init gives it
                _local(b[0].weight).copy_(_local(a[0].weight))
                _local(b[0].bias).copy_(_local(a[0].bias))
            runs.load_checkpoint(ck, b, opt_b, sched_b, {"stage": "t"})
            assert sched_b.last_epoch == 2
            for k, p in b.named_parameters():
                assert torch.equal(_local(p), trained[k]), k
            for k, p in b.named_parameters():
                if p.requires_grad:
                    for n, v in opt_b.state[p].items():
                        assert torch.equal(_local(v), moments[k][n]), (k, n)
            _train_step(b, opt_b, sched_b, 7)
            if shard:
                _train_step(a, opt_a, sched_a, 7)
            assert all(torch.equal(_local(p), _local(q)) for p, q in zip(a.parameters(), b.parameters()))
        intact = shutil.copytree(ck, str(tmp_path / "intact"))
        import errno
        import torch.distributed.checkpoint.filesystem as dcp_fs
        with monkeypatch.context() as m:  # a full disk under one rank's write: the previous checkpoint stays
            m.setattr(dcp_fs, "_write_item", lambda *x, **y: (_ for _ in ()).throw(
                OSError(errno.ENOSPC, "No space left on device")))
            with pytest.raises(OSError, match=r"disk full \(ENOSPC\).*checkpoint\.tmp") as e:
                runs.checkpoint_all_ranks(args, a, opt_a, sched_a, 3, 10, {"stage": "t"}, ddp=True, master=True)
        assert e.value.errno == errno.ENOSPC and not os.path.exists(os.path.join(out, "checkpoint.tmp"))
        assert torch.load(os.path.join(ck, "trainer_state.pt"), weights_only=True)["step"] == 2
        with open(os.path.join(ck, "sharded", "__0_0.distcp"), "r+b") as f:
            f.truncate(100)
        b, opt_b, sched_b = _tiny(1, shard=True)
        with pytest.raises(RuntimeError, match="corrupt"):
            runs.load_checkpoint(ck, b, opt_b, sched_b, {"stage": "t"})
    finally:
        dist.destroy_process_group()
    # no process group at all: plain `python train.py --resume`, and evaluate.py reading RUN/checkpoint
    whole = runs.checkpoint_weights(intact)
    assert set(whole) == set(moments) and all(torch.equal(whole[k], trained[k]) for k in whole)
    b, opt_b, sched_b = _tiny(1, shard=False)
    runs.load_checkpoint(intact, b, opt_b, sched_b, {"stage": "t"})
    assert all(torch.equal(p, trained[k]) for k, p in b.named_parameters() if p.requires_grad)
    assert all(torch.equal(v, moments[k][n]) for k, p in b.named_parameters() if p.requires_grad
               for n, v in opt_b.state[p].items())


def _moment_bytes_per_file(checkpoint):
    """{shard file: bytes of AdamW moments it holds} of an --fsdp checkpoint's sharded/ (read from DCP's
    metadata, which records where each saved piece lies)."""
    import torch.distributed.checkpoint as dcp
    md = dcp.FileSystemReader(os.path.join(checkpoint, "sharded")).read_metadata()
    out = {}
    for index, info in md.storage_data.items():
        if index.fqn.startswith("optim.state.") and index.fqn.endswith(("exp_avg", "exp_avg_sq")):
            out[info.relative_path] = out.get(info.relative_path, 0) + info.length
    return out


def _killed_at_its_checkpoint(run, copy):
    """A copy of a finished run as a kill right after its step-2 checkpoint leaves it: the checkpoint, the
    log, no model and no summary (runs that save every 2 of 4 steps keep the step-2 checkpoint)."""
    shutil.copytree(run, copy)
    for name in ("model.safetensors", "trainer_summary.json"):
        os.remove(os.path.join(copy, name))
    return copy


@pytest.mark.slow
def test_fsdp_equals_ddp_training_the_whole_llm(setup):
    """--full-llm: the LM head trains, and the chunked loss reads its weight after the forward (the root
    unit's gathered weight); the preset's embeddings are tied. --vat-layers auto: its no-grad measuring
    forwards before step 1 leave the root unit gathered (AdamW must still get the shards).
    Checkpoints across kinds of run and world sizes: the DDP run's step-2 checkpoint (whole tensors) resumed
    under --fsdp, and the --fsdp run's (the shards of 2 ranks) resumed by --fsdp on 1 process, both equal the
    uninterrupted DDP run."""
    world, teacher, root = setup
    ddp, fsdp = str(root / "full_ddp"), str(root / "full_fsdp")
    args = ["--max-steps", "4", "--save-every", "2", "--full-llm", "--vat-layers", "auto", "--vat-auto-samples", "8"]
    _torchrun(_args(world, teacher, ddp, *args), 29641)
    _torchrun(_args(world, teacher, fsdp, *args, "--fsdp"), 29642)
    _same_run(ddp, fsdp)
    assert all(r["vat"] > 0 and r["kd"] > 0 for r in _records(fsdp) if "lm" in r)
    assert set(_moment_bytes_per_file(os.path.join(fsdp, "checkpoint"))) == {"__0_0.distcp", "__1_0.distcp"}
    ddp_cut = _killed_at_its_checkpoint(ddp, str(root / "full_ddp_cut"))
    _torchrun(_args(world, teacher, ddp_cut, *args, "--fsdp", "--resume"), 29647)
    _same_run(ddp, ddp_cut)
    fsdp_cut = _killed_at_its_checkpoint(fsdp, str(root / "full_fsdp_cut"))
    _torchrun(_args(world, teacher, fsdp_cut, *args, "--fsdp", "--resume"), 29648, nproc=1)
    _same_run(ddp, fsdp_cut)


@pytest.mark.slow
def test_fsdp_lora_resume_and_validation_equal_ddp_and_checkpoints_cross_over(setup):
    """LoRA (the stage's default) with in-loop validation and TAF: an FSDP2 run (its teacher sharded while it
    loads) stopped after step 2 and resumed equals the uninterrupted DDP run (its validation split over the
    ranks); so does its checkpoint resumed by DDP. The checkpoint is each rank's shards: both ranks wrote a file,
    each with about half of the Adam moments, and trainer_state.pt holds none; read whole in one process
    (evaluate.py RUN/checkpoint), it gives the DDP run's step-2 model (LoRA merged)."""
    world, teacher, root = setup
    common = ["--max-steps", "4", "--save-every", "2", "--eval-sugarcrepe", os.path.join(world, "val", "sugarcrepe"),
              "--eval-every", "2", "--taf"]  # TAF: under --fsdp its checks read the teacher's encoder whole
    ddp, fsdp, cross = str(root / "lora_ddp"), str(root / "lora_fsdp"), str(root / "lora_cross")
    _torchrun(_args(world, teacher, ddp, *common), 29643)
    _torchrun(_args(world, teacher, fsdp, *common, "--fsdp"), 29644, fault="stop_after=2")
    state = torch.load(os.path.join(fsdp, "checkpoint", "trainer_state.pt"), weights_only=True)
    assert state["step"] == 2 and "optimizer" not in state
    moments = _moment_bytes_per_file(os.path.join(fsdp, "checkpoint"))
    assert set(moments) == {"__0_0.distcp", "__1_0.distcp"}
    assert all(0.4 <= b / sum(moments.values()) <= 0.6 for b in moments.values()), moments
    shutil.copytree(fsdp, cross)
    _torchrun(_args(world, teacher, fsdp, *common, "--fsdp", "--resume"), 29645)
    _torchrun(_args(world, teacher, cross, *common, "--resume"), 29646)
    _same_run(ddp, fsdp)
    _same_run(ddp, cross)
    import model as M  # both checkpoints are step 2's (no checkpoint at the last step)
    a = M.load_any(os.path.join(fsdp, "checkpoint"))[0].state_dict()
    b = M.load_any(os.path.join(ddp, "checkpoint"))[0].state_dict()
    assert set(a) == set(b) and max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-5


def _all_gather_worker(rank, tokenizer_dir, port, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import data
    import distributed
    import model as M
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tok = data.load_tokenizer(tokenizer_dir)
    mesh = init_device_mesh("cpu", (2,))
    seen, real = [], dist.all_gather_single  # what FSDP2 (torch 2.13) all-gathers the parameters with
    dist.all_gather_single = lambda o, i, *a, **k: (seen.append((str(i.dtype), i.numel() * i.element_size())),
                                                    real(o, i, *a, **k))[1]
    result = {}
    for name, policy in (("none", None), ("cuda", distributed.mixed_precision(torch.device("cuda")))):
        m = distributed.fsdp_shard(M.from_preset("student", tok), mesh, policy)
        seen.clear()
        ids = torch.randint(0, 100, (1, 8))
        m(ids, torch.ones_like(ids))["logits"].float().sum().backward()
        result[name] = {"dtypes": sorted({d for d, _ in seen}), "bytes": sum(b for _, b in seen),
                        "master": sorted({str(p.dtype) for p in m.parameters()}),
                        "grads": sorted({str(p.grad.dtype) for p in m.parameters() if p.grad is not None})}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_cuda_policy_all_gathers_bf16_half_the_bytes(tokenizer_dir, tmp_path):
    """distributed.mixed_precision: on CUDA, FSDP2 gathers the fp32 master weights in bf16 (half the bytes of
    the fp32 all-gather) while the shards, and the gradients they receive, stay fp32; on the CPU no policy (the
    DDP-vs-FSDP equality above is fp32). Shown with gloo on 2 CPU processes and the CUDA policy applied."""
    import torch.multiprocessing as mp
    assert train.mixed_precision(torch.device("cpu")) is None
    mp.spawn(_all_gather_worker, args=(tokenizer_dir, 29651, str(tmp_path / "r.json")), nprocs=2)
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["none"]["dtypes"] == ["torch.float32"] and r["cuda"]["dtypes"] == ["torch.bfloat16"]
    assert r["cuda"]["bytes"] * 2 == r["none"]["bytes"] > 0
    assert r["cuda"]["master"] == r["cuda"]["grads"] == ["torch.float32"]


def _sharded_load_worker(rank, big, tiny, port, out):
    import ctypes
    import gc

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import distributed
    import model as M
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    shard = lambda m: distributed.fsdp_shard(m, mesh)  # noqa: E731
    M.load_pretrained(tiny, dtype=torch.bfloat16, prepare=shard)  # every import done
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    kib = lambda key: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024  # noqa
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    before = kib("VmRSS:")
    m = M.load_pretrained(big, dtype=torch.bfloat16, prepare=shard)[0]
    peak = kib("VmHWM:") - before
    weights = sum(p.numel() * p.element_size() for p in m.parameters())  # global sizes (DTensor)
    local = sum(p.to_local().numel() * p.element_size() for p in m.parameters())
    ids = torch.arange(5, 37).view(2, 16)
    with torch.no_grad():
        logits = m(ids, torch.ones_like(ids))["logits"]
    tied = m.language_model.lm_head.weight is m.language_model.model.embed_tokens.weight
    if rank == 0:
        ref = M.load_pretrained(big, dtype=torch.bfloat16)[0]
        with torch.no_grad():
            same = torch.equal(ref(ids, torch.ones_like(ids))["logits"], logits)
        with open(out, "w") as f:
            json.dump({"peak": peak, "weights": weights, "local": local, "same": same, "tied": tied}, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_sharded_load_reads_only_the_ranks_shards(tokenizer, tmp_path):
    """model.load_pretrained(prepare=fsdp_shard), train.py's teacher under --fsdp: built on the meta device,
    sharded, then filled shard by shard. On each of 2 gloo ranks the load's peak host memory is about its half
    of a 134 MB bf16 model plus one tensor (8 MB), not the whole model; the sharded model computes the logits
    of the whole one, bit for bit, with its embedding and head still tied. (Before, every rank read the whole
    teacher, in fp32, beside a random model.)"""
    import torch.multiprocessing as mp

    import model as M
    big, tiny = str(tmp_path / "big"), str(tmp_path / "tiny")
    torch.manual_seed(0)
    m = M.from_preset("student", tokenizer, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=16)
    M.save_pretrained(m.to(torch.bfloat16), big, tokenizer)
    del m
    M.save_pretrained(M.from_preset("student", tokenizer).to(torch.bfloat16), tiny, tokenizer)
    mp.spawn(_sharded_load_worker, args=(big, tiny, 29671, str(tmp_path / "r.json")), nprocs=2)
    r = json.loads((tmp_path / "r.json").read_text())
    print(f"sharded load on rank 0: peak {r['peak'] / 2**20:.0f} MiB, shard {r['local'] / 2**20:.0f} MiB, "
          f"whole model {r['weights'] / 2**20:.0f} MiB")
    assert r["same"] and r["tied"]
    assert abs(r["local"] - r["weights"] / 2) <= 0.01 * r["weights"]
    assert r["peak"] <= r["local"] + 0.2 * r["weights"], r  # its shard + one 8 MB tensor + slack, not 1.0x
