"""bench.py: the RESULT line end to end at tiny shapes, and the FLOPs it divides by, worked by hand."""
import os
import re
import subprocess
import sys

import pytest

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_prints_the_result_line_at_every_batch():
    cmd = [sys.executable, os.path.join(ROOT, "bench.py"), "--student-layers", "4", "--teacher-layers", "6",
           "--student-hidden", "64", "--teacher-hidden", "64", "--student-intermediate", "96",
           "--teacher-intermediate", "96", "--vocab", "128", "--seq", "64", "--visual", "16", "--batches", "1,2",
           "--repeats", "1", "--kl-vocab", "300", "--kl-seq", "64", "--kl-student-hidden", "32",
           "--kl-teacher-hidden", "48", "--kl-chunk", "16"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"RESULT vat_mem_ratio=\S+ vat_step_speedup=[\d.]+ kl_mem_ratio=\S+ kl_max_diff=(\S+) "
                     r"kl_step_speedup=[\d.]+ vat_overhead=([\d.]+) vat_overhead_b1=([\d.]+) vat_overhead_b2=[\d.]+", last)
    assert m, last
    assert float(m.group(1)) < 1e-5  # chunked L_KL equals the full-logits loss
    assert m.group(2) == m.group(3)  # the headline overhead is the first batch's
    assert "VAT arithmetic: floor" in res.stdout


def test_step_flops_worked_by_hand():
    a = dict(batch=2, seq=100, visual=20, rows="all", layers="middle", student_layers=4, teacher_layers=6,
             student_hidden=64, student_heads=4, student_kv_heads=2, student_intermediate=96,
             teacher_hidden=64, teacher_heads=4, teacher_kv_heads=4, teacher_intermediate=96, vocab=128,
             device="cpu")
    student, teacher, *_ = bench._bench_setup(a, "plain")
    plain, floor, today = bench._step_flops(a, student, teacher)
    # parameters without the input embeddings: per layer q (64x64+64), k, v (64x32+32 each for 2 kv heads of
    # 16; 64x64+64 for the teacher's 4), o (64x64), MLP 3 x 64x96, two RMSNorms (64 each); final norm 64;
    # LM head 64x128
    def n(layers, kv):
        per = (64 * 64 + 64) + 2 * (64 * kv + kv) + 64 * 64 + 3 * 64 * 96 + 2 * 64
        return layers * per + 64 + 64 * 128
    ns, nt = n(4, 32), n(6, 64)
    tokens, T = 2 * 100, 100
    assert plain == tokens * (6 * ns + 12 * 4 * 4 * 16 * T + 2 * nt + 4 * 6 * 4 * 16 * T)
    # middle layers: student [1, 2], teacher [2, 3] (30%-70% of 4 and 6); visual columns over all 100 rows
    per_head = 2 * 100 * 20 * 16  # 2 R N d
    assert floor == 3 * 2 * (2 * 4 * per_head) + 2 * (2 * 4 * per_head)
    assert today > floor


def test_memory_plan_counts_worked_by_hand():
    """Parameter counts from the meta-device build against Qwen2's layer worked by hand, Qwen2.5-0.5B's
    published total, and the activation count of bench.activation_bytes's docstring by hand."""
    tiny = bench.llm_config((8, 16, 2, 2, 1, 10, True))  # d 8, I 16, 2 layers, 2 heads, 1 KV head (d_kv 4), V 10
    vision = dict(hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, image_size=8,
                  patch_size=4)
    s = bench.model_sizes(tiny, vision, lora_r=2)
    layer = (8 * 8 + 8) + 2 * (8 * 4 + 4) + 8 * 8 + 3 * 8 * 16 + 2 * 8  # q, k, v (biased), o, MLP, two norms
    assert s["block"] == layer == 608
    assert s["llm"] == 10 * 8 + 2 * layer + 8  # tied: the embedding once, + final norm
    assert s["lora"] == 2 * 2 * ((8 + 8) + 2 * (8 + 4) + (8 + 8) + 2 * (8 + 16) + (16 + 8))
    assert s["projector"] == 4 * 8 + 8 + 8 * 8 + 8
    assert bench.model_sizes(bench.llm_config("Qwen2.5-0.5B"))["llm"] == 494_032_768
    # 34d + 6 d_kv + 8I per layer and token: 272 + 24 + 128 = 424; 2 layers, 3 tokens
    assert bench.activation_bytes(tiny, 3) == 3 * 2 * 424
    assert bench.activation_bytes(tiny, 3, grad_ckpt=True) == 3 * (4 * 8 * 2 + 424)
    # FSDP2's share falls with the ranks, DDP's does not
    one, eight = (bench.memory_plan(bench.llm_config("Qwen2.5-0.5B"), bench.llm_config("Qwen2.5-1.5B"), world=w)
                  for w in (1, 8))
    assert one["ddp"] == eight["ddp"] and eight["fsdp"] < one["fsdp"]
