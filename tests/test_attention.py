"""attention.py (the attention study, docs/method.md section 7): the per-layer cosine against an independent
recomputation from HF eager attention (output_attentions=True), the self-comparison identity, the right / wrong
split on hand-worked numbers, the CLI's files, the heat-map grid, and the layer profiles. Tiny real models, a tiny
synthetic benchmark."""
import copy
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attention  # noqa: E402
import data  # noqa: E402
import shapes  # noqa: E402
import evaluate as ev  # noqa: E402
import model as M  # noqa: E402

PATTERN = shapes.VQAV2_IMAGE_PATTERN.replace("{image_id:012d}", "%012d")  # evaluate.py's %-style pattern


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    shapes.synthesize(str(root), seed=0, n_pretrain=32, n_instruct=32, n_images=32, n_sugarcrepe=3, n_vqa=4,
                    n_val_sugarcrepe=2, n_val_vqa=2, tokenizer=False, progress=False)
    return str(root)


def sharpen(mllm, std=0.16):
    """Scale the random q/k projections to weight std `std`: at Qwen2's default init (0.02) every attention
    row is close to uniform and any two maps have cosine ~1, so a comparison would prove little; much
    larger (the teacher preset's own 0.125 x 8) and the rows are one-hot and badly conditioned."""
    factor = std / mllm.language_model.config.initializer_range
    with torch.no_grad():
        for layer in mllm.language_model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return mllm.eval()


@pytest.fixture(scope="module")
def models(tokenizer):
    teacher = sharpen(M.from_preset("teacher", tokenizer, seed=0))
    student = sharpen(M.from_preset("student", tokenizer, seed=0))
    return teacher, student, M.make_image_processor(student.vision_tower.config)


@pytest.fixture(scope="module")
def requests_(world):
    """2 SugarCrepe items (true caption as (A)) and 1 VQAv2 question: three prompt lengths, so a batch of 2
    has a padded row and the last batch is short."""
    sc = ev.read_sugarcrepe(os.path.join(world, "sugarcrepe"), limit=1)
    vqa = ev.read_vqav2(os.path.join(world, "vqav2"), PATTERN, limit=1)
    items = attention.attention_items({"sugarcrepe": {k: sc[k] for k in list(sc)[:2]}, "vqav2": vqa})
    reqs = [it["request"] for it in items]
    return reqs


EAGER = {}  # id(model) -> an eager copy of its LM


def eager_maps(mllm, tok, proc, request):
    """The reference A~_l of every layer for ONE request, unpadded: an eager copy of the LM with
    output_attentions=True; head mean, every query row, visual key columns, float64. -> (list of (T, N), T)."""
    ids = data.render_prompt(tok, [{"role": "user", "content": request["prompt"]}], mllm.num_visual_tokens,
                             mllm.image_token_id)
    ids = torch.tensor([ids])
    pixels = proc(images=[ev.open_image(request["image"])], return_tensors="pt")["pixel_values"]
    if id(mllm) not in EAGER:
        EAGER[id(mllm)] = copy.deepcopy(mllm.language_model)
        EAGER[id(mllm)].set_attn_implementation("eager")
    lm = EAGER[id(mllm)]
    with torch.no_grad():
        embeds, vmask = mllm.embed(ids, pixels)
        out = lm(inputs_embeds=embeds, output_attentions=True, return_dict=True)
    vis = vmask[0].nonzero()[:, 0]
    return [a[0].double().mean(0)[:, vis] for a in out.attentions], ids.shape[1]


def cosine(a, b):
    a, b = a.flatten(), b.flatten()
    return float(a @ b / (a.norm() * b.norm()))


def test_cosine_matches_eager_reference(models, tokenizer, requests_):
    teacher, student, proc = models
    # "all" layers: student 0..3 vs teacher 0..5, so every group window holds n = 6 - 4 + 1 = 3 teacher layers
    res = attention.attention_distance(teacher, student, tokenizer, proc, requests_, layers_spec="all",
                                       batch_size=2, answer_rows=len(requests_))
    assert res["student_layers"] == [0, 1, 2, 3]
    assert res["windows"] == [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]]
    ref, lengths = np.zeros((len(requests_), 4)), []
    ref_answer = np.zeros((len(requests_), 4))
    for i, r in enumerate(requests_):
        t_maps, T = eager_maps(teacher, tokenizer, proc, r)
        s_maps, T_s = eager_maps(student, tokenizer, proc, r)
        assert T == T_s
        lengths.append(T)
        for j, window in enumerate(res["windows"]):
            target = torch.stack([t_maps[t] for t in window]).mean(0)
            ref[i, j] = cosine(s_maps[j], target)
            ref_answer[i, j] = cosine(s_maps[j][-1], target[-1])  # the answer position's row alone
        # heat-map row: the last prompt token's attention, mean over the student layers / teacher window layers
        np.testing.assert_allclose(res["answer_rows"]["student"][i],
                                   torch.stack([m[-1] for m in s_maps]).mean(0).numpy(), atol=1e-6)
        np.testing.assert_allclose(res["answer_rows"]["teacher"][i],
                                   torch.stack([m[-1] for m in t_maps]).mean(0).numpy(), atol=1e-6)
        assert res["answer_rows"]["student"][i].shape == (student.num_visual_tokens,)
    assert lengths[0] != lengths[1]  # the first batch of 2 holds a padded row
    np.testing.assert_allclose(np.array(res["per_item"]), ref, atol=1e-5)
    np.testing.assert_allclose(np.array(res["answer_cos"]), ref_answer, atol=1e-5)
    assert np.abs(ref_answer - ref).max() > 1e-3  # one row is not the whole map
    assert res["answer_dist"] == pytest.approx(1 - ref_answer.mean(0).mean(), abs=1e-5)
    # the pair is not trivially aligned (cosines well below 1 and varying), so the comparison means something
    assert ref.max() < 0.98 and ref.std() > 5e-3
    means = ref.mean(0)
    assert [p["cosine"] for p in res["per_layer"]] == pytest.approx(means.tolist(), abs=1e-5)
    assert res["attn_dist"] == pytest.approx(1 - means.mean(), abs=1e-5)


def test_default_middle_layers(models, tokenizer, requests_):
    teacher, student, proc = models
    res = attention.attention_distance(teacher, student, tokenizer, proc, requests_[:2], batch_size=2)
    # 30%-70% of depth: student 4 layers -> 1, 2; teacher 6 layers -> 2, 3; window n = 1
    assert res["student_layers"] == [1, 2] and res["teacher_layers"] == [2, 3]
    assert res["windows"] == [[2], [3]]
    assert 0.0 < res["attn_dist"] < 1.0


def test_student_against_itself_is_aligned(models, tokenizer, requests_):
    _, student, proc = models
    res = attention.attention_distance(student, student, tokenizer, proc, requests_, layers_spec="all", batch_size=3)
    np.testing.assert_allclose(np.array(res["per_item"]), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.array(res["answer_cos"]), 1.0, atol=1e-6)
    assert res["attn_dist"] == pytest.approx(0.0, abs=1e-6)


def test_split_by_correctness_hand_numbers():
    per_item = [[1.0, 0.5], [0.5, 0.0], [0.8, 0.2]]
    s = attention.split_by_correctness(per_item, [True, False, True], [7, 8], [[10, 11], [11, 12]])
    rows = s["per_layer"]
    assert rows[0]["cos_all"] == pytest.approx(2.3 / 3) and rows[1]["cos_all"] == pytest.approx(0.7 / 3)
    assert rows[0]["cos_right"] == pytest.approx(0.9) and rows[1]["cos_right"] == pytest.approx(0.35)
    assert rows[0]["cos_wrong"] == pytest.approx(0.5) and rows[1]["cos_wrong"] == pytest.approx(0.0)
    assert s["attn_dist"] == pytest.approx(0.5)              # 1 - mean(2.3/3, 0.7/3)
    assert s["attn_dist_right"] == pytest.approx(1 - 0.625)
    assert s["attn_dist_wrong"] == pytest.approx(0.75)
    assert (s["n_right"], s["n_wrong"], s["accuracy"]) == (2, 1, pytest.approx(200 / 3))
    empty = attention.split_by_correctness(per_item, [True] * 3, [7, 8], [[10, 11], [11, 12]])
    assert empty["per_layer"][0]["cos_wrong"] != empty["per_layer"][0]["cos_wrong"]  # NaN: no wrong item


def test_patch_grid_and_heatmap():
    grid = attention.patch_grid(np.arange(16.0))
    assert grid.shape == (4, 4) and grid[1, 0] == 4.0      # row-major patch order
    with pytest.raises(ValueError, match="square"):
        attention.patch_grid(np.arange(15.0))
    img = attention.attention_heatmap(Image.new("RGB", (50, 30), "red"),
                                      [("teacher", grid), ("student: s", grid.T)],
                                      "a red circle is to the left of a blue square")
    P, pad = attention.HEATMAP_PANEL, attention.HEATMAP_PAD
    assert img.size[0] == 3 * P + 4 * pad and img.size[1] > P + attention.HEATMAP_TITLE_H
    # the brightest patch of the teacher's map (bottom right) is drawn brightest, the darkest darkest
    x0, y0 = pad + (P + pad), pad + attention.HEATMAP_TITLE_H
    lum = np.asarray(img.convert("L"), dtype=float)
    assert lum[y0 + P - 5, x0 + P - 5] > lum[y0 + 5, x0 + 5]


def test_cli_writes_json_plot_and_heatmaps(world, models, tokenizer, tokenizer_dir, tmp_path, monkeypatch):
    teacher, student, _ = models
    real, budgets = ev.model_fns, []

    def short_generation(mllm, tok, proc, device, batch_size, max_new_tokens, **kw):  # the real glue, 1 new token
        budgets.append(max_new_tokens)
        return real(mllm, tok, proc, device, batch_size, 1, **kw)
    monkeypatch.setattr(attention, "model_fns", short_generation)
    tok = data.load_tokenizer(tokenizer_dir)
    M.save_pretrained(teacher, str(tmp_path / "teacher"), tok)
    M.save_pretrained(student, str(tmp_path / "student"), tok)
    out = tmp_path / "out"
    report = attention.main(["distance", "--teacher", str(tmp_path / "teacher"),
                             "--student", str(tmp_path / "student"), "--student", str(tmp_path / "teacher"),
                             "--teacher-layers", "all",
                             "--sugarcrepe", os.path.join(world, "sugarcrepe"), "--vqav2", os.path.join(world, "vqav2"),
                             "--vqav2-image-pattern", PATTERN, "--limit", "1", "--out", str(out), "--heatmaps", "2",
                             "--batch-size", "8"])
    with open(out / "attention.json") as f:
        saved = json.load(f)
    assert list(saved["students"]) == ["student", "teacher"]
    for name, n_layers in (("student", 2), ("teacher", 2)):
        s = saved["students"][name]
        assert s["n_items"] == 7 + 1 and s["n_right"] + s["n_wrong"] == 8   # 7 subsets x 1 + 1 VQA question
        assert len(s["per_layer"]) == n_layers and len(s["items"]) == 8
        cos = np.array([it["cos"] for it in s["items"]])
        assert [r["cos_all"] for r in s["per_layer"]] == pytest.approx(cos.mean(0).tolist())
        right = np.array([it["right"] for it in s["items"]])
        for r, col in zip(s["per_layer"], cos.T):
            assert (r["cos_right"] is None) == (not right.any())
            if right.any():
                assert r["cos_right"] == pytest.approx(col[right].mean())
        assert s["attn_dist"] == pytest.approx(1 - cos.mean())
    # student layers 1, 2 (middle of 4) vs all 6 teacher layers: windows of n = 5
    assert saved["students"]["student"]["per_layer"][0]["teacher_layers"] == [0, 1, 2, 3, 4]
    assert report["students"]["student"]["attn_dist"] == pytest.approx(saved["students"]["student"]["attn_dist"])
    with Image.open(out / "attention_similarity.png") as im:
        assert im.size == (2 * attention.PLOT_W, attention.PLOT_H)
    for i in range(2):
        with Image.open(out / f"heatmap_{i}.png") as im:
            # image, teacher, two students
            assert im.size[0] == 4 * attention.HEATMAP_PANEL + 5 * attention.HEATMAP_PAD
    assert not (out / "heatmap_2.png").exists()
    assert budgets == [32, 16, 32, 16]   # per student: the cr and vqa protocols' max_new_tokens
    for it in saved["students"]["student"]["items"]:  # right = the protocol's judgement of the answer
        if it["benchmark"] == "sugarcrepe":
            assert it["right"] == (ev.parse_choice(it["answer"]) == "A")


# -----------------------------------------------------------------------------
# attention.py section 2: layer profiles and the "auto" window


def test_layer_profile_matches_eager_reference(models, tokenizer, requests_):
    """layer_profile (batched, padded, captured under SDPA) against the eager maps of each request alone:
    share = mean over text rows after the image of the visual mass, entropy of the renormalised row / log N,
    object = the answer row's share on the named patches; and the auto window is vat.auto_layers of them."""
    teacher, _, proc = models
    reqs = [dict(r, object_patches=[3, 7]) if i != 1 else r for i, r in enumerate(requests_)]
    prof = attention.layer_profile(teacher, tokenizer, proc, reqs, batch_size=2)
    ref = {l: {"share": [], "entropy": [], "object": []} for l in range(6)}
    for r in reqs:
        maps, T = eager_maps(teacher, tokenizer, proc, r)
        ids = data.render_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}], teacher.num_visual_tokens,
                                 teacher.image_token_id)
        vis = [i for i, t in enumerate(ids) if t == teacher.image_token_id]
        rows = list(range(vis[-1] + 1, T))
        for l, m in enumerate(maps):
            mass = m[rows].sum(-1)
            p = m[rows] / mass[:, None]
            ent = -(p * p.clamp_min(1e-300).log()).sum(-1) / np.log(len(vis))
            ref[l]["share"].append(float(mass.mean()))
            ref[l]["entropy"].append(float(ent.mean()))
            if r.get("object_patches"):
                last = m[-1]
                ref[l]["object"].append(float(last[[3, 7]].sum() / last.sum()))
    for l in range(6):
        for k in ("share", "entropy", "object"):
            assert prof["layers"][l][k] == pytest.approx(np.mean(ref[l][k]), abs=1e-5), (l, k)
    assert prof["n_items"] == len(reqs)
    assert prof["auto"] == vat_auto(prof["layers"])
    assert prof["middle"] == [2, 3]


def vat_auto(layers):
    import vat
    return vat.auto_layers(layers, len(layers))


def test_layers_cli_writes_json_and_plot(world, models, tokenizer_dir, tmp_path):
    teacher, student, _ = models
    tok = data.load_tokenizer(tokenizer_dir)
    M.save_pretrained(teacher, str(tmp_path / "teacher"), tok)
    M.save_pretrained(student, str(tmp_path / "student"), tok)
    # a calibration file naming the object of each request (relative image paths)
    sc = ev.read_sugarcrepe(os.path.join(world, "sugarcrepe"), limit=1)
    first = next(iter(sc.values()))[0]
    lines = [{"image": os.path.relpath(first["image"], tmp_path), "prompt": "<image>\nWhat color is the circle?",
              "object_patches": [5]}]
    with open(tmp_path / "calib.jsonl", "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "layers"
    report = attention.main(["layers", "--model", str(tmp_path / "teacher"), "--model", str(tmp_path / "student"),
                             "--sugarcrepe", os.path.join(world, "sugarcrepe"), "--limit", "1",
                             "--requests", str(tmp_path / "calib.jsonl"), "--out", str(out)])
    with open(out / "layers.json") as f:
        saved = json.load(f)
    assert list(saved["models"]) == ["teacher", "student"] and saved["requests"] == 7 + 1
    assert len(saved["models"]["teacher"]["layers"]) == 6 and len(saved["models"]["student"]["layers"]) == 4
    for m in saved["models"].values():
        assert 0 < len(m["auto"]) and all(0 <= v["share"] <= 1 for v in m["layers"].values())
        assert all(v["object"] is not None for v in m["layers"].values())  # one request names an object
    assert report["models"]["student"]["auto"] == saved["models"]["student"]["auto"]
    with Image.open(out / "layers.png") as im:
        assert im.size == (2 * attention.PLOT_W, attention.PLOT_H)


def test_visual_token_states_are_the_layers_hidden_states_at_the_image(models, tokenizer, requests_):
    """Each request alone and unpadded through an eager copy of the LM (output_hidden_states): layer l's
    rows at the visual positions; layer 0 is the projector's output (encode_images). Batched with padding."""
    _, student, proc = models
    got = attention.visual_token_states(student, tokenizer, proc, requests_, batch_size=2)
    assert got.shape == (student.language_model.config.num_hidden_layers + 1, len(requests_),
                         student.num_visual_tokens, student.d_llm)
    for i, r in enumerate(requests_):
        ids = torch.tensor([data.render_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}],
                                               student.num_visual_tokens, student.image_token_id)])
        pixels = proc(images=[ev.open_image(r["image"])], return_tensors="pt")["pixel_values"]
        lm = copy.deepcopy(student.language_model)
        lm.set_attn_implementation("eager")
        with torch.no_grad():
            embeds, vmask = student.embed(ids, pixels)
            hs = lm(inputs_embeds=embeds, output_hidden_states=True, return_dict=True).hidden_states
            feats = student.encode_images(pixels)[0]
        vis = vmask[0].nonzero()[:, 0]
        assert torch.allclose(got[0, i], feats, atol=1e-6)
        for l, h in enumerate(hs):
            assert torch.allclose(got[l, i], h[0, vis], atol=1e-5), l
