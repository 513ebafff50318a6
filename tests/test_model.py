"""model.py: shapes, the visual mask, the HF LLaVA peer check, save/load, generation."""
import os

import pytest
import torch

import model as M


def _batch(tok, m, prompts_before, n_images_per_row, pad_to=None):
    """Rows of [prefix tokens][image tokens][suffix], right-padded; n_images_per_row in {0, 1}."""
    img = m.image_token_id
    rows = []
    for pre, has in zip(prompts_before, n_images_per_row):
        row = [5 + (i % 7) for i in range(pre)] + ([img] * m.num_visual_tokens if has else []) + [9, 10, 11]
        rows.append(row)
    T = pad_to or max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_token_id)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
    n_img = sum(n_images_per_row)
    pv = torch.randn(n_img, 3, 64, 64) if n_img else None
    return ids, mask, pv, rows


def test_visual_mask_any_layout_padding_and_text_only(tokenizer):
    m = M.from_preset("student", tokenizer)
    ids, mask, pv, rows = _batch(tokenizer, m, [1, 7, 3], [1, 0, 1], pad_to=40)
    out = m(ids, mask, pv)
    assert out["logits"].shape == (3, 40, len(tokenizer))
    vm = out["visual_mask"]
    # hand-built expectation: exactly the positions where the image block was placed
    expect = torch.zeros_like(vm)
    expect[0, 1:1 + m.num_visual_tokens] = True
    expect[2, 3:3 + m.num_visual_tokens] = True
    assert torch.equal(vm, expect)
    assert not vm[1].any()  # text-only row: all False
    assert not (vm & (mask == 0)).any()  # never on padding


def test_image_features_land_on_image_tokens(tokenizer):
    """The embeddings at image positions are the projected features of THAT row's image, in order."""
    m = M.from_preset("student", tokenizer).eval()
    ids, mask, pv, _ = _batch(tokenizer, m, [2, 5], [1, 1])
    embeds, vm = m.embed(ids, pv)
    feats = m.encode_images(pv)
    assert torch.allclose(embeds[0][vm[0]], feats[0])
    assert torch.allclose(embeds[1][vm[1]], feats[1])
    text = m.language_model.get_input_embeddings()(ids)
    assert torch.equal(embeds[~vm], text[~vm])


def test_token_feature_count_mismatch_is_a_clear_error(tokenizer):
    m = M.from_preset("student", tokenizer)
    ids, mask, pv, _ = _batch(tokenizer, m, [2, 5], [1, 1])
    with pytest.raises(ValueError, match="image tokens and image features disagree"):
        m(ids, mask, pv[:1])
    ids[0, 3] = 9  # one image token lost
    with pytest.raises(ValueError, match=r"per sample \[15, 16\]"):
        m(ids, mask, pv)


def test_num_visual_tokens_from_config_clip_drops_cls(tokenizer):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    vcfg = AutoConfig.for_model("clip_vision_model", image_size=32, patch_size=8, hidden_size=32,
                                intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision = AutoModel.from_config(vcfg)
    tcfg = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    lm = AutoModelForCausalLM.from_config(tcfg)
    img = tokenizer.convert_tokens_to_ids("<image>")
    keep = M.MultimodalLM(vision, M.mlp2x_gelu(32, 32), lm, img, -2, "full")
    drop = M.MultimodalLM(vision, M.mlp2x_gelu(32, 32), lm, img, -2, "default")
    assert keep.num_visual_tokens == 17 and drop.num_visual_tokens == 16  # 4x4 patches (+ CLS)
    assert drop.encode_images(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)


def test_hf_llava_peer_check(tmp_path):
    """A tiny random HF LlavaForConditionalGeneration saved to disk, loaded through from_llava, gives HF's
    own logits (fp32, max abs diff <= 1e-5)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig
    torch.manual_seed(0)
    vcfg = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=3, num_attention_heads=2)
    tcfg = Qwen2Config(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=100, vision_feature_layer=-2,
                      vision_feature_select_strategy="full", projector_hidden_act="gelu")
    hf = LlavaForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path / "llava")
    ours = M.from_llava(str(tmp_path / "llava")).eval()
    assert ours.num_visual_tokens == 16
    ids = torch.tensor([[1, 2] + [100] * 16 + [3, 4, 5], [7] + [100] * 16 + [8, 9, 10, 11]])
    mask = torch.ones_like(ids)
    pv = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        got = ours(ids, mask, pv)["logits"]
    assert (ref - got).abs().max().item() <= 1e-5
    assert ref.abs().max() > 0.01  # not a trivial comparison


def test_hf_llava_clip_no_projector_bias_bf16_checkpoint(tmp_path, tokenizer):
    """A bf16 LLaVA checkpoint with CLIP (CLS dropped, 'default'), a Llama LM and a bias-free projector
    (multimodal_projector_bias=False): loaded in fp32 (trainable master weights), HF's own logits (HF loaded
    in fp32 from the same file), and the bias-free projector survives our save / load."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=2)
    tcfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    img = tokenizer.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=img, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      multimodal_projector_bias=False)
    LlavaForConditionalGeneration(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "llava")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava", dtype=torch.float32).eval()
    ours = M.from_llava(str(tmp_path / "llava")).eval()
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    assert ours.num_visual_tokens == 16 and ours.projector[0].bias is None
    text = [t for t in range(20, 30) if t != img][:5]
    ids = torch.tensor([text[:2] + [img] * 16 + text[2:]])
    pv = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv).logits
        got = ours(ids, torch.ones_like(ids), pv)["logits"]
    assert (ref - got).abs().max().item() <= 1e-5 and ref.abs().max() > 0.01
    M.save_pretrained(ours, str(tmp_path / "ours"), tokenizer)
    again, _, _ = M.load_pretrained(str(tmp_path / "ours"))
    assert again.projector[0].bias is None
    with torch.no_grad():
        assert torch.equal(again.eval()(ids, torch.ones_like(ids), pv)["logits"], got)


@pytest.mark.parametrize("kind, strategy, n", [("clip", "default", 16), ("siglip", "full", 16)])
def test_from_parts_strategy_and_fp32(tmp_path, tokenizer, kind, strategy, n):
    """from_parts on bf16 checkpoints: fp32 weights; CLIP's CLS token dropped, SigLIP's tokens all kept."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    vcfg = AutoConfig.for_model(f"{kind}_vision_model", image_size=32, patch_size=8, hidden_size=32,
                                intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    AutoModel.from_config(vcfg).to(torch.bfloat16).save_pretrained(tmp_path / "vision")
    tcfg = AutoConfig.for_model("qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(tcfg).to(torch.bfloat16).save_pretrained(tmp_path / "llm")
    m = M.from_parts(str(tmp_path / "vision"), str(tmp_path / "llm"), tokenizer)
    assert m.vision_feature_select_strategy == strategy and m.num_visual_tokens == n
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    assert m.encode_images(torch.randn(1, 3, 32, 32)).shape == (1, n, 32)


def test_save_load_round_trip_and_strict_errors(tokenizer, tmp_path):
    m = M.from_preset("teacher", tokenizer).eval()
    M.save_pretrained(m, str(tmp_path / "t"), tokenizer)
    assert sorted(os.listdir(tmp_path / "t"))[:2] == ["chat_template.jinja", "config.json"] or \
        os.path.exists(tmp_path / "t" / "tokenizer_config.json")
    m2, tok2, proc = M.load_pretrained(str(tmp_path / "t"))
    ids, mask, pv, _ = _batch(tokenizer, m, [2, 4], [1, 0])
    with torch.no_grad():
        assert torch.equal(m(ids, mask, pv)["logits"], m2.eval()(ids, mask, pv)["logits"])
    assert tok2.get_vocab() == tokenizer.get_vocab()
    # a student checkpoint's weights do not fit a teacher config: the error names keys and shapes
    s = M.from_preset("student", tokenizer)
    M.save_pretrained(s, str(tmp_path / "s"), tokenizer)
    os.replace(tmp_path / "s" / "model.safetensors", tmp_path / "t" / "model.safetensors")
    with pytest.raises(ValueError, match="shape mismatches"):
        M.load_pretrained(str(tmp_path / "t"))


def test_generate_matches_uncached_greedy_with_left_and_right_padding(tokenizer):
    m = M.from_preset("student", tokenizer, seed=3).eval()
    ids, mask, pv, rows = _batch(tokenizer, m, [1, 6], [1, 1])
    got_right = m.generate(ids, mask, pv, max_new_tokens=6)
    # left-padded version of the same rows
    T = ids.shape[1]
    left = torch.full_like(ids, tokenizer.pad_token_id)
    lmask = torch.zeros_like(mask)
    for b, r in enumerate(rows):
        left[b, T - len(r):] = torch.tensor(r)
        lmask[b, T - len(r):] = 1
    assert m.generate(left, lmask, pv, max_new_tokens=6) == got_right
    for b, r in enumerate(rows):  # reference: no cache, no padding, one row at a time
        x, seq = torch.tensor([r]), []
        for _ in range(6):
            with torch.no_grad():
                n = m(x, torch.ones_like(x), pv[b:b + 1])["logits"][0, -1].argmax().item()
            seq.append(n)
            x = torch.cat([x, torch.tensor([[n]])], 1)
        assert got_right[b] == seq


def _old_load(path, dtype):
    """The loading path before meta-device construction: a randomly initialised model, the whole file read
    (safetensors.torch.load_file), copied in, tied, cast. The reference the new loader must equal."""
    from safetensors.torch import load_file
    m = M.model_from_config(M.read_config(path))
    m.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=False)
    m.language_model.tie_weights()
    return m.to(dtype) if dtype is not None else m


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_meta_loading_equals_the_old_path_buffers_and_ties_included(tokenizer, tmp_path, dtype, tied):
    """load_pretrained builds on the meta device and fills from the file: the same logits as the old path
    (random model + load_file + copy) bit for bit, the buffers no checkpoint holds (rotary inv_freq, SigLIP
    position_ids) as a normally built model has them, the tied head still the embedding itself."""
    cfg = M.from_preset("teacher", tokenizer).config_dict()
    cfg["text_config"]["tie_word_embeddings"] = tied
    torch.manual_seed(0)
    src = M.model_from_config(cfg).to(torch.bfloat16)  # a bf16 checkpoint, as Qwen ships
    M.save_pretrained(src, str(tmp_path / "m"), tokenizer)
    new = M.load_pretrained(str(tmp_path / "m"), dtype=dtype)[0].eval()
    old = _old_load(str(tmp_path / "m"), dtype).eval()
    assert not any(p.is_meta for p in new.parameters())
    assert {p.dtype for p in new.parameters()} == {dtype or torch.float32}
    assert not new.vision_tower.embeddings.patch_embedding.weight.requires_grad  # frozen, as built
    lm = new.language_model
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == tied
    old_buffers = dict(old.named_buffers())
    for k, b in new.named_buffers():  # includes the non-persistent ones
        assert torch.equal(b, old_buffers[k]) and b.dtype == old_buffers[k].dtype, k
    ids, mask, pv, _ = _batch(tokenizer, new, [2, 5], [1, 0])
    with torch.no_grad():
        a, b = new(ids, mask, pv)["logits"], old(ids, mask, pv)["logits"]
    assert torch.equal(a, b) and a.abs().max() > 0.01


LOAD_PEAK = r"""
import ctypes, gc, os, sys, torch
sys.path.insert(0, sys.argv[1])
import model as M
def kib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024
M.load_pretrained(sys.argv[3])  # a tiny model of the same kind: every import done
for dtype in (None, torch.bfloat16):
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the previous load's memory back to the system
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS (Linux)
    before = kib("VmRSS:")
    m = M.load_pretrained(sys.argv[2], dtype=dtype)[0]
    weights = sum(p.numel() * p.element_size() for p in m.parameters())
    print((kib("VmHWM:") - before) / weights)
    del m
"""


def test_loading_peaks_at_the_weights_once(tokenizer, tmp_path):
    """Loading a bf16 model directory (135 MB of weights) raises the process's peak host memory by at most
    1.3x its weights in the target dtype: bf16, and the float32 master weights (dtype None). Measured in a
    fresh process (VmHWM, reset before each load). The old path (a random fp32 model, then the whole file
    read beside it) took 3.0x and 1.5x."""
    import subprocess
    import sys
    big, tiny = str(tmp_path / "big"), str(tmp_path / "tiny")
    torch.manual_seed(0)
    m = M.from_preset("student", tokenizer, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=16)
    M.save_pretrained(m.to(torch.bfloat16), big, tokenizer)
    del m
    M.save_pretrained(M.from_preset("student", tokenizer).to(torch.bfloat16), tiny, tokenizer)
    out = subprocess.run([sys.executable, "-c", LOAD_PEAK, os.path.dirname(M.__file__), big, tiny],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    ratios = [float(x) for x in out.stdout.split()[-2:]]
    print(f"load peak / weights: float32 {ratios[0]:.3f}x, bf16 {ratios[1]:.3f}x")
    assert all(0.5 < r <= 1.3 for r in ratios), ratios
