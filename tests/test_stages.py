"""The distillation stages: L_KL against F.kl_div, chunked == unchunked, stages 1 -> 2 -> 3, DDP stage 2."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import shapes
import losses
import model as M
import train
from conftest import world_and_teacher, killed_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kd_loss_equals_f_kl_div_hand_built():
    """Two supervised positions, vocabulary 3, identity heads so hidden states are the logits."""
    s_logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])
    t_logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, 2, 0]])  # positions 0 and 1 predict labels 1 and 2
    eye = torch.eye(3)
    got = losses.kd_loss(s_logits, t_logits, eye, eye, labels, num_tokens=2)
    # independent reference: F.kl_div(input=log q, target=p) = sum p (log p - log q), batchmean over 2 rows
    ref = F.kl_div(F.log_softmax(s_logits[0, :2], -1), F.softmax(t_logits[0, :2], -1), reduction="batchmean")
    assert torch.allclose(got, ref, atol=1e-7)
    # temperature 2: softmax(z/2), times 2^2
    got2 = losses.kd_loss(s_logits, t_logits, eye, eye, labels, num_tokens=2, temperature=2.0)
    ref2 = 4 * F.kl_div(F.log_softmax(s_logits[0, :2] / 2, -1), F.softmax(t_logits[0, :2] / 2, -1),
                        reduction="batchmean")
    assert torch.allclose(got2, ref2, atol=1e-7)


def test_lm_loss_is_shifted_cross_entropy():
    h = torch.randn(2, 5, 4)
    w = torch.randn(7, 4)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 5]])
    lm, kd = losses.lm_and_kd_loss(h, w, labels, num_tokens=6)
    logits = (h @ w.t()).double()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100,
                          reduction="sum") / 6
    assert abs(lm.item() - ref.item()) < 1e-5 and kd.item() == 0.0


def test_chunked_equals_unchunked_values_and_grads():
    torch.manual_seed(0)
    B, T, D, Dt, V, Vt = 2, 37, 16, 24, 101, 110  # the teacher head has padded rows beyond V
    hs = torch.randn(B, T, D, requires_grad=True)
    ht = torch.randn(B, T, Dt)
    ws = torch.randn(V, D, requires_grad=True)
    wt = torch.randn(Vt, Dt)
    labels = torch.randint(0, V, (B, T))
    labels[:, :5] = -100
    labels[1, 20:] = -100
    n = int((labels[:, 1:] != -100).sum())
    chunked = losses.kd_loss(hs, ht, ws, wt, labels, n, temperature=1.5, chunk_size=7)
    g_chunk = torch.autograd.grad(chunked, (hs, ws))
    ref = losses.kd_loss_reference(hs @ ws.t(), ht @ wt.t(), labels, n, temperature=1.5)
    g_ref = torch.autograd.grad(ref, (hs, ws))
    ref64 = losses.kd_loss_reference((hs @ ws.t()).double(), (ht @ wt.t()).double(), labels, n, temperature=1.5)
    assert abs(chunked.item() - ref64.item()) <= 1e-6 * abs(ref64.item())  # fp32 rounding only
    assert abs(chunked.item() - ref.item()) <= 1e-6 * abs(ref64.item())
    for a, b in zip(g_chunk, g_ref):
        assert torch.allclose(a, b, atol=1e-6)


def _divergence_reference64(s_logits, t_logits, labels, num_tokens, temperature, divergence, beta):
    """Independent float64 reference from FULL logits: F.kl_div for the two KLs (F.kl_div(log q, log p) =
    KL(p || q)), the generalized JSD by explicit sums over the mixture built in probability space."""
    keep = labels[:, 1:] != -100
    V = s_logits.shape[-1]
    s = s_logits[:, :-1][keep].double() / temperature
    t = t_logits[:, :-1][keep][:, :V].double() / temperature
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    if divergence == "forward":  # KL(p_t || p_s) * T^2
        return F.kl_div(ls, lt, log_target=True, reduction="sum") * temperature ** 2 / num_tokens
    if divergence == "reverse":  # KL(p_s || p_t) * T^2
        return F.kl_div(lt, ls, log_target=True, reduction="sum") * temperature ** 2 / num_tokens
    ps, pt = ls.exp(), lt.exp()  # GKD / TRL: no T^2; beta weights the teacher in the mixture
    if beta == 0:
        return (pt * (lt - ls)).sum() / num_tokens
    if beta == 1:
        return (ps * (ls - lt)).sum() / num_tokens
    m = beta * pt + (1 - beta) * ps
    return (beta * (pt * (pt.log() - m.log())).sum() + (1 - beta) * (ps * (ps.log() - m.log())).sum()) / num_tokens


@pytest.mark.parametrize("divergence,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                             ("jsd", 0.9), ("jsd", 0.0), ("jsd", 1.0)])
def test_kd_divergences_equal_a_float64_reference_in_value_and_gradient(divergence, beta):
    """--kd-divergence on the chunked path (chunk 7 < rows, T = 1.7, a teacher head with padded rows) equals an
    independent float64 computation from full logits, loss and gradients."""
    torch.manual_seed(1)
    B, T, D, Dt, V, Vt = 2, 29, 16, 24, 97, 103
    hs = torch.randn(B, T, D, requires_grad=True)
    ht = torch.randn(B, T, Dt)
    ws = (torch.randn(V, D) / 2).requires_grad_(True)
    wt = torch.randn(Vt, Dt) / 2
    labels = torch.randint(0, V, (B, T))
    labels[:, :4] = -100
    labels[0, 22:] = -100
    n = int((labels[:, 1:] != -100).sum())
    assert n > 7  # several chunks
    got = losses.kd_loss(hs, ht, ws, wt, labels, n, temperature=1.7, chunk_size=7, divergence=divergence, beta=beta)
    g_got = torch.autograd.grad(got, (hs, ws))
    hs64, ws64 = hs.detach().double().requires_grad_(True), ws.detach().double().requires_grad_(True)
    ref = _divergence_reference64(hs64 @ ws64.t(), ht.double() @ wt.double().t(), labels, n, 1.7, divergence, beta)
    g_ref = torch.autograd.grad(ref, (hs64, ws64))
    assert ref.item() > 0
    assert abs(got.item() - ref.item()) <= 1e-6 * ref.item(), (got.item(), ref.item())
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6 * b.abs().max().item())  # fp32 rounding
    if divergence == "forward":  # the default: the same numbers as before the option existed
        assert torch.equal(got, losses.kd_loss(hs, ht, ws, wt, labels, n, temperature=1.7, chunk_size=7))


def test_kd_divergence_is_recorded_and_a_resume_with_another_is_refused(setup):
    world, teacher, root = setup
    out = str(root / "jsd")
    args = ["--stage", "1", "--max-steps", "2", "--save-every", "1", *_stage_args(world, teacher, out)]
    with killed_after(1):
        train.main([*args, "--kd-divergence", "jsd", "--kd-jsd-beta", "0.3"])
    state = torch.load(os.path.join(out, "checkpoint", "trainer_state.pt"), weights_only=True)
    assert state["meta"]["kd_divergence"] == "jsd" and state["meta"]["kd_jsd_beta"] == 0.3
    with pytest.raises(ValueError, match="kd_divergence"):
        train.main([*args, "--resume"])  # forward KL now
    with pytest.raises(ValueError, match="kd_jsd_beta"):
        train.main([*args, "--resume", "--kd-divergence", "jsd", "--kd-jsd-beta", "0.5"])
    train.main([*args, "--resume", "--kd-divergence", "jsd", "--kd-jsd-beta", "0.3"])
    assert [r["step"] for r in _log(out)] == [1, 2] and all(r["kd"] > 0 for r in _log(out))
    with pytest.raises(SystemExit):
        train.main([*args, "--kd-divergence", "jsd", "--kd-jsd-beta", "1.5"])


def test_token_losses_stay_fp32_under_bf16_autocast():
    """Under the loop's bf16 autocast (CUDA; CPU autocast recasts matmuls the same way) L_LM and L_KL and
    their gradients still equal the fp32 computation: the chunk's logits must not be rebuilt in bf16."""
    torch.manual_seed(0)
    B, T, D, V = 2, 23, 32, 211
    hs = torch.randn(B, T, D, requires_grad=True)
    ht = hs.detach() + 0.05 * torch.randn(B, T, D)  # teacher close to the student: where bf16 error is worst
    ws = torch.randn(V, D) / 4
    labels = torch.randint(0, V, (B, T))
    n = int((labels[:, 1:] != -100).sum())
    ref = losses.lm_and_kd_loss(hs, ws, labels, n, ht, ws, 1.0, 7)
    g_ref = torch.autograd.grad(ref[0] + ref[1], hs)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = losses.lm_and_kd_loss(hs, ws, labels, n, ht, ws, 1.0, 7)
    g_got = torch.autograd.grad(got[0] + got[1], hs)[0]  # backward outside autocast, as the loop does
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32 and abs(a.item() - b.item()) <= 1e-6 * max(1.0, abs(b.item()))
    torch.testing.assert_close(g_got, g_ref, atol=1e-6, rtol=1e-5)


def test_tokenizer_mismatch_is_a_clear_error(tokenizer, tmp_path):
    other = shapes.train_tokenizer(["completely different words here"] * 20, str(tmp_path / "other"), vocab_size=300)
    with pytest.raises(ValueError, match="(?s)tokenizers disagree.*vocabularies differ"):
        data.check_tokenizers_agree(tokenizer, other)
    data.check_tokenizers_agree(tokenizer, tokenizer)


def test_taf_from_a_bias_free_teacher_adapter_saves_and_loads(tokenizer, tmp_path):
    """A teacher whose adapter has no biases (LLaVA's multimodal_projector_bias=False): the TAF student keeps
    that adapter, and its checkpoint loads back to the same model."""
    teacher = M.from_preset("teacher", tokenizer)
    teacher.projector = M.mlp2x_gelu(teacher.d_vision, teacher.d_llm, bias=False)
    teacher.extra_config["projector_bias"] = False
    student = train.apply_taf(M.from_preset("student", tokenizer), teacher)
    M.save_pretrained(student, str(tmp_path / "s"), tokenizer)
    again, _, _ = M.load_pretrained(str(tmp_path / "s"))
    assert again.projector.teacher_adapter[0].bias is None
    ids = torch.tensor([[5] + [student.image_token_id] * student.num_visual_tokens + [6, 7]])
    pv = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(student.eval()(ids, None, pv)["logits"], again.eval()(ids, None, pv)["logits"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    world, teacher = world_and_teacher(root, seed=1, n_pretrain=64, n_instruct=128, n_images=64, n_sugarcrepe=4,
                                       n_vqa=8, n_val_sugarcrepe=2, n_val_vqa=4)
    return world, teacher, root


def _stage_args(world, teacher, out, *extra):
    return ["--init", "preset:student", "--tokenizer", os.path.join(world, "tokenizer"), "--teacher", teacher,
            "--data-pretrain", os.path.join(world, "pretrain.json"), "--data-instruct", os.path.join(world, "instruct.json"),
            "--data", os.path.join(world, "instruct.json"), "--image-folder", world, "--out", out,
            "--global-batch", "8", "--micro-batch", "4", "--max-len", "256", "--lora-r", "4", "--lora-alpha", "8",
            "--lr", "1e-3", "--quiet", *extra]


def _log(path):
    with open(os.path.join(path, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "step" in r]


def test_stage_all_runs_1_2_3_with_the_right_losses_and_parameters(setup):
    world, teacher, root = setup
    out = str(root / "cd")
    train.main(["--stage", "all", "--max-steps", "3", *_stage_args(world, teacher, out)])
    s1, s2, s3 = (_log(os.path.join(out, f"stage{k}")) for k in (1, 2, 3))
    assert all(r["kd"] > 0 and r["vat"] == 0 for r in s1)
    assert all(r["kd"] > 0 and r["vat"] > 0 for r in s2)
    assert all(r["kd"] == 0 and r["vat"] == 0 for r in s3)
    summ = [json.load(open(os.path.join(out, f"stage{k}", "trainer_summary.json"))) for k in (1, 2, 3)]
    d_t, d_s = M.PRESETS["teacher"]["hidden_size"], M.PRESETS["student"]["hidden_size"]
    assert summ[0]["n_trainable"] == d_t * d_s + d_s  # stage 1: the TAF linear only
    assert summ[1]["n_trainable"] > summ[0]["n_trainable"]  # + LoRA
    # the saved student reads images through the teacher's adapter, unchanged by training
    st, _, _ = M.load_pretrained(os.path.join(out, "stage3"))
    te, _, _ = M.load_pretrained(teacher)
    assert st.extra_config["projector"] == "taf"
    for a, b in zip(st.projector.teacher_adapter.parameters(), te.projector.parameters()):
        assert torch.equal(a, b)


def test_stage_all_uses_the_papers_global_batch_per_stage(setup, monkeypatch):
    """docs/method.md section 5: DPT 256, DFT 128, SFT 192 unless --global-batch is given (then for every stage)."""
    world, teacher, root = setup
    args = _stage_args(world, teacher, str(root / "gb"))
    i = args.index("--global-batch")
    no_batch = args[:i] + args[i + 2:]
    with pytest.raises(ValueError, match="fewer than --global-batch 256"):  # stage 1 on 64 captions
        train.main(["--stage", "1", "--max-steps", "1", *no_batch])
    with pytest.raises(ValueError, match="fewer than --global-batch 256"):  # LLaVA's adapter pre-training
        train.main(["--stage", "llava", "--trainable", "adapter", "--max-steps", "1", *no_batch])
    captions = ["--data", os.path.join(world, "pretrain.json")]  # 64 samples
    with pytest.raises(ValueError, match="fewer than --global-batch 128"):  # LLaVA's fine-tuning
        train.main(["--stage", "llava", "--max-steps", "1", *no_batch, *captions])
    seen = []
    monkeypatch.setattr(train, "run_stage", lambda a: seen.append((a.stage, a.global_batch, a.init)))
    train.main(["--stage", "all", *no_batch])
    assert [s[:2] for s in seen] == [("1", 256), ("2", 128), ("3", 192)]
    assert seen[1][2] == os.path.join(str(root / "gb"), "stage1") and seen[2][2] == os.path.join(str(root / "gb"), "stage2")
    seen.clear()
    train.main(["--stage", "all", *args])
    assert [s[:2] for s in seen] == [("1", 8), ("2", 8), ("3", 8)]


def test_kd_only_and_no_taf_baselines(setup):
    world, teacher, root = setup
    kd = str(root / "kd")
    train.main(["--stage", "2", "--max-steps", "2", "--w-vat", "0", "--no-taf", *_stage_args(world, teacher, kd)])
    assert all(r["vat"] == 0 and r["kd"] > 0 for r in _log(kd))
    st, _, _ = M.load_pretrained(kd)
    assert st.extra_config.get("projector", "mlp2x_gelu") == "mlp2x_gelu"


@pytest.mark.slow
def test_stage2_two_gloo_processes_match_one(setup):
    world, teacher, root = setup
    one, two = str(root / "s2one"), str(root / "s2two")
    # LoRA dropout off: each rank draws its own dropout masks, which legitimately differ from 1 process
    train.main(["--stage", "2", "--max-steps", "3", "--lora-dropout", "0", *_stage_args(world, teacher, one)])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537",
           os.path.join(ROOT, "train.py"), "--stage", "2", "--max-steps", "3", "--device", "cpu", "--lora-dropout", "0",
           *_stage_args(world, teacher, two)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for a, b in zip(_log(one), _log(two)):
        for k in ("lm", "kd", "vat"):
            assert abs(a[k] - b[k]) <= 1e-5, (k, a, b)


def test_vat_layers_auto_measures_before_training_and_resume_keeps_them(setup, capsys, monkeypatch):
    """--vat-layers auto: each model's profile on the first --vat-auto-samples image samples picks its window
    (vat.auto_layers of attention.layer_profile_batches, measured here again on the same samples with the
    initial weights); the checkpoint records it, and a resumed run reuses it without measuring."""
    import attention
    world, teacher, root = setup
    out = str(root / "auto")
    args = ["--stage", "2", "--vat-layers", "auto", "--vat-auto-samples", "6", "--save-every", "1",
            *_stage_args(world, teacher, out)]
    with killed_after(1):
        train.main(["--max-steps", "2", *args])
    printed = capsys.readouterr().out
    state = torch.load(os.path.join(out, "checkpoint", "trainer_state.pt"), weights_only=True)
    auto = state["meta"]["vat_auto"]
    assert auto["samples"] == 6 and f"VAT: student layers {auto['student']}" in printed
    # the same measurement, by hand, for the teacher (loaded as saved; the student's TAF linear is drawn
    # from the stage's RNG stream, so only its printed and recorded choice is compared)
    tok = data.load_tokenizer(os.path.join(world, "tokenizer"))
    te, _, proc = M.load_pretrained(teacher)
    samples = [s for s in data.load_llava_json(os.path.join(world, "instruct.json")) if s.get("image")][:6]
    ds = data.SupervisedDataset(samples, tok, proc, world, te.num_visual_tokens, te.image_token_id, 256)
    batch = data.collate([ds[i] for i in range(6)], data.pad_token_id(tok))
    b = [(batch["input_ids"][:4], batch["attention_mask"][:4], batch["pixel_values"][:4], None),
         (batch["input_ids"][4:], batch["attention_mask"][4:], batch["pixel_values"][4:], None)]  # micro-batch 4
    assert attention.layer_profile_batches(te, b)["auto"] == auto["teacher"]
    assert state["meta"]["vat_auto"]["student"] and all(0 <= l < 4 for l in auto["student"])
    # resume: no new measurement, the recorded layers
    monkeypatch.setattr(attention, "layer_profile_batches", lambda *a, **k: pytest.fail("measured again on resume"))
    train.main(["--max-steps", "2", "--resume", *args])
    assert f"VAT: student layers {auto['student']}" in capsys.readouterr().out


def test_vat_layers_auto_without_image_samples_is_an_error(setup, tmp_path):
    world, teacher, root = setup
    text = [s for s in json.load(open(os.path.join(world, "instruct.json"), encoding="utf-8")) if not s.get("image")]
    assert text
    text_only = [dict(text[k % len(text)], id=f"text_{k}") for k in range(8)]  # a global batch of them
    path = str(tmp_path / "text_only.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(text_only, f)
    args = _stage_args(world, teacher, str(tmp_path / "out"))
    args[args.index("--data") + 1] = path
    with pytest.raises(ValueError, match=r"--vat-layers auto: .*text_only.json has no sample with an image"):
        train.main(["--stage", "2", "--max-steps", "1", "--vat-layers", "auto", *args])


def test_stage_all_hands_stage2_to_stage3_in_fp32_and_saves_the_taf_linear_in_fp32(setup, tmp_path, monkeypatch):
    """--stage all with an LLM that came in bf16: stage 2's merged LoRA delta, far below bf16's resolution
    (stage 2 at lr 1e-5), reaches stage 3 as fp32 base + delta (a bf16 hand-off rounds it away: the old code),
    the TAF linear is saved in fp32 bit for bit in every stage, and stage 3 still ends in the LLM's bf16."""
    from safetensors import safe_open
    world, teacher, root = setup
    tok = data.load_tokenizer(os.path.join(world, "tokenizer"))
    init = M.from_preset("student", tok)
    init.language_model.to(torch.bfloat16).float()  # as read from a bf16 checkpoint
    init.extra_config["llm_dtype"] = "bfloat16"
    M.save_pretrained(init, str(tmp_path / "init"), tok)
    q = "layers.0.self_attn.q_proj"
    merged, started = [], {}  # per stage: (fp32 base, float64 delta, TAF linear) before the merge; stage 3's start
    real_merge, real_build = train.merge_lora, train.build_student

    def spy_merge(model):
        lm = model.language_model
        mod = dict(lm.named_modules()).get(f"base_model.model.model.{q}")
        lin = model.projector.linear.weight.detach().clone()
        if mod is None:  # no LoRA (stage 1)
            merged.append((None, None, lin))
        else:
            a, b = mod.lora_A["default"].weight.detach().double(), mod.lora_B["default"].weight.detach().double()
            merged.append((mod.base_layer.weight.detach().double().clone(), (b @ a) * mod.scaling["default"], lin))
        return real_merge(model)

    def spy_build(args, *rest):
        out = real_build(args, *rest)
        if args.stage == "3":
            started["q"] = dict(out[0].language_model.named_parameters())[f"model.{q}.weight"].detach().double().clone()
        return out
    monkeypatch.setattr(train, "merge_lora", spy_merge)
    monkeypatch.setattr(train, "build_student", spy_build)
    out = str(tmp_path / "all")
    args = _stage_args(world, teacher, out)
    args[args.index("--init") + 1] = str(tmp_path / "init")
    args[args.index("--lr") + 1] = "1e-3,1e-5,1e-3"
    train.main(["--stage", "all", "--max-steps", "2", *args])
    assert len(merged) == 3 and merged[0][0] is None
    base, delta, _ = merged[1]
    want = base + delta
    ulp_bf16 = 2.0 ** (torch.floor(torch.log2(base.abs().clamp_min(1e-30))) - 7)
    below = (delta != 0) & (delta.abs() < ulp_bf16 / 2)
    assert below.float().mean() > 0.5  # most of the delta is below bf16's resolution
    got = started["q"]
    assert (got - want).abs().max() <= 2 ** -23 * want.abs().max()  # fp32 rounding of base + delta only
    assert (got[below] != base[below]).float().mean() > 0.9  # the small delta is there (bf16 would drop it)
    for k, dtype in ((1, torch.float32), (2, torch.float32), (3, torch.bfloat16)):
        with safe_open(os.path.join(out, f"stage{k}", "model.safetensors"), "pt") as f:
            assert f.get_tensor(f"language_model.model.{q}.weight").dtype == dtype
            lin = f.get_tensor("projector.linear.weight")
        assert lin.dtype == torch.float32 and torch.equal(lin, merged[k - 1][2])  # the trained linear, exact
    summ = json.load(open(os.path.join(out, "stage3", "trainer_summary.json")))
    assert summ["save_dtype"] == "bfloat16"


@pytest.mark.parametrize("stage,flag,want", [("2", None, 0.0), ("3", None, 0.0), ("llava", None, 0.05),
                                             ("2", "0.1", 0.1)])
def test_lora_dropout_is_off_in_the_distillation_stages_by_default(tokenizer, stage, flag, want):
    """The authors' distillation trainer (DistillTrainer, used by their DPT, DFT and SFT scripts) sets every
    dropout of student and teacher to 0; the LLaVA recipe keeps LLaVA-1.5's 0.05; --lora-dropout overrides."""
    argv = ["--stage", stage, *(["--lora-dropout", flag] if flag else [])]
    args = train.get_parser().parse_args(argv)
    args.lora_r, args.lora_alpha = 4, 8
    model = M.from_preset("student", tokenizer)
    assert train.set_trainable(model, args) == "adapter+lora"
    drops = [m.lora_dropout["default"] for m in model.language_model.modules() if hasattr(m, "lora_dropout")]
    assert drops and all((d.p if isinstance(d, torch.nn.Dropout) else 0.0) == want for d in drops)
    with torch.no_grad():  # a trained LoRA (peft starts B at 0, where a dropped input changes nothing)
        for m in model.language_model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B["default"].weight.normal_(0, 0.1)
    model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():  # no dropout: two training-mode forwards agree exactly
        same = torch.equal(model(ids)["logits"], model(ids)["logits"])
    assert same == (want == 0.0)


def test_the_teacher_reads_images_and_prompts_as_it_was_trained_to(setup, tmp_path, monkeypatch):
    """A teacher recorded with --image-aspect-ratio pad and its own --system-prompt, a student that squashes:
    the teacher sees its images padded to a square (built here by hand: LLaVA's expand2square with the
    processor's mean colour), the student its own squashed ones. A student with another system prompt is
    refused naming both prompts and the flags, unless --cross-vocab, where the teacher reads its own rendering.
    (Before, the teacher silently saw the student's pixels and ids.)"""
    from PIL import Image
    world, teacher, root = setup
    tok = data.load_tokenizer(os.path.join(world, "tokenizer"))
    img_id = data.image_token_id(tok)
    samples = [s for s in data.load_llava_json(os.path.join(world, "instruct.json")) if s.get("image")][:8]
    os.makedirs(tmp_path / "images")
    for s in samples:  # non-square images: where pad and squash differ
        Image.open(os.path.join(world, s["image"])).convert("RGB").crop((0, 0, 64, 40)).save(tmp_path / s["image"])
    with open(tmp_path / "wide.json", "w", encoding="utf-8") as f:
        json.dump(samples, f)
    te, te_tok, _ = M.load_pretrained(teacher)
    prompt = "You are the teacher."
    te.extra_config.update(image_aspect_ratio="pad", system_prompt=prompt)
    M.save_pretrained(te, str(tmp_path / "teacher"), te_tok)
    base = M.make_image_processor(te.vision_tower.config)
    mean = tuple(int(round(x * 255)) for x in base.image_mean)

    def by_hand(pil, pad):
        if pad:
            canvas = Image.new("RGB", (64, 64), mean)
            canvas.paste(pil, (0, 12))
            pil = canvas
        return base(images=pil, return_tensors="pt")["pixel_values"][0]
    pils = [Image.open(tmp_path / s["image"]).convert("RGB") for s in samples]
    padded, squashed = [by_hand(p, True) for p in pils], [by_hand(p, False) for p in pils]
    seen = []
    real_forward = M.MultimodalLM.forward

    def spy(self, input_ids, attention_mask=None, pixel_values=None, *a, **k):
        seen.append((self.d_llm, input_ids.clone(), attention_mask.clone(), pixel_values.clone()))
        return real_forward(self, input_ids, attention_mask, pixel_values, *a, **k)
    monkeypatch.setattr(M.MultimodalLM, "forward", spy)
    args = _stage_args(world, str(tmp_path / "teacher"), str(tmp_path / "s1"))
    args[args.index("--data") + 1] = str(tmp_path / "wide.json")
    args[args.index("--image-folder") + 1] = str(tmp_path)
    train.main(["--stage", "1", "--max-steps", "1", "--system-prompt", prompt, *args])
    d_t = M.PRESETS["teacher"]["hidden_size"]
    assert {d for d, *_ in seen} == {d_t, M.PRESETS["student"]["hidden_size"]}
    for d, _, _, pix in seen:
        for row in pix:
            want, other = (padded, squashed) if d == d_t else (squashed, padded)
            assert any(torch.allclose(row, w, atol=1e-6) for w in want)
            assert not any(torch.allclose(row, w, atol=1e-3) for w in other)
    # another system prompt: refused, naming both and the flags
    args[args.index("--out") + 1] = str(tmp_path / "refused")
    with pytest.raises(ValueError, match=r"(?s)system prompt 'You are the teacher\.'.*'be brief'.*--system-prompt"
                                         r".*--cross-vocab"):
        train.main(["--stage", "1", "--max-steps", "1", "--system-prompt", "be brief", *args])
    # --cross-vocab: the teacher renders each sample with its own prompt
    seen.clear()
    args[args.index("--out") + 1] = str(tmp_path / "cross")
    train.main(["--stage", "1", "--max-steps", "1", "--system-prompt", "be brief", "--cross-vocab", *args])

    def rendering(p):
        return {tuple(data.render_conversation(tok, data.with_system_prompt(tok, data.llava_to_messages(s), p), 16,
                                               img_id)[0][:256]) for s in samples}
    teacher_ids, student_ids = rendering(prompt), rendering("be brief")
    assert teacher_ids.isdisjoint(student_ids)
    for d, ids, mask, _ in seen:
        rows = {tuple(r[m.bool()].tolist()) for r, m in zip(ids, mask)}
        assert rows <= (teacher_ids if d == d_t else student_ids)
