"""The main job end to end (shortened): data, teacher, student LM, three students, evaluation, table."""
import json
import os
import re

import pytest
import torch
from PIL import Image

import demo
import train


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
    # the three students saw the same data and steps
    for stage in ("stage1", "stage2", "stage3"):
        assert os.path.exists(os.path.join(out, "compodistill_seed0", stage, "model.safetensors"))
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
               ("teacher", "student_lm", "sft_seed0", "kd_seed0/stage2", "compodistill_seed0/stage3")]
    mtimes = [os.stat(p).st_mtime_ns for p in weights]
    demo.main(["--quick", "--train-teacher", "--out", out])
    assert capsys.readouterr().out.strip().splitlines()[-1] == last
    assert [os.stat(p).st_mtime_ns for p in weights] == mtimes
    # an evaluation made against another teacher is redone (the attention distance is to the teacher)
    cached = os.path.join(out, "sft_seed0", "result.json")
    stale = {**_json(cached), "teacher": "/another/teacher", "attn_dist": -1.0}
    with open(cached, "w") as f:
        json.dump(stale, f)
    demo.main(["--quick", "--train-teacher", "--out", out])
    assert capsys.readouterr().out.strip().splitlines()[-1] == last
    redone = _json(cached)
    assert redone["teacher"] == os.path.abspath(os.path.join(out, "teacher")) and redone["attn_dist"] >= 0
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
    # ... and a finished stage made with other arguments is never silently taken for this one
    sft = _json(os.path.join(out, "sft_seed0", "args.json"))
    with pytest.raises(SystemExit, match="other arguments"):
        demo._demo_stage(["--stage", "llava", "--init", sft["init"], "--data", sft["data"], "--image-folder",
                           sft["image_folder"], "--max-steps", str(sft["max_steps"] + 1), "--out", sft["out"]])


def test_shipped_teacher_matches_a_freshly_synthesised_world(tmp_path):
    """`python demo.py` synthesises the default world and then loads assets/demo_teacher: a change
    to the generator that changes the tokenizer (BPE merges follow the samples) must retrain the teacher."""
    import data
    paths = demo.demo_data(str(tmp_path))
    train.check_tokenizers_agree(data.load_tokenizer(paths["tokenizer"]), data.load_tokenizer(demo.DEMO_TEACHER))


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


def _training_world(tmp_path, seed, n_images):
    """A small synthesised world without a tokenizer -> (scenes.json path, scenes, training image names)."""
    import data
    import shapes
    world = tmp_path / "w"
    shapes.synthesize(str(world), seed=seed, n_pretrain=n_images, n_instruct=8, n_images=n_images, n_sugarcrepe=2,
                    n_vqa=2, n_val_sugarcrepe=2, n_val_vqa=2, tokenizer=False, progress=False)
    images = {x["image"] for x in data.load_llava_json(str(world / "pretrain.json"))}
    return str(world / "scenes.json"), _json(world / "scenes.json"), images


def test_lookup_questions_are_true_of_their_image(tmp_path):
    scenes_json, scenes, images = _training_world(tmp_path, seed=1, n_images=30)
    samples = demo.lookup_questions(scenes_json, images)
    assert {x["image"] for x in samples} == images
    n = 0
    for x in samples:
        objs = scenes[x["image"]]["objects"]
        conv = x["conversations"]
        assert conv[0]["value"].startswith("<image>\n") and sum("<image>" in c["value"] for c in conv) == 1
        for q, a in zip(conv[::2], conv[1::2]):
            words = q["value"].split("\n")[-2].rstrip("?").split()  # "What color is the circle"
            if words[1] == "shape":  # "What shape is the red object": exactly one red object, of that shape
                assert [o["shape"] for o in objs if o["color"] == words[4]] == [a["value"]]
            else:  # "What color/size is the circle": the one circle's colour/size
                assert words[1] in ("color", "size"), q["value"]
                assert [o[words[1]] for o in objs if o["shape"] == words[4]] == [a["value"]]
            n += 1
    assert n >= 30 * 4  # at least colour + size of two objects per image


def test_compositional_questions_point_to_the_true_caption(tmp_path):
    """Parse each 2-choice prompt back into its two captions: the letter answered must name the caption that
    is true of the image, the other must be false (a hard negative), and both orders must occur."""
    import shapes
    scenes_json, scenes, images = _training_world(tmp_path, seed=2, n_images=40)
    samples = demo.compositional_questions(scenes_json, images)
    assert {x["image"] for x in samples} == images
    assert {x["subset"] for x in samples} == set(shapes.SUGARCREPE_SUBSETS)
    letters = []
    for x in samples:
        q, a = x["conversations"][0]["value"], x["conversations"][1]["value"]
        assert q.startswith("<image>\n")
        a_text = q.split("(A) ")[1].split("\n")[0]
        b_text = q.split("(B) ")[1].split("\n")[0]
        true_of = {t: shapes.caption_is_true(scenes[x["image"]], shapes.parse_caption(t)) for t in (a_text, b_text)}
        assert a_text != b_text
        assert true_of == {a_text: a == "A", b_text: a == "B"}, (x["subset"], q, a)
        letters.append(a)
    assert 0.3 < letters.count("A") / len(letters) < 0.7


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
