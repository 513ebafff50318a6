"""Tests for vat.py (docs/method.md section 3: the visual attention maps and L_ADL, Eq. 3).

References are independent of the implementation: HF eager attention with output_attentions=True
for the capture, float64 loops for the losses, a hand-worked example for the official sink filter,
F.kl_div for the KL distance."""
import copy
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vat  # noqa: E402

# -----------------------------------------------------------------------------
# tiny models and a ragged batch


def tiny_lm(family="qwen2", layers=3, heads=4, kv_heads=2, seed=0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    Config, Model = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                 attn_implementation="sdpa", **extra)
    torch.manual_seed(seed)
    return Model(cfg).float().eval()


def eager_copy(model):
    e = copy.deepcopy(model)
    e.set_attn_implementation("eager")
    return e


T = 48


def ragged_batch():
    """4 samples, T=48: different visual offsets and counts, right padding, one text-only sample."""
    vm = torch.zeros(4, T, dtype=torch.bool)
    am = torch.ones(4, T, dtype=torch.long)
    vm[0, 3:19] = True            # 16 visual tokens at 3, no padding
    vm[1, 10:26] = True           # 16 visual tokens at 10, right-padded from 40
    am[1, 40:] = 0
    am[2, 30:] = 0                # text-only, right-padded
    vm[3, 20:32] = True           # 12 visual tokens at 20, right-padded from 43
    am[3, 43:] = 0
    return vm, am


def reference_maps(eager_model, inputs, vm, am, layers, rows="all", headwise=False):
    """A~_l from HF eager attention: head mean (or heads), visual key columns, chosen rows; built with
    plain per-sample boolean indexing, zero-padded to the layout of the module docstring."""
    out = eager_model(**inputs, attention_mask=am, output_attentions=True)
    n = int(vm.sum(1).max())
    maps = {}
    for l in layers:
        att = out.attentions[l].float()  # (B, H, T, T)
        if not headwise:
            att = att.mean(1, keepdim=True)
        B, H = att.shape[:2]
        R = T if rows == "all" else n
        ref = torch.zeros(B, H, R, n)
        for b in range(B):
            keys = vm[b].nonzero()[:, 0]
            qrows = torch.arange(T) if rows == "all" else keys
            block = att[b][:, qrows][:, :, keys]
            block = block * am[b].bool()[qrows][None, :, None]
            ref[b, :, :len(qrows), :len(keys)] = block
        maps[l] = ref if headwise else ref[:, 0]
    return maps, out.logits


def model_inputs(model, family):
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (4, T))
    if family == "llama":  # feed embeddings, as the multimodal model does
        return {"inputs_embeds": model.get_input_embeddings()(ids).detach()}
    return {"input_ids": ids}


# -----------------------------------------------------------------------------
# capture == HF eager attention


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("rows,headwise", [("all", False), ("visual", False), ("all", True)])
def test_capture_matches_eager(family, rows, headwise):
    model = tiny_lm(family)
    eager = eager_copy(model)
    vm, am = ragged_batch()
    inputs = model_inputs(model, family)
    layers = [0, 2]
    with torch.no_grad():
        ref, _ = reference_maps(eager, inputs, vm, am, layers, rows, headwise)
        with vat.capture_visual_attention(model, layers, vm, am, rows=rows, headwise=headwise, query_chunk=20) as maps:
            model(**inputs, attention_mask=am)
    assert sorted(maps) == layers
    for l in layers:
        assert maps[l].shape == ref[l].shape and maps[l].dtype == torch.float32
        torch.testing.assert_close(maps[l], ref[l], atol=1e-5, rtol=0)
    assert maps[0][2].abs().sum() == 0  # text-only sample: nothing


def test_capture_without_attention_mask_uses_sdpa_causal_path():
    model, vm = tiny_lm("qwen2"), torch.zeros(2, T, dtype=torch.bool)
    vm[0, 5:21] = True
    vm[1, 0:16] = True
    ids = torch.randint(0, 97, (2, T))
    ref = eager_copy(model)(input_ids=ids, output_attentions=True).attentions[1].mean(1)
    with torch.no_grad(), vat.capture_visual_attention(model, [1], vm) as maps:
        model(input_ids=ids)  # sdpa gets mask=None (is_causal fast path): the capture builds the causal mask
    for b in range(2):
        torch.testing.assert_close(maps[1][b], ref[b][:, vm[b]], atol=1e-5, rtol=0)


def test_logits_unchanged_and_config_restored():
    model = tiny_lm("qwen2")
    vm, am = ragged_batch()
    ids = torch.randint(0, 97, (4, T))
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=am).logits
        with vat.capture_visual_attention(model, [0, 1, 2], vm, am) as maps:
            assert model.config._attn_implementation.startswith("vat")
            captured = model(input_ids=ids, attention_mask=am).logits
    assert torch.equal(plain, captured)
    assert model.config._attn_implementation == "sdpa"
    assert all(m.config._attn_implementation == "sdpa" for m in model.modules() if hasattr(m, "config"))
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    assert not [k for k in AttentionInterface._global_mapping if k.startswith("vat")]
    assert not [k for k in AttentionMaskInterface._global_mapping if k.startswith("vat")]
    # restored on exceptions too
    with pytest.raises(KeyError):
        with vat.capture_visual_attention(model, [1], vm, am):
            raise KeyError("boom")
    assert model.config._attn_implementation == "sdpa"


def _student_teacher_loss(student, teacher, vm, am, ids, s_layers, t_layers, use_capture):
    matching = vat.group_layer_matching(s_layers, t_layers)
    if use_capture:
        with torch.no_grad(), vat.capture_visual_attention(teacher, t_layers, vm, am) as t_maps:
            teacher(input_ids=ids, attention_mask=am)
        with vat.capture_visual_attention(student, s_layers, vm, am, query_chunk=16) as s_maps:
            student(input_ids=ids, attention_mask=am)
    else:  # the authors' way: eager attention everywhere + output_attentions
        with torch.no_grad():
            t_maps, _ = reference_maps(teacher, {"input_ids": ids}, vm, am, t_layers)
        s_maps, _ = reference_maps(student, {"input_ids": ids}, vm, am, s_layers)
    return vat_loss_all(s_maps, t_maps, matching, s_layers, vm, am)


def vat_loss_all(*args):
    return vat.vat_loss(*args)


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_gradients_reach_q_k_and_match_eager(grad_ckpt):
    teacher = tiny_lm("qwen2", layers=4, heads=4, kv_heads=4, seed=1)
    student = tiny_lm("qwen2", layers=3, heads=4, kv_heads=2, seed=2).train()
    vm, am = ragged_batch()
    ids = torch.randint(0, 97, (4, T))
    if grad_ckpt:
        student.activation_checkpointing_enable()
        student.config.use_cache = False
    loss = _student_teacher_loss(student, teacher, vm, am, ids, [1, 2], [1, 2, 3], use_capture=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    for l in (1, 2):
        for proj in ("q_proj", "k_proj"):
            g = grads[f"model.layers.{l}.self_attn.{proj}.weight"]
            assert g.abs().sum() > 0
    # the same loss through eager output_attentions gives the same gradients
    ref_student = eager_copy(student)
    ref_student.zero_grad()
    ref = _student_teacher_loss(ref_student, eager_copy(teacher), vm, am, ids, [1, 2], [1, 2, 3], use_capture=False)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
    for n, p in ref_student.named_parameters():
        if "self_attn" in n and p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-4)


def test_capture_errors():
    vm, am = ragged_batch()
    model = tiny_lm("qwen2")
    with pytest.raises(ValueError, match="out of range"):
        with vat.capture_visual_attention(model, [3], vm, am):
            pass
    with pytest.raises(ValueError, match="eager"):
        with vat.capture_visual_attention(eager_copy(model), [1], vm, am):
            pass
    with pytest.raises(RuntimeError, match=r"\[1\].*Qwen2ForCausalLM"):
        with vat.capture_visual_attention(model, [1], vm, am):
            pass  # no forward
    # an attention module that does not identify itself is never captured -> loud error
    del model.model.layers[2].self_attn.layer_idx
    with pytest.raises(RuntimeError, match=r"\[2\]"):
        with torch.no_grad(), vat.capture_visual_attention(model, [1, 2], vm, am):
            model(input_ids=torch.randint(0, 97, (4, T)), attention_mask=am, use_cache=False)
    sliding = tiny_lm("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(NotImplementedError, match="sliding"):
        with vat.capture_visual_attention(sliding, [2], vm, am):
            pass


def test_no_visual_tokens_at_all():
    model = tiny_lm("qwen2").train()
    vm = torch.zeros(2, T, dtype=torch.bool)
    ids = torch.randint(0, 97, (2, T))
    with torch.no_grad(), vat.capture_visual_attention(model, [1], vm) as t_maps:
        model(input_ids=ids)
    with vat.capture_visual_attention(model, [1], vm) as s_maps:
        model(input_ids=ids)
    assert s_maps[1].shape == (2, T, 0)
    loss = vat.vat_loss(s_maps, t_maps, [[1]], [1], vm)
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -----------------------------------------------------------------------------
# layers and matching


def test_layer_selection():
    assert vat.visual_understanding_layers(24) == list(range(7, 17))
    assert vat.select_layers(8, "middle") == [2, 3, 4, 5]
    assert vat.select_layers(10, "early") == [0, 1, 2]
    assert vat.select_layers(10, "late") == [7, 8, 9]
    assert vat.select_layers(4, "all") == [0, 1, 2, 3]
    assert vat.select_layers(10, "0.1-0.4") == [1, 2, 3]
    assert vat.select_layers(24, "8,9,10") == [8, 9, 10]
    assert vat.select_layers(24, [10, 8]) == [8, 10]
    # the authors' tables (DistillTrainer.__init__): student target layers, teacher target layers + group
    assert vat.select_layers(24, "authors") == [8, 9, 10, 11, 12, 13, 14]
    assert vat.select_layers(28, "authors") == [9, 10, 11, 12, 13, 14, 15]
    assert vat.select_layers(40, "authors") == [13, 14, 15, 16, 17, 18, 19]
    for depth, targets, group in ((24, range(8, 15), 2), (40, range(13, 20), 5), (28, range(9, 16), 3),
                                  (32, range(11, 18), 3)):
        t_layers = vat.select_layers(depth, "authors", teacher=True)
        assert t_layers == sorted({l for i in targets for l in range(i, i + group)})
        # with a 7-layer student window, group matching gives the authors' windows [i, i + group)
        assert vat.group_layer_matching(list(range(7)), t_layers) == [list(range(i, i + group)) for i in targets]
    with pytest.raises(ValueError, match="30 layers"):
        vat.select_layers(30, "authors")
    with pytest.raises(ValueError, match="student layer table has no entry for 32"):
        vat.select_layers(32, "authors")
    with pytest.raises(ValueError):
        vat.select_layers(8, "8,9")
    with pytest.raises(ValueError):
        vat.select_layers(8, "middle-ish")


def test_group_matching():
    m = vat.group_layer_matching(list(range(8, 15)), list(range(13, 24)))
    assert m == [list(range(13 + j, 18 + j)) for j in range(7)]  # 13-17, 14-18, ..., 19-23
    assert vat.group_layer_matching([0, 1, 2], list(range(9)), "uniform") == [[0], [4], [8]]
    assert vat.group_layer_matching([5, 6], [7, 9], "one_to_one") == [[7], [9]]
    with pytest.raises(ValueError):
        vat.group_layer_matching([5, 6], [7, 8, 9], "one_to_one")
    with pytest.raises(ValueError):
        vat.group_layer_matching([1, 2, 3], [4, 5], "group")


# -----------------------------------------------------------------------------
# L_ADL against independent recomputations


def random_maps(layers, vm, am, heads=None, seed=0):
    """Random non-negative maps in the capture layout (zeros at padding slots and padded rows)."""
    g = torch.Generator().manual_seed(seed)
    B, n = vm.shape[0], int(vm.sum(1).max())
    valid = am.bool()[:, :, None] & (torch.arange(n)[None, None, :] < vm.sum(1)[:, None, None])
    maps = {}
    for l in layers:
        shape = (B, T, n) if heads is None else (B, heads, T, n)
        x = torch.rand(shape, generator=g)
        maps[l] = x * (valid if heads is None else valid[:, None])
    return maps


def test_paper_cosine_vs_float64_loop():
    vm, am = ragged_batch()
    s_layers, t_layers = [4, 5], [6, 7, 8]
    matching = vat.group_layer_matching(s_layers, t_layers)  # [[6, 7], [7, 8]]
    s_maps = {l: m.requires_grad_() for l, m in random_maps(s_layers, vm, am, seed=1).items()}
    t_maps = random_maps(t_layers, vm, am, seed=2)
    loss = vat.vat_loss(s_maps, t_maps, matching, s_layers, vm, am)
    cos_all = []
    for j, s_l in enumerate(s_layers):
        cos_b = []
        for b in range(4):
            nv, nr = int(vm[b].sum()), int(am[b].sum())
            if nv == 0:
                continue
            s = s_maps[s_l][b, :nr, :nv].double().flatten()
            t = sum(t_maps[t][b, :nr, :nv].double() for t in matching[j]).flatten() / len(matching[j])
            cos_b.append((s @ t) / (s.norm() * t.norm()))
        cos_all.append(sum(cos_b) / len(cos_b))
    expected = 1 - sum(cos_all) / len(cos_all)
    assert abs(loss.item() - expected.item()) < 1e-6
    loss.backward()
    assert s_maps[4].grad is not None and torch.isfinite(s_maps[4].grad).all()
    assert s_maps[4].grad[2].abs().sum() == 0  # text-only sample: no gradient
    cos = vat.map_cosine(s_maps, t_maps, matching, s_layers, vm, am)
    assert cos.shape == (2, 4) and torch.isnan(cos[:, 2]).all()
    assert abs((1 - cos[:, [0, 1, 3]].mean(1).mean()).item() - expected.item()) < 1e-6


def test_text_only_sample_contributes_nothing():
    vm, am = ragged_batch()
    s_maps, t_maps = random_maps([0], vm, am, seed=3), random_maps([0], vm, am, seed=4)
    s_maps[0][2] = torch.rand(T, s_maps[0].shape[-1])  # garbage in the text-only sample must be ignored
    full = vat.vat_loss(s_maps, t_maps, [[0]], [0], vm, am)
    keep = [0, 1, 3]
    sub = vat.vat_loss({0: s_maps[0][keep]}, {0: t_maps[0][keep]}, [[0]], [0], vm[keep], am[keep])
    assert torch.isfinite(full) and abs(full.item() - sub.item()) < 1e-7


def test_official_sink_filter_hand_worked():
    # one sample, T=5, visual tokens at positions 1..3; the 3x3 visual->visual blocks (causal: zeros above
    # the diagonal):
    S = torch.tensor([[0.9, 0.0, 0.0], [0.3, 0.6, 0.0], [0.2, 0.2, 0.4]])
    Tt = torch.tensor([[0.8, 0.0, 0.0], [0.5, 0.4, 0.0], [0.1, 0.1, 0.7]])
    # S: mean 2.6/9 = 0.2889, unbiased std 0.3060 -> keep <= 0.5949: drops 0.9 and 0.6
    # T: mean 0.2889, unbiased std 0.3180 -> keep <= 0.6069: drops 0.8 and 0.7
    # both kept = [[F,T,T],[T,F,T],[T,T,F]]; the authors count an entry only where the filtered teacher
    # value is nonzero, mask = [[F,F,F],[T,F,F],[T,T,F]]; masked mean over the query axis (per key column):
    vs = [(0.3 + 0.2) / 2, 0.2 / 1, 0.0]   # [0.25, 0.2, 0]   (column 2: no entry, count clamped to 1)
    vt = [(0.5 + 0.1) / 2, 0.1 / 1, 0.0]   # [0.3, 0.1, 0]
    cos = sum(a * b for a, b in zip(vs, vt)) / math.sqrt(sum(a * a for a in vs) * sum(b * b for b in vt))
    expected_one_layer = 1 - cos  # 1 - 0.095 / sqrt(0.1025 * 0.1) = 0.06166
    vm = torch.tensor([[False, True, True, True, False]])
    am = torch.ones(1, 5, dtype=torch.long)
    g = torch.Generator().manual_seed(0)

    def full_rows(block):  # rows="all" layout (1, 5, 3): other rows hold noise the official variant ignores
        m = torch.rand(1, 5, 3, generator=g)
        m[0, 1:4] = block
        return m

    s0, t0 = full_rows(S), full_rows(Tt)
    s_maps, t_maps = {0: s0, 1: s0.clone()}, {0: t0, 1: t0.clone()}
    one = vat.vat_loss({0: s_maps[0]}, {0: t_maps[0]}, [[0]], [0], vm, am, variant="official")
    assert abs(one.item() - expected_one_layer) < 1e-6 and abs(expected_one_layer - 0.06166) < 1e-4
    two = vat.vat_loss(s_maps, t_maps, [[0], [1]], [0, 1], vm, am, variant="official")
    assert abs(two.item() - 2 * expected_one_layer) < 1e-6  # a SUM over layers
    # the same blocks captured with rows="visual"
    vis = vat.vat_loss({0: S[None]}, {0: Tt[None]}, [[0]], [0], vm, am, variant="official", rows="visual")
    assert abs(vis.item() - expected_one_layer) < 1e-6
    # paper variant averages over layers instead
    p1 = vat.vat_loss({0: s_maps[0]}, {0: t_maps[0]}, [[0]], [0], vm, am)
    p2 = vat.vat_loss(s_maps, t_maps, [[0], [1]], [0, 1], vm, am)
    assert abs(p1.item() - p2.item()) < 1e-7


def authors_attention_loss(student_attentions, teacher_attentions, student_targets, teacher_targets, group,
                           start, n_visual):
    """The authors' attention loss written from their formula (ptkjw1997/CompoDistill,
    compodistill/train/distill_trainer.py, DistillTrainer.compute_loss_distill), independent of vat.py:
    eager attentions per layer (B, H, T, T); a fixed visual block [start, start + n_visual) as query rows
    and key columns; head mean; teacher target = mean of layers [i, i + group) for i in teacher_targets;
    per (layer, sample) a filter keeping entries <= mean + std (torch.std, unbiased, over the whole block)
    in both maps; an entry counts iff it passes and the filtered teacher value != 0; per key column the
    mean of the counted entries (count clamped at 1); loss = sum over layers and samples of
    (1 - cos) / batch size."""
    a, b = start, start + n_visual
    t_all = torch.stack(list(teacher_attentions))[:, :, :, a:b, a:b].mean(2)
    t_block = torch.stack([t_all[i:i + group].mean(0) for i in teacher_targets])
    s_block = torch.stack([student_attentions[l] for l in student_targets])[:, :, :, a:b, a:b].mean(2)
    loss = 0.0
    for j in range(s_block.shape[0]):
        for n in range(s_block.shape[1]):
            s, t = s_block[j, n], t_block[j, n]
            kept = (s <= s.mean() + s.std()) & (t <= t.mean() + t.std())
            s_f, t_f = s * kept, t * kept
            counted = (t_f != 0).to(s.dtype)
            count = counted.sum(0).clamp(min=1)
            u, v = (s_f * counted).sum(0) / count, (t_f * counted).sum(0) / count
            loss = loss + 1 - (u @ v) / (u.norm() * v.norm()).clamp_min(1e-8)
    return loss / s_block.shape[1]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_official_variant_equals_the_authors_formula(family):
    """Tiny real models with GQA, eager attentions: the authors' formula on output_attentions equals
    vat_loss(variant="official") on the captured maps, loss and gradient (w.r.t. the student's maps), on
    a case where counting every filtered entry (the rule before) gives another number."""
    torch.manual_seed(0)
    # a large init scale: peaked attention, so that maps, filter and loss are far from uniform
    student_sdpa = tiny_lm(family, layers=4, heads=4, kv_heads=2, initializer_range=0.4).double()
    student = eager_copy(student_sdpa)
    teacher = eager_copy(tiny_lm(family, layers=6, heads=4, kv_heads=1, seed=1, initializer_range=0.4).double())
    B, T, start, n_vis = 2, 14, 3, 8
    ids = torch.randint(5, 97, (B, T), generator=torch.Generator().manual_seed(1))
    vm = torch.zeros(B, T, dtype=torch.bool)
    vm[:, start:start + n_vis] = True
    am = torch.ones(B, T, dtype=torch.long)
    s_layers, t_targets, group = [1, 2], [2, 3], 3  # teacher windows [2, 3, 4] and [3, 4, 5]
    with torch.no_grad():
        t_att = teacher(input_ids=ids, attention_mask=am, output_attentions=True).attentions
    s_att = [a.detach().requires_grad_(True) for a in
             student(input_ids=ids, attention_mask=am, output_attentions=True).attentions]
    ref = authors_attention_loss(s_att, t_att, s_layers, t_targets, group, start, n_vis)
    ref.backward()
    # vat.py on the same attentions in its layout: rows="visual" (B, N, N), head mean, visual keys
    s_maps = {l: s_att[l].detach().mean(1)[:, start:start + n_vis, start:start + n_vis].clone().requires_grad_(True)
              for l in s_layers}
    t_maps = {l: t_att[l].mean(1)[:, start:start + n_vis, start:start + n_vis] for l in range(6)}
    matching = vat.group_layer_matching(s_layers, sorted({l for i in t_targets for l in range(i, i + group)}))
    assert matching == [[2, 3, 4], [3, 4, 5]]
    ours = vat.vat_loss(s_maps, t_maps, matching, s_layers, vm, am, variant="official", rows="visual")
    ours.backward()
    assert abs(ours.item() - ref.item()) < 1e-6, (ours.item(), ref.item())
    for l in s_layers:  # the authors' gradient reaches the head-averaged block: d/dA_h = (1/H) d/dmean
        g_ref = s_att[l].grad[:, :, start:start + n_vis, start:start + n_vis].sum(1)
        assert torch.allclose(s_maps[l].grad, g_ref, atol=1e-6, rtol=0), (g_ref - s_maps[l].grad).abs().max()
    # the rule before (every filtered entry in the mean, causal zeros included) differs here
    def old_rule_vectors(s, t, valid):
        n = valid.sum((1, 2)).clamp_min(1)
        thr = lambda x: (x.sum((1, 2)) / n + x.flatten(1).std(1))[:, None, None]
        keep = valid & (s <= thr(s)) & (t <= thr(t))
        c = keep.sum(1).clamp_min(1)
        return (torch.where(keep, s, 0.0).sum(1) / c)[:, None], (torch.where(keep, t, 0.0).sum(1) / c)[:, None], valid.any(1)[:, None]
    real = vat._sink_filtered_vectors
    try:
        vat._sink_filtered_vectors = old_rule_vectors
        before = vat.vat_loss({l: m.detach() for l, m in s_maps.items()}, t_maps, matching, s_layers, vm, am,
                              variant="official", rows="visual")
    finally:
        vat._sink_filtered_vectors = real
    assert abs(before.item() - ref.item()) > 0.01, (before.item(), ref.item())
    # and from the capture (SDPA kept running) instead of output_attentions: the same loss
    with vat.capture_visual_attention(student_sdpa, s_layers, vm, am, rows="visual") as cap:
        student_sdpa(input_ids=ids, attention_mask=am)
    captured = vat.vat_loss(cap, t_maps, matching, s_layers, vm, am, variant="official", rows="visual")
    assert abs(captured.item() - ref.item()) < 1e-5, (captured.item(), ref.item())


def test_headwise_grouping():
    vm, am = ragged_batch()
    s_maps = random_maps([0], vm, am, heads=2, seed=5)
    t_maps = random_maps([0], vm, am, heads=4, seed=6)
    loss = vat.vat_loss(s_maps, t_maps, [[0]], [0], vm, am, headwise=True)
    per_sample = []
    for b in (0, 1, 3):
        nv, nr = int(vm[b].sum()), int(am[b].sum())
        heads = []
        for h in range(2):  # student head h <-> mean of teacher heads 2h, 2h+1
            s = s_maps[0][b, h, :nr, :nv].double().flatten()
            t = t_maps[0][b, 2 * h:2 * h + 2, :nr, :nv].double().mean(0).flatten()
            heads.append(1 - (s @ t) / (s.norm() * t.norm()))
        per_sample.append(sum(heads) / 2)
    assert abs(loss.item() - (sum(per_sample) / 3).item()) < 1e-6
    with pytest.raises(ValueError, match="multiple"):
        vat.vat_loss(random_maps([0], vm, am, heads=3), t_maps, [[0]], [0], vm, am, headwise=True)
    with pytest.raises(ValueError, match="headwise"):
        vat.vat_loss(s_maps, t_maps, [[0]], [0], vm, am)  # 4D maps without headwise=True


def test_mse_and_kl_vs_manual():
    vm, am = ragged_batch()
    s_maps, t_maps = random_maps([0, 1], vm, am, seed=7), random_maps([2], vm, am, seed=8)
    matching = [[2], [2]]
    mse = vat.vat_loss(s_maps, t_maps, matching, [0, 1], vm, am, distance="mse")
    kl = vat.vat_loss(s_maps, t_maps, matching, [0, 1], vm, am, distance="kl")
    exp_mse, exp_kl = [], []
    for l in (0, 1):
        m_b, k_b = [], []
        for b in (0, 1, 3):
            nv, nr = int(vm[b].sum()), int(am[b].sum())
            s, t = s_maps[l][b, :nr, :nv].double(), t_maps[2][b, :nr, :nv].double()
            m_b.append(((s - t) ** 2).mean())
            ps, pt = s / s.sum(-1, keepdim=True), t / t.sum(-1, keepdim=True)
            k_b.append(F.kl_div(ps.log(), pt, reduction="sum") / nr)  # KL(teacher || student), mean over rows
        exp_mse.append(sum(m_b) / 3)
        exp_kl.append(sum(k_b) / 3)
    assert abs(mse.item() - (sum(exp_mse) / 2).item()) < 1e-6
    assert abs(kl.item() - (sum(exp_kl) / 2).item()) < 1e-5


def test_teacher_maps_get_no_gradient():
    vm, am = ragged_batch()
    s_maps = {l: m.requires_grad_() for l, m in random_maps([0], vm, am, seed=9).items()}
    t_maps = {l: m.requires_grad_() for l, m in random_maps([0], vm, am, seed=10).items()}
    vat.vat_loss(s_maps, t_maps, [[0]], [0], vm, am).backward()
    assert t_maps[0].grad is None and s_maps[0].grad is not None


def test_capture_with_custom_4d_float_mask_non_causal():
    """A 4D additive mask passed by the caller (here: visual tokens see each other both ways) is used as is."""
    model = tiny_lm("qwen2")
    vm, _ = ragged_batch()
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] | (vm[:, :, None] & vm[:, None, :])
    mask4d = torch.zeros(4, 1, T, T).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    ids = torch.randint(0, 97, (4, T))
    with torch.no_grad():
        ref = eager_copy(model)(input_ids=ids, attention_mask=mask4d, output_attentions=True).attentions[1].mean(1)
        with vat.capture_visual_attention(model, [1], vm, query_chunk=16) as maps:
            model(input_ids=ids, attention_mask=mask4d)
    for b in range(4):
        torch.testing.assert_close(maps[1][b, :, :int(vm[b].sum())], ref[b][:, vm[b]], atol=1e-5, rtol=0)


def test_visual_key_probs_backward_matches_autograd_float64():
    """The hand-written backward of the chunked map equals autograd through softmax + gather (float64,
    GQA, a padded-out visual slot and a masked key)."""
    torch.manual_seed(0)
    B, H, H_kv, c, n, D, N = 2, 4, 2, 5, 9, 3, 4
    q = torch.randn(B, H, c, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H_kv, n, D, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(B, 1, c, n, dtype=torch.float64)
    bias[:, :, :, -2] = torch.finfo(torch.float64).min  # one key masked for every row
    key_index = torch.tensor([[1, 3, 4, 8], [0, 2, 8, 8]])
    inside = torch.tensor([[True, True, True, True], [True, True, True, False]])[:, None, None, :]
    index = key_index[:, None, None, :].expand(B, H, c, N)
    assert torch.autograd.gradcheck(lambda a, b: vat._VisualKeyProbs.apply(a, b, bias, index, inside, 0.7), (q, k))
    # and against plain autograd through the straightforward formula
    g = torch.randn(B, H, c, N, dtype=torch.float64)
    got = torch.autograd.grad((vat._VisualKeyProbs.apply(q, k, bias, index, inside, 0.7) * g).sum(), (q, k))
    scores = 0.7 * q @ k.repeat_interleave(H // H_kv, dim=1).transpose(-1, -2) + bias
    ref_out = torch.where(inside, scores.softmax(-1).gather(3, index), 0.0)
    ref = torch.autograd.grad((ref_out * g).sum(), (q, k))
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-10)


def test_visual_key_probs_stay_fp32_under_bf16_autocast():
    """The map and its hand-written backward are fp32 under the loop's bf16 autocast: forward and backward
    must compute the same function (a bf16 forward with an fp32 recomputation in backward would not)."""
    torch.manual_seed(0)
    B, H, H_kv, c, n, D, N = 2, 4, 2, 6, 40, 16, 12
    q = (3 * torch.randn(B, H, c, D)).requires_grad_()
    k = (3 * torch.randn(B, H_kv, n, D)).requires_grad_()
    bias = torch.zeros(B, 1, c, n)
    index = torch.arange(N)[None, None, None, :].expand(B, H, c, N) + 4
    inside = torch.ones(B, 1, 1, N, dtype=torch.bool)
    g = torch.randn(B, H, c, N)
    ref = vat._VisualKeyProbs.apply(q, k, bias, index, inside, 1.0)
    g_ref = torch.autograd.grad((ref * g).sum(), (q, k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vat._VisualKeyProbs.apply(q, k, bias, index, inside, 1.0)
        g_got = torch.autograd.grad((got * g).sum(), (q, k))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_visual_key_probs_of_bf16_inputs_are_fp32_of_the_same_values():
    """A bf16 model hands the capture bf16 q and k (kept as they are, not copied to fp32): the map is fp32
    and equals the float64 map of the same bf16 values (a product of two bf16 numbers is exact in fp32, so
    only the summation differs), and the gradients come back in bf16, close to float64's."""
    torch.manual_seed(0)
    B, H, H_kv, c, n, D, N = 2, 4, 2, 6, 40, 16, 12
    q = (3 * torch.randn(B, H, c, D)).bfloat16().requires_grad_()
    k = (3 * torch.randn(B, H_kv, n, D)).bfloat16().requires_grad_()
    bias = torch.zeros(B, 1, c, n)
    bias[..., -3:] = torch.finfo(torch.float32).min
    index = torch.arange(N)[None, None, None, :].expand(B, H, c, N) + 4
    inside = torch.ones(B, 1, 1, N, dtype=torch.bool)
    g = torch.randn(B, H, c, N)
    got = vat._VisualKeyProbs.apply(q, k, bias, index, inside, 0.25)
    assert got.dtype == torch.float32
    dq, dk = torch.autograd.grad((got * g).sum(), (q, k))
    assert dq.dtype == torch.bfloat16 and dk.dtype == torch.bfloat16
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    s = 0.25 * q64 @ k64.repeat_interleave(H // H_kv, dim=1).transpose(-1, -2) + bias.double()
    ref = s.softmax(-1).gather(3, index)
    rq, rk = torch.autograd.grad((ref * g.double()).sum(), (q64, k64))
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)
    for got_g, ref_g in ((dq, rq), (dk, rk)):  # bf16 keeps 8 bits: 0.4% of an entry, or of the largest near 0
        torch.testing.assert_close(got_g.double(), ref_g, atol=1e-2 * ref_g.abs().max().item(), rtol=1e-2)


# -----------------------------------------------------------------------------
# the layer window found from the models


def test_visual_attention_profile_hand_worked():
    # one sample, T=6: text 0, visual 1..3, text rows 4 and 5 (the answer position); N = 3
    vm = torch.tensor([[False, True, True, True, False, False]])
    m = torch.zeros(1, 6, 3)
    m[0, 4] = torch.tensor([0.2, 0.2, 0.0])   # mass 0.4, renormalised [0.5, 0.5, 0]: entropy log 2 / log 3
    m[0, 5] = torch.tensor([0.6, 0.0, 0.0])   # mass 0.6, all on one patch: entropy 0
    m[0, 2] = torch.tensor([9.0, 9.0, 9.0])   # a visual row: not counted
    obj = torch.tensor([[True, False, False]])
    p = vat.visual_attention_profile({7: m}, vm, None, obj)[7]
    assert abs(p["share"].item() - 0.5) < 1e-7
    assert abs(p["entropy"].item() - (math.log(2) / math.log(3)) / 2) < 1e-7
    assert abs(p["object"].item() - 1.0) < 1e-7  # the answer row's visual attention is all on patch 0
    # padding after the answer: the answer position is the last VALID row; a text-only sample is NaN
    vm2 = torch.cat([torch.cat([vm, torch.zeros(1, 1, dtype=torch.bool)], 1), torch.zeros(1, 7, dtype=torch.bool)])
    m2 = torch.zeros(2, 7, 3)
    m2[0, :6] = m[0]
    m2[0, 6] = torch.tensor([0.0, 0.0, 1.0])  # a padded row: ignored
    am = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    p2 = vat.visual_attention_profile({0: m2}, vm2, am, torch.cat([obj, obj]))[0]
    assert abs(p2["share"][0].item() - 0.5) < 1e-7 and abs(p2["object"][0].item() - 1.0) < 1e-7
    assert torch.isnan(p2["share"][1]) and torch.isnan(p2["object"][1])


def test_auto_layers_rule_hand_worked():
    # scores share * (1 - entropy): 0.1, 0.5, 0.45, 0.05, 0.6, 0.02 -> cut (0.02 + 0.6) / 2 = 0.31:
    # runs at or above it: [1, 2] and [4]; the longest is [1, 2]
    share = [0.2, 1.0, 0.9, 0.1, 0.8, 0.04]
    ent = [0.5, 0.5, 0.5, 0.5, 0.25, 0.5]
    prof = {l: {"share": [share[l]], "entropy": torch.tensor([ent[l], float("nan")])} for l in range(6)}
    assert vat.auto_layers(prof, 6) == [1, 2]
    assert vat.select_layers(6, "auto", profile=prof) == [1, 2]
    # a tie between two runs of one layer: the earliest
    prof2 = {l: {"share": [v], "entropy": [0.0]} for l, v in enumerate([0.0, 1.0, 0.0, 1.0])}
    assert vat.auto_layers(prof2, 4) == [1]
    with pytest.raises(ValueError, match="needs the model's measured attention profile"):
        vat.select_layers(6, "auto")
    with pytest.raises(ValueError, match="lacks layers"):
        vat.auto_layers({0: prof[0]}, 6)


def _fake_cuda_bmm(monkeypatch, fail):
    """CPU stand-in for the CUDA fast path of vat._scores: tensors report is_cuda, and torch.bmm takes
    out_dtype (computing in fp32) except where `fail(a)` returns an exception to raise. Returns the count of
    fast products (the 1x1x1 probe not counted)."""
    real_bmm, fast = torch.bmm, []

    def bmm(a, b, *, out_dtype=None):
        if out_dtype is None:
            return real_bmm(a, b)
        err = fail(a)
        if err is not None:
            raise err
        fast.append(a.numel() > 1)
        return real_bmm(a.float(), b.float())
    monkeypatch.setattr(torch, "bmm", bmm)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(vat, "_OUT_DTYPE_BMM", {}, raising=False)  # probe afresh
    return fast


def _scores_float64(q, k, bias, scaling):
    g = q.shape[1] // k.shape[1]
    return (q.double() @ k.double().repeat_interleave(g, dim=1).transpose(-1, -2)) * scaling + bias.double()


def test_out_of_memory_in_the_fast_score_product_propagates_and_keeps_the_fast_path(monkeypatch):
    """A CUDA out-of-memory inside bmm(..., out_dtype=float32) is not a missing overload: it reaches the caller
    (train.py's out-of-memory advice) and the next call still takes the fast path (it used to switch every later
    step to the upcast path, silently)."""
    ooms = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")]
    fast = _fake_cuda_bmm(monkeypatch, lambda a: ooms.pop() if a.numel() > 1 and ooms else None)
    torch.manual_seed(0)
    q, k, bias = torch.randn(2, 4, 3, 8).bfloat16(), torch.randn(2, 2, 5, 8).bfloat16(), torch.randn(2, 1, 3, 5)
    with pytest.raises(torch.OutOfMemoryError):
        vat._scores(q, k, bias, 0.5)
    s = vat._scores(q, k, bias, 0.5)
    assert fast.count(True) == 1  # the second call's product ran on the fast path
    assert s.dtype == torch.float32 and torch.allclose(s.double(), _scores_float64(q, k, bias, 0.5), atol=1e-5)


def test_a_missing_fp32_output_overload_selects_the_upcast_path(monkeypatch):
    """An older torch without the overload (TypeError for the keyword) or without the kernel
    (NotImplementedError): the probe says so once and the upcast path gives the same fp32 scores."""
    for err in (TypeError("bmm() got an unexpected keyword argument 'out_dtype'"),
                NotImplementedError("Could not run 'aten::bmm.dtype' with arguments from the 'CUDA' backend")):
        fast = _fake_cuda_bmm(monkeypatch, lambda a, err=err: err)
        torch.manual_seed(0)
        q, k, bias = torch.randn(2, 4, 3, 8).bfloat16(), torch.randn(2, 2, 5, 8).bfloat16(), torch.randn(2, 1, 3, 5)
        for _ in range(2):
            s = vat._scores(q, k, bias, 0.5)
            assert s.dtype == torch.float32 and torch.allclose(s.double(), _scores_float64(q, k, bias, 0.5), atol=1e-5)
        assert fast == [] and list(vat._OUT_DTYPE_BMM.values()) == [False]


def test_text_rows_capture_and_loss_match_eager_and_float64():
    """rows="text" (probe P3c's diagnostic): the capture holds HF eager attention's rows after each sample's last
    visual token, zeros elsewhere; the loss is Eq. 3's 1 - cos over those rows only, worked in float64."""
    model = tiny_lm(seed=0)
    vm, am = ragged_batch()
    inputs = model_inputs(model, "qwen2")
    with torch.no_grad():
        ref_s, _ = reference_maps(eager_copy(model), inputs, vm, am, [1, 2])
        with vat.capture_visual_attention(model, [1, 2], vm, am, rows="text", query_chunk=16) as maps:
            model(**inputs, attention_mask=am)
    text_rows = {0: range(19, 48), 1: range(26, 40), 3: range(32, 43)}  # after the image, not padded (by hand)
    for l in (1, 2):
        for b in range(4):
            keep = torch.zeros(T, dtype=torch.bool)
            keep[list(text_rows.get(b, []))] = True
            torch.testing.assert_close(maps[l][b], ref_s[l][b] * keep[:, None], atol=1e-5, rtol=0)
    # the loss on random maps that fill every row: only the text rows after the image may count
    s_maps, t_maps = random_maps([1, 2], vm, am, seed=1), random_maps([1, 2, 3], vm, am, seed=2)
    matching = vat.group_layer_matching([1, 2], [1, 2, 3])
    loss = vat.vat_loss(s_maps, t_maps, matching, [1, 2], vm, am, rows="text")
    cos = []
    for j, s_l in enumerate((1, 2)):
        per_b = []
        for b, r in text_rows.items():
            nv = int(vm[b].sum())
            s = s_maps[s_l][b, list(r), :nv].double().flatten()
            t = (sum(t_maps[t_l][b, list(r), :nv].double() for t_l in matching[j]) / len(matching[j])).flatten()
            per_b.append((s @ t) / (s.norm() * t.norm()))
        cos.append(sum(per_b) / len(per_b))
    assert abs(loss.item() - (1 - sum(cos) / len(cos)).item()) < 1e-6
    full = vat.vat_loss(s_maps, t_maps, matching, [1, 2], vm, am)  # every row: another number
    assert abs(full.item() - loss.item()) > 1e-3
    with pytest.raises(ValueError, match="paper variant"):
        vat.vat_loss(s_maps, t_maps, matching, [1, 2], vm, am, variant="official", rows="text")


def test_vat_text_rows_flag_reaches_the_loss_and_refuses_what_it_cannot_mean():
    import runs
    import train
    base = ["--stage", "2", "--init", "a", "--teacher", "t", "--data", "d.json", "--out", "o"]
    args = train.get_parser().parse_args([*base, "--vat-text-rows"])
    assert train.vat_rows(args) == "text" and runs.check_args(args) == []
    assert train.vat_rows(train.get_parser().parse_args(base)) == "all"
    for extra in (["--vat-variant", "official"], ["--cross-vocab"]):
        problems = runs.check_args(train.get_parser().parse_args([*base, "--vat-text-rows", *extra]))
        assert any("--vat-text-rows" in p for p in problems), problems
