"""
VAT: Visual Attention Alignment, the loss L_ADL (CompoDistill, arXiv 2510.12184, docs/method.md section 3).

The student is trained so that, in its "visual understanding" layers, the attention its tokens pay
to the VISUAL tokens looks like the teacher's. This file has two halves and depends only on torch
and transformers (copy it into your fork as is):

1. Capture (`capture_visual_attention`): the attention maps A~_l of chosen layers, recorded during
   an ordinary forward of a HF causal LM that keeps running SDPA (or flash attention):

       A_l  = mean_heads softmax(Q K^T * scaling + mask)       over ALL keys (causal, padding)
       A~_l = A_l[rows, visual keys]                            (no renormalisation over visual keys)

   The maps are computed a chunk of query rows at a time in fp32 with a hand-written backward
   (`_VisualKeyProbs`) that recomputes the chunk's probabilities from q and k, so backward keeps only
   q, k and the (B, chunk, N_vis) result, never the (B, H, T, T) probabilities that
   `output_attentions=True` (eager attention on every layer, the authors' way) materialises.
   See `python bench.py`.

2. Loss (`vat_loss`), with the layer choice (`select_layers`) and the group layer matching
   (`group_layer_matching`). The paper and the authors' code differ; both are here:

   variant="paper" (Eq. 3)                        | variant="official" (authors' code)
   -----------------------------------------------+------------------------------------------------
   rows: every valid query row                    | rows: visual query rows only (visual->visual block)
   keys: visual key columns                       | keys: visual key columns
   teacher target: mean of the window's maps      | same
   no filter                                      | "sink filter" per (layer, sample): keep entries
                                                  |  <= mean + std of the block (unbiased std, over the
                                                  |  valid N_b x N_b block incl. its causal zeros) in
                                                  |  BOTH maps; the intersection mask is applied to both
   compare the flattened (rows x keys) maps       | masked mean over the query axis -> one vector per
                                                  |  map (attention each visual key receives); an entry
                                                  |  counts in the mean (numerator and denominator,
                                                  |  both maps) iff it passes the filter AND the
                                                  |  teacher's value is nonzero (so causal zeros do
                                                  |  not dilute the mean); compare the two vectors
   L = 1 - (1/k) sum_j mean_b cos(Abar_t^j, A~_s) | L = sum_j mean_b (1 - cos)   (k times larger scale)
   = MEAN over layers of mean_b (1 - cos)         | = SUM over layers

   In both, "mean_b" is over the samples that HAVE visual tokens; text-only samples add nothing
   (the authors' fixed slice silently covered text there). distance="mse" / "kl" replace 1 - cos for
   the ablation (docs/method.md section 7), see `_per_sample_distance`.

Map layout (what the capture yields and the loss reads), B = batch, T = sequence length:
    visual_mask (B, T) bool, True at visual tokens; N = max number of visual tokens in the batch.
    Sample b's visual positions, in order, are gathered into slots 0..N_b-1; slots >= N_b are padding.
    rows="all":    map (B, T, N)  [or (B, H, T, N) headwise]: row i = query position i
    rows="visual": map (B, N, N)  [or (B, H, N, N)]:          row r = the r-th visual position
    rows="text":   map (B, T, N), only the text rows after the sample's last visual token kept (its
                   question and answer; a diagnostic that aligns what the answer reads, not Eq. 3)
    Padding slots, padded query rows (attention_mask == 0) and text-only samples hold zeros.

Typical DFT step (docs/method.md section 5, stage 2):

    s_layers = select_layers(24, "middle"); t_layers = select_layers(40, "middle")
    matching = group_layer_matching(s_layers, t_layers)
    with torch.no_grad(), capture_visual_attention(teacher_lm, t_layers, vmask, amask) as t_maps:
        teacher_lm(inputs_embeds=t_embeds, attention_mask=amask)
    with capture_visual_attention(student_lm, s_layers, vmask, amask) as s_maps:
        out = student_lm(inputs_embeds=s_embeds, attention_mask=amask)
    loss = lm_loss + kd_loss + vat_loss(s_maps, t_maps, matching, s_layers, vmask, amask)
"""

import contextlib
import itertools
import math

import torch

# -----------------------------------------------------------------------------
# Which layers: the "visual understanding layers" and the group layer matching (docs/method.md section 3)


def _fraction_layers(num_layers: int, start: float, end: float) -> list[int]:
    """Layers l with round(start * L) <= l < round(end * L), rounding half up (not Python's
    banker's rounding). Examples: L=24 -> 7..16, L=28 -> 8..19, L=40 -> 12..27, L=8 -> 2..5."""
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"layer fraction range must satisfy 0 <= start < end <= 1, got {start}-{end}")
    lo, hi = math.floor(start * num_layers + 0.5), math.floor(end * num_layers + 0.5)
    if hi <= lo:
        raise ValueError(f"the fraction range {start}-{end} of a {num_layers}-layer model holds no layer")
    return list(range(lo, hi))


def visual_understanding_layers(num_layers: int, start: float = 0.3, end: float = 0.7) -> list[int]:
    """The paper's "visual understanding layers": 30%-70% of depth (docs/method.md section 3), 0-indexed.
    Rounding: layers l with floor(start*L + 0.5) <= l < floor(end*L + 0.5), e.g. 24 layers -> 7..16."""
    return _fraction_layers(num_layers, start, end)


# The authors' hand-made tables (docs/method.md section 3; their `DistillTrainer.__init__`), 0-indexed and
# inclusive. Student: depth -> (first, last). Teacher: depth -> (first, last, window): student layer j is
# aligned with the mean of teacher layers t_j .. t_j + window - 1 for t_j in first..last, so a teacher uses
# layers first .. last + window - 1, and the group matching below, with n = m - k + 1, gives every student
# layer exactly that window (24-layer student 8..14 <-> 40-layer teacher 13..23: n = 11 - 7 + 1 = 5).
AUTHORS_STUDENT_LAYERS = {24: (8, 14), 28: (9, 15), 40: (13, 19)}
AUTHORS_TEACHER_LAYERS = {24: (8, 14, 2), 28: (9, 15, 3), 32: (11, 17, 3), 40: (13, 19, 5)}


def select_layers(num_layers: int, spec, teacher: bool = False, profile: dict | None = None) -> list[int]:
    """Layer choice for VAT (docs/method.md section 3 and the layer ablation of section 7).

    spec:  "middle" (= 30%-70%, `visual_understanding_layers`), "early" (0%-30%), "late" (70%-100%),
           "all", a fraction range "0.1-0.4", an explicit list "8,9,10" or an inclusive index range
           "8-14", a list of ints, or "authors": the authors' tables, `AUTHORS_STUDENT_LAYERS` (depths 24,
           28, 40) or, with teacher=True, `AUTHORS_TEACHER_LAYERS` (depths 24, 28, 32, 40; every layer of
           the windows); or "auto": the window `auto_layers` finds in `profile`, the model's measured
           attention over the visual tokens (`visual_attention_profile`; train.py and attention.py measure it).
           `teacher` matters for "authors" only, `profile` for "auto" only.
    Returns sorted, distinct, 0-indexed layers."""
    if isinstance(spec, (list, tuple)):
        layers = [int(x) for x in spec]
    elif not isinstance(spec, str):
        raise TypeError(f"layer spec must be a string or a list of ints, got {type(spec).__name__}")
    elif spec == "middle":
        layers = _fraction_layers(num_layers, 0.3, 0.7)
    elif spec == "early":
        layers = _fraction_layers(num_layers, 0.0, 0.3)
    elif spec == "late":
        layers = _fraction_layers(num_layers, 0.7, 1.0)
    elif spec == "all":
        layers = list(range(num_layers))
    elif spec == "auto":
        if profile is None:
            raise ValueError("layer spec 'auto' needs the model's measured attention profile "
                             "(vat.visual_attention_profile): train.py measures it with --vat-layers auto, "
                             "`python attention.py layers` prints it")
        layers = auto_layers(profile, num_layers)
    elif spec == "authors":
        table = AUTHORS_TEACHER_LAYERS if teacher else AUTHORS_STUDENT_LAYERS
        if num_layers not in table:
            raise ValueError(f"the authors' {'teacher' if teacher else 'student'} layer table has no entry for "
                             f"{num_layers} layers (it knows {sorted(table)}); use 'middle' or an explicit list")
        first, last, window = (*table[num_layers], 1)[:3]
        layers = list(range(first, last + window))
    elif "-" in spec and "." in spec:
        start, end = (float(x) for x in spec.split("-"))
        layers = _fraction_layers(num_layers, start, end)
    elif "-" in spec:
        a, b = (int(x) for x in spec.split("-"))
        layers = list(range(a, b + 1))
    else:
        try:
            layers = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"unknown layer spec {spec!r}: use middle, early, late, all, authors, "
                             "a fraction range like 0.3-0.7, or a list like 8,9,10") from None
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad or not layers:
        raise ValueError(f"layer spec {spec!r} gives layers {bad or layers} outside 0..{num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer spec {spec!r} repeats layers: {layers}")
    return sorted(layers)


def group_layer_matching(student_layers, teacher_layers, mode: str = "group") -> list[list[int]]:
    """Teacher layers matched to each student layer (docs/method.md section 3, and the matching ablation).

    group (the paper's Eq.): k student layers s_1..s_k, m >= k teacher layers t_1..t_m, window
        n = m - k + 1; student s_j <-> G_j = {t_j, ..., t_{j+n-1}} (sliding window, stride 1), and the
        target is the mean of the window's maps, Abar_t^j = (1/n) sum_{l in G_j} A~_t^l.
    uniform: one teacher layer per student layer, spread evenly over the teacher's list:
        t index = floor(j * (m - 1) / (k - 1) + 0.5) for j = 0..k-1 (first to last; k = 1 -> middle).
    one_to_one: s_j <-> t_j, requires k == m.
    Returns a list of k lists of teacher layer indices."""
    s, t = list(student_layers), list(teacher_layers)
    k, m = len(s), len(t)
    if k == 0 or m == 0:
        raise ValueError("group_layer_matching: empty layer list")
    if mode == "group":
        if m < k:
            raise ValueError(f"group matching needs at least as many teacher layers as student layers (k={k}, m={m}): "
                             f"give the teacher a window of at least {k} layers (--vat-teacher-layers), fewer "
                             "student layers (--vat-layers), or --vat-matching uniform")
        n = m - k + 1
        return [t[j:j + n] for j in range(k)]
    if mode == "uniform":
        if k == 1:
            return [[t[(m - 1) // 2]]]
        return [[t[math.floor(j * (m - 1) / (k - 1) + 0.5)]] for j in range(k)]
    if mode == "one_to_one":
        if k != m:
            raise ValueError(f"one_to_one matching needs as many teacher as student layers (k={k}, m={m})")
        return [[x] for x in t]
    raise ValueError(f"unknown matching mode {mode!r}: use group, uniform or one_to_one")


# The layer window found from the models (the paper leaves open whether 30%-70% suits every depth, its
# open question 3 in docs/method.md section 8): measure how each layer's attention treats the visual tokens,
# then pick the window by a rule fixed in advance.

def visual_attention_profile(maps: dict, visual_mask, attention_mask=None, object_mask=None) -> dict:
    """Per layer of `maps` (rows="all" maps (B, T, N) from `capture_visual_attention`), per sample:
      share    the mean, over the sample's text query rows after its last visual token (valid, not visual),
               of the row's attention mass on the visual tokens (0..1: how much the text looks at the image);
      entropy  the mean over the same rows of the entropy of the row's attention renormalised over the
               visual tokens, divided by log N_b (0 = all on one patch, 1 = spread evenly over the image);
      object   where object_mask (B, N) bool marks the visual tokens of the object the prompt names (the
               shapes world knows it), the share of the answer position's (the last valid row's) visual
               attention that falls on them; NaN elsewhere.
    Samples without visual tokens or without text rows after the image are NaN throughout.
    Returns {layer: {"share": (B,), "entropy": (B,), "object": (B,)}} float64 on the CPU, so that batches
    can be concatenated and averaged (nanmean) by the caller."""
    B, T = visual_mask.shape
    vm = visual_mask.bool()
    am = torch.ones_like(vm) if attention_mask is None else attention_mask.to(vm.device).bool()
    _, key_valid = visual_positions(vm)
    n_vis = key_valid.sum(1)
    pos = torch.arange(T, device=vm.device)[None, :]
    last_vis = torch.where(vm, pos, -1).max(1).values
    rows = am & ~vm & (pos > last_vis[:, None])                               # (B, T) text rows after the image
    last_row = torch.where(am, pos, -1).max(1).values.clamp_min(0)            # the answer position
    has = (n_vis > 0) & rows.any(1)
    out = {}
    for layer, m in maps.items():
        a = torch.where(key_valid[:, None, :], m.detach().double().to(vm.device), 0.0)   # (B, T, N)
        mass = a.sum(-1)                                                        # (B, T)
        p = a / mass.clamp_min(1e-30)[..., None]
        ent = -(torch.xlogy(p, p)).sum(-1) / n_vis.clamp_min(2).log()[:, None].double()
        n_rows = rows.sum(1).clamp_min(1)
        share = torch.where(rows, mass, 0.0).sum(1) / n_rows
        entropy = torch.where(rows, ent, 0.0).sum(1) / n_rows
        nan = torch.full((B,), float("nan"), dtype=torch.float64, device=vm.device)
        obj = nan
        if object_mask is not None:
            om = object_mask.to(vm.device).bool() & key_valid
            ans = a[torch.arange(B, device=vm.device), last_row]               # (B, N)
            obj = torch.where(om.any(1) & has, (ans * om).sum(1) / ans.sum(1).clamp_min(1e-30), nan)
        out[layer] = {"share": torch.where(has, share, nan).cpu(), "entropy": torch.where(has, entropy, nan).cpu(),
                      "object": obj.cpu()}
    return out


def auto_layers(profile: dict, num_layers: int, min_layers: int = 1) -> list[int]:
    """The "auto" layer window, from a measured profile {layer: {"share": s, "entropy": h, ...}} with one
    number per layer (means over a calibration set; `visual_attention_profile` gives per-sample values,
    which are averaged first if given as tensors or lists).
    Rule, fixed before any measurement and never tuned on a benchmark: a layer's score is
    share * (1 - entropy), the text's attention on the image that is also concentrated on a few patches (the
    paper's "visual understanding" as opposed to modality alignment, which spreads over the image, and
    response generation, which leaves it); the window is the longest run of consecutive layers whose score
    is at least half-way between the lowest and the highest score, the earliest such run on a tie. Every
    layer 0..num_layers-1 must be in the profile.
    `min_layers`: a window shorter than this grows, one layer at a time, by the neighbour (just before or just
    after it) with the higher score, the earlier on a tie, until it has `min_layers` layers. train.py gives the
    teacher's window the student's layer count k: group matching (Eq. 2, `group_layer_matching`) needs
    m >= k teacher layers, and the two windows are measured independently, so a teacher whose run above
    its half-way cut is shorter than the student's would otherwise have no valid matching. The teacher's
    window grows rather than the student's shrinking, because the student's window decides which of its
    layers are trained, and the teacher (the deeper model in the paper) has the layers to spare; the growth
    stays around the teacher's measured peak, taking the next-best adjacent layer each time (docs/method.md
    section 8, open question 3)."""
    missing = [l for l in range(num_layers) if l not in profile]
    if missing:
        raise ValueError(f"auto_layers: the profile lacks layers {missing} of {num_layers}")
    if not 1 <= min_layers <= num_layers:
        raise ValueError(f"auto_layers: a window of at least {min_layers} layers cannot be taken from "
                         f"{num_layers} layers")

    def mean(x):
        x = torch.as_tensor(x, dtype=torch.float64).flatten()
        x = x[~torch.isnan(x)]
        if not len(x):
            raise ValueError("auto_layers: the profile holds no sample with visual tokens and text after them")
        return float(x.mean())
    score = [mean(profile[l]["share"]) * (1.0 - mean(profile[l]["entropy"])) for l in range(num_layers)]
    cut = (min(score) + max(score)) / 2
    best, run = (0, 0), None
    for l, v in enumerate(score + [float("-inf")]):
        if v >= cut and run is None:
            run = l
        elif v < cut and run is not None:
            if l - run > best[1] - best[0]:
                best = (run, l)
            run = None
    lo, hi = best
    while hi - lo < min_layers:  # grow by the better neighbour (the earlier on a tie)
        before = score[lo - 1] if lo > 0 else float("-inf")
        after = score[hi] if hi < num_layers else float("-inf")
        if before >= after:
            lo -= 1
        else:
            hi += 1
    return list(range(lo, hi))


# -----------------------------------------------------------------------------
# Capture: the visual part of the attention maps during an ordinary (SDPA / flash) forward


def visual_positions(visual_mask: torch.Tensor):
    """(B, T) bool visual mask -> (index (B, N) long, valid (B, N) bool), N = max visual count.
    index[b, :N_b] are sample b's visual positions in order; padding slots hold 0 and valid=False."""
    if visual_mask.dim() != 2:
        raise ValueError(f"visual_mask must be (B, T), got shape {tuple(visual_mask.shape)}")
    vm = visual_mask.bool()
    counts = vm.sum(1)
    n = int(counts.max()) if vm.numel() else 0
    index = torch.sort((~vm).int(), dim=1, stable=True).indices[:, :n]  # True positions first, in order
    valid = torch.arange(n, device=vm.device)[None, :] < counts[:, None]
    return index.masked_fill(~valid, 0), valid


def _row_plan(visual_mask, attention_mask, rows: str):
    """Which query rows a map keeps and which are valid: (row_index (B, R), row_valid (B, R))."""
    B, T = visual_mask.shape
    key_index, key_valid = visual_positions(visual_mask)
    not_pad = torch.ones(B, T, dtype=torch.bool, device=visual_mask.device) if attention_mask is None \
        else attention_mask.to(visual_mask.device).bool()
    if rows == "all":
        return torch.arange(T, device=visual_mask.device).expand(B, T), not_pad
    if rows == "visual":
        return key_index, key_valid & not_pad.gather(1, key_index)
    if rows == "text":  # a diagnostic, not the paper's: the text rows after the sample's last visual token
        pos = torch.arange(T, device=visual_mask.device)
        last_visual = torch.where(visual_mask.bool(), pos, -1).max(1).values
        return pos.expand(B, T), not_pad & ~visual_mask.bool() & (pos[None, :] > last_visual[:, None])
    raise ValueError(f"rows must be 'all', 'visual' or 'text', got {rows!r}")


_OUT_DTYPE_BMM = {}  # (device, dtype) -> whether this torch has bmm(..., out_dtype=float32) there (probed once)


def _out_dtype_bmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.bmm(a, b, out_dtype=torch.float32)` runs for `dtype` inputs on `device`: probed once per
    (device, dtype) on a 1x1x1 product. A torch without the overload raises TypeError (no such keyword),
    NotImplementedError (no kernel for this backend) or a RuntimeError (not for this dtype); any of those means
    the upcast path, from now on. An out-of-memory error is not a missing overload: it propagates."""
    key = (str(device), dtype)
    if key not in _OUT_DTYPE_BMM:
        a = torch.zeros(1, 1, 1, device=device, dtype=dtype)
        try:
            ok = torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except torch.OutOfMemoryError:
            raise
        except (TypeError, NotImplementedError, RuntimeError):
            ok = False
        _OUT_DTYPE_BMM[key] = ok
    return _OUT_DTYPE_BMM[key]


def _half_cuda(q, k) -> bool:
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype
            and _out_dtype_bmm(q.device, q.dtype))


def _scores(q, k, bias, scaling: float):
    """q (B, H, c, D), k (B, H_kv, n, D) in the model's dtype, bias (B, 1|H, c, n) -> (B, H, c, n) fp32
    scores q k^T * scaling + bias, accumulated in fp32, never under autocast (it would recast to bf16). The
    key heads are broadcast over their query group (GQA), never copied.
    On CUDA with bf16 / fp16 inputs the product runs on tensor cores with an fp32 output
    (`torch.bmm(..., out_dtype=torch.float32)`): a product of two bf16 (or fp16) numbers is exact in fp32, so
    this equals the fp32 matmul of the upcast inputs up to the order of summation; the scaling is applied to
    the fp32 scores. Elsewhere (CPU, fp32 inputs, a torch without that overload: _out_dtype_bmm, probed once) q
    and k are upcast to fp32 (fp64 stays fp64) and q is scaled before the product, the small side. An error of
    the product itself (a CUDA out-of-memory) propagates and leaves the fast path on."""
    B, H, c, D = q.shape
    H_kv, n = k.shape[1], k.shape[2]
    with torch.autocast(q.device.type, enabled=False):
        if _half_cuda(q, k):
            s = torch.bmm(q.reshape(B * H_kv, (H // H_kv) * c, D), k.reshape(B * H_kv, n, D).transpose(1, 2),
                          out_dtype=torch.float32)  # any error here (out of memory) propagates: train.py advises
            return s.view(B, H, c, n).mul_(scaling).add_(bias)
        dtype = torch.promote_types(q.dtype, torch.float32)
        qs = (q.to(dtype) * scaling).view(B, H_kv, H // H_kv, c, D)
        s = torch.matmul(qs, k.to(dtype)[:, :, None].transpose(-1, -2)).view(B, H, c, n)
    return s.add_(bias)


class _VisualKeyProbs(torch.autograd.Function):
    """A~ of docs/method.md section 3 for one chunk: P[..., visual keys] with P = softmax(q k^T * scaling
    + bias) over ALL n keys, in fp32, and a hand-written backward that recomputes P from q and k, so nothing
    of size (B, H, c, n) is kept between forward and backward; q and k are kept in the model's dtype.

    For a = P_{t,v} (v a visual key) and s the scores: da/ds_j = a (1[j = v] - P_j), hence
        ds = scatter_v(g * a) - P * sum_v(g * a)          (g = dL/da, one (B, H, c, n) buffer)
        dq = scaling ds k,   dk = scaling ds^T q   (summed over each key head's query group), in fp32."""

    @staticmethod
    def forward(ctx, q, k, bias, index, inside, scaling):
        probs = _scores(q, k, bias, scaling).softmax(dim=-1)
        out = torch.where(inside, probs.gather(3, index), 0.0)
        ctx.save_for_backward(q, k, bias, index, inside)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, bias, index, inside = ctx.saved_tensors
        B, H, c, D = q.shape
        H_kv, n = k.shape[1], k.shape[2]
        probs = _scores(q, k, bias, ctx.scaling).softmax(dim=-1)
        ga = torch.where(inside, grad * probs.gather(3, index), 0.0)  # g * a, (B, H, c, N)
        ds = probs.mul_(-ga.sum(-1, keepdim=True)).scatter_add_(3, index, ga)  # in place: P is not needed again
        ds = ds.view(B, H_kv, H // H_kv, c, n)
        with torch.autocast(q.device.type, enabled=False):  # fp32, like the forward (backward may run under autocast)
            kf, qf = k.to(ds.dtype), q.to(ds.dtype)
            dq = torch.matmul(ds, kf[:, :, None]).view(B, H, c, D).mul_(ctx.scaling)
            dk = torch.matmul(ds.transpose(-1, -2), qf.view(B, H_kv, H // H_kv, c, D)).sum(2).mul_(ctx.scaling)
        return dq.to(q.dtype), dk.to(k.dtype), None, None, None, None


def _visual_attention_chunk(query, key, mask, key_padding, rows, key_index, scaling: float, headwise: bool,
                            n_keys: int):
    """A~ for a chunk of query rows (docs/method.md section 3): softmax(q k^T * scaling + mask) over ALL
    keys, in fp32, then the visual key columns and the mean over heads (unless headwise).

    query (B, H, T, D), key (B, H_kv, T, D) (GQA: query head h uses key head h // (H / H_kv), as
    transformers' repeat_kv), rows (B, c) query positions, key_index (B, N) visual key positions.
    mask: the model's 4D mask (B|1, 1|H, T, T), bool (True = attend) or float (additive); or None:
    causal, plus key_padding (B, T) bool (True = real token) when given.
    n_keys: keys >= n_keys are masked for every row of the chunk (causality), so they are skipped:
    their probability is exactly 0 and they add nothing to the softmax's normaliser.
    Returns (B, c, N) or, headwise, (B, H, c, N) fp32. Backward (`_VisualKeyProbs`) recomputes the
    probabilities instead of storing them."""
    B, H, T, D = query.shape
    c, N = rows.shape[1], key_index.shape[1]
    q = query.gather(2, rows[:, None, :, None].expand(B, H, c, D))  # the chunk's rows, in the model's dtype
    k = key[:, :, :n_keys]
    lowest = torch.finfo(torch.float32).min
    with torch.no_grad():
        if mask is None:
            keep = torch.arange(n_keys, device=rows.device)[None, None, :] <= rows[:, :, None]  # causal
            if key_padding is not None:
                keep = keep & key_padding[:, None, :n_keys]
            bias = torch.zeros(keep.shape, device=keep.device).masked_fill_(~keep, lowest)[:, None]  # (B, 1, c, n)
        else:
            m = mask[..., :n_keys].expand(B, -1, -1, -1)
            m = m.gather(2, rows[:, None, :, None].expand(B, m.shape[1], c, n_keys))
            bias = torch.zeros(m.shape, device=m.device).masked_fill_(~m, lowest) if m.dtype == torch.bool \
                else m.float().clamp_min(lowest)  # no -inf: a fully masked row stays finite (uniform, like eager), not NaN
    inside = (key_index < n_keys)[:, None, None, :]  # visual keys beyond n_keys: probability 0
    index = key_index.clamp_max(n_keys - 1)[:, None, None, :].expand(B, H, c, N)
    probs = _VisualKeyProbs.apply(q, k, bias, index, inside, scaling)
    return probs if headwise else probs.mean(dim=1)


def _allows_future_keys(mask) -> bool:
    """Whether a 4D model mask lets some query see a later key (not a plain causal decoder mask)."""
    T_q, T_k = mask.shape[-2:]
    future = torch.ones(T_q, T_k, dtype=torch.bool, device=mask.device).triu(1)
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return bool((allowed & future).any())


def _visual_attention_map(query, key, mask, key_padding, plan, scaling: float, headwise: bool, query_chunk: int):
    """A~_l for one layer (docs/method.md section 3), chunk by chunk over the query rows.
    Backward keeps q and k (which the attention itself saves anyway) and recomputes each chunk's
    probabilities (`_VisualKeyProbs`), instead of storing (B, H, chunk, T).
    Under a causal mask a chunk only looks at the keys up to its last row."""
    row_index, row_valid, key_index, key_valid, chunk_ends = plan
    B, H, R, N = query.shape[0], query.shape[1], row_index.shape[1], key_index.shape[1]
    T = key.shape[2]
    shape = (B, H, R, N) if headwise else (B, R, N)
    if N == 0:  # no visual token in the batch: an empty map, still connected to q and k (DDP-friendly)
        return query.new_zeros(shape, dtype=torch.float32) + 0.0 * (query.float().sum() + key.float().sum())
    causal = mask is None or not _allows_future_keys(mask)
    chunks = []
    for j, i in enumerate(range(0, R, query_chunk)):
        n_keys = chunk_ends[j] if causal else T
        args = (query, key, mask, key_padding, row_index[:, i:i + query_chunk], key_index, scaling, headwise, n_keys)
        chunks.append(_visual_attention_chunk(*args))
    a = torch.cat(chunks, dim=-2) if chunks else query.new_zeros(shape, dtype=torch.float32)
    valid = row_valid[:, :, None] & key_valid[:, None, :]
    return torch.where(valid[:, None] if headwise else valid, a, 0.0)


def _identity(x):
    return x


SUPPORTED_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")
_capture_ids = itertools.count()


def _decoder_config(language_model):
    config = language_model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _configs(language_model) -> list:
    """Every distinct config object the model's modules read `_attn_implementation` from."""
    from transformers import PretrainedConfig

    found = {id(language_model.config): language_model.config}
    for module in language_model.modules():
        cfg = getattr(module, "config", None)
        if isinstance(cfg, PretrainedConfig):
            found.setdefault(id(cfg), cfg)
    return list(found.values())


@contextlib.contextmanager
def capture_visual_attention(language_model, layers, visual_mask, attention_mask=None, rows: str = "all",
                             headwise: bool = False, query_chunk: int = 256):
    """Record A~_l (docs/method.md section 3) of `layers` during ONE forward of `language_model`.

        with capture_visual_attention(lm, [8, 9, 10], vmask, amask) as maps:
            lm(inputs_embeds=x, attention_mask=amask)
        maps[9]  # (B, T, N) fp32 (see the module docstring for the layout)

    language_model: a HF decoder (Qwen2, Llama, ...) loaded with attn_implementation "sdpa" or
        "flash_attention_*", whose attention modules call
        ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...) and carry `layer_idx`.
    visual_mask (B, T) bool; attention_mask (B, T) 0/1 or None (no padding); rows "all" | "visual" | "text";
    headwise keeps the heads: (B, H, R, N); query_chunk: query rows per chunk.

    How: for the duration, every config of the model points `_attn_implementation` at a freshly
    registered attention function (and the matching mask function, so masks are still built the
    original way). For the chosen layers it computes the map and then, like every other layer, hands
    the attention itself to the original implementation: the model's output is unchanged, and
    `output_attentions` stays off. The original value is restored on exit, also on exceptions.
    Only the first call of each layer is recorded, so gradient-checkpointing recomputation (which
    re-runs the layer during backward) neither overwrites nor duplicates the maps.
    Raises on exit if a chosen layer was never seen (its attention bypasses the interface)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = _decoder_config(language_model)
    model_name = type(language_model).__name__
    num_layers = config.num_hidden_layers
    layers = sorted(set(int(l) for l in layers))
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"capture_visual_attention: layers {layers} out of range for {model_name} with {num_layers} layers")
    layer_types = getattr(config, "layer_types", None)
    sliding = [l for l in layers if layer_types is not None and layer_types[l] == "sliding_attention"]
    if sliding or (layer_types is None and getattr(config, "use_sliding_window", False)
                   and getattr(config, "sliding_window", None)):
        raise NotImplementedError(f"capture_visual_attention: sliding-window attention on layers {sliding or layers} "
                                  f"of {model_name} is not supported")
    original = config._attn_implementation
    if original not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(f"capture_visual_attention: {model_name} uses attn_implementation={original!r}; load it with "
                         f"one of {SUPPORTED_IMPLEMENTATIONS} (eager is what this capture replaces)")
    if attention_mask is not None and attention_mask.shape != visual_mask.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} and visual_mask {tuple(visual_mask.shape)} differ in shape")

    row_index, row_valid = _row_plan(visual_mask, attention_mask, rows)
    key_index, key_valid = visual_positions(visual_mask)
    rows_host = row_index.cpu()  # last query position of each chunk (+1), known once, on the host
    chunk_ends = [int(rows_host[:, i:i + query_chunk].max()) + 1 for i in range(0, rows_host.shape[1], query_chunk)]
    plan = (row_index, row_valid, key_index, key_valid)
    key_padding = None if attention_mask is None else attention_mask.bool()
    original_fn = ALL_ATTENTION_FUNCTIONS[original]
    wanted, maps = set(layers), {}

    def attention_with_capture(module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", None)
        if layer in wanted:
            if kwargs.get("sliding_window") is not None:
                raise NotImplementedError(f"capture_visual_attention: layer {layer} of {model_name} uses a sliding window")
            B, T = visual_mask.shape
            if query.shape[0] != B or query.shape[2] != T or key.shape[2] != T:
                raise ValueError(f"capture_visual_attention: visual_mask is (B={B}, T={T}) but layer {layer} sees "
                                 f"query {tuple(query.shape)} and key {tuple(key.shape)} (a cache is not supported)")
            dev = query.device
            mask = attention_mask  # the mask the model built for this layer
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                use_mask, padding = mask, None  # bool (True = attend) or float additive
            elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
                use_mask, padding = None, mask.to(dev).bool()  # flash: the 2D padding mask
            else:
                use_mask, padding = None, None if key_padding is None else key_padding.to(dev)  # sdpa is_causal path
            # Own (identity) saved-tensor hooks: if the layer runs under gradient checkpointing, what the map
            # saves for backward is kept here instead of being left to the layer's recomputation, which
            # happens after this context has exited (plain attention, no capture) and must see the same ops.
            with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
                a = _visual_attention_map(query, key, use_mask, padding, tuple(x.to(dev) for x in plan) + (chunk_ends,),
                                          kwargs.get("scaling") or query.shape[-1] ** -0.5, headwise, query_chunk)
            if layer not in maps:
                maps[layer] = a
        if original.startswith("flash"):  # flash_attention_forward picks its kernel from the config's name
            with _attn_implementation(module.config, original):
                return original_fn(module, query, key, value, attention_mask, **kwargs)
        return original_fn(module, query, key, value, attention_mask, **kwargs)

    # a fresh name per context (contexts may nest: teacher and student); it keeps "flash..." in it so
    # transformers' is_flash_attention_requested() still sees flash models as flash
    name = f"vat{next(_capture_ids)}_capture_{original}"
    AttentionInterface.register(name, attention_with_capture)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    configs = _configs(language_model)
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name  # the property setter (configuration_utils), recursing into sub-configs
        yield maps
    finally:
        for c, value in zip(reversed(configs), reversed(saved)):
            c._attn_implementation = value
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)
    missing = [l for l in layers if l not in maps]
    if missing:
        raise RuntimeError(f"capture_visual_attention: layers {missing} of {model_name} were never captured: its "
                           "attention does not dispatch through transformers' AttentionInterface "
                           "(config._attn_implementation), or no forward ran inside the context")


@contextlib.contextmanager
def _attn_implementation(config, value):
    saved = config._attn_implementation
    config._attn_implementation = value
    try:
        yield
    finally:
        config._attn_implementation = saved


# -----------------------------------------------------------------------------
# The loss L_ADL (docs/method.md section 3, Eq. 3) and its variants


def _per_sample_distance(s, t, valid, distance: str):
    """Distance between student maps s and teacher targets t, (S, R, N) each, over the entries where
    valid (S, R, N) is True; returns (S,).
      cosine: 1 - cos(s, t) of the flattened valid entries (Eq. 3; norms clamped at 1e-8).
      mse:    mean over valid entries of (s - t)^2.
      kl:     each row renormalised over its valid visual keys to a distribution,
              KL(p_t || p_s) = sum_k p_t log(p_t / p_s), averaged over the rows whose teacher and student
              rows both have mass (p_s clamped at 1e-12 inside the log; 0 log 0 = 0)."""
    s = torch.where(valid, s, 0.0)
    t = torch.where(valid, t, 0.0)
    if distance == "cosine":
        dot = (s * t).sum((1, 2))
        ns = s.pow(2).sum((1, 2)).clamp_min(1e-16).sqrt()
        nt = t.pow(2).sum((1, 2)).clamp_min(1e-16).sqrt()
        return 1.0 - dot / (ns * nt)
    if distance == "mse":
        return (s - t).pow(2).sum((1, 2)) / valid.sum((1, 2)).clamp_min(1)
    if distance == "kl":
        ms, mt = s.sum(-1, keepdim=True), t.sum(-1, keepdim=True)
        rows_ok = (ms[..., 0] > 0) & (mt[..., 0] > 0) & valid.any(-1)
        ps, pt = s / ms.clamp_min(1e-30), t / mt.clamp_min(1e-30)
        kl_rows = (torch.xlogy(pt, pt) - pt * ps.clamp_min(1e-12).log()).sum(-1)
        return torch.where(rows_ok, kl_rows, 0.0).sum(-1) / rows_ok.sum(-1).clamp_min(1)
    raise ValueError(f"unknown distance {distance!r}: use cosine, mse or kl")


def _sink_filtered_vectors(s, t, valid):
    """The authors' sink filter (official variant, docs/method.md section 3) on visual->visual blocks
    s, t (S, N, N) with valid (S, N, N): per block, keep entries <= mean + std (mean and unbiased std
    over the valid entries) in BOTH maps, then the masked mean over the query axis, in which an entry
    counts only where the filtered TEACHER value is nonzero (the authors' `compute_loss_distill`:
    mask = teacher_filtered != 0, the same mask and denominator for both maps). So the causal zeros
    above the diagonal (query r < key c) are not in column c's mean, and a student value is dropped
    wherever the teacher's is exactly 0.
    Returns the per-key vectors (S, 1, N) for student and teacher, and their validity (S, 1, N)."""
    def threshold(x):
        n = valid.sum((1, 2)).clamp_min(1)
        mean = torch.where(valid, x, 0.0).sum((1, 2)) / n
        var = torch.where(valid, (x - mean[:, None, None]) ** 2, 0.0).sum((1, 2)) / (n - 1).clamp_min(1)
        return (mean + var.sqrt())[:, None, None]

    with torch.no_grad():
        keep = valid & (s <= threshold(s)) & (t <= threshold(t)) & (t != 0)
    count = keep.sum(1).clamp_min(1)  # (S, N) kept entries per key column
    vs = torch.where(keep, s, 0.0).sum(1) / count
    vt = torch.where(keep, t, 0.0).sum(1) / count
    return vs[:, None], vt[:, None], valid.any(1)[:, None]


def _matched_pairs(student_maps, teacher_maps, matching, student_layers, headwise: bool):
    """Yield (student map, teacher target) per student layer j: the target is the mean of the maps of
    its teacher window, Abar_t^j = (1/n) sum_{l in G_j} A~_t^l (docs/method.md section 3), detached.
    Headwise: teacher heads are averaged in contiguous groups down to the student's head count."""
    if len(matching) != len(student_layers):
        raise ValueError(f"matching has {len(matching)} entries for {len(student_layers)} student layers")
    for s_layer, window in zip(student_layers, matching):
        if s_layer not in student_maps:
            raise KeyError(f"no captured student map for layer {s_layer} (have {sorted(student_maps)})")
        absent = [t for t in window if t not in teacher_maps]
        if absent:
            raise KeyError(f"no captured teacher map for layers {absent} (have {sorted(teacher_maps)})")
        s = student_maps[s_layer]
        t = torch.stack([teacher_maps[l].detach() for l in window]).float().mean(0)
        if s.dim() != (4 if headwise else 3) or t.dim() != s.dim():
            raise ValueError(f"maps have {s.dim()} (student) and {t.dim()} (teacher) dims; expected "
                             f"{4 if headwise else 3} with headwise={headwise} (capture with the same headwise)")
        if headwise and t.shape[1] != s.shape[1]:
            hs, ht = s.shape[1], t.shape[1]
            if ht % hs:
                raise ValueError(f"headwise VAT: teacher has {ht} heads, student {hs}; the teacher's heads are "
                                 f"averaged in contiguous groups, so {ht} must be a multiple of {hs}")
            t = t.view(t.shape[0], hs, ht // hs, *t.shape[2:]).mean(2)
        if s.shape != t.shape:
            raise ValueError(f"student layer {s_layer} map {tuple(s.shape)} vs teacher target {tuple(t.shape)}")
        yield s, t


def _layer_distances(student_maps, teacher_maps, matching, student_layers, visual_mask, attention_mask,
                     variant: str, distance: str, headwise: bool, rows: str):
    """(k, B_v) per-layer, per-sample distances over the B_v samples that have visual tokens, and
    the index of those samples."""
    if variant not in ("paper", "official"):
        raise ValueError(f"unknown VAT variant {variant!r}: use paper or official")
    if variant == "official" and rows == "text":
        raise ValueError("the official variant compares the visual query rows; rows='text' is for the paper variant")
    device = student_maps[student_layers[0]].device if student_layers and student_layers[0] in student_maps else visual_mask.device
    visual_mask = visual_mask.to(device).bool()
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    B, T = visual_mask.shape
    key_index, key_valid = visual_positions(visual_mask)
    row_index, row_valid = _row_plan(visual_mask, attention_mask, rows)
    has_visual = key_valid.any(1)
    samples = has_visual.nonzero()[:, 0]
    out = []
    for s, t in _matched_pairs(student_maps, teacher_maps, matching, student_layers, headwise):
        expected = (B, row_index.shape[1], key_index.shape[1])
        got = (s.shape[0], s.shape[-2], s.shape[-1])
        if got != expected:
            raise ValueError(f"map shape {tuple(s.shape)} does not fit visual_mask {tuple(visual_mask.shape)} with "
                             f"rows={rows!r} (expected (B, R, N) = {expected})")
        s, t = s[samples], t[samples].to(s.device)
        rv, kv, ki = row_valid[samples], key_valid[samples], key_index[samples]
        H = s.shape[1] if headwise else 1
        if headwise:  # fold heads into the sample axis; the distance is averaged over heads below
            s, t = s.flatten(0, 1), t.flatten(0, 1)
            rv, kv, ki = (x.repeat_interleave(H, 0) for x in (rv, kv, ki))
        if variant == "official":
            if rows == "all":  # visual query rows only: the visual->visual block
                idx = ki[:, :, None].expand(-1, -1, s.shape[-1])
                s, t, rv = s.gather(1, idx), t.gather(1, idx), kv & rv.gather(1, ki)
            s, t, valid = _sink_filtered_vectors(s, t, rv[:, :, None] & kv[:, None, :])
        else:
            valid = rv[:, :, None] & kv[:, None, :]
        d = _per_sample_distance(s.float(), t.float(), valid, distance)
        out.append(d.view(-1, H).mean(1))
    return torch.stack(out), samples


def vat_loss(student_maps: dict, teacher_maps: dict, matching, student_layers, visual_mask, attention_mask=None,
             variant: str = "paper", distance: str = "cosine", headwise: bool = False, rows: str = "all"):
    """L_ADL, Eq. 3 (docs/method.md section 3):

        paper:    L = 1 - (1/k) sum_j cos(Abar_t^j, A~_s^{s_j}), per sample, averaged over samples
        official: L = sum_j mean_b (1 - cos(v_t^j, v_s^{s_j})), v = sink-filtered per-key vectors

    student_maps / teacher_maps: {layer: map} from `capture_visual_attention` (same rows, same
        headwise), maps (B, R, N) or headwise (B, H, R, N); teacher maps are detached here.
    matching: `group_layer_matching(student_layers, teacher_layers, mode)`, one teacher window per
        entry of student_layers. visual_mask (B, T) bool, attention_mask (B, T) or None.
    distance: "cosine" (1 - cos, the paper), "mse" or "kl" (the ablation; see `_per_sample_distance`).
    headwise (open question 1): per-head maps, the teacher's heads averaged in contiguous groups down
        to the student's head count; the distance is averaged over heads.
    Samples without visual tokens contribute nothing; with none in the batch the result is a 0 that
    is still connected to the student's maps (so backward() works everywhere)."""
    dist, samples = _layer_distances(student_maps, teacher_maps, matching, student_layers, visual_mask,
                                     attention_mask, variant, distance, headwise, rows)
    if samples.numel() == 0:
        return sum(student_maps[l].sum() for l in student_layers) * 0.0
    per_layer = dist.mean(1)  # mean over the samples that have visual tokens
    return per_layer.mean() if variant == "paper" else per_layer.sum()


@torch.no_grad()
def map_cosine(student_maps: dict, teacher_maps: dict, matching, student_layers, visual_mask, attention_mask=None,
               headwise: bool = False, rows: str = "all") -> torch.Tensor:
    """cos(Abar_t^j, A~_s^{s_j}) of Eq. 3 per layer and sample, (k, B) float, for the attention analysis
    and the logs ("attention distance" = 1 - cos). Samples without visual tokens are NaN."""
    dist, samples = _layer_distances(student_maps, teacher_maps, matching, student_layers, visual_mask,
                                     attention_mask, "paper", "cosine", headwise, rows)
    out = torch.full((len(student_layers), visual_mask.shape[0]), float("nan"), device=samples.device)
    out[:, samples] = 1.0 - dist.to(out.device)
    return out
