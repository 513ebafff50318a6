"""verdict.py (issue 40, docs/verdict.md): the t table against the t distribution integrated numerically, the
paired interval on hand-worked numbers, the fresh held-out set (drawn deterministically from its seed, no scene any
shipped model or student may have seen, the exclusion honoured, drawn once), the misalignment analysis against
eager attention maps, and the paired runner end to end (shared stage 1, one thread count, resumed, tabulated)."""
import json
import math
import os

import numpy as np
import pytest
import torch

import data
import demo
import evaluate as E
import model as M
import shapes
import verdict


# -----------------------------------------------------------------------------
# The interval


def t_cdf(q, df, n=4000):
    """P(T <= q) for Student's t with df degrees of freedom, q > 0: 0.5 + the density integrated from 0 to q by
    Simpson's rule (the density from math.lgamma), independent of the table."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    h = q / n
    s = f(0) + f(q) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
    return 0.5 + s * h / 3


def test_t_table_is_the_975_quantile():
    # the textbook values
    for df, t in ((1, 12.706), (2, 4.303), (5, 2.571), (6, 2.447), (9, 2.262), (10, 2.228), (30, 2.042)):
        assert verdict.T975[df] == pytest.approx(t, abs=5e-4), df
    # every entry: the t distribution's CDF there is 0.975 (4 decimals of the quantile: the CDF within 1e-5 x density)
    for df, t in verdict.T975.items():
        assert t_cdf(t, df) == pytest.approx(0.975, abs=2e-5), df


def test_bonferroni_table_is_the_99167_quantile():
    # probe P3's three variants, each at 1 - 0.05 / 3: docs/verdict.md gives t(0.99167, 5) = 3.534 by hand
    assert verdict.T99167[5] == pytest.approx(3.534, abs=5e-4)
    for df, t in verdict.T99167.items():
        assert t_cdf(t, df, n=20000) == pytest.approx(1 - 0.05 / 6, abs=2e-5), df
    iv = verdict.paired_interval({s: 10.0 + s for s in range(1, 7)}, {s: 10.0 for s in range(1, 7)}, verdict.T99167)
    assert iv["half"] == pytest.approx(3.5341 * 0.763763, abs=1e-5)  # se of d = 1..6 as below


def test_paired_interval_hand_worked():
    # three seeds of docs/design-log.md section 20's CR: CompoDistill 78.4 / 75.4 / 82.4, KD + TAF 73.8 / 77.0 / 83.1. By hand:
    # d = 4.6, -1.6, -0.7; mean 0.76667; squared deviations 14.69444 + 5.60111 + 2.15111 = 22.44667, / 2 = 11.22333,
    # sd 3.35012; se = sd / sqrt 3 = 1.93419; half = 4.3027 x 1.93419 = 8.32229; [-7.55562, 9.08896]
    iv = verdict.paired_interval({0: 78.4, 1: 75.4, 2: 82.4}, {0: 73.8, 1: 77.0, 2: 83.1})
    assert iv["diffs"] == pytest.approx([4.6, -1.6, -0.7])
    assert iv["mean"] == pytest.approx(0.76667, abs=1e-5) and iv["sd"] == pytest.approx(3.35012, abs=1e-5)
    assert iv["t"] == 4.3027 and iv["half"] == pytest.approx(8.32229, abs=1e-4)
    assert (iv["lo"], iv["hi"]) == (pytest.approx(-7.55562, abs=1e-4), pytest.approx(9.08896, abs=1e-4))
    assert verdict.reading(iv) == "not shown"
    # six seeds, d = 1..6: mean 3.5, sd sqrt(3.5) = 1.870829, se 0.763763, half 2.5706 x 0.763763 = 1.963330
    six = verdict.paired_interval({s: 10.0 + s for s in range(1, 7)}, {s: 10.0 for s in range(1, 7)})
    assert (six["lo"], six["hi"]) == (pytest.approx(1.536670, abs=1e-5), pytest.approx(5.463330, abs=1e-5))
    assert verdict.reading(six) == "above 0"
    assert verdict.reading(verdict.paired_interval({s: 0.0 for s in range(1, 7)}, {s: 10.0 + s for s in range(1, 7)})) \
        == "below 0"
    with pytest.raises(ValueError, match="unpaired"):
        verdict.paired_interval({0: 1.0, 1: 2.0}, {0: 1.0, 2: 2.0})
    with pytest.raises(ValueError, match="1 seeds"):
        verdict.paired_interval({0: 1.0}, {0: 2.0})


# -----------------------------------------------------------------------------
# The fresh held-out set


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("verdict_world"))
    q = verdict.quick_setup()
    return root, q, demo.demo_data(root, seed=0, sizes=q["world_sizes"], text_sizes=q["text_sizes"])


def _keys(scenes_json):
    with open(scenes_json) as f:
        return {p: shapes.scene_key(s) for p, s in json.load(f).items()}


def test_seen_scenes_hold_every_scene_the_models_were_trained_on(world):
    """The replay against the files the production paths write: the phase files demo.scene_token_data writes (what
    the LMs are trained on), the teacher's fresh images (demo.fresh_images), the image world's scenes.json."""
    root, q, paths = world
    seen, counts = verdict.seen_scenes(paths, q["text_recipes"], q["image_recipe"], q["teacher_recipe"])
    assert set(_keys(os.path.join(paths["dir"], "scenes.json")).values()) <= seen
    for recipe in q["text_recipes"].values():
        files = demo.scene_token_data(paths, recipe)
        for path in files["phases"] + [files["val"]]:
            trained = {shapes.scene_key(shapes.parse_scene_tokens(x["scene_text"])) for x in data.load_llava_json(path)}
            assert trained and trained <= seen, path
    fresh = demo.fresh_images(paths, q["teacher_recipe"]["fresh_scenes"], q["teacher_recipe"]["fresh_seed"])
    assert {shapes.scene_key(s) for _, s in fresh} <= seen
    assert counts["text world (student)"] > 0 and counts["vision encoder"] > 0 and counts["all"] == len(seen)


def test_fresh_benchmark_is_drawn_from_its_seed_and_shares_no_seen_scene(world, tmp_path):
    root, q, paths = world
    seen, _ = verdict.seen_scenes(paths, q["text_recipes"], q["image_recipe"], q["teacher_recipe"])
    a, b, c = (str(tmp_path / n) for n in ("a", "b", "c"))
    ma = verdict.draw_benchmark(a, 4040, 3, 6, lambda: seen)
    mb = verdict.draw_benchmark(b, 4040, 3, 6, lambda: seen)
    assert ma["sha256"] == mb["sha256"] and ma["scenes"] >= 7 * 3 + 2  # 6 questions, up to 3 an image
    for name in ("sugarcrepe/add_att.json", "vqav2/questions.json", "scenes.json", "sugarcrepe/images/000003000000.png"):
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read()
    assert verdict.draw_benchmark(c, 4041, 3, 6, lambda: seen)["sha256"] != ma["sha256"]
    fresh = _keys(os.path.join(a, "scenes.json"))
    assert not set(fresh.values()) & seen
    assert not set(fresh.values()) & set(_keys(os.path.join(paths["dir"], "scenes.json")).values())
    # evaluate.py reads it in the official layouts, the layer-probe requests name each object's patch
    assert sum(len(v) for v in E.read_sugarcrepe(os.path.join(a, "sugarcrepe")).values()) == 21
    assert len(E.read_vqav2(os.path.join(a, "vqav2"), shapes.VQAV2_IMAGE_PATTERN.replace("{image_id:012d}", "%012d"))) == 6
    probe = [json.loads(line) for line in open(os.path.join(a, "layer_probe.jsonl"))]
    assert probe and all(len(r["object_patches"]) == 1 for r in probe)
    # the exclusion is honoured: with the first scene drawn excluded, another scene takes its place
    first = fresh["sugarcrepe/images/000003000000.png"]
    d = str(tmp_path / "d")
    verdict.draw_benchmark(d, 4040, 3, 6, lambda: seen | {first})
    assert first not in set(_keys(os.path.join(d, "scenes.json")).values())
    # drawn once: reused without drawing (the exclusion is not even computed), refused when changed or re-sized
    assert verdict.draw_benchmark(a, 4040, 3, 6, lambda: 1 / 0) == ma
    with pytest.raises(SystemExit, match="another recipe"):
        verdict.draw_benchmark(a, 4040, 4, 6, lambda: seen)
    with open(os.path.join(a, "sugarcrepe", "add_att.json"), "a") as f:
        f.write(" ")
    with pytest.raises(SystemExit, match="changed"):
        verdict.draw_benchmark(a, 4040, 3, 6, lambda: seen)


# -----------------------------------------------------------------------------
# The misalignment analysis


def test_misalignment_against_eager_maps(world, tokenizer_dir, tmp_path):
    """Whole-map and answer-row cosines of every item and the answer row's share on the named object per layer,
    recomputed from HF eager attention (test_attention's eager_maps); the right / wrong split from the items."""
    from test_attention import eager_maps, sharpen
    root, q, paths = world
    bench = str(tmp_path / "bench")
    verdict.draw_benchmark(bench, 4040, 1, 3, lambda: set())
    tok = data.load_tokenizer(tokenizer_dir)
    teacher, student = sharpen(M.from_preset("teacher", tok, seed=0)), sharpen(M.from_preset("student", tok, seed=1))
    student.vision_tower.load_state_dict(teacher.vision_tower.state_dict())
    t_dir, s_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
    M.save_pretrained(teacher, t_dir, tok)
    M.save_pretrained(student, s_dir, tok)
    res = verdict.misalignment(t_dir, s_dir, bench, batch_size=4)
    proc = M.make_image_processor(student.vision_tower.config)
    assert res["n_items"] == 7 == res["n_right"] + res["n_wrong"] == len(res["items"])
    assert res["student_layers"] == [1, 2] and res["windows"] == [[2], [3]]
    items = E.read_sugarcrepe(os.path.join(bench, "sugarcrepe"))
    for it, r in zip([x for sub in items.values() for x in sub][:4], res["items"][:4]):
        request = E.choice_request(it["image"], it["pos"], it["neg"])
        t_maps, _ = eager_maps(teacher, tok, proc, request)
        s_maps, _ = eager_maps(student, tok, proc, request)
        for j, (sl, tl) in enumerate(zip([1, 2], [2, 3])):
            s, t = s_maps[sl], t_maps[tl]
            assert r["cos"][j] == pytest.approx(float((s * t).sum() / (s.norm() * t.norm())), abs=1e-5)
            assert r["answer_cos"][j] == pytest.approx(float(s[-1] @ t[-1] / (s[-1].norm() * t[-1].norm())), abs=1e-5)
    cos = np.array([r["cos"] for r in res["items"]])
    ans = np.array([r["answer_cos"] for r in res["items"]])
    right = np.array([r["right"] for r in res["items"]])
    assert res["attn_dist"] == pytest.approx(1 - cos.mean(0).mean(), abs=1e-9)
    assert res["answer_dist"] == pytest.approx(1 - ans.mean(0).mean(), abs=1e-9)
    assert abs(res["attn_dist"] - res["answer_dist"]) > 1e-3
    for g, keep in (("right", right), ("wrong", ~right)):
        want = 1 - cos[keep].mean(0).mean() if keep.any() else None
        assert (res["attn_dist_" + g] == pytest.approx(want, abs=1e-9)) if want is not None else \
            math.isnan(res["attn_dist_" + g])
    # the answer row's share on the named object: the last row's mass on the object's patch / its visual mass
    probe = [json.loads(line) for line in open(os.path.join(bench, "layer_probe.jsonl"))]
    ref = np.zeros((len(probe), 4))
    for i, r in enumerate(probe):
        maps, _ = eager_maps(student, tok, proc, {"image": os.path.join(bench, r["image"]), "prompt": r["prompt"]})
        for l, m in enumerate(maps):
            ref[i, l] = float(m[-1][r["object_patches"][0]] / m[-1].sum())
    np.testing.assert_allclose(res["object_share_per_layer"], ref.mean(0), atol=1e-5)
    assert res["object_share"] == pytest.approx(ref.mean(0)[[1, 2]].mean(), abs=1e-5)
    assert res["object_share_chance"] == pytest.approx(1 / 16)


# -----------------------------------------------------------------------------
# The paired runner, end to end on tiny models


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_paired_runner_shares_stage1_resumes_and_tabulates(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs below say --threads 1; the suite may run at any count
    root = str(tmp_path / "verdict")
    q = verdict.quick_setup()
    paths = demo.demo_data(root, seed=0, sizes=q["world_sizes"], text_sizes=q["text_sizes"])
    tok = data.load_tokenizer(paths["tokenizer"])
    teacher, student_lm = str(tmp_path / "teacher"), str(tmp_path / "student_lm")
    M.save_pretrained(M.from_preset("teacher", tok, seed=0), teacher, tok)
    M.save_pretrained(M.from_preset("student", tok, seed=0), student_lm, tok)
    verdict.main(["draw", "--quick", "--out", root, "--teacher", teacher, "--student-lm", student_lm])
    assert "CR" not in capsys.readouterr().out  # no held-out figure printed
    verdict.main(["train", "--out", root, "--seeds", "3,4"])
    printed = capsys.readouterr().out
    assert "validation CR" in printed and "held-out CR" not in printed
    for seed in (3, 4):
        sd = os.path.join(root, f"seed{seed}")
        # one stage 1 per group, none inside a row's directory
        assert sorted(n for n in os.listdir(sd) if n.startswith("stage1")) == ["stage1_own", "stage1_taf"]
        assert not any(os.path.exists(os.path.join(sd, r, "stage1")) for r in verdict.PRIMARY_ROWS)
        assert _json(os.path.join(sd, "stage1_taf", "trainer_summary.json"))["taf"] is True
        assert _json(os.path.join(sd, "stage1_own", "trainer_summary.json"))["taf"] is False
        s2 = {r: _json(os.path.join(sd, r, "stage2", "args.json")) for r in ("kd", "vat_no_taf", "taf_no_vat", "compodistill")}
        assert s2["kd"]["init"] == s2["vat_no_taf"]["init"] == os.path.join(sd, "stage1_own")
        assert s2["taf_no_vat"]["init"] == s2["compodistill"]["init"] == os.path.join(sd, "stage1_taf")
        # the pairs differ in L_ADL's weight only (the same seed, hence data order, data, steps, lr)
        for a, b in (("vat_no_taf", "kd"), ("compodistill", "taf_no_vat")):
            assert s2[a]["w_vat"] == demo.STUDENTS["w_vat"] and s2[b]["w_vat"] == 0.0
            assert {k: v for k, v in s2[a].items() if k not in ("w_vat", "out", "run_id")} == \
                {k: v for k, v in s2[b].items() if k not in ("w_vat", "out", "run_id")}
        assert s2["kd"]["seed"] == seed and _json(os.path.join(sd, "threads.json")) == {"threads": 1}
        res = _json(os.path.join(sd, "compodistill", "result.json"))
        assert res["threads"] == 1 and res["analysis"]["n_items"] == 21 and len(res["heldout"]["cr_subsets"]) == 7
    # the same command again: every stage and result reused
    weights = [os.path.join(root, "seed3", d, "model.safetensors") for d in ("stage1_taf", "kd/stage3", "sft/stage3")]
    stamps = [os.stat(p).st_mtime_ns for p in weights + [os.path.join(root, "seed3", "kd", "result.json")]]
    verdict.main(["train", "--out", root, "--seeds", "3"])
    assert [os.stat(p).st_mtime_ns for p in weights + [os.path.join(root, "seed3", "kd", "result.json")]] == stamps
    with pytest.raises(SystemExit, match="thread"):
        verdict.main(["train", "--out", root, "--seeds", "3", "--threads", "2"])
    # the table: only reads; each claim's differences are the per-seed differences of the result files
    table = verdict.main(["table", "--out", root])
    r = {(row, s): _json(os.path.join(root, f"seed{s}", row, "result.json")) for row in verdict.PRIMARY_ROWS for s in (3, 4)}
    iv = table["claims"]["VAT given TAF: CompoDistill - (KD + TAF)"]["intervals"]["cr"]
    assert iv["diffs"] == pytest.approx([r["compodistill", s]["heldout"]["cr"] - r["taf_no_vat", s]["heldout"]["cr"]
                                         for s in (3, 4)])
    assert table["threads"] == 1 and table["seeds"] == [3, 4] and "1 thread(s)" in table["markdown"]
    assert os.path.exists(os.path.join(root, "verdict.md"))
    with pytest.raises(SystemExit, match="missing"):
        verdict.main(["table", "--out", root, "--seeds", "3,4,5"])
    # probe P3: the three variants share the seed's TAF stage 1 and differ from CompoDistill in one stage-2 flag
    part1 = open(os.path.join(root, "verdict.md")).read()
    verdict.main(["train", "--out", root, "--seeds", "3,4", "--rows", ",".join(verdict.P3_ROWS)])
    flags = {"p3a_teacher_layer1": {"vat_teacher_layers": "1-3"}, "p3b_headwise": {"vat_headwise": True},
             "p3c_text_rows": {"vat_text_rows": True}}
    for seed in (3, 4):
        sd = os.path.join(root, f"seed{seed}")
        assert sorted(n for n in os.listdir(sd) if n.startswith("stage1")) == ["stage1_own", "stage1_taf"]
        cd = _json(os.path.join(sd, "compodistill", "stage2", "args.json"))
        for row, flag in flags.items():
            s2 = _json(os.path.join(sd, row, "stage2", "args.json"))
            assert s2["init"] == os.path.join(sd, "stage1_taf")
            assert {k: v for k, v in s2.items() if k not in ("out", "run_id") and cd.get(k) != v} == flag
            s3 = _json(os.path.join(sd, row, "stage3", "args.json"))
            assert not any(s3[k] for k in ("vat_headwise", "vat_text_rows")) and s3["vat_teacher_layers"] is None
    p3 = verdict.main(["table", "--out", root, "--tag", "p3", "--rows", "taf_no_vat,compodistill," + ",".join(verdict.P3_ROWS)])
    assert open(os.path.join(root, "verdict.md")).read() == part1  # part 1's table is not overwritten
    assert os.path.exists(os.path.join(root, "verdict_p3.md"))
    iv = p3["claims"]["P3b - (KD + TAF) (98.33%)"]["intervals"]["cr"]
    assert iv["t"] == verdict.T99167[1] and p3["claims"]["P3b - (KD + TAF) (98.33%)"]["level"] == pytest.approx(1 - 0.05 / 3)
    r3 = {s: _json(os.path.join(root, f"seed{s}", "p3b_headwise", "result.json"))["heldout"]["cr"] for s in (3, 4)}
    assert iv["diffs"] == pytest.approx([r3[s] - r["taf_no_vat", s]["heldout"]["cr"] for s in (3, 4)])
    # probe P1: the gate lengthens the own adapter's stage 1 in its order, reusing part 1's at the shipped length
    monkeypatch.setattr(verdict, "SEEDS", (3, 4))
    monkeypatch.setattr(verdict, "P1_LENGTHS", (2, 4))  # the quick budget's s1_steps is 2
    monkeypatch.setattr(verdict, "P1_GATE", 101.0)       # unreachable: both lengths run, the last is chosen
    qtype = next(iter(r["kd", 3]["validation"]["vqa_by_question_type"]))  # the tiny validation set's 2 questions
    monkeypatch.setattr(verdict, "P1_QUESTION_TYPE", qtype)
    with pytest.raises(SystemExit, match="gate is not decided"):
        verdict.main(["train", "--out", root, "--seeds", "3", "--rows", "p1_kd"])
    own = os.path.join(root, "seed3", "stage1_own", "model.safetensors")
    stamp = os.stat(own).st_mtime_ns
    st = verdict.main(["gate", "--out", root, "--seeds", "3"])
    assert st["next"] == 2 and st["chosen"] is None and "waiting" in capsys.readouterr().out
    assert os.stat(own).st_mtime_ns == stamp  # the shipped length's stage 1 is part 1's, reused
    g3 = _json(os.path.join(root, "seed3", "stage1_own", "gate.json"))
    assert g3["colour"] == g3["validation"]["vqa_by_question_type"][qtype]
    st = verdict.main(["gate", "--out", root, "--seeds", "4"])
    assert st["lengths"][2]["mean"] == pytest.approx((g3["colour"] + _json(os.path.join(
        root, "seed4", "stage1_own", "gate.json"))["colour"]) / 2) and st["next"] == 4
    assert "below the gate (101); next 4 steps" in capsys.readouterr().out
    for seed in (3, 4):  # the next length in turn
        verdict.main(["gate", "--out", root, "--seeds", str(seed)])
    st = _json(os.path.join(root, "p1_gate.json"))
    assert st["chosen"] == 4 and st["reached"] is False and "gate not reached" in capsys.readouterr().out
    for seed in (3, 4):
        a = _json(os.path.join(root, f"seed{seed}", "stage1_own_s4", "args.json"))
        assert a["max_steps"] == 4 and a["taf"] is False and a["seed"] == seed
        assert {k: v for k, v in a.items() if k not in ("out", "run_id", "max_steps")} == {
            k: v for k, v in _json(os.path.join(root, f"seed{seed}", "stage1_own", "args.json")).items()
            if k not in ("out", "run_id", "max_steps")}
    verdict.main(["train", "--out", root, "--seeds", "3,4", "--rows", ",".join(verdict.P1_ROWS)])
    for seed in (3, 4):
        sd = os.path.join(root, f"seed{seed}")
        kd, vat = (_json(os.path.join(sd, r, "stage2", "args.json")) for r in verdict.P1_ROWS)
        assert kd["init"] == vat["init"] == os.path.join(sd, "stage1_own_s4")
        assert kd["w_vat"] == 0.0 and vat["w_vat"] == demo.STUDENTS["w_vat"]
    p1 = verdict.main(["table", "--out", root, "--tag", "p1", "--rows", ",".join(verdict.P1_ROWS)])
    iv = p1["claims"]["P1, VAT alone after the gated stage 1: (KD + VAT) - KD"]["intervals"]["cr"]
    r1 = {(row, s): _json(os.path.join(root, f"seed{s}", row, "result.json"))["heldout"]["cr"]
          for row in verdict.P1_ROWS for s in (3, 4)}
    assert iv["t"] == verdict.T975[1] and iv["diffs"] == pytest.approx(
        [r1["p1_vat_no_taf", s] - r1["p1_kd", s] for s in (3, 4)])
