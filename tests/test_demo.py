"""The main job end to end (shortened): data, teacher, student LM, three students, evaluation, table."""
import json
import os
import re

import pytest
import torch
from PIL import Image

import demo


def _json(path):
    with open(path) as f:
        return json.load(f)


def _width(path):
    with Image.open(path) as im:
        return im.size[0]


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "demo")
    demo.main(["--quick", "--train-teacher", "--out", out])
    printed = capsys.readouterr().out.strip().splitlines()
    last = printed[-1]
    assert re.fullmatch(r"RESULT sft_cr=[\d.]+ kd_cr=[\d.]+ compodistill_cr=[\d.]+ teacher_cr=[\d.]+ "
                        r"kd_cr_match=[\d.]+ compodistill_cr_match=[\d.]+ sft_vqa=[\d.]+ kd_vqa=[\d.]+ compodistill_vqa=[\d.]+ kd_attn_dist=[\d.]+ "
                        r"compodistill_attn_dist=[\d.]+", last), last
    assert any(line.startswith("| model | ") for line in printed)
    res = _json(os.path.join(out, "results.json"))
    assert set(res["summary"]) == {"sft", "kd", "compodistill", "teacher"}
    for name in ("sft", "kd", "compodistill"):
        r = res["results"][name][0]
        assert 0 <= r["cr"] <= 100 and 0 <= r["vqa"] <= 100 and 0 <= r["attn_dist"] <= 2
        assert len(r["cr_subsets"]) == 7 and len(r["cr_match_subsets"]) == 7 and 0 <= r["cr_match"] <= 100
    # the RESULT line reports the same numbers as results.json
    vals = dict(kv.split("=") for kv in last.split()[1:])
    assert abs(float(vals["kd_cr"]) - res["summary"]["kd"]["cr"][0]) < 0.06
    assert abs(float(vals["compodistill_cr_match"]) - res["summary"]["compodistill"]["cr_match"][0]) < 0.06
    assert _width(os.path.join(out, "results.png")) > 100
    maps = os.listdir(os.path.join(out, "heatmaps"))
    assert maps and all(_width(os.path.join(out, "heatmaps", m)) > 100 for m in maps)
    # the three students saw the same data (the teacher's own image questions) and steps, from one init: the
    # student text LM with the teacher's vision encoder
    for stage in ("stage1", "stage2", "stage3"):
        assert os.path.exists(os.path.join(out, "compodistill_seed0", stage, "model.safetensors"))
    qa = os.path.join(out, "data", "image_questions.json")
    args = {d: _json(os.path.join(out, d, "args.json")) for d in
            ("sft_seed0/stage2", "sft_seed0/stage3", "kd_seed0/stage2", "compodistill_seed0/stage1",
             "compodistill_seed0/stage3")}
    assert all(a["data"] == qa for a in args.values())
    # ... and the same lr schedule: sft's fine-tuning is split where the others' stages 2 and 3 meet
    stage3 = [_json(os.path.join(out, n, "stage3", "args.json")) for n in ("sft_seed0", "kd_seed0", "compodistill_seed0")]
    assert {(a["lr"], a["min_lr"], a["max_steps"]) for a in stage3} == {(demo.STUDENTS["s3_lr"],) * 2 + (2,)}
    assert args["sft_seed0/stage2"]["lr"] == args["kd_seed0/stage2"]["lr"] == demo.STUDENTS["lr"]
    assert _json(os.path.join(out, "teacher_image", "adapter", "args.json"))["data"] == qa
    # the teacher's relation phases (teacher_relations): rows / columns and relations on the training images from
    # the image model, then the caption-heavy questions about freshly drawn scenes, each image drawn beside them
    rel, last_phase = (_json(os.path.join(out, d, "args.json")) for d in ("teacher/relations", "teacher"))
    assert rel["init"] == os.path.join(out, "teacher_image") and last_phase["init"] == os.path.join(out, "teacher", "relations")
    assert rel["data"].endswith("teacher_relation_questions.json") and last_phase["data"].endswith("teacher_fresh_questions.json")
    assert {x["task"] for x in _json(rel["data"])} <= {"where", "relation"}
    fresh = _json(last_phase["data"])
    assert fresh and all(x["image"].startswith("fresh/") and os.path.exists(os.path.join(out, "data", x["image"]))
                         for x in fresh)
    import model as M
    # one vision encoder: pre-trained once, left untouched by the teacher's phases, copied into every student
    vision = {d: M.load_pretrained(os.path.join(out, d))[0].vision_tower.state_dict()
              for d in ("vision_encoder", "teacher_image", "teacher", "student_init")}
    assert all(torch.equal(v, vision[d][k]) for d in ("teacher_image", "teacher", "student_init")
               for k, v in vision["vision_encoder"].items())
    assert M.load_pretrained(os.path.join(out, "student_init"))[0].language_model.config.hidden_size < \
        M.load_pretrained(os.path.join(out, "teacher"))[0].language_model.config.hidden_size
    # the learning curve: validation CR logged during stages 2 and 3 (2 + 2 steps, eval every step)
    curves = _json(os.path.join(out, "learning_curves.json"))
    assert [x for x, _ in curves["compodistill"]] == [1, 2, 3, 4]
    assert [x for x, _ in curves["sft"]] == [1, 2, 3, 4]
    assert all(0 <= y <= 100 for c in curves.values() for _, y in c)
    assert _width(os.path.join(out, "learning_curve.png")) > 100
    # the probes: per model, a probe accuracy per layer and attribute, an object-attention share per layer
    probes = _json(os.path.join(out, "probes.json"))
    assert set(probes) == {"teacher", "student_lm", "kd_stage2", "compodistill_stage2"}
    assert all(len(p["probe"]["colour"]) == len(p["object"]) + 1 for p in probes.values())
    assert any(line.startswith("| model | shape probe") for line in printed)

    # run again on the same --out: every finished stage and evaluation is reused (nothing retrains)
    weights = [os.path.join(out, d, "model.safetensors") for d in
               ("teacher", "student_tokens_lm", "teacher_tokens_lm", "vision_encoder", "student_init", "sft_seed0/stage3",
                "kd_seed0/stage2", "compodistill_seed0/stage3")]
    mtimes = [os.stat(p).st_mtime_ns for p in weights]
    demo.main(["--quick", "--train-teacher", "--out", out])
    assert capsys.readouterr().out.strip().splitlines()[-1] == last
    assert [os.stat(p).st_mtime_ns for p in weights] == mtimes
    # an evaluation made against another teacher is redone (the attention distance is to the teacher)
    cached = os.path.join(out, "sft_seed0", "result.json")
    stale = {**_json(cached), "teacher": "/another/teacher", "attn_dist": -1.0}
    with open(cached, "w") as f:
        json.dump(stale, f)
    # ... and so is one of another model (a run directory laid out before, e.g. sft's single fine-tuning run)
    cached_kd = os.path.join(out, "kd_seed0", "result.json")
    stale_kd = {**_json(cached_kd), "dir": os.path.join(out, "kd_seed0"), "attn_dist": -1.0}
    with open(cached_kd, "w") as f:
        json.dump(stale_kd, f)
    demo.main(["--quick", "--train-teacher", "--out", out])
    assert capsys.readouterr().out.strip().splitlines()[-1] == last
    redone = _json(cached)
    assert redone["teacher"] == os.path.abspath(os.path.join(out, "teacher")) and redone["attn_dist"] >= 0
    assert _json(cached_kd)["dir"] == os.path.join(out, "kd_seed0", "stage3") and _json(cached_kd)["attn_dist"] >= 0
    # a stage finished before an option was added to train.py (its args.json lacks the key) is still
    # this stage when the option is at its default
    kd = os.path.join(out, "kd_seed0", "stage2")
    saved = _json(os.path.join(kd, "args.json"))
    del saved["group_by_length"]
    with open(os.path.join(kd, "args.json"), "w") as f:
        json.dump(saved, f)
    demo.main(["--quick", "--train-teacher", "--out", out])
    assert capsys.readouterr().out.strip().splitlines()[-1] == last
    assert [os.stat(p).st_mtime_ns for p in weights] == mtimes
    # students of one teacher are never reused for another, even one at the same path (a newer assets/)
    with pytest.raises(SystemExit, match="another teacher"):
        demo.main(["--quick", "--teacher", os.path.join(out, "teacher_image"), "--student-lm",
                   os.path.join(out, "student_tokens_lm"), "--out", out])
    # ... and a finished stage made with other arguments is never silently taken for this one
    sft = _json(os.path.join(out, "sft_seed0", "stage3", "args.json"))
    with pytest.raises(SystemExit, match="other arguments"):
        demo._demo_stage(["--stage", "llava", "--init", sft["init"], "--data", sft["data"], "--image-folder",
                           sft["image_folder"], "--max-steps", str(sft["max_steps"] + 1), "--out", sft["out"]])


def test_shipped_models_match_a_freshly_synthesised_world(tmp_path):
    """`python demo.py` synthesises the default world and then loads assets/demo_teacher and
    assets/demo_student_lm: a change to the generator that changes the scene tokenizer (BPE merges follow the
    samples) must remake them (demo.py --train-teacher). Both read every scene token as one token, and the
    students' encoder is the teacher's."""
    import data
    import shapes
    paths = demo.demo_data(str(tmp_path))
    fresh = data.load_tokenizer(demo.scene_tokenizer(paths))
    for shipped in (demo.DEMO_TEACHER, demo.DEMO_STUDENT_LM):
        tok = data.load_tokenizer(shipped)
        data.check_tokenizers_agree(fresh, tok)
        assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in shapes.SCENE_TOKENS)


def test_vision_encoder_pretraining_reads_each_patch_and_never_sees_a_benchmark_scene(tmp_path):
    """The read-out is trained per patch against shapes.patch_labels: if patches and labels were misaligned
    (another raster order, a CLS offset) colour and size could not beat chance (1/6, 1/2)."""
    import torch
    import data
    import shapes
    import model as M
    torch.manual_seed(0)
    world = tmp_path / "w"
    shapes.synthesize(str(world), seed=0, n_pretrain=8, n_instruct=8, n_images=8, n_sugarcrepe=3, n_vqa=3,
                    n_val_sugarcrepe=2, n_val_vqa=2, tokenizer=False, progress=False)
    tok = data.load_tokenizer(demo.DEMO_TEACHER)
    m = M.from_preset("teacher", tok)
    before = {k: v.clone() for k, v in m.vision_tower.state_dict().items()}
    with open(world / "scenes.json") as f:
        bench = [s for k, s in json.load(f).items() if "sugarcrepe" in k or "vqav2" in k]
    drawn = []
    real_random_scene = shapes.random_scene

    def benchmark_scenes_first(rng):  # offer every benchmark scene first: each must be refused
        s = bench[len(drawn)] if len(drawn) < len(bench) else real_random_scene(rng)
        drawn.append(s)
        return s
    shapes.random_scene = benchmark_scenes_first
    try:
        acc = demo.pretrain_vision_encoder(m.vision_tower, M.make_image_processor(m.vision_tower.config),
                                            str(world / "scenes.json"), steps=200, n_scenes=2500, cells=True)
    finally:
        shapes.random_scene = real_random_scene
    assert len(bench) >= 10 and len(drawn) == len(bench) + 2500
    assert acc["colour"] > 90 and acc["size"] > 90, acc
    assert set(acc) == {"shape", "colour", "size", "cell"} and acc["cell"] > 90, acc  # cells=True: where it is
    assert any(not torch.equal(before[k], v) for k, v in m.vision_tower.state_dict().items())
    assert not any(p.requires_grad for p in m.vision_tower.parameters())


def test_linear_probe_reads_a_linear_code_and_not_noise():
    """Separable classes (each a direction plus noise) are read back; labels independent of the features
    stay near chance (1/4) on held-out rows."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.randint(0, 4, (800,), generator=g)
    x = centers[y] + torch.randn(800, 16, generator=g)
    assert demo.linear_probe(x[:600], y[:600], x[600:], y[600:], 4) > 95
    noise = torch.randint(0, 4, (800,), generator=g)
    assert demo.linear_probe(x[:600], noise[:600], x[600:], noise[600:], 4) < 40
