"""The distillation losses (docs/method.md section 4), from the final hidden states, chunk by chunk:

  L_LM  next-token cross-entropy on the supervised (assistant) tokens, `hidden[:, :-1]` vs `labels[:, 1:]`.
  L_KL  forward KL(p_teacher || p_student) * T^2 on the same shifted positions, p = softmax(logits / T), fp32
        (the paper's); reverse KL or GKD's generalized JSD as options (`divergence_rows`).
  ULD   across vocabularies (--cross-vocab): Universal Logit Distillation on text-aligned positions (`uld_loss`).

Both token losses are divided by a count the caller gives (train.py: the supervised tokens of the whole global
batch), so 1 process and N processes with the same global batch take the same step. Neither model's full
(B, T, V) logits ever exist: only (chunk, V) at a time, forward and backward. L_ADL (Eq. 3) is vat.py's.

This file needs only torch, so it can be copied into another code base (like vat.py and taf.py).

    lm, kd = lm_and_kd_loss(student_hidden, student_head.weight, labels, n_tokens, teacher_hidden,
                            teacher_head.weight, temperature=1.0)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def head_logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 logits h @ w^T of one chunk of rows, outside autocast (bf16 autocast would round them). A bf16 /
    fp16 head on CUDA (the teacher's) runs on tensor cores with an fp32 output (`torch.mm(..., out_dtype=
    torch.float32)`: products of two bf16 numbers are exact in fp32, so this is the fp32 product of the upcast
    operands up to the order of summation) and is never copied to fp32; an fp32 head (the student's master
    weights, everything on the CPU) is multiplied in fp32 with the chunk upcast."""
    with torch.autocast(h.device.type, enabled=False):
        if h.is_cuda and w.dtype in (torch.bfloat16, torch.float16):
            return torch.mm(h.to(w.dtype), w.t(), out_dtype=torch.float32)
        return h.float() @ w.float().t()


def _chunk_pass(h_s, w_s, targets, h_t, w_t, temperature, divergence, beta, chunk_size, grad_h, grad_w):
    """One pass over the rows, `chunk_size` at a time: the summed cross-entropy and divergence, and (where
    asked) their gradients, each kept apart (the caller weights them later): d/dh (rows, D) and d/dW (V, D).
    The teacher's logits are computed once per chunk, under no_grad, sliced to the student's vocabulary (a
    padded teacher head's extra rows are never multiplied); only (chunk, V) logits exist at a time."""
    N, V = h_s.shape[0], w_s.shape[0]
    ce_sum = torch.zeros((), dtype=torch.float32, device=h_s.device)
    kd_sum = torch.zeros((), dtype=torch.float32, device=h_s.device)
    teacher = h_t is not None
    ws32 = w_s.detach().float()  # a no-op for fp32 master weights; otherwise ONE copy per call, not per chunk
    dh = [torch.zeros(N, w_s.shape[1], dtype=torch.float32, device=h_s.device) for _ in range(1 + teacher)] \
        if grad_h else None
    dw = [torch.zeros(V, w_s.shape[1], dtype=torch.float32, device=h_s.device) for _ in range(1 + teacher)] \
        if grad_w else None
    with torch.autocast(h_s.device.type, enabled=False):  # fp32 throughout, whatever the loop's autocast
        for i in range(0, N, chunk_size):
            hs = h_s[i:i + chunk_size].detach()
            with torch.no_grad():
                logits_t = head_logits(h_t[i:i + chunk_size], w_t[:V]) if teacher else None
            z = head_logits(hs, ws32)
            if divergence == "forward" or not teacher:
                ce, kd, gz = _forward_kl_rows(z, targets[i:i + chunk_size], logits_t, temperature, grad_h or grad_w)
            else:  # reverse KL, JSD: their gradients by autograd, on the chunk's logits only
                with torch.enable_grad():
                    z.requires_grad_(grad_h or grad_w)
                    ce = F.cross_entropy(z, targets[i:i + chunk_size], reduction="sum")
                    kd = divergence_rows(z, logits_t, temperature, divergence, beta)
                    gz = ([torch.autograd.grad(ce, z, retain_graph=True)[0], torch.autograd.grad(kd, z)[0]]
                          if grad_h or grad_w else None)
            del z, logits_t
            if gz is not None:  # through the head by hand
                hs32 = hs.float()
                for k, g in enumerate(gz):
                    if grad_h:
                        dh[k][i:i + chunk_size] = g @ ws32
                    if grad_w:
                        dw[k].addmm_(g.t(), hs32)
                del gz
            ce_sum += ce.detach()
            if teacher:
                kd_sum += kd.detach()
    return ce_sum, kd_sum, dh, dw


@torch.no_grad()
def _forward_kl_rows(z, targets, logits_t, temperature: float, want_grad: bool):
    """One chunk's summed cross-entropy and forward KL (divergence_rows's "forward", the paper's L_KL) from fp32
    logits, with their gradients with respect to the student's logits in closed form, in place where the
    chunk allows (5 (chunk, V) tensors at most):
        d CE / dz = softmax(z) - onehot(y),   d [T^2 KL(p_t || p_s)] / dz = T (softmax(z / T) - p_t).
    logits_t None (no teacher): the divergence is 0. -> (ce, kd, [d CE/dz, d KL/dz] or None)."""
    rows = torch.arange(z.shape[0], device=z.device)
    logp_s = F.log_softmax(z, dim=-1)
    ce = -logp_s[rows, targets].sum()
    gz = None
    if want_grad:
        gz = [logp_s.exp()]
        gz[0][rows, targets] -= 1
    if logits_t is None:
        return ce, None, gz
    logp_sT = logp_s if temperature == 1 else F.log_softmax(z / temperature, dim=-1)
    logp_t = F.log_softmax(logits_t / temperature, dim=-1)
    p_t = logp_t.exp()
    kd = logp_t.sub_(logp_sT).mul_(p_t).sum() * temperature ** 2  # sum p_t (log p_t - log p_s)
    del logp_t
    if want_grad:
        gz.append(logp_sT.exp_().sub_(p_t).mul_(temperature))
    return ce, kd, gz


class _HeadLosses(torch.autograd.Function):
    """(sum CE, sum divergence) over the rows with their gradients computed in the forward pass, chunk by chunk
    (_chunk_pass), so the backward only scales them: nothing is recomputed, the teacher's logits least of all.
    Saved for the backward: d/dh (rows, D) per loss, and d/dW (V, D) per loss when the head trains."""

    @staticmethod
    def forward(ctx, h_s, w_s, targets, h_t, w_t, temperature, divergence, beta, chunk_size):
        grad_h, grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ce, kd, dh, dw = _chunk_pass(h_s, w_s, targets, h_t, w_t, temperature, divergence, beta, chunk_size,
                                     grad_h, grad_w)
        ctx.dh, ctx.dw, ctx.dtypes = dh, dw, (h_s.dtype, w_s.dtype)
        return ce, kd

    @staticmethod
    def backward(ctx, g_ce, g_kd):
        def combine(parts, dtype):
            if parts is None:
                return None
            out = parts[0].mul_(g_ce)
            if len(parts) > 1:
                out.add_(parts[1].mul_(g_kd))
            return out.to(dtype)
        gh, gw = combine(ctx.dh, ctx.dtypes[0]), combine(ctx.dw, ctx.dtypes[1])
        ctx.dh = ctx.dw = None
        return gh, gw, None, None, None, None, None, None, None


def lm_and_kd_loss(student_hidden, student_head_weight, labels, num_tokens, teacher_hidden=None,
                   teacher_head_weight=None, temperature: float = 1.0, chunk_size: int = 512,
                   divergence: str = "forward", beta: float = 0.5):
    """L_LM and L_KL (docs/method.md section 4) from the final hidden states, chunk by chunk.

    L_LM = -(1/N) sum_t log p_s(y_{t+1} | y_<=t)
    L_KL = (T^2/N) sum_t sum_v p_t(v) (log p_t(v) - log p_s(v)),  p = softmax(logits / T)
    over the supervised shifted positions t (labels[:, 1:] != -100), N = `num_tokens`, the count over
    the whole global batch. `divergence` "reverse" / "jsd" (with `beta`) replace the forward KL by another
    divergence on the same chunked path (`divergence_rows`: reverse KL, TRL's generalized JSD). Logits and
    both losses are fp32 (head_logits). Only (chunk, V) logits exist at a time: each chunk's student and
    teacher logits are computed once, in the forward pass, with the losses' gradients with respect to the
    student's hidden states (and head, when it trains), which the backward pass only scales (_HeadLosses).
    Returns (lm_loss, kd_loss) as 0-dim tensors (kd is 0 without a teacher)."""
    if divergence not in KD_DIVERGENCES:
        raise ValueError(f"divergence must be one of {KD_DIVERGENCES}, got {divergence!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"the JSD beta must be in [0, 1], got {beta}")
    h_s, targets, keep = _shifted(student_hidden, labels)
    h_t = None if teacher_hidden is None else teacher_hidden[:, :-1][keep]
    if torch.is_grad_enabled() and (h_s.requires_grad or student_head_weight.requires_grad):
        lm, kd = _HeadLosses.apply(h_s, student_head_weight, targets, h_t, teacher_head_weight, temperature,
                                   divergence, beta, chunk_size)
    else:
        lm, kd = _chunk_pass(h_s, student_head_weight, targets, h_t, teacher_head_weight, temperature, divergence,
                             beta, chunk_size, False, False)[:2]
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
