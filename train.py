"""Training: the standard LLaVA recipe and CompoDistill's three stages in ONE visible loop.

Stages (docs/method.md section 5; `--stage`):
  llava  the standard recipe without a teacher: adapter pre-training (`--trainable adapter`), then
         fine-tuning (`--trainable adapter+lora` or `adapter+llm`). On the teacher preset it trains the
         teacher; on the student preset it is the paper's SFT baseline.
  1      DPT, distilled pre-training: L_LM + L_KL; trains the TAF linear only (taf.py).
  2      DFT, distilled fine-tuning: L_LM + L_KL + L_ADL (vat.py); trains the TAF linear + LoRA (or the LLM).
  3      SFT: L_LM only; stage 2's LoRA is merged, a fresh LoRA + the TAF linear train; no teacher.
  all    1 -> 2 -> 3, each reading the previous stage's output directory.

Losses (weights `--w-lm --w-kl --w-vat`, default 1 each):
  L_LM  next-token cross-entropy on assistant tokens (`logits[:, :-1]` vs `labels[:, 1:]`).
  L_KL  forward KL(p_teacher || p_student) on the same shifted positions, fp32, temperature T
        (docs/method.md section 4), computed chunk by chunk from the final hidden states so that neither
        model's full (B, T, V) logits ever exist (`kd_loss`). `--kd-divergence reverse|jsd` swaps in reverse KL
        or GKD's generalized JSD (`--kd-jsd-beta`) on the same path (`divergence_rows`).
  L_ADL visual attention alignment, Eq. 3 (vat.py).
Both token losses are normalised by the supervised-token count of the whole GLOBAL batch (all ranks,
all micro-batches), so 1 process and N processes with the same global batch take the same step.
Under torchrun the student is wrapped in DDP; `--fsdp` shards the student and the teacher with PyTorch
FSDP2 instead (section "--fsdp" below), the same step within float rounding.

Run directory `--out` (one per stage): model.safetensors + config.json + tokenizer (the stage's output,
LoRA merged), `checkpoint/` (trainable weights, optimizer, scheduler, step, data position, RNG; written
atomically), `log.jsonl` (one JSON line per logged step, each loss separately), `args.json`.

  python train.py --stage llava --init preset:teacher --data D/instruct.json --image-folder D/images --out runs/t
  torchrun --nproc_per_node=8 train.py --stage 2 --init runs/x/stage1 --teacher runs/t ...
  torchrun --nproc_per_node=8 train.py --stage 2 --fsdp ...     # teachers of 7B+ next to a 2B+ student
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import errno
import functools
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
import uuid

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import model as M
import vat


# -----------------------------------------------------------------------------
# Losses: L_LM and the chunked L_KL (docs/method.md section 4)

def _shifted(hidden: torch.Tensor, labels: torch.Tensor):
    """Positions t whose next token t+1 is supervised: hidden[:, :-1] predicts labels[:, 1:].
    Returns (rows (N, D), targets (N,), row index tuple)."""
    target = labels[:, 1:]
    keep = target != -100
    return hidden[:, :-1][keep], target[keep], keep


KD_DIVERGENCES = ("forward", "reverse", "jsd")


def divergence_rows(logits_s, logits_t, temperature: float, divergence: str = "forward", beta: float = 0.5):
    """Sum over rows of the token-level divergence between teacher and student, fp32 in, p = softmax(z / T).

    forward  KL(p_t || p_s) * T^2: the paper's L_KL (docs/method.md section 4; Hinton's T^2 scaling).
    reverse  KL(p_s || p_t) * T^2: the mode-seeking direction, same scaling.
    jsd      the generalized Jensen-Shannon divergence of GKD (Agarwal et al., arXiv 2306.13649, Eq. 1), exactly
             as TRL's `GKDTrainer.generalized_jsd_loss` (huggingface/trl, trl/experimental/gkd/gkd_trainer.py):
             logits divided by T and NO T^2 factor; the mixture m = beta * p_t + (1 - beta) * p_s (beta weights
             the TEACHER), JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m); at the end points TRL's
             special cases: beta = 0 is KL(p_t || p_s), beta = 1 is KL(p_s || p_t) (both without T^2)."""
    logp_s = F.log_softmax(logits_s / temperature, dim=-1)
    logp_t = F.log_softmax(logits_t / temperature, dim=-1)
    if divergence == "forward":
        return (logp_t.exp() * (logp_t - logp_s)).sum() * temperature ** 2
    if divergence == "reverse":
        return (logp_s.exp() * (logp_s - logp_t)).sum() * temperature ** 2
    if divergence != "jsd":
        raise ValueError(f"divergence must be one of {KD_DIVERGENCES}, got {divergence!r}")
    if beta == 0:
        return (logp_t.exp() * (logp_t - logp_s)).sum()
    if beta == 1:
        return (logp_s.exp() * (logp_s - logp_t)).sum()
    b = torch.tensor(beta, dtype=logp_s.dtype, device=logp_s.device)
    log_m = torch.logsumexp(torch.stack([logp_s + torch.log1p(-b), logp_t + torch.log(b)]), dim=0)
    return beta * (logp_t.exp() * (logp_t - log_m)).sum() + (1 - beta) * (logp_s.exp() * (logp_s - log_m)).sum()


def _chunk_losses(h_s, w_s, targets, h_t, w_t, temperature: float, divergence: str = "forward", beta: float = 0.5):
    """Sum over the rows of one chunk: (cross-entropy, divergence). fp32 throughout (docs/method.md section 4)."""
    with torch.autocast(h_s.device.type, enabled=False):  # bf16 autocast would recast these matmuls
        logits_s = h_s.float() @ w_s.float().t()
        logits_t = None if h_t is None else h_t.float() @ w_t.float().t()
    ce = F.cross_entropy(logits_s, targets, reduction="sum")
    if h_t is None:
        return ce, ce.new_zeros(())
    logits_t = logits_t[:, :logits_s.shape[-1]]  # tokenizers checked equal: cut padded vocab rows
    return ce, divergence_rows(logits_s, logits_t, temperature, divergence, beta)


def lm_and_kd_loss(student_hidden, student_head_weight, labels, num_tokens, teacher_hidden=None,
                   teacher_head_weight=None, temperature: float = 1.0, chunk_size: int = 512,
                   divergence: str = "forward", beta: float = 0.5):
    """L_LM and L_KL (docs/method.md section 4) from the final hidden states, chunk by chunk.

    L_LM = -(1/N) sum_t log p_s(y_{t+1} | y_<=t)
    L_KL = (T^2/N) sum_t sum_v p_t(v) (log p_t(v) - log p_s(v)),  p = softmax(logits / T)
    over the supervised shifted positions t (labels[:, 1:] != -100), N = `num_tokens`, the count over
    the whole global batch. `divergence` "reverse" / "jsd" (with `beta`) replace the forward KL by another
    divergence on the same chunked path (`divergence_rows`: reverse KL, TRL's generalized JSD). Each chunk's logits are rebuilt from the hidden states inside a
    checkpoint, so only (chunk, V) logits exist at a time, forward or backward.
    Returns (lm_loss, kd_loss) as 0-dim tensors (kd is 0 without a teacher)."""
    if divergence not in KD_DIVERGENCES:
        raise ValueError(f"divergence must be one of {KD_DIVERGENCES}, got {divergence!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"the JSD beta must be in [0, 1], got {beta}")
    h_s, targets, keep = _shifted(student_hidden, labels)
    h_t = None if teacher_hidden is None else teacher_hidden[:, :-1][keep]
    lm = student_hidden.new_zeros((), dtype=torch.float32)
    kd = student_hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h_s.shape[0], chunk_size):
        hs = h_s[i:i + chunk_size]
        ht = None if h_t is None else h_t[i:i + chunk_size]
        if torch.is_grad_enabled() and hs.requires_grad:
            ce, kl = torch.utils.checkpoint.checkpoint(_chunk_losses, hs, student_head_weight, targets[i:i + chunk_size],
                                                       ht, teacher_head_weight, temperature, divergence, beta,
                                                       use_reentrant=False)
        else:
            ce, kl = _chunk_losses(hs, student_head_weight, targets[i:i + chunk_size], ht, teacher_head_weight,
                                   temperature, divergence, beta)
        lm = lm + ce
        kd = kd + kl
    return lm / num_tokens, kd / num_tokens


def kd_loss(student_hidden, teacher_hidden, student_head_weight, teacher_head_weight, labels, num_tokens,
            temperature: float = 1.0, chunk_size: int = 512, divergence: str = "forward", beta: float = 0.5):
    """L_KL alone (docs/method.md section 4), chunked; see lm_and_kd_loss (`divergence`, `beta` there)."""
    return lm_and_kd_loss(student_hidden, student_head_weight, labels, num_tokens, teacher_hidden,
                          teacher_head_weight, temperature, chunk_size, divergence, beta)[1]


def kd_loss_reference(student_logits, teacher_logits, labels, num_tokens, temperature: float = 1.0):
    """Unchunked L_KL from full logits (the straightforward way; for tests and the benchmark)."""
    keep = labels[:, 1:] != -100
    V = student_logits.shape[-1]
    s = student_logits[:, :-1][keep].float() / temperature
    t = teacher_logits[:, :-1][keep][:, :V].float() / temperature
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") \
        * temperature ** 2 / num_tokens


def _uld_chunk(h_s, w_s, h_t, w_t, temperature: float):
    """Sum over the rows of one chunk of sum_i |sort(p_s)_i - sort(p_t)_i|, the shorter vector padded with
    zeros; fp32 (see uld_loss)."""
    with torch.autocast(h_s.device.type, enabled=False):
        p_s = F.softmax((h_s.float() @ w_s.float().t()) / temperature, dim=-1)
        with torch.no_grad():
            p_t = F.softmax((h_t.float() @ w_t.float().t()) / temperature, dim=-1)
    p_s = p_s.sort(dim=-1, descending=True).values
    p_t = p_t.sort(dim=-1, descending=True).values
    pad = p_s.shape[-1] - p_t.shape[-1]
    p_s, p_t = (p_s, F.pad(p_t, (0, pad))) if pad > 0 else (F.pad(p_s, (0, -pad)), p_t)
    return (p_s - p_t).abs().sum()


def uld_loss(student_rows, teacher_rows, student_head_weight, teacher_head_weight, num_pairs,
             temperature: float = 1.0, chunk_size: int = 512):
    """L_KL across vocabularies: Universal Logit Distillation (Boizard et al., "Towards Cross-Tokenizer
    Distillation: the Universal Logit Distillation Loss for LLMs", arXiv 2402.12030): per aligned position,
    the Wasserstein-1 distance between the student's and the teacher's next-token distributions under a
    cost that ignores token identity, which in closed form is sum_i |p_s^(i) - p_t^(i)| over the two
    probability vectors sorted in decreasing order, the shorter padded with zeros:

        L_ULD = (1/P) sum_pairs sum_i |sort(p_s)_i - sort(p_t)_i|,   p = softmax(logits / T)

    over the P aligned (student, teacher) positions of the global batch (`num_pairs`). student_rows /
    teacher_rows (P, D_s) / (P, D_t): the final hidden states that PREDICT the paired tokens. Chunked and
    checkpointed like lm_and_kd_loss (only (chunk, V) logits at a time); the teacher side has no gradient.
    What it preserves: the shape of the teacher's distribution (how sure, how the mass falls off over
    the top candidates); what it does not: which token gets the mass, for there is no map between the
    vocabularies; the answer itself comes from L_LM. The authors' code (and TRL's GOLD trainer) pairs the
    i-th answer tokens of the two sequences; here positions are paired by text (data.aligned_pairs).
    Unlike L_KL there is no T^2 factor (the authors use none)."""
    total = student_rows.new_zeros((), dtype=torch.float32)
    for i in range(0, student_rows.shape[0], chunk_size):
        hs, ht = student_rows[i:i + chunk_size], teacher_rows[i:i + chunk_size]
        if torch.is_grad_enabled() and hs.requires_grad:
            total = total + torch.utils.checkpoint.checkpoint(_uld_chunk, hs, student_head_weight, ht,
                                                              teacher_head_weight, temperature, use_reentrant=False)
        else:
            total = total + _uld_chunk(hs, student_head_weight, ht, teacher_head_weight, temperature)
    return total / num_pairs


def pair_rows(student_hidden, teacher_hidden, pairs):
    """The hidden states predicting each aligned pair's tokens: pairs (P, 3) = (sample, student position,
    teacher position) of supervised tokens (data.collate_cross_vocab), so rows at positions - 1."""
    b, i, j = pairs.to(student_hidden.device).unbind(1)
    return student_hidden[b, i - 1], teacher_hidden[b, j - 1]


# -----------------------------------------------------------------------------
# Checks before training

def check_tokenizers_agree(student_tok, teacher_tok):
    """Logit KD compares distributions token by token: the two vocabularies must be the same map.
    Raises with what differs (vocab entries, special tokens, chat template)."""
    problems = []
    vs, vt = student_tok.get_vocab(), teacher_tok.get_vocab()
    if vs != vt:
        only_s = sorted(set(vs) - set(vt))[:5]
        only_t = sorted(set(vt) - set(vs))[:5]
        moved = sorted(k for k in set(vs) & set(vt) if vs[k] != vt[k])[:5]
        problems.append(f"vocabularies differ (sizes {len(vs)} vs {len(vt)}; only in student {only_s}, only in "
                        f"teacher {only_t}, different ids {moved})")
    for name in ("eos_token", "pad_token", "bos_token", "unk_token"):
        if getattr(student_tok, name) != getattr(teacher_tok, name):
            problems.append(f"{name}: student {getattr(student_tok, name)!r} vs teacher {getattr(teacher_tok, name)!r}")
    if set(student_tok.all_special_tokens) != set(teacher_tok.all_special_tokens):
        problems.append(f"special tokens differ: {sorted(set(student_tok.all_special_tokens) ^ set(teacher_tok.all_special_tokens))}")
    if student_tok.chat_template != teacher_tok.chat_template:
        problems.append("chat templates differ")
    if problems:
        raise ValueError("teacher and student tokenizers disagree, so logit KD (L_KL) would compare different "
                         "tokens:\n  - " + "\n  - ".join(problems))


def trainable_state(model: torch.nn.Module) -> dict:
    """The trainable weights, whole, on the CPU. Under --fsdp each is gathered from its shards (a collective:
    every rank calls this, in the same order)."""
    return {k: full_tensor(p.detach()).cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


# -----------------------------------------------------------------------------
# Logging: log.jsonl is the record; Weights & Biases / TensorBoard receive the same records (`--report-to`)

SINK_PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("torch.utils.tensorboard", "tensorboard")}


def parse_report_to(value: str | None) -> list:
    """`--report-to none|wandb|tensorboard` (comma-separated) -> the sink names, [] for none. Each sink's package
    is imported here, so a missing one is an error naming it before any model loads; none is a dependency."""
    import importlib
    names = [n.strip() for n in (value or "none").split(",") if n.strip()]
    unknown = [n for n in names if n != "none" and n not in SINK_PACKAGES]
    if unknown or ("none" in names and len(names) > 1):
        raise ValueError(f"--report-to takes none, or one or more of {', '.join(SINK_PACKAGES)} separated by commas; "
                         f"got {value!r}")
    names = [n for n in names if n != "none"]
    for n in names:
        module, package = SINK_PACKAGES[n]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"--report-to {n} needs the '{package}' package, which is not installed "
                              f"(pip install {package}); log.jsonl is written without it ({e})") from None
    return names


def open_sinks(names: list, out: str, run_name: str | None, config: dict, resume: bool) -> list:
    """The sinks as (log(step, numbers), close) pairs, rank 0 only. wandb: project $WANDB_PROJECT (default
    compodistill), files under `out`, the run id kept in `out`/wandb_id so that a --resume continues the same
    run; TensorBoard: event files in `out`/tensorboard[/run_name]. Closed by close_sinks, or at exit."""
    import atexit
    sinks = []
    for n in names:
        if n == "wandb":
            import uuid
            import wandb
            id_path = os.path.join(out, "wandb_id")
            run_id = open(id_path, encoding="utf-8").read().strip() if resume and os.path.exists(id_path) else uuid.uuid4().hex[:16]
            with open(id_path, "w", encoding="utf-8") as f:
                f.write(run_id)
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "compodistill"), name=run_name, id=run_id,
                             resume="allow", dir=out, config=config)
            sinks.append((lambda step, nums, run=run: run.log(nums, step=step), run.finish))
        else:
            from torch.utils.tensorboard import SummaryWriter
            w = SummaryWriter(log_dir=os.path.join(out, "tensorboard", *([run_name] if run_name else [])))

            def log_tb(step, nums, w=w):
                for k, v in nums.items():
                    w.add_scalar(k, v, global_step=step)
                w.flush()
            sinks.append((log_tb, w.close))
    for _, close in sinks:
        atexit.register(close)  # a run that stops on an error still flushes what it logged
    return sinks


def sink_numbers(rec: dict) -> tuple:
    """(x, numbers) of one log.jsonl record for a sink: x = its "step" ("from_step" for the start line); numbers
    = every numeric field but "step", nested dicts flattened as "outer/inner"; strings are left out."""
    nums = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}/", v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and f"{prefix}{k}" != "step":
                nums[f"{prefix}{k}"] = v
    walk("", rec)
    return int(rec.get("step", rec.get("from_step", 0))), nums


def write_record(log_path: str, rec: dict, sinks=()):
    """Append one record to log.jsonl (the source of truth), then hand the same record to every sink."""
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    x, nums = sink_numbers(rec)
    for log, _ in sinks:
        log(x, nums)


def close_sinks(sinks):
    import atexit
    for _, close in sinks:
        close()
        atexit.unregister(close)


# -----------------------------------------------------------------------------
# Checkpoints: atomic directory swap, exact resume

def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """This process's RNG state (torch CPU, CUDA, python random), as a checkpoint stores it."""
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(rng: dict):
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _disk_full(e: BaseException) -> bool:
    """ENOSPC however it arrives: an OSError, or safetensors' error text ("os error 28")."""
    return getattr(e, "errno", None) == errno.ENOSPC or "os error 28" in str(e) or "No space left" in str(e)


def save_checkpoint(out_dir: str, weights: dict, optimizer_state: dict, scheduler, step: int, sampler_state: dict,
                    meta: dict, rng_per_rank: list | None = None):
    """checkpoint/ = trainable weights (safetensors; `weights`, trainable_state) + trainer_state.pt (optimizer
    (`optimizer_state`, optimizer_state), scheduler, step, data position, RNG of every rank: `rng_per_rank`,
    gathered by checkpoint_all_ranks). Whole tensors, whether the run was DDP or --fsdp. Written to
    checkpoint.tmp/, fsynced, then swapped in by renames, so a crash at any moment leaves either the old
    or the new checkpoint loadable (load_checkpoint falls back to .old). A full disk is an OSError(ENOSPC)
    naming the path (the previous checkpoint stays)."""
    from safetensors.torch import save_file
    final, tmp, old = (os.path.join(out_dir, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    rng_per_rank = rng_per_rank or [rng_state()]
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(weights, os.path.join(tmp, "trainable.safetensors"))
        state = {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                 "sampler": sampler_state, "meta": meta, "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank}
        with open(os.path.join(tmp, "trainer_state.pt"), "wb") as f:  # a file object: ENOSPC stays an OSError
            torch.save(state, f)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
    except Exception as e:
        if not _disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(errno.ENOSPC, f"disk full (ENOSPC) while writing the checkpoint to {tmp}; the previous "
                      f"checkpoint ({final}) is left as it was. Free space there and --resume") from None
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out_dir: str) -> str | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old exists only if a crash hit the swap
        p = os.path.join(out_dir, name)
        if os.path.exists(os.path.join(p, "trainer_state.pt")):
            return p
    return None


# meta fields recorded since a later version: a checkpoint without them is not refused for their absence
LATER_META = ("lr", "w_lm", "w_kl", "w_vat", "kd_temperature", "max_len", "data_size", "data_sha256")


def _corrupt(path: str, name: str, e: Exception) -> RuntimeError:
    """The checkpoint file cannot be read: say so, name it and the fallback. (torch's own message advises
    weights_only=False, i.e. unpickling arbitrary code: never.)"""
    old = os.path.join(os.path.dirname(path), "checkpoint.old")
    hint = (f" {old} holds the previous checkpoint: move it to {os.path.join(os.path.dirname(path), 'checkpoint')} "
            f"to resume from there, or start again with --overwrite." if os.path.isdir(old) and path != old
            else " Start again with --overwrite (without --resume).")
    return RuntimeError(f"the checkpoint {os.path.join(path, name)} is corrupt or truncated and cannot be read "
                        f"({type(e).__name__}).{hint}")


def checkpoint_meta(path: str) -> dict:
    """The meta dict a checkpoint was written with (what the run decided before its first step)."""
    try:
        return torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True, map_location="cpu")["meta"]
    except Exception as e:  # noqa: BLE001 - any unreadable file: the same clear message as load_checkpoint
        raise _corrupt(path, "trainer_state.pt", e) from None


def load_checkpoint(path: str, model, optimizer, scheduler, meta: dict, rank: int = 0) -> dict:
    """Restore trainable weights, optimizer, scheduler and this rank's RNG; returns the trainer state.
    Refuses a checkpoint written for another model/stage/run setting (names the mismatching fields or
    keys); a corrupt file is an error naming it."""
    from safetensors.torch import load_file
    try:
        state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, ...
        raise _corrupt(path, "trainer_state.pt", e) from None
    diff = {k: (state["meta"].get(k), meta.get(k)) for k in {**state["meta"], **meta}
            if state["meta"].get(k) != meta.get(k) and not (k in LATER_META and k not in state["meta"])}
    if diff:
        raise ValueError(f"{path} was written by another run: " +
                         ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items()) +
                         " (resume with the same settings and data)")
    try:
        weights = load_file(os.path.join(path, "trainable.safetensors"))
    except Exception as e:  # noqa: BLE001
        raise _corrupt(path, "trainable.safetensors", e) from None
    own = dict(model.named_parameters())
    expected = {k for k, p in own.items() if p.requires_grad}
    if set(weights) != expected:
        raise ValueError(f"{path}: trainable keys differ from this model's: missing "
                         f"{sorted(expected - set(weights))[:6]}, unexpected {sorted(set(weights) - expected)[:6]}")
    with torch.no_grad():
        for k, v in weights.items():
            if own[k].shape != v.shape:  # a DTensor's shape is the whole tensor's
                raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, model has {tuple(own[k].shape)}")
            own[k].copy_(shard_like(v.to(own[k].dtype), own[k]))
    optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], optimizer))
    scheduler.load_state_dict(state["scheduler"])
    per_rank = state.get("rng_per_rank") or [state["rng"]]  # older checkpoints: rank 0's only
    set_rng_state(per_rank[rank] if rank < len(per_rank) else per_rank[0])
    return state


def checkpoint_all_ranks(args, student, optimizer, scheduler, step: int, steps_per_epoch: int, meta: dict,
                         ddp: bool, master: bool):
    """Every rank's RNG state is gathered (LoRA dropout draws differ per rank, so rank 0's state alone does
    not resume the others exactly); rank 0 writes the checkpoint; all wait for it."""
    states = [rng_state()]
    if ddp:
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng_state())
    sharded = getattr(args, "fsdp", False)  # the shards are gathered by every rank; rank 0 writes
    weights = trainable_state(student) if master or sharded else None
    opt_state = optimizer_state(optimizer) if master or sharded else None
    if master:
        save_checkpoint(args.out, weights, opt_state, scheduler, step,
                        {"epoch": step // steps_per_epoch, "step": step % steps_per_epoch}, meta, rng_per_rank=states)
    if ddp:
        dist.barrier()


# -----------------------------------------------------------------------------
# The run directory: what a previous run left, one run at a time, SIGTERM

# what a run writes into --out (the tokenizer files are rewritten with the model; .lock is the lock)
RUN_FILES = ("args.json", "log.jsonl", "checkpoint", "checkpoint.old", "checkpoint.tmp", "model.safetensors",
             "config.json", "trainer_summary.json")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_finished(out: str) -> bool:
    """OUT holds a finished run: trainer_summary.json (written last) comes from the run whose args.json is
    there (the same run_id; runs saved before run ids existed have none in either file)."""
    args, summary = _read_json(os.path.join(out, "args.json")), _read_json(os.path.join(out, "trainer_summary.json"))
    return isinstance(args, dict) and isinstance(summary, dict) and args.get("run_id") == summary.get("run_id")


def _nothing_to_resume(out: str, found: list) -> str:
    why = []
    if os.path.isdir(os.path.join(out, "checkpoint")) or os.path.isdir(os.path.join(out, "checkpoint.old")):
        why.append("checkpoint/ has no trainer_state.pt (an incomplete checkpoint)")
    if os.path.isdir(os.path.join(out, "checkpoint.tmp")):
        why.append("only checkpoint.tmp/, a checkpoint whose write did not finish (if you know it is complete, "
                   "rename it to checkpoint/)")
    if not why:
        why.append("no checkpoint (the run stopped before its first --save-every checkpoint, or ran without "
                   "--save-every)" + ("; it finished" if is_finished(out) else ""))
    return (f"nothing to resume in {out}: it holds a run ({', '.join(found)}) but {'; '.join(why)}. Nothing was "
            f"changed (the log is kept). To start again: --overwrite without --resume.")


def prepare_out_dir(args) -> str:
    """Decide what this run does with --out, before anything loads (rank 0; --out is locked by then):
    - `--resume` with a usable checkpoint: resume ("resume");
    - `--resume` on an --out holding no run at all: start fresh (torchrun --max-restarts relaunches
      the same command) ("fresh");
    - `--resume` on a run without a usable checkpoint: an error saying so; nothing is touched;
    - no `--resume`: an --out holding anything of a previous run (RUN_FILES) is refused, unless
      `--overwrite`, which removes those files first (a run that then dies leaves no old model or
      summary beside its own args.json and log) ("fresh")."""
    out = args.out
    os.makedirs(out, exist_ok=True)
    found = [n for n in RUN_FILES if os.path.exists(os.path.join(out, n))]
    if args.resume:
        if find_checkpoint(out):
            return "resume"
        if found:
            raise ValueError(_nothing_to_resume(out, found))
        return "fresh"
    if found and not args.overwrite:
        raise ValueError(f"{out} holds a previous run ({', '.join(found)}): pass --resume to continue it or "
                         f"--overwrite to replace it")
    for name in found:
        p = os.path.join(out, name)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    return "fresh"


def write_run_files(args):
    """A fresh run's args.json (with a new run_id, which trainer_summary.json repeats: is_finished) and an
    empty log. --overwrite is not recorded: it says what to do with the directory, not how to train."""
    run = {k: v for k, v in vars(args).items() if k != "overwrite"}
    run["run_id"] = uuid.uuid4().hex
    with open(os.path.join(args.out, "args.json"), "w", encoding="utf-8") as f:
        json.dump(run, f, indent=2)
    open(os.path.join(args.out, "log.jsonl"), "w", encoding="utf-8").close()


@contextlib.contextmanager
def lock_out_dir(out: str, enabled: bool = True):
    """An exclusive lock on OUT/.lock (fcntl.flock) for as long as the run lasts: a second training on the
    same --out stops with a clear error instead of interleaving logs and leaving whichever model came last.
    The OS drops the lock when the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    if not enabled or fcntl is None or not out:
        yield
        return
    os.makedirs(out, exist_ok=True)
    f = open(os.path.join(out, ".lock"), "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            who = f.read().strip() or "another process"
            raise RuntimeError(f"{out}: another training ({who}) holds the lock on this --out; wait for it to end "
                               f"or give another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()


_SIGTERM = {"received": False}


@contextlib.contextmanager
def sigterm_checkpoints():
    """While a stage runs, SIGTERM (what schedulers send before a kill) only raises a flag; the loop ends the
    step, saves a checkpoint and exits with 143 (128 + SIGTERM). The previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _SIGTERM["received"] = False
    prev = signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.update(received=True))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)


def guarded(run):
    """run_stage with --out locked (lock_out_dir, rank 0 only) and SIGTERM handled (sigterm_checkpoints),
    both released however the stage ends."""
    @functools.wraps(run)
    def stage(args):
        with lock_out_dir(args.out, enabled=int(os.environ.get("RANK", "0")) == 0), sigterm_checkpoints():
            return run(args)
    return stage


def file_fingerprint(path: str) -> dict:
    """Size and sha256 of a data file, recorded in the checkpoint: --resume on a file whose content changed
    under the same path is refused (the data position would point into other samples)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"data_size": os.path.getsize(path), "data_sha256": h.hexdigest()}


def nonfinite_message(args, step: int, bad_in_a_row: int, stats, last_checkpoint: int | None) -> str:
    """Why the run stops after --max-nonfinite bad steps: WHAT went non-finite (a NaN teacher is not the
    student's --lr) and which checkpoint, if any, there is to resume from."""
    lm, kd, vat_l, gnorm, teacher_bad = (stats[i].item() for i in (0, 1, 2, 3, 5))
    what = []
    if teacher_bad:
        what.append(f"the teacher's hidden states ({args.teacher})")
    if not math.isfinite(lm):
        what.append("the student's L_LM")
    if not math.isfinite(kd) and not teacher_bad:
        what.append("L_KL")
    if not math.isfinite(vat_l):
        what.append("L_ADL")
    if math.isfinite(lm) and math.isfinite(kd) and math.isfinite(vat_l) and not math.isfinite(gnorm):
        what.append("the gradient norm")
    advice = (f"The teacher itself is non-finite: check its weights (a forward pass of {args.teacher} alone) or "
              f"its dtype; the student's settings do not cause this." if teacher_bad
              else "Try a lower --lr, --grad-clip, or fp32.")
    where = (f"The last checkpoint, {os.path.join(args.out, 'checkpoint')} (step {last_checkpoint}), was saved before "
             f"the streak: --resume starts from it." if last_checkpoint is not None
             else "There is no checkpoint to resume from (none was saved before the streak).")
    return (f"{bad_in_a_row} consecutive non-finite steps at step {step} ({', '.join(what) or 'losses'}); "
            f"stopping. {where} {advice}")


# every size, count and rate on the command line: (flags, check, what it must be)
_ARG_RULES = (
    (("global_batch", "micro_batch", "log_every", "kd_chunk", "max_len", "lora_r", "max_nonfinite", "eval_limit"),
     lambda v: v > 0, "a positive integer"),
    (("max_steps", "save_every", "eval_every", "stop_after", "lora_alpha"), lambda v: v >= 0, "0 or more"),
    (("epochs", "kd_temperature", "lr"), lambda v: math.isfinite(v) and v > 0, "a positive number"),
    (("min_lr", "weight_decay", "grad_clip", "w_lm", "w_kl", "w_vat"), lambda v: math.isfinite(v) and v >= 0,
     "a number >= 0"),
    (("warmup_ratio", "lora_dropout"), lambda v: 0 <= v < 1, "in [0, 1)"),
)


def _input_paths(args) -> dict:
    """{flag: directory} of the models a run reads, to keep --out off them."""
    paths = {"--teacher": args.teacher}
    init = args.init or ""
    if init.startswith("llava:"):
        paths["--init"] = init.split(":", 1)[1]
    elif init.startswith("parts:"):
        for k, part in enumerate(init.split(":", 1)[1].split(",")):
            paths[f"--init (part {k + 1})"] = part
    elif init and not init.startswith("preset:"):
        paths["--init"] = init
    return {k: v for k, v in paths.items() if v}


def check_args(args) -> list:
    """Problems with the command line, each naming its flag, found before anything loads: sizes, counts and
    rates in range (a negative --global-batch hung, 0 divided by zero, --epochs 0 saved an untrained model),
    and an --out that is not one of the models the run reads (it would overwrite the teacher)."""
    problems = []
    for names, ok, what in _ARG_RULES:
        for name in names:
            v = getattr(args, name, None)
            for x in (v if isinstance(v, tuple) else (v,)):  # per-stage options hold three values
                if x is not None and not ok(x):
                    problems.append(f"--{name.replace('_', '-')} must be {what}, got {x}")
    if getattr(args, "fsdp", False) and "WORLD_SIZE" not in os.environ:
        problems.append("--fsdp shards over the processes torchrun starts: run it under torchrun "
                        "(torchrun --nproc_per_node N train.py ...; N = 1 works too)")
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        problems.append("--resume and --overwrite exclude each other (continue the run, or replace it)")
    if args.out:
        outs = ([os.path.join(args.out, f"stage{k}") for k in "123"] if args.stage == "all" else [args.out])
        for flag, path in _input_paths(args).items():
            for out in outs:
                if os.path.realpath(out) == os.path.realpath(path):
                    problems.append(f"--out {out} is the model {flag} reads; the run would overwrite it")
    return problems


# -----------------------------------------------------------------------------
# Building the stage's models

LORA_TARGETS = M.LORA_TARGETS


def build_student(args, tokenizer_path_hint=None):
    """The model this stage trains, from `--init`, any source model.load_any reads: `preset:NAME`, a
    compodistill model dir, a run's checkpoint/, `llava:DIR` or an HF LLaVA dir, `parts:VISION,LLM,TOKENIZER`
    (with --vision-feature-layer / --vision-feature-select-strategy). -> (model, tokenizer, image_processor)."""
    return M.load_any(args.init, trust_remote_code=args.trust_remote_code, tokenizer=args.tokenizer,
                      seed=args.model_seed, vision_feature_layer=getattr(args, "vision_feature_layer", None),
                      vision_feature_select_strategy=getattr(args, "vision_feature_select_strategy", None))


def add_lora(model: M.MultimodalLM, r: int, alpha: int, dropout: float):
    """Wrap the LLM with fresh LoRA adapters (peft) on every attention and MLP projection."""
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")
    model.language_model = get_peft_model(model.language_model, cfg)
    return model


def merge_lora(model: M.MultimodalLM):
    """Fold LoRA into the base weights (stage 2 -> 3, and every stage's saved output)."""
    if hasattr(model.language_model, "merge_and_unload"):
        model.language_model = model.language_model.merge_and_unload()
    return model


def set_trainable(model: M.MultimodalLM, args):
    """Which parameters train. Stage defaults follow docs/method.md section 5; `--trainable` overrides:
    adapter | adapter+lora | adapter+llm. The vision encoder is always frozen (as in the paper)."""
    model.requires_grad_(False)
    what = args.trainable
    if what is None:
        what = {"llava": "adapter+lora", "1": "adapter", "2": "adapter+lora", "3": "adapter+lora"}[args.stage]
        if args.stage == "2" and args.full_llm:
            what = "adapter+llm"
    if what not in ("adapter", "adapter+lora", "adapter+llm"):
        raise ValueError(f"--trainable must be adapter, adapter+lora or adapter+llm, got {what!r}")
    if what == "adapter+lora":
        add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)  # peft marks only LoRA weights trainable
    model.projector.requires_grad_(True)
    if hasattr(model.projector, "teacher_adapter"):  # TAF: the fetched teacher adapter stays frozen
        model.projector.teacher_adapter.requires_grad_(False)
    if what == "adapter+llm":
        model.language_model.requires_grad_(True)
    return what


def load_teacher(args, device, student_tok, student: M.MultimodalLM, dtype=None):
    """The teacher: frozen, eval mode, bf16 on CUDA (`dtype`, default: bf16 when `device` is CUDA), never
    wrapped in DDP (sharded like the student under --fsdp). -> (teacher, its tokenizer).
    Its tokenizer must be the student's (logit KD compares token by token), unless --cross-vocab, where it
    may be any: L_KL becomes ULD over text-aligned positions; the visual tokens must still correspond one
    to one (the same vision encoder, the same count)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else None)
    teacher, teacher_tok, _ = M.load_any(args.teacher, device=device, dtype=dtype,
                                         trust_remote_code=args.trust_remote_code, tokenizer=args.tokenizer,
                                         vision_feature_layer=getattr(args, "vision_feature_layer", None),
                                         vision_feature_select_strategy=getattr(args, "vision_feature_select_strategy", None))
    teacher.eval().requires_grad_(False)
    if getattr(args, "cross_vocab", False):
        if teacher.num_visual_tokens != student.num_visual_tokens:
            raise ValueError(f"--cross-vocab: the teacher ({args.teacher}) gives {teacher.num_visual_tokens} visual "
                             f"tokens per image, the student {student.num_visual_tokens}; they must share the vision "
                             "encoder (and TAF needs it anyway)")
        return teacher, teacher_tok
    check_tokenizers_agree(student_tok, teacher_tok)
    V = student.language_model.get_output_embeddings().weight.shape[0]
    Vt = teacher.language_model.get_output_embeddings().weight.shape[0]
    if Vt < V:
        raise ValueError(f"the teacher's LM head has {Vt} rows, fewer than the student's {V}")
    return teacher, teacher_tok


def apply_taf(student: M.MultimodalLM, teacher: M.MultimodalLM):
    """TAF (docs/method.md section 2): the student's projector becomes the teacher's frozen adapter + a trainable
    Linear(d_teacher -> d_student); the student's vision encoder must be the teacher's."""
    from taf import check_shared_vision_encoder
    check_shared_vision_encoder(teacher.vision_tower, student.vision_tower)
    check_same_vision_features(teacher, student)
    if hasattr(teacher.projector, "teacher_adapter"):
        raise ValueError("the teacher itself has a TAF projector; use a teacher trained with its own adapter")
    # taf_projector deep-copies the adapter, so the teacher (bf16 on CUDA) is left untouched
    return M.taf_student(student, teacher)


def check_same_vision_features(teacher: M.MultimodalLM, student: M.MultimodalLM):
    """The same encoder is not enough for TAF: the teacher's adapter was trained on ONE hidden layer (or set)
    with one select strategy; a student reading another would feed it features it never saw. Raises naming
    both values and the flags that set them."""
    diff = [f"{k}: teacher {getattr(teacher, k)!r} vs student {getattr(student, k)!r}"
            for k in ("vision_feature_layer", "vision_feature_select_strategy")
            if getattr(teacher, k) != getattr(student, k)]
    if diff:
        raise ValueError("TAF: teacher and student read different vision features (" + "; ".join(diff) + "); the "
                         "teacher's frozen adapter was trained on the teacher's. Build the student with the same "
                         "--vision-feature-layer / --vision-feature-select-strategy")


# -----------------------------------------------------------------------------
# One stage

def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup then cosine decay to min_lr (docs/method.md section 5: cosine, warmup 3%)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def init_distributed(backend: str):
    """Join the torchrun job. torchrun --max-restarts brings every worker back up after one dies, and
    the new workers meet in the SAME store as the dead ones: a survivor could read a dead worker's
    stale address (gloo: "connectFullMesh ... Connection refused"; NCCL: an old unique id, a hang).
    So each attempt's keys live under their own prefix (TORCHELASTIC_RESTART_COUNT)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun hosts the store
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, multi_tenant=True,
                          timeout=datetime.timedelta(minutes=30))  # torch's default process-group timeout
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"compodistill/attempt_{attempt}", store),
                            rank=rank, world_size=world)


# -----------------------------------------------------------------------------
# --fsdp: PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) in place of DDP, for models past one GPU's
# memory. Each transformer block is its own unit; parameters, gradients and AdamW state are split over the
# ranks (ZeRO-3) and a block's weights are gathered only while it runs. The losses, the VAT capture and the
# checkpoint format are the DDP run's (the tests compare the two runs step by step).

def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a sharded (DTensor) tensor, gathered from every rank (a collective); else `t`."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor, the same on every rank) split like the DTensor `like`; else unchanged.
    No communication: each rank keeps its own piece."""
    if not hasattr(like, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor gathered whole onto the CPU (collective under
    --fsdp), so a checkpoint reads the same whether it was written by DDP or FSDP2."""
    sd = optimizer.state_dict()
    return {**sd, "state": {i: {k: (full_tensor(v).cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
                            for i, st in sd["state"].items()}}


def shard_optimizer_state(sd: dict, optimizer) -> dict:
    """The inverse of optimizer_state for this optimizer's parameters (index i = i-th parameter, as torch
    numbers them): whole state tensors become DTensors split like their parameter."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not any(hasattr(p, "device_mesh") for p in params):
        return sd
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    by_id = dict(zip(ids, params))
    return {**sd, "state": {i: {k: (shard_like(v, by_id[i]) if torch.is_tensor(v) and v.shape == by_id[i].shape
                                    and v.dim() else v) for k, v in st.items()} for i, st in sd["state"].items()}}


def fsdp_shard(mllm: M.MultimodalLM, mesh) -> M.MultimodalLM:
    """Shard a model in place with FSDP2: every decoder layer of the LLM and every encoder layer of the vision
    tower is one unit, the root unit holds the rest (embeddings and LM head, tied or not, the final norms, the
    projector). Parameters move to the mesh's device as they are split. The root's weights stay gathered
    from its forward to its backward, so the chunked loss may read the LM head's weight after the forward
    (and the teacher's, which has no backward, stay gathered)."""
    from torch.distributed.fsdp import fully_shard
    blocks = [m for m in mllm.modules() if type(m).__name__.endswith(("DecoderLayer", "EncoderLayer"))]
    if not blocks:
        raise ValueError(f"--fsdp: no *DecoderLayer / *EncoderLayer module in {type(mllm.language_model).__name__}"
                         " to shard")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(mllm, mesh=mesh)
    return mllm


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The module's structure with its parameters on the meta device (no storage) and its buffers copied:
    under --fsdp, rank 0 keeps one, and the gathered weights are loaded into it to save the stage's output."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def gather_state_dict(model: torch.nn.Module, keep: bool) -> dict:
    """model.state_dict() whole, gathered tensor by tensor (a collective: every rank calls it); the CPU
    copies are kept where `keep` (rank 0), dropped elsewhere. A tensor shared by two names (tied embeddings)
    is gathered once and stays shared."""
    state = model.state_dict()  # (state_dict() makes a new tensor per name: identity is the parameter's)
    owner = {k: id(t) for k, t in [*model.named_parameters(remove_duplicate=False),
                                   *model.named_buffers(remove_duplicate=False)]}
    out, seen = {}, {}
    for k, v in state.items():
        key = owner.get(k, id(v))
        if key not in seen:
            whole = full_tensor(v.detach())
            seen[key] = whole.cpu() if keep else None
        if keep:
            out[k] = seen[key]
    return out


def validate_cr_sharded(student, *args) -> dict:
    """validate_cr under --fsdp, on every rank (each block's weights are gathered from all ranks, so every
    rank runs the same forwards, on the same items): the root unit is gathered for the duration, since
    generation calls the LLM and the encoder past the root's forward."""
    student.unshard()
    try:
        return validate_cr(student, *args)
    finally:
        student.reshard()


def validate_cr(student, tokenizer, image_processor, items: dict, device) -> dict:
    """In-loop validation: CR accuracy of the model being trained on a SugarCrepe-layout set, by the
    paper's protocol (docs/method.md section 6; evaluate.eval_sugarcrepe: 2-choice, both orders, greedy). The
    learning curve."""
    import evaluate as E
    generate, _ = E.model_fns(student, tokenizer, image_processor, device, batch_size=64, max_new_tokens=4,
                              progress=False)
    metrics, _ = E.eval_sugarcrepe(generate, items)
    student.train()
    return {"val_cr": metrics["average"], "val_cr_subsets": {k: v["average"] for k, v in metrics["subsets"].items()}}


# the paper's global batch per stage (docs/method.md section 5: DPT 256, DFT 128, SFT 192); the LLaVA recipe's
# adapter pre-training 256 (`--stage llava --trainable adapter`), its fine-tuning 128
STAGE_GLOBAL_BATCH = {"1": 256, "2": 128, "3": 192, "llava": 128, "llava-adapter": 256}


def record_run_choices(student: M.MultimodalLM, args):
    """What this run decides about prompts and images goes into the model's config, so that every later
    stage and evaluate.py render and preprocess the same way: --system-prompt (TEXT, or "none"; not given:
    what the init model recorded, else the template's default) and --image-aspect-ratio (squash / pad; not
    given: what the init model recorded, else squash)."""
    if getattr(args, "system_prompt", None) is not None:
        student.extra_config["system_prompt"] = args.system_prompt
    if getattr(args, "image_aspect_ratio", None) is not None:
        student.extra_config["image_aspect_ratio"] = args.image_aspect_ratio


def trim_log(log_path: str, step: int):
    """On resume from the checkpoint at `step`: drop the log lines of steps after it (they ran before the
    kill and run again now), so that each step is logged once. Rewritten atomically (tmp + rename)."""
    if not os.path.exists(log_path):
        return
    with open(log_path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        if rec.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    with open(log_path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(log_path + ".tmp", log_path)


@guarded
def run_stage(args) -> str:
    if args.global_batch is None:
        key = "llava-adapter" if args.stage == "llava" and args.trainable == "adapter" else args.stage
        args.global_batch = STAGE_GLOBAL_BATCH[key]
    # --- distributed setup (torchrun sets RANK/WORLD_SIZE; plain python is one process) ---------------
    fsdp = bool(getattr(args, "fsdp", False))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or fsdp  # DDP, or FSDP2 with --fsdp
    if distributed:
        if not dist.is_initialized():
            init_distributed("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, world, local_rank = 0, 1, 0
    master = rank == 0
    if args.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device if args.device != "cuda" else f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if master:
        prepare_out_dir(args)  # refuses a previous run's --out (or clears it with --overwrite), before loading
    if distributed:
        dist.barrier()

    # --- models ---------------------------------------------------------------------------------------
    student, tokenizer, base_processor = build_student(args)
    record_run_choices(student, args)
    teacher = None
    distill = args.stage in ("1", "2")
    if distill:
        if not args.teacher:
            raise ValueError(f"--stage {args.stage} needs --teacher DIR")
        # under --fsdp the teacher is read into CPU memory and only its shards go to the device
        teacher, teacher_tok = load_teacher(args, torch.device("cpu") if fsdp else device, tokenizer, student,
                                            dtype=torch.bfloat16 if device.type == "cuda" else None)
        if args.taf and student.extra_config.get("projector") != "taf":
            apply_taf(student, teacher)
    trainable_kind = set_trainable(student, args)
    if args.grad_checkpointing:
        student.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    skeleton = None
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (world,))
        skeleton = meta_copy(student) if master else None  # what the gathered weights are saved through
        fsdp_shard(student, mesh)
        if teacher is not None:
            fsdp_shard(teacher, mesh)
    else:
        student.to(device)
    w_vat = args.w_vat if args.stage == "2" else 0.0

    # --- data -----------------------------------------------------------------------------------------
    samples = data.load_llava_json(args.data)
    barrier = dist.barrier if distributed else None  # the image checks and the rendering are split over the ranks
    image_stats = {}
    samples, bad_images = data.validate_images(samples, args.image_folder, skip_bad=args.skip_bad_images,
                                               allow_non_rgb=not args.strict_rgb, progress=master and not args.quiet,
                                               stats=image_stats, rank=rank, world_size=world, barrier=barrier)
    image_processor = M.image_processor_for(student, base_processor)  # the checkpoint's own; pad or squash
    pad_id = data.pad_token_id(tokenizer)
    num_workers = resolve_num_workers(args, device)
    dataset = data.SupervisedDataset(samples, tokenizer, image_processor, args.image_folder,
                                     student.num_visual_tokens, student.image_token_id, args.max_len,
                                     drop_overlong=args.drop_overlong, progress=master and not args.quiet,
                                     system_prompt=student.extra_config.get("system_prompt"),
                                     cache_dir=data.default_cache_dir(), rank=rank, world_size=world,
                                     barrier=barrier, processes=num_workers)
    cross = bool(getattr(args, "cross_vocab", False) and teacher is not None)
    collate = None
    if cross:  # the teacher reads the same conversation in its own tokens; L_KL pairs positions by text
        dataset = data.CrossVocabDataset(dataset, tokenizer, teacher_tok, teacher.image_token_id,
                                         student.extra_config.get("system_prompt"))
        collate = functools.partial(data.collate_cross_vocab, pad_token_id=pad_id,
                                    teacher_pad_token_id=data.pad_token_id(teacher_tok))
    if master and dataset.dropped:
        print(f"--drop-overlong: dropped {len(dataset.dropped)} of {len(dataset.dropped) + len(dataset)} samples of "
              f"{args.data} (image + first answer token longer than --max-len {args.max_len}; first ids "
              f"{dataset.dropped[:5]})")
    if len(dataset) < args.global_batch:
        raise ValueError(f"{args.data}: {len(dataset)} usable samples, fewer than --global-batch {args.global_batch}")
    vat_cfg = None
    if w_vat > 0:
        resumed = find_checkpoint(args.out) if args.resume else None
        vat_cfg = vat_layers(args, student, teacher, dataset, pad_id, micro_batch_size(args, world),
                             checkpoint_meta(resumed) if resumed else {}, collate)
        if master:
            print(f"VAT: student layers {vat_cfg['s_layers']} <- teacher windows {vat_cfg['matching']}"
                  + (f" (auto, measured on {vat_cfg['auto']['samples']} samples)" if vat_cfg.get("auto") else ""))
    steps_per_epoch = len(dataset) // args.global_batch
    total_steps = args.max_steps or int(args.epochs * steps_per_epoch)
    if total_steps < 1:
        raise ValueError(f"--epochs {args.epochs} over {len(dataset)} samples at --global-batch {args.global_batch} "
                         f"gives 0 optimizer steps ({steps_per_epoch} per epoch); raise --epochs or give --max-steps")
    sampler = data.GlobalBatchSampler(len(dataset), args.global_batch, rank, world, seed=args.seed,
                                      lengths=dataset.lengths if args.group_by_length else None)
    per_rank = args.global_batch // world
    micro = micro_batch_size(args, world)
    if per_rank % micro:
        raise ValueError(f"per-rank batch {per_rank} (= --global-batch / world size) is not a multiple of "
                         f"--micro-batch {micro}")

    # --- optimizer, schedule, resume ------------------------------------------------------------------
    if fsdp:  # a no-grad forward (--vat-layers auto) leaves the root unit gathered: its registered
        student.reshard()  # parameters would be the gathered copies, and AdamW would hold those, not the shards
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    if fsdp and not all(hasattr(p, "device_mesh") for p in params):
        raise RuntimeError("--fsdp: some trainable parameters are not sharded (DTensor) when the optimizer is built")
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    warmup = max(1, int(args.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, total_steps, warmup, args.lr, args.min_lr) / args.lr)
    meta = {"stage": args.stage, "init": args.init, "trainable": trainable_kind, "taf": bool(args.taf and distill),
            "global_batch": args.global_batch, "data": os.path.abspath(args.data), "seed": args.seed,
            **({"group_by_length": True} if args.group_by_length else {}),  # absent when off: older checkpoints
            **({"vat_auto": vat_cfg["auto"]} if vat_cfg and vat_cfg.get("auto") else {}),  # the layers auto chose
            **{k: student.extra_config[k] for k in ("system_prompt", "image_aspect_ratio") if k in student.extra_config},
            **kd_meta(args, distill),
            **({"cross_vocab": True} if getattr(args, "cross_vocab", False) and distill else {}),
            "n_trainable": sum(p.numel() for p in params),
            "lr": args.lr, "w_lm": args.w_lm, "w_kl": args.w_kl, "w_vat": args.w_vat,
            "kd_temperature": args.kd_temperature, "max_len": args.max_len, **file_fingerprint(args.data)}
    step, last_checkpoint = 0, None
    if args.resume and find_checkpoint(args.out):
        state = load_checkpoint(find_checkpoint(args.out), student, optimizer, scheduler, meta, rank=rank)
        step = last_checkpoint = state["step"]
        if master:
            print(f"resumed from {args.out} at step {step}")
            trim_log(os.path.join(args.out, "log.jsonl"), step)
    elif master:
        write_run_files(args)
    sampler.load_state_dict({"epoch": step // steps_per_epoch, "step": step % steps_per_epoch})
    batches = data_loader(dataset, sampler, micro, pad_id, num_workers, device, args.seed, collate)

    model = (DDP(student, device_ids=[device.index] if device.type == "cuda" else None)
             if distributed and not fsdp else student)  # FSDP2's sharded student is called as it is
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    s_head = student.language_model.get_output_embeddings()
    t_head = teacher.language_model.get_output_embeddings() if teacher is not None else None
    for head in (s_head, t_head):
        if head is not None and getattr(head, "bias", None) is not None:
            raise ValueError("LM heads with a bias are not supported by the chunked loss")

    val_items = None
    if args.eval_sugarcrepe and args.eval_every and (master or fsdp):  # --fsdp: every rank runs it
        import evaluate as E
        val_items = E.read_sugarcrepe(args.eval_sugarcrepe, args.eval_coco_images, limit=args.eval_limit)

    # --- the loop -------------------------------------------------------------------------------------
    log_path = os.path.join(args.out, "log.jsonl")
    sinks = open_sinks(parse_report_to(args.report_to), args.out, args.run_name, vars(args), step > 0) if master else []
    if master:  # one line per (re)start: what the data checks dropped, where the run starts
        write_record(log_path, {"event": "start", "from_step": step, "samples": len(dataset),
                                "skipped_bad_images": len(bad_images), "dropped_overlong": len(dataset.dropped),
                                "converted_non_rgb": image_stats.get("converted_non_rgb", 0)}, sinks)
    student.train()
    bad_in_a_row, skipped = 0, 0
    pbar = tqdm(total=total_steps, initial=step, desc=f"stage {args.stage}", disable=not master or args.quiet,
                dynamic_ncols=True)
    t_last = time.time()
    tokens_since = 0
    paused = 0.0  # seconds of validation / checkpointing since t_last: not charged to tokens_per_s
    while step < total_steps:
        micro_batches = [next(batches) for _ in range(per_rank // micro)]  # this step's share, collated
        # global normalisers: supervised tokens and samples with visual tokens, over all ranks
        counts = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches),
                               sum(int((b["input_ids"] == student.image_token_id).any(1).sum()) for b in micro_batches),
                               sum(len(b["pairs"]) for b in micro_batches) if cross else 0],
                              dtype=torch.float64, device=device)
        if distributed:
            dist.all_reduce(counts)
        n_tok, n_vis, n_pairs = max(1.0, counts[0].item()), counts[1].item(), counts[2].item()
        lr = lr_at(step, total_steps, warmup, args.lr, args.min_lr)
        sums = {"lm": 0.0, "kd": 0.0, "vat": 0.0, "teacher_bad": 0}
        if step == args.fail_at_step and rank == args.fail_rank and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os._exit(17)  # test hook: this rank dies (first attempt only) so that torchrun restarts the job
        try:
            for k, b in enumerate(micro_batches):
                b = {key: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for key, v in b.items()}
                last = k == len(micro_batches) - 1
                if fsdp:  # gradients reduce-scattered after the last micro-batch only, like DDP's no_sync
                    student.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext() if (not distributed or fsdp or last) else model.no_sync()
                with sync, autocast:
                    t_maps, s_maps = {}, {}
                    if teacher is not None:
                        t_ids, t_mask = ((b["teacher_input_ids"], b["teacher_attention_mask"]) if cross
                                         else (b["input_ids"], b["attention_mask"]))
                        with torch.no_grad():
                            cap = (vat.capture_visual_attention(teacher.language_model, vat_cfg["t_layers"],
                                                                t_ids == teacher.image_token_id, t_mask,
                                                                rows=vat_rows(args), headwise=args.vat_headwise)
                                   if vat_cfg else contextlib.nullcontext({}))
                            with cap as t_maps:
                                t_out = teacher(t_ids, t_mask, b["pixel_values"], return_hidden=True)
                            sums["teacher_bad"] += int(not torch.isfinite(t_out["hidden"]).all())
                    cap = (vat.capture_visual_attention(student.language_model, vat_cfg["s_layers"],
                                                        b["input_ids"] == student.image_token_id, b["attention_mask"],
                                                        rows=vat_rows(args), headwise=args.vat_headwise)
                           if vat_cfg else contextlib.nullcontext({}))
                    with cap as s_maps:
                        out = model(b["input_ids"], b["attention_mask"], b["pixel_values"], return_hidden=True)
                    lm, kd = lm_and_kd_loss(out["hidden"], s_head.weight, b["labels"], n_tok,
                                            t_out["hidden"] if teacher is not None and not cross else None,
                                            t_head.weight if teacher is not None else None,
                                            args.kd_temperature, args.kd_chunk, args.kd_divergence, args.kd_jsd_beta)
                    if cross:  # L_KL across vocabularies: ULD on the text-aligned pairs (global count n_pairs)
                        kd = uld_loss(*pair_rows(out["hidden"], t_out["hidden"], b["pairs"]), s_head.weight,
                                      t_head.weight, max(1.0, n_pairs), args.kd_temperature, args.kd_chunk)
                    loss = args.w_lm * lm + (args.w_kl * kd if teacher is not None else 0.0)
                    vat_l = torch.zeros((), device=device)
                    if vat_cfg:
                        local_vis = int(out["visual_mask"].any(1).sum())
                        if local_vis:
                            mean_l = vat.vat_loss(s_maps, t_maps, vat_cfg["matching"], vat_cfg["s_layers"],
                                                  out["visual_mask"], b["attention_mask"], variant=args.vat_variant,
                                                  distance=args.vat_distance, headwise=args.vat_headwise,
                                                  rows=vat_rows(args))
                            vat_l = mean_l * local_vis / max(1.0, n_vis)  # a global per-sample mean
                        loss = loss + w_vat * vat_l
                (loss * world).backward()  # DDP averages over ranks; the losses are already global sums / N
                sums["lm"] += lm.item()
                sums["kd"] += kd.item()
                sums["vat"] += vat_l.item()
                tokens_since += int(b["attention_mask"].sum())
        except torch.OutOfMemoryError as e:
            raise RuntimeError(out_of_memory_message(args, device)) from e
        except RuntimeError as e:
            if "can't allocate memory" not in str(e) and "out of memory" not in str(e):
                raise
            raise RuntimeError(out_of_memory_message(args, device)) from e
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0
                                                               else float("inf")))  # --fsdp: the global norm
        stats = torch.tensor([sums["lm"], sums["kd"], sums["vat"], float(grad_norm), float(_SIGTERM["received"]),
                              sums["teacher_bad"]], device=device, dtype=torch.float64)
        if distributed:  # losses: partial sums of global means -> add; grad norm: the same on every rank; flags: counts
            dist.all_reduce(stats)
            stats[3] /= world
        finite = bool(torch.isfinite(stats).all())
        if finite:
            optimizer.step()
            bad_in_a_row = 0
        else:
            skipped += 1
            bad_in_a_row += 1
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        pbar.update(1)
        if not finite and bad_in_a_row >= args.max_nonfinite:
            pbar.close()
            raise FloatingPointError(nonfinite_message(args, step, bad_in_a_row, stats, last_checkpoint))
        if master and (step % args.log_every == 0 or step == total_steps):
            dt = time.time() - t_last - paused
            rec = {"step": step, "loss": round(args.w_lm * stats[0].item() + args.w_kl * stats[1].item()
                                                + w_vat * stats[2].item(), 6),
                   "lm": stats[0].item(), "kd": stats[1].item(), "vat": stats[2].item(),
                   "lr": lr, "grad_norm": stats[3].item(), "tokens_per_s": tokens_since * world / max(dt, 1e-9),
                   "skipped": skipped, **({"kd_pairs": int(n_pairs)} if cross else {})}
            write_record(log_path, rec, sinks)
            pbar.set_postfix(lm=f"{rec['lm']:.3f}", kd=f"{rec['kd']:.3f}", vat=f"{rec['vat']:.4f}")
            t_last, tokens_since, paused = time.time(), 0, 0.0
        t_pause = time.time()
        if val_items is not None and (step % args.eval_every == 0 or step == total_steps):
            rec = {"step": step, **(validate_cr_sharded if fsdp else validate_cr)(student, tokenizer, image_processor,
                                                                                   val_items, device)}
            if master:
                write_record(log_path, rec, sinks)
                pbar.set_postfix(val_cr=f"{rec['val_cr']:.1f}")
        # never while a non-finite streak is open: those weights are what the streak is about
        if args.save_every and step % args.save_every == 0 and step < total_steps and bad_in_a_row == 0:
            checkpoint_all_ranks(args, student, optimizer, scheduler, step, steps_per_epoch, meta, distributed, master)
            last_checkpoint = step
        paused += time.time() - t_pause
        if stats[4] > 0 and step < total_steps:  # SIGTERM on some rank: this step is done; save it, stop
            pbar.close()
            sigterm_stop(args, step, bad_in_a_row, last_checkpoint,
                         lambda: checkpoint_all_ranks(args, student, optimizer, scheduler, step, steps_per_epoch,
                                                      meta, distributed, master), master)
        if args.stop_after and step >= args.stop_after:  # for tests: simulate a kill after this step
            pbar.close()
            close_sinks(sinks)
            return args.out
    pbar.close()
    close_sinks(sinks)

    # --- the stage's output: the full model, LoRA merged ----------------------------------------------
    if fsdp:  # every rank gathers; rank 0 loads the whole weights into its unsharded copy
        whole = gather_state_dict(student, keep=master)
        if master:
            skeleton.load_state_dict(whole, assign=True)
            student = skeleton
    if master:
        merge_lora(student)
        student.language_model.config.use_cache = True
        save_dtype = args.save_dtype or student.extra_config.get("llm_dtype") or "float32"
        if save_dtype not in ("float32", "bfloat16", "float16"):
            save_dtype = "float32"  # a checkpoint config naming another dtype: keep the master weights' fp32
        student.to(getattr(torch, save_dtype))  # the run is over: the in-memory model is not used again
        M.save_pretrained(student, args.out, tokenizer, image_processor)
        with open(os.path.join(args.out, "trainer_summary.json"), "w", encoding="utf-8") as f:
            json.dump({"steps": step, "skipped_nonfinite": skipped, "dropped_overlong": len(dataset.dropped),
                       "skipped_bad_images": len(bad_images),
                       "converted_non_rgb": image_stats.get("converted_non_rgb", 0), "save_dtype": save_dtype,
                       **meta, "args": vars(args),
                       "run_id": (_read_json(os.path.join(args.out, "args.json")) or {}).get("run_id")},
                      f, indent=2)
    if distributed:
        dist.barrier()
    return args.out


def sigterm_stop(args, step: int, bad_in_a_row: int, last_checkpoint, save, master: bool):
    """After SIGTERM: save a checkpoint of the finished step (unless a non-finite streak is open), say so on
    stderr, exit 143."""
    if bad_in_a_row == 0 and last_checkpoint != step:
        save()
        last_checkpoint = step
    if master:
        where = (f"checkpoint of step {last_checkpoint} in {os.path.join(args.out, 'checkpoint')}; continue with --resume"
                 if last_checkpoint is not None else "no checkpoint (a non-finite streak was open)")
        print(f"SIGTERM: stopped after step {step}: {where}", file=sys.stderr, flush=True)
    raise SystemExit(143)


def resolve_num_workers(args, device) -> int:
    """`--num-workers`, or by default: 0 on a CPU device (the cores that would load data are the ones training),
    else min(4, this rank's share of the CPUs - 1), at least 1. At 20-23 ms per 384 px sample (JPEG decode +
    SigLIP processor), 16 samples per rank are ~0.35 s of work per step: 4 workers keep that under the step time
    of any real model pair and leave a core to the training process."""
    if args.num_workers is not None:
        if args.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
        return args.num_workers
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(4, per_rank - 1))


def data_loader(dataset, sampler, micro, pad_id, num_workers, device, seed, collate=None):
    """An iterator over this rank's collated micro-batches, in the sampler's order: a torch DataLoader over
    data.MicroBatchSampler with `num_workers` worker processes (0: in this process), pinned memory on CUDA and
    4 micro-batches prefetched per worker. Items (image decode + processor, ids expanded) and collate run in
    the workers; the order, hence every loss, is the same for any number of workers. Its own seeded generator,
    so that the global RNG (dropout) does not depend on the loader. Workers are forked (where the platform
    can), so they share the dataset's memory-mapped arrays instead of pickling them."""
    import multiprocessing as mp
    if num_workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers never tokenize
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=data.MicroBatchSampler(sampler, micro),
        collate_fn=collate or functools.partial(data.collate, pad_token_id=pad_id), num_workers=num_workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None,
        generator=torch.Generator().manual_seed(seed),
        multiprocessing_context=("fork" if "fork" in mp.get_all_start_methods() else None) if num_workers else None)
    return iter(loader)


def out_of_memory_message(args, device) -> str:
    return (f"out of memory on {device} at micro-batch {args.micro_batch} x max_len {args.max_len}. Turn, in this "
            f"order: --micro-batch (smaller; --global-batch stays, gradient accumulation makes up the rest), "
            f"--grad-checkpointing (on: {args.grad_checkpointing}), --kd-chunk (smaller: {args.kd_chunk}), "
            f"--max-len (shorter: {args.max_len}; with --drop-overlong for the few long samples).")


def micro_batch_size(args, world: int) -> int:
    return min(args.micro_batch, args.global_batch // world)


def vat_layers(args, student, teacher, dataset, pad_id, micro: int, resumed_meta: dict, collate=None) -> dict:
    """VAT's layers and their matching (docs/method.md section 3): `--vat-layers` / `--vat-teacher-layers`
    are vat.select_layers specs. "auto" measures the model's attention profile (evaluate.layer_profile_batches:
    per layer, the text's attention share on the image and its entropy there) on the first
    --vat-auto-samples training samples that have an image, before any step, and takes vat.auto_layers; a
    resumed run takes the layers its checkpoint recorded (the trained model would measure differently).
    Every rank measures the same samples with the same weights, so every rank picks the same layers.
    Returns {"s_layers", "t_layers" (the teacher layers of the windows), "matching"[, "auto"]}."""
    s_spec, t_spec = args.vat_layers, args.vat_teacher_layers or args.vat_layers
    n_s = student.language_model.config.num_hidden_layers
    n_t = teacher.language_model.config.num_hidden_layers
    auto = None
    if "auto" in (s_spec, t_spec):
        auto = resumed_meta.get("vat_auto")
        if auto is None:
            import evaluate as E
            idx = [i for i, x in enumerate(dataset.samples) if x.get("image")][:args.vat_auto_samples]
            if not idx:
                raise ValueError(f"--vat-layers auto: {args.data} has no sample with an image to measure on")
            device = next(student.parameters()).device

            def batches(who):  # the teacher reads its own tokens under --cross-vocab
                for j in range(0, len(idx), micro):
                    b = (collate or functools.partial(data.collate, pad_token_id=pad_id))(
                        [dataset[i] for i in idx[j:j + micro]])
                    ids, mask = ((b["teacher_input_ids"], b["teacher_attention_mask"]) if "pairs" in b and
                                 who == "teacher" else (b["input_ids"], b["attention_mask"]))
                    yield ids, mask, b["pixel_values"].to(device), None
            auto = {"samples": len(idx)}
            for who, mllm, spec in (("student", student, s_spec), ("teacher", teacher, t_spec)):
                if spec == "auto":
                    auto[who] = E.layer_profile_batches(mllm, batches(who))["auto"]
    s_layers = auto["student"] if s_spec == "auto" else vat.select_layers(n_s, s_spec)
    t_layers = auto["teacher"] if t_spec == "auto" else vat.select_layers(n_t, t_spec, teacher=True)
    matching = vat.group_layer_matching(s_layers, t_layers, args.vat_matching)
    cfg = dict(s_layers=s_layers, t_layers=sorted({t for g in matching for t in g}), matching=matching)
    return dict(cfg, auto=auto) if auto else cfg


def kd_meta(args, distill: bool) -> dict:
    """The checkpoint meta's record of L_KL's divergence: absent for the paper's forward KL (so checkpoints written
    before the option resume), else {"kd_divergence", and for jsd "kd_jsd_beta"}; a resume with another is refused."""
    div = getattr(args, "kd_divergence", "forward")
    if not distill or div == "forward":
        return {}
    return {"kd_divergence": div, **({"kd_jsd_beta": args.kd_jsd_beta} if div == "jsd" else {})}


def vat_rows(args) -> str:
    """Query rows the VAT variant needs: all rows (paper) or the visual rows (the authors' code). Across
    vocabularies (--cross-vocab) the visual rows only, whatever the variant: the text rows of the two
    tokenizations do not correspond one to one, the visual ones do."""
    return "all" if args.vat_variant == "paper" and not getattr(args, "cross_vocab", False) else "visual"


# -----------------------------------------------------------------------------
# Command line

def feature_layer(text: str):
    """--vision-feature-layer: one int (-2) or a comma-separated list (-2,-5)."""
    vals = [int(x) for x in text.split(",") if x.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected an int or ints separated by commas, got {text!r}")
    return vals[0] if len(vals) == 1 else vals


def per_stage(kind):
    """An option that takes one value (every stage) or three comma-separated values (stages 1, 2, 3 of
    --stage all), e.g. --max-steps 100,50,200. Three values come back as a tuple."""
    def parse(text):
        vals = [kind(x) for x in str(text).split(",")]
        if len(vals) == 1:
            return vals[0]
        if len(vals) != 3:
            raise argparse.ArgumentTypeError(f"expected one value or three (stages 1,2,3), got {text!r}")
        return tuple(vals)
    parse.__name__ = kind.__name__
    return parse


PER_STAGE = ("max_steps", "lr", "global_batch", "epochs")
# arguments that do not change what a stage trains: a finished stage is still finished when these differ
NOT_TRAINING = {"resume", "quiet", "device", "stop_after", "fail_at_step", "fail_rank", "log_every", "save_every",
                "eval_sugarcrepe", "eval_coco_images", "eval_every", "eval_limit", "max_nonfinite",
                "trust_remote_code", "demo", "allow_non_rgb", "overwrite", "save_dtype"}


def stage_finished(sub) -> bool:
    """--stage all --resume: True when sub.out holds a finished stage (trainer_summary.json) trained with these
    arguments; a finished stage with other arguments is an error naming them (retraining it silently would
    overwrite a result)."""
    path = os.path.join(sub.out, "trainer_summary.json")
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        done = json.load(f).get("args")
    if done is None:
        print(f"{path} records no arguments (an older run): stage {sub.stage} is trained again")
        return False
    now = json.loads(json.dumps(vars(sub), default=str))
    diff = sorted(k for k in set(done) | set(now) if k not in NOT_TRAINING and done.get(k) != now.get(k))
    if diff:
        raise ValueError(f"--resume: stage {sub.stage} in {sub.out} finished with other arguments: "
                         + ", ".join(f"--{k.replace('_', '-')} {done.get(k)!r} then vs {now.get(k)!r} now" for k in diff)
                         + "; give the same arguments, or another --out")
    return True


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["llava", "1", "2", "3", "all"], default="llava")
    p.add_argument("--init", help="preset:NAME | model dir (previous stage) | RUN/checkpoint | llava:DIR (or an HF "
                   "LLaVA dir) | parts:VISION,LLM,TOKENIZER (<image> is added to the tokenizer if it lacks it)")
    p.add_argument("--vision-feature-layer", type=feature_layer, default=None, help="parts: the vision hidden "
                   "layer(s) the adapter reads, e.g. -2 (default, LLaVA's) or, several, --vision-feature-layer=-2,-5")
    p.add_argument("--vision-feature-select-strategy", choices=["default", "full"], default=None,
                   help="parts: 'default' drops the first (CLS) token, 'full' keeps all (default: CLIP default, SigLIP full)")
    p.add_argument("--tokenizer", help="tokenizer dir (for preset:NAME)")
    p.add_argument("--teacher", help="teacher: any --init source but preset/parts (a model dir, RUN/checkpoint, "
                   "llava:DIR or an HF LLaVA dir; stages 1, 2)")
    p.add_argument("--data", help="LLaVA-format JSON (stage all: --data-pretrain / --data-instruct)")
    p.add_argument("--data-pretrain", help="stage all: stage-1 data")
    p.add_argument("--data-instruct", help="stage all: stage-2/3 data")
    p.add_argument("--image-folder", default=".")
    p.add_argument("--out", required=False)
    p.add_argument("--trainable", default=None, help="adapter | adapter+lora | adapter+llm")
    p.add_argument("--full-llm", action="store_true", help="stage 2: train the whole LLM instead of LoRA")
    p.add_argument("--lora-r", type=int, default=128)
    p.add_argument("--lora-alpha", type=int, default=256)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--taf", action=argparse.BooleanOptionalAction, default=True, help="TAF projector (stage 1)")
    p.add_argument("--w-lm", type=float, default=1.0)
    p.add_argument("--w-kl", type=float, default=1.0)
    p.add_argument("--w-vat", type=float, default=1.0, help="L_ADL weight in stage 2 (0 = the KD-only baseline)")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--kd-chunk", type=int, default=512, help="rows of logits materialised at a time in L_LM/L_KL")
    p.add_argument("--cross-vocab", action="store_true", help="a teacher with its own tokenizer: L_KL becomes ULD "
                   "(train.uld_loss) over the positions whose tokens end at the same character of an answer "
                   "(data.aligned_pairs, counted as kd_pairs in the log); VAT aligns the visual query rows only")
    p.add_argument("--kd-divergence", choices=list(KD_DIVERGENCES), default="forward", help="L_KL's divergence: "
                   "forward KL(p_t||p_s) (the paper), reverse KL(p_s||p_t), or jsd, the generalized JSD of GKD as TRL "
                   "computes it (no T^2 factor; train.divergence_rows)")
    p.add_argument("--kd-jsd-beta", type=float, default=0.5, help="--kd-divergence jsd: the teacher's weight in the "
                   "mixture beta*p_t + (1-beta)*p_s, in [0, 1] (TRL's beta: 0 = forward KL, 1 = reverse KL)")
    p.add_argument("--vat-layers", default="middle", help="student layers: middle|early|late|all|authors|auto|"
                   "0.3-0.7|8,9,10 (auto: the window vat.auto_layers finds in the model's measured attention)")
    p.add_argument("--vat-teacher-layers", default=None, help="teacher layers (default: same rule as the student)")
    p.add_argument("--vat-auto-samples", type=int, default=64, help="training samples with an image that "
                   "--vat-layers auto measures each model on, before the first step")
    p.add_argument("--vat-matching", default="group", choices=["group", "uniform", "one_to_one"])
    p.add_argument("--vat-distance", default="cosine", choices=["cosine", "mse", "kl"])
    p.add_argument("--vat-variant", default="paper", choices=["paper", "official"])
    p.add_argument("--vat-headwise", action="store_true")
    p.add_argument("--lr", type=per_stage(float), default=2e-4, help="one value, or three for --stage all (1,2,3)")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--global-batch", type=per_stage(int), default=None, help="samples per optimizer step over all ranks "
                   "and micro-batches; default: the paper's per stage (docs/method.md section 5), "
                   + ", ".join(f"{k}: {v}" for k, v in STAGE_GLOBAL_BATCH.items()) + "; one value applies to every "
                   "stage, three comma-separated values to stages 1, 2, 3 of --stage all")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader worker processes per rank (image "
                   "decode, processor, collate; also the rendering pool at the start); default: 0 on CPU, else "
                   "min(4, CPUs per rank - 1)")
    p.add_argument("--group-by-length", action="store_true", help="batches of similar length (LLaVA's "
                   "group_by_modality_length): every sample still once per epoch, far less right padding")
    p.add_argument("--epochs", type=per_stage(float), default=1.0, help="one value, or three for --stage all")
    p.add_argument("--max-steps", type=per_stage(int), default=0, help="one value, or three for --stage all "
                   "(e.g. 100,50,200; 0 = --epochs)")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--drop-overlong", action="store_true", help="drop (and count) samples whose image + first "
                   "answer token do not fit --max-len, instead of stopping with an error")
    p.add_argument("--skip-bad-images", action="store_true", help="skip (and count) samples whose image is "
                   "missing, unreadable or corrupt, instead of stopping before training")
    p.add_argument("--strict-rgb", action="store_true", help="treat non-RGB images (grayscale, RGBA, ...) as bad "
                   "images; by default they are converted to RGB, as LLaVA does, and counted (converted_non_rgb)")
    p.add_argument("--allow-non-rgb", action="store_true", help="no-op, kept for old command lines: non-RGB images "
                   "are converted by default now (--strict-rgb for the old refusal)")
    p.add_argument("--image-aspect-ratio", choices=list(M.ASPECT_RATIOS), default=None, help="squash (resize to "
                   "the encoder's square) or pad (LLaVA-1.5: pad to a square with the processor's mean colour); "
                   "default: what the --init model recorded, else squash. Recorded in the saved config")
    p.add_argument("--system-prompt", default=None, help="system turn of every sample, replacing the chat "
                   "template's default (Qwen2.5 adds a 21-token one); 'none' for no system turn where the "
                   "template allows. Recorded in the saved config, so evaluate.py prompts the same way")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--fsdp", action="store_true", help="shard the student and the teacher with PyTorch FSDP2 "
                   "(fully_shard; parameters, gradients and optimizer state split over the ranks) instead of DDP; "
                   "under torchrun. Same losses, VAT capture and checkpoints (README, 'Memory per model pair')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-seed", type=int, default=0, help="init seed of preset models")
    p.add_argument("--device", default="auto")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--report-to", default="none", help="none | wandb | tensorboard, comma-separated: sinks that receive "
                   "the same records as log.jsonl (rank 0; step is the x axis; the packages are optional)")
    p.add_argument("--run-name", default=None, help="the run's name in wandb / its TensorBoard subdirectory "
                   "(--stage all: NAME-stage1, ...)")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], default=None, help="dtype of the "
                   "saved model.safetensors; default: the dtype the LLM came in (parts / llava), float32 for presets")
    p.add_argument("--eval-sugarcrepe", help="validation set in the SugarCrepe layout: its CR accuracy (the paper's "
                   "2-choice protocol, greedy) is logged every --eval-every steps as {'step', 'val_cr'} lines")
    p.add_argument("--eval-coco-images", help="images of --eval-sugarcrepe (the official layout keeps COCO val2017 "
                   "elsewhere; default EVAL_SUGARCREPE/images)")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=None, help="items per subset in the in-loop validation")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint (an --out holding no "
                   "run starts fresh; a run without a usable checkpoint is an error)")
    p.add_argument("--overwrite", action="store_true", help="a fresh run into an --out holding a previous run: "
                   "remove that run's files first (without it, such an --out is refused)")
    p.add_argument("--max-nonfinite", type=int, default=5, help="stop after this many non-finite steps in a row")
    p.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--fail-at-step", type=int, default=-1, help=argparse.SUPPRESS)  # test hook (rank death)
    p.add_argument("--fail-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--demo", action="store_true", help=argparse.SUPPRESS)  # moved: python demo.py
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        parse_report_to(args.report_to)  # a missing sink package stops here, before any model loads
    except ValueError as e:
        get_parser().error(str(e))
    if not 0.0 <= args.kd_jsd_beta <= 1.0:
        get_parser().error(f"--kd-jsd-beta must be in [0, 1], got {args.kd_jsd_beta}")
    if args.demo:
        raise SystemExit("the demo is its own script now: python demo.py (python demo.py --help for its options)")
    problems = check_args(args)
    if problems:
        get_parser().error("; ".join(problems))
    if args.stage == "all":
        base = args.out
        for i, (stage, data_path) in enumerate((("1", args.data_pretrain or args.data),
                                                ("2", args.data_instruct or args.data),
                                                ("3", args.data_instruct or args.data))):
            sub = argparse.Namespace(**vars(args))
            sub.stage, sub.data, sub.out = stage, data_path, os.path.join(base, f"stage{stage}")
            for name in PER_STAGE:  # three values: this stage's; one value: every stage's
                value = getattr(args, name)
                setattr(sub, name, value[i] if isinstance(value, tuple) else value)
            sub.global_batch = sub.global_batch or STAGE_GLOBAL_BATCH[stage]
            sub.run_name = f"{args.run_name}-stage{stage}" if args.run_name else None
            if stage != "1":
                sub.init = os.path.join(base, f"stage{int(stage) - 1}")
            if args.resume and stage_finished(sub):
                print(f"stage {stage}: finished in {sub.out} (trainer_summary.json), skipped")
                continue
            run_stage(sub)
        return base
    if not (args.init and args.data and args.out):
        get_parser().error("--init, --data and --out are required")
    for name in PER_STAGE:
        if isinstance(getattr(args, name), tuple):
            get_parser().error(f"--{name.replace('_', '-')} takes three values only with --stage all")
    return run_stage(args)


if __name__ == "__main__":
    main()
