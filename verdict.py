"""The miniature's verdict, paired and powered (issue 40). The rules it applies (rows, seeds, thread count, the
fresh held-out benchmark and its seed, what counts as a positive or a negative result, what may be chosen on
validation) are docs/verdict.md, written in the repository before any run that applies them.

  python verdict.py draw --out runs/verdict       # once: the world, the students' init, the fresh held-out set
  OMP_NUM_THREADS=1 python verdict.py train --out runs/verdict --seeds 20,21,22 &
  OMP_NUM_THREADS=1 python verdict.py train --out runs/verdict --seeds 23,24,25    # two processes split the seeds
  python verdict.py table --out runs/verdict      # reads results only: each row's mean, each claim's interval
  python verdict.py analyse --out runs/verdict --model DIR   # the misalignment analysis of any student
  OMP_NUM_THREADS=1 python verdict.py gate --out runs/verdict --seeds 20,21,22   # probe P1's gate (and 23,24,25)

Every student is demo.demo_student with demo.STUDENTS, unchanged. Rows that differ in one thing share the rest:
per seed one stage 1 with TAF (KD + TAF and CompoDistill: OUT/seed{S}/stage1_taf) and one with the student's own
adapter (KD and KD + VAT without TAF: OUT/seed{S}/stage1_own), the same data and data order (the seed), one
thread count (OUT/seed{S}/threads.json). Each student is then evaluated on validation and on the fresh held-out
set (CR under both protocols, VQA) and its misalignment analysis (`misalignment`) is run on the held-out set;
each result is one JSON file beside the student (OUT/seed{S}/{row}/result.json), so `train` resumes where it
stopped and `table` only reads. `train` prints validation figures only; held-out figures are printed by `table`.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import time

import attention
import data
import demo
import evaluate as E
import model as M
import shapes

# -----------------------------------------------------------------------------
# The pre-registered design (docs/verdict.md)

BENCHMARK_SEED = 4040            # the fresh held-out set's seed: its scenes come from random.Random("4040-verdict-test")
BENCHMARK = dict(n_sugarcrepe=200, n_vqa=600)   # twice the old held-out set's 100 a subset / 300 questions
ANALYSIS_LIMIT = 100             # the misalignment analysis: the first 100 held-out items of each subset
SEEDS = (20, 21, 22, 23, 24, 25)  # the students' train.py seeds; no student was trained at these before
THREADS = 1
IMAGE_ID_BASE = 3 * 10 ** 6      # the old held-out set's image ids start at 10**6, validation's at 2 * 10**6
# row: (demo.demo_student kind, train.py arguments added to every stage, changes to demo.STUDENTS)
ROWS = {
    "sft": ("sft", (), {}),
    "kd": ("kd", ("--no-taf",), {}),
    "taf_no_vat": ("kd", (), {}),                        # KD + TAF
    "vat_no_taf": ("compodistill", ("--no-taf",), {}),   # KD + VAT without TAF
    "compodistill": ("compodistill", (), {}),
    "compodistill_w1": ("compodistill", (), {"w_vat": 1.0}),  # secondary: the paper's L_ADL weight (rule 3)
    # part 2, probe P3 (docs/verdict.md): CompoDistill with VAT aligning what matters, stage 2 only
    "p3a_teacher_layer1": ("compodistill", (), {"s2_extra": ("--vat-teacher-layers", "1-3")}),
    "p3b_headwise": ("compodistill", (), {"s2_extra": ("--vat-headwise",)}),
    "p3c_text_rows": ("compodistill", (), {"s2_extra": ("--vat-text-rows",)}),
    # part 2, probe P1: KD and KD + VAT without TAF from the own adapter's stage 1 at the gate's length (p1_length)
    "p1_kd": ("kd", ("--no-taf",), {}),
    "p1_vat_no_taf": ("compodistill", ("--no-taf",), {}),
}
PRIMARY_ROWS = ("sft", "kd", "taf_no_vat", "vat_no_taf", "compodistill")
LABELS = {"sft": "SFT", "kd": "KD", "taf_no_vat": "KD + TAF", "vat_no_taf": "KD + VAT (no TAF)",
          "compodistill": "CompoDistill (VAT + TAF)", "compodistill_w1": "CompoDistill, L_ADL weight 1",
          "p3a_teacher_layer1": "P3a: teacher layers 1-3", "p3b_headwise": "P3b: head-wise VAT",
          "p3c_text_rows": "P3c: text rows only", "p1_kd": "P1: KD, gated stage 1",
          "p1_vat_no_taf": "P1: KD + VAT (no TAF), gated stage 1", "teacher": "teacher"}
P3_ROWS = ("p3a_teacher_layer1", "p3b_headwise", "p3c_text_rows")
P1_ROWS = ("p1_kd", "p1_vat_no_taf")
# probe P1's gate (docs/verdict.md part 2): the own adapter's stage 1 at these lengths, in this order, until the
# mean over SEEDS of its validation accuracy on the colour questions (this VQA question type) is at least P1_GATE
P1_LENGTHS = (600, 1200, 2400, 4800)
P1_GATE = 90.0
P1_QUESTION_TYPE = "what color is the"
# (a, b, claim): the paired difference a - b over seeds, at 95%; P3's variants at the Bonferroni level for three
CLAIMS = (("compodistill", "kd", "CompoDistill - KD"),
          ("compodistill", "taf_no_vat", "VAT given TAF: CompoDistill - (KD + TAF)"),
          ("vat_no_taf", "kd", "VAT alone: (KD + VAT) - KD"),
          ("taf_no_vat", "kd", "TAF alone: (KD + TAF) - KD"),
          ("compodistill_w1", "compodistill", "L_ADL weight 1 - weight 10 (secondary)"),
          ("p1_vat_no_taf", "p1_kd", "P1, VAT alone after the gated stage 1: (KD + VAT) - KD"),
          *((p, b, f"{LABELS[p][:3]} - {n} (98.33%)") for p in P3_ROWS
            for b, n in (("taf_no_vat", "(KD + TAF)"), ("compodistill", "CompoDistill"))))
# metric: (where in result.json, label); CR is the primary metric of every claim
METRICS = {"cr": (("heldout", "cr"), "CR (2-choice)"), "cr_match": (("heldout", "cr_match"), "CR (match)"),
           "vqa": (("heldout", "vqa"), "VQA"), "attn_dist": (("analysis", "attn_dist"), "attn dist (whole map)"),
           "answer_dist": (("analysis", "answer_dist"), "attn dist (answer row)"),
           "object_share": (("analysis", "object_share"), "answer row on the named object"),
           "val_cr": (("validation", "cr"), "validation CR")}

# 95% two-sided: the 0.975 quantile of Student's t per degree of freedom (standard tables, 4 decimals)
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060, 9: 2.2622,
        10: 2.2281, 11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314, 16: 2.1199, 17: 2.1098,
        18: 2.1009, 19: 2.0930, 20: 2.0860, 21: 2.0796, 22: 2.0739, 23: 2.0687, 24: 2.0639, 25: 2.0595,
        26: 2.0555, 27: 2.0518, 28: 2.0484, 29: 2.0452, 30: 2.0423}
# P3's three variants, each at 1 - 0.05 / 3 (Bonferroni, docs/verdict.md part 2): the 0.99167 quantile
# (computed once with scipy.stats.t.ppf(1 - 0.05 / 6, df), 4 decimals; tests/test_verdict.py checks every entry)
T99167 = {1: 38.1885, 2: 7.6488, 3: 4.8567, 4: 3.9608, 5: 3.5341, 6: 3.2875, 7: 3.1276, 8: 3.0158, 9: 2.9333,
          10: 2.8701, 11: 2.8200, 12: 2.7795, 13: 2.7459, 14: 2.7178, 15: 2.6937, 16: 2.6730, 17: 2.6550,
          18: 2.6391, 19: 2.6251, 20: 2.6126, 21: 2.6013, 22: 2.5912, 23: 2.5820, 24: 2.5736, 25: 2.5660,
          26: 2.5589, 27: 2.5525, 28: 2.5465, 29: 2.5409, 30: 2.5357}


def paired_interval(a: dict, b: dict, table: dict = T975) -> dict:
    """The paired difference a - b over seeds ({seed: value} each, the same seeds) with its 95% t-interval:
    mean +- t_{0.975, n-1} * sd / sqrt(n), sd the sample standard deviation of the n per-seed differences
    (`table` T99167: the 98.33% interval of a Bonferroni correction for three).
    -> {"n", "seeds", "diffs", "mean", "sd", "t", "half", "lo", "hi"}."""
    if set(a) != set(b):
        raise ValueError(f"paired_interval: unpaired seeds {sorted(set(a) ^ set(b))}")
    seeds = sorted(a)
    n = len(seeds)
    if n - 1 not in table:
        raise ValueError(f"paired_interval: {n} seeds; the t table covers 2 to {max(table) + 1}")
    d = [a[s] - b[s] for s in seeds]
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    t = table[n - 1]
    half = t * sd / math.sqrt(n)
    return {"n": n, "seeds": seeds, "diffs": d, "mean": mean, "sd": sd, "t": t, "half": half,
            "lo": mean - half, "hi": mean + half}


def reading(iv: dict) -> str:
    """docs/verdict.md rule 5: 'above 0' when the whole 95% interval is above 0, 'below 0' when it is below,
    else 'not shown' (the interval holds 0; its ends say which effects the data rule out)."""
    if iv["lo"] > 0:
        return "above 0"
    if iv["hi"] < 0:
        return "below 0"
    return "not shown" if iv["lo"] == iv["lo"] else "n/a"


def stage1_group(row: str) -> str | None:
    """Which shared stage 1 a row starts from: "taf" (TAF's linear map), "own" (the student's own adapter),
    None for sft (its adapter phase has no teacher, L_LM only: its own)."""
    kind, extra, _ = ROWS[row]
    return None if kind == "sft" else ("own" if "--no-taf" in extra else "taf")


# -----------------------------------------------------------------------------
# The fresh held-out benchmark


def seen_scenes(paths: dict, text_recipes: dict, image_recipe: dict, teacher_recipe: dict) -> tuple[set, dict]:
    """Every scene (shapes.scene_key) that a shipped model or a verdict student may have seen: the image world's
    (training, validation and the old held-out set, scenes.json); the scene-token text world both LMs were
    pre-trained on (each recipe's validation scenes and its phases, replayed through shapes.text_question_stream
    exactly as demo.scene_token_data draws them); the vision encoder's pre-training scenes (demo.vision_scenes)
    and the teacher's last phase's fresh images (demo.fresh_scenes). -> (keys, {source: count})."""
    with open(os.path.join(paths["dir"], "scenes.json"), encoding="utf-8") as f:
        image_world = {shapes.scene_key(s) for s in json.load(f).values()}
    seen, counts, replayed = set(image_world), {"image world": len(image_world)}, set()
    for name, recipe in text_recipes.items():
        val = data.load_llava_json(demo.scene_token_val(paths, recipe["n_val"]))
        exclude = demo.scene_token_exclude(paths, val)
        text = exclude - image_world
        for tasks, steps, phase_seed in demo.scene_token_phases(recipe):
            spec = (tuple(tasks), steps, phase_seed, recipe["batch"], recipe["n_val"])
            if spec not in replayed:  # the student's and teacher's recipes share their first phases' files
                replayed.add(spec)
                stream = shapes.text_question_stream(phase_seed, tasks, exclude)
                text |= {shapes.scene_key(scene) for scene, _ in itertools.islice(stream, steps * recipe["batch"])}
        counts[f"text world ({name})"] = len(text)
        seen |= text
    # image_init pre-trains the encoder with pretrain_vision_encoder's default seed, 0
    vision = {shapes.scene_key(s) for s in demo.vision_scenes(os.path.join(paths["dir"], "scenes.json"),
                                                                image_recipe["vision_scenes"], seed=0)}
    fresh = {shapes.scene_key(s) for s in demo.fresh_scenes(paths, teacher_recipe["fresh_scenes"],
                                                               teacher_recipe["fresh_seed"])}
    counts.update({"vision encoder": len(vision), "teacher's fresh images": len(fresh)})
    seen |= vision | fresh
    counts["all"] = len(seen)
    return seen, counts


def _tree_sha256(root: str) -> str:
    """sha256 over every file under root (relative path and content), manifest.json left out."""
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(d, name)
            rel = os.path.relpath(path, root)
            if rel == "manifest.json":
                continue
            h.update(rel.encode() + b"\0")
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def draw_benchmark(out_dir: str, seed: int, n_sugarcrepe: int, n_vqa: int, exclude) -> dict:
    """The fresh held-out benchmark, drawn once: shapes.write_benchmarks (SugarCrepe layout, 7 subsets of
    n_sugarcrepe items, VQAv2 layout, n_vqa questions) from random.Random(f"{seed}-verdict-test"), no scene in
    exclude() (seen_scenes; called only when the set is drawn), the images drawn, scenes.json and the layer-probe
    requests (shapes.layer_probe: "What color is the <shape>?" with the object's patch) beside them;
    manifest.json, written last, holds the recipe and the sha256 of every file. A complete set is checked
    against its manifest and reused (drawn from the seed, the same files every time); one of another recipe, or
    whose files changed, is refused; an incomplete one (no manifest) is drawn again. -> the manifest."""
    wanted = {"seed": seed, "stream": f"{seed}-verdict-test", "n_sugarcrepe": n_sugarcrepe, "n_vqa": n_vqa,
              "image_id_base": IMAGE_ID_BASE}
    manifest = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest, encoding="utf-8") as f:
            m = json.load(f)
        if m["recipe"] != wanted:
            raise SystemExit(f"{out_dir} holds a held-out set of another recipe ({m['recipe']}); it is drawn once")
        if _tree_sha256(out_dir) != m["sha256"]:
            raise SystemExit(f"{out_dir}: the held-out files changed since they were drawn (sha256 differs from "
                             f"{manifest}); draw it into a new --out")
        return m
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)  # an interrupted draw (no manifest): drawn again from the seed
    excluded = exclude()
    taken, scenes = set(excluded), {}
    shapes.write_benchmarks(out_dir, "", random.Random(wanted["stream"]), taken, n_sugarcrepe, n_vqa, scenes,
                            IMAGE_ID_BASE)
    for path, scene in sorted(scenes.items()):
        os.makedirs(os.path.dirname(os.path.join(out_dir, path)), exist_ok=True)
        shapes.draw_scene(scene).save(os.path.join(out_dir, path), format="PNG")
    scenes_json = os.path.join(out_dir, "scenes.json")
    demo._demo_json(scenes, scenes_json)
    demo._demo_jsonl(shapes.layer_probe(scenes_json, ""), os.path.join(out_dir, "layer_probe.jsonl"))
    m = {"recipe": wanted, "scenes": len(scenes), "excluded_scenes": len(excluded), "sha256": _tree_sha256(out_dir)}
    demo._demo_json(m, manifest)
    return m


# -----------------------------------------------------------------------------
# The misalignment analysis (the paper's section on attention vs correctness, docs/method.md section 7)


def object_share(model_dir: str, bench_dir: str, layers=None) -> dict:
    """The answer row's share on the named object: attention.layer_profile's "object" (the share of the answer
    position's visual attention on the patch of the object the question names) on the held-out set's
    layer-probe requests ("What color is the <shape>?"), per layer, and its mean over `layers` (default the
    model's middle, VAT's, layers). Chance (attention spread evenly) is 1 / the visual tokens."""
    import vat
    requests = attention.read_requests(os.path.join(bench_dir, "layer_probe.jsonl"))
    mllm, tok, proc = M.load_any(model_dir)
    depth = mllm.language_model.config.get_text_config().num_hidden_layers
    prof = attention.layer_profile(mllm, tok, proc, requests, batch_size=32)
    per_layer = [prof["layers"][l]["object"] for l in range(depth)]
    layers = vat.select_layers(depth, "middle") if layers is None else layers
    return {"per_layer": per_layer, "layers": list(layers), "mean": sum(per_layer[l] for l in layers) / len(layers),
            "chance": 1.0 / mllm.num_visual_tokens, "n_requests": len(requests)}


def misalignment(teacher: str, student: str, bench_dir: str, batch_size: int = 32, limit: int | None = ANALYSIS_LIMIT) -> dict:
    """The paper's misalignment analysis for one student on a benchmark in the shapes layout (bench_dir with
    sugarcrepe/, layer_probe.jsonl): the first `limit` SugarCrepe items of each subset (None: all), each asked once
    with the true caption as (A) (attention.attention_items), the student's greedy answer (evaluate.py) says right or wrong; per item the
    Eq. 3 cosine of the whole maps and of the answer row alone (attention.attention_distance), each split by
    correctness (attention.split_by_correctness), and the answer row's share on the named object in the
    student's aligned layers (object_share). Distances are 1 - cos averaged over the matched layers; "items" holds
    each item's answer and cosines (per matched layer)."""
    items = attention.attention_items({"sugarcrepe": E.read_sugarcrepe(os.path.join(bench_dir, "sugarcrepe"),
                                                                        limit=limit)})
    requests = [it["request"] for it in items]
    gen, _ = E.make_model_fns(student, batch_size=64, max_new_tokens=8)  # demo.demo_evaluate's settings
    right = [it["judge"](a) for it, a in zip(items, E.ask(gen, requests))]
    del gen
    res = attention.attention_distance(teacher, student, None, None, requests, batch_size=batch_size)
    whole = attention.split_by_correctness(res["per_item"], right, res["student_layers"], res["windows"])
    answer = attention.split_by_correctness(res["answer_cos"], right, res["student_layers"], res["windows"])
    share = object_share(student, bench_dir, res["student_layers"])
    out = {"n_items": whole["n_items"], "n_right": whole["n_right"], "n_wrong": whole["n_wrong"],
           "accuracy": whole["accuracy"], "student_layers": res["student_layers"], "windows": res["windows"],
           "object_share": share["mean"], "object_share_per_layer": share["per_layer"],
           "object_share_chance": share["chance"],
           "items": [{"subset": it["subset"], "id": it["id"], "right": r, "cos": c, "answer_cos": a}
                     for it, r, c, a in zip(items, right, res["per_item"], res["answer_cos"])]}
    for g in ("all", "right", "wrong"):
        out["attn_dist" + ("" if g == "all" else "_" + g)] = whole["attn_dist_" + g]
        out["answer_dist" + ("" if g == "all" else "_" + g)] = answer["attn_dist_" + g]
    return out


# -----------------------------------------------------------------------------
# draw: everything the students share, made once


def quick_setup() -> dict:
    """The tests' end-to-end run: demo.py --quick's tiny world and budget, a tiny held-out set."""
    text = dict(demo.SCENE_TOKEN_TEXT, batch=4, n_val=2, phases=((demo._POSITIONS, 2), (demo._BINDING + ("choice",), 2)))
    return {"budget": dict(demo.STUDENTS, batch=4, s1_steps=2, s2_steps=2, s3_steps=2, eval_every=1, eval_limit=1),
            "world_sizes": dict(n_pretrain=24, n_instruct=48, n_images=24, n_sugarcrepe=2, n_vqa=4, n_val_sugarcrepe=2,
                                n_val_vqa=2, progress=False),
            "text_sizes": dict(n_train=10, n_val=2),
            "text_recipes": {"student": text, "teacher": dict(text, phases=text["phases"] + ((("where", "relation"), 2),))},
            "image_recipe": dict(demo.IMAGE_FROM_TEXT, batch=4, adapter_steps=2, steps=2, vision_steps=2,
                                 vision_scenes=520),
            "teacher_recipe": dict(demo.TEACHER_IMAGE, batch=4, relation_steps=2, fresh_steps=2, fresh_scenes=20),
            "benchmark": dict(seed=BENCHMARK_SEED, n_sugarcrepe=3, n_vqa=6)}


def full_setup() -> dict:
    """The verdict's: the demo's world, the shipped recipes (what made assets/), the students' budget
    demo.STUDENTS unchanged, the held-out set at BENCHMARK's sizes."""
    return {"budget": dict(demo.STUDENTS), "world_sizes": None, "text_sizes": None, "text_recipes": dict(demo.TEXT_RECIPES),
            "image_recipe": dict(demo.IMAGE_FROM_TEXT), "teacher_recipe": dict(demo.TEACHER_IMAGE),
            "benchmark": dict(seed=BENCHMARK_SEED, **BENCHMARK)}


def _json_roundtrip(x):
    return json.loads(json.dumps(x))


def draw(args) -> dict:
    """`python verdict.py draw`: the world (demo.demo_data, the demo's seed 0), the students' init (the student LM
    with the teacher's vision encoder, demo.image_init) and data (demo.image_question_data), the fresh held-out
    set (draw_benchmark, excluding seen_scenes) and the teacher's figures on it (OUT/teacher_result.json), then
    OUT/setup.json, written last, which `train` and `table` read. Prints no held-out figure."""
    root = args.out
    os.makedirs(root, exist_ok=True)
    setup = quick_setup() if args.quick else full_setup()
    teacher = os.path.abspath(args.teacher or demo.DEMO_TEACHER)
    student_lm = os.path.abspath(args.student_lm or demo.DEMO_STUDENT_LM)
    setup.update(quick=bool(args.quick), teacher=teacher, student_lm=student_lm)
    path = os.path.join(root, "setup.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        if {k: v for k, v in before.items() if k not in ("paths", "lm_init", "qa", "heldout", "manifest")} != \
                _json_roundtrip(setup):
            raise SystemExit(f"{root} was set up with other settings ({path}); give verdict.py another --out")
    t0 = time.time()
    paths = demo.demo_data(root, seed=0, sizes=setup["world_sizes"], text_sizes=setup["text_sizes"])
    data.check_tokenizers_agree(data.load_tokenizer(student_lm), data.load_tokenizer(teacher))
    demo.same_teacher(root, teacher)
    lm_init = demo.image_init(paths, student_lm, os.path.join(root, "student_init"), setup["image_recipe"],
                              vision_from=teacher)
    qa = demo.image_question_data(paths, setup["image_recipe"])
    heldout = os.path.join(root, "heldout")
    bm = setup["benchmark"]
    manifest = draw_benchmark(heldout, bm["seed"], bm["n_sugarcrepe"], bm["n_vqa"], lambda: seen_scenes(
        paths, setup["text_recipes"], setup["image_recipe"], setup["teacher_recipe"])[0])
    teacher_result = os.path.join(root, "teacher_result.json")
    if not os.path.exists(teacher_result):
        import vat
        r = demo.demo_evaluate(teacher, heldout)
        depth = M.load_any(teacher)[0].language_model.config.get_text_config().num_hidden_layers
        share = object_share(teacher, heldout, vat.select_layers(depth, "middle", teacher=True))
        demo._demo_json({"heldout": r, "analysis": {"object_share": share["mean"], "object_share_per_layer":
                                                    share["per_layer"], "object_share_chance": share["chance"]},
                         "teacher": teacher, "benchmark": manifest["sha256"]}, teacher_result)
    setup.update(paths=paths, lm_init=lm_init, qa=qa, heldout=heldout, manifest=manifest)
    demo._demo_json(setup, path)
    print(f"verdict set up in {root} ({time.time() - t0:.0f} s): held-out set {heldout}, {manifest['scenes']} "
          f"scenes drawn from seed {bm['seed']}, none of the {manifest['excluded_scenes']} scenes a shipped model or "
          f"a student may have seen; sha256 {manifest['sha256'][:16]}")
    return setup


def load_setup(root: str) -> dict:
    path = os.path.join(root, "setup.json")
    if not os.path.exists(path):
        raise SystemExit(f"{root}: no setup.json; run `python verdict.py draw --out {root}` first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# train: the paired students of some seeds, each evaluated once


def _set_threads(n: int) -> int:
    """torch's thread count for this process, which must agree with OMP_NUM_THREADS where that is set."""
    import torch
    torch.set_num_threads(n)
    threads = torch.get_num_threads()
    env = os.environ.get("OMP_NUM_THREADS")
    if env is not None and env != str(threads):
        raise SystemExit(f"OMP_NUM_THREADS={env} but --threads {threads}: give one thread count")
    return threads


def _same_threads(seed_dir: str, threads: int):
    """One thread count for every row of a seed (and, by `table`'s check, of the table): the first process to
    train in seed_dir records it; another count is refused."""
    path = os.path.join(seed_dir, "threads.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)["threads"]
        if before != threads:
            raise SystemExit(f"{seed_dir} was trained at {before} thread(s), this process runs {threads}: every row "
                             f"of a table at one thread count (docs/verdict.md); run with --threads {before}")
    else:
        demo._demo_json({"threads": threads}, path)


def evaluate_row(setup: dict, row: str, seed: int, model_dir: str, threads: int, seconds: float) -> dict:
    """One student's result.json beside its stages: validation and held-out CR / VQA (demo.demo_evaluate) and
    the misalignment analysis on the held-out set. Reused when it is of this model, teacher, held-out set and
    thread count; made again otherwise."""
    row_dir = os.path.dirname(model_dir)
    path = os.path.join(row_dir, "result.json")
    key = {"row": row, "seed": seed, "dir": model_dir, "teacher": setup["teacher"], "threads": threads,
           "benchmark": setup["manifest"]["sha256"]}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
        if {k: res.get(k) for k in key} == key:
            return res
    res = {**key, "train_seconds": seconds,
           "validation": demo.demo_evaluate(model_dir, os.path.join(setup["paths"]["dir"], "val")),
           "heldout": demo.demo_evaluate(model_dir, setup["heldout"]),
           "analysis": misalignment(setup["teacher"], model_dir, setup["heldout"])}
    demo._demo_json(res, path)
    return res


def train(args) -> dict:
    """`python verdict.py train --seeds ...`: per seed, every row's student (demo.demo_student: finished stages
    reused, an interrupted one resumed), rows sharing their stage 1 (stage1_group), then evaluate_row. Two
    processes on one --out must take different seeds (each seed's shared stage 1 belongs to one process)."""
    root = args.out
    setup = load_setup(root)
    rows = args.rows.split(",") if args.rows else list(PRIMARY_ROWS)
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"--rows: unknown rows {sorted(unknown)}; known: {list(ROWS)}")
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(SEEDS)
    threads = _set_threads(args.threads)
    paths = setup["paths"]
    out = {}
    for seed in seeds:
        seed_dir = os.path.join(root, f"seed{seed}")
        os.makedirs(seed_dir, exist_ok=True)
        _same_threads(seed_dir, threads)
        for row in rows:
            kind, extra, change = ROWS[row]
            group = stage1_group(row)
            stage1 = os.path.join(seed_dir, f"stage1_{group}") if group else None
            if row in P1_ROWS:  # from the gate's stage 1 (its length, its directory)
                change = dict(change, s1_steps=p1_length(root, setup))
                if change["s1_steps"] == setup["budget"]["s1_steps"]:
                    raise SystemExit("probe P1: the gate passed at the shipped length, so P1's rows are part 1's kd "
                                     "and vat_no_taf and its claim is C3 (`table`)")
                stage1 = gate_dir(seed_dir, change["s1_steps"], setup["budget"]["s1_steps"])
            t = time.time()
            model_dir = demo.demo_student(dict(setup["budget"], **change), kind, paths, setup["teacher"],
                                          setup["lm_init"], os.path.join(seed_dir, row), seed, extra,
                                          data_files=(setup["qa"], setup["qa"]), stage1=stage1)
            res = evaluate_row(setup, row, seed, model_dir, threads, time.time() - t)
            out[(row, seed)] = res
            print(f"seed {seed} {row}: validation CR {res['validation']['cr']:.1f}, VQA {res['validation']['vqa']:.1f} "
                  f"({res['train_seconds']:.0f} s)", flush=True)
    return out


# -----------------------------------------------------------------------------
# gate: probe P1's stage 1, lengthened until the own adapter reads colours


def gate_dir(seed_dir: str, steps: int, shipped: int) -> str:
    """Where a seed's own-adapter stage 1 of `steps` steps is: part 1's stage1_own at the shipped length."""
    return os.path.join(seed_dir, "stage1_own" if steps == shipped else f"stage1_own_s{steps}")


def gate_status(root: str, setup: dict) -> dict:
    """Probe P1's gate from the files: per length in P1_LENGTHS order, each seed's validation colour accuracy
    (OUT/seed{S}/<gate_dir>/gate.json); the first length whose mean over SEEDS is at least P1_GATE is chosen;
    if none passes, the last is chosen and the gate is 'not reached'. Until every seed of the length in turn
    has its figure, -> "next" is that length and nothing is chosen."""
    shipped = setup["budget"]["s1_steps"]
    out = {"gate": P1_GATE, "question_type": P1_QUESTION_TYPE, "seeds": list(SEEDS), "lengths": {}, "chosen": None,
           "reached": None, "next": None}
    for steps in P1_LENGTHS:
        accs = {}
        for seed in SEEDS:
            path = os.path.join(gate_dir(os.path.join(root, f"seed{seed}"), steps, shipped), "gate.json")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    accs[seed] = json.load(f)["colour"]
        mean = sum(accs.values()) / len(accs) if len(accs) == len(SEEDS) else None
        out["lengths"][steps] = {"colour": accs, "mean": mean}
        if mean is None:
            out["next"] = steps
            return out
        if mean >= P1_GATE or steps == P1_LENGTHS[-1]:
            out.update(chosen=steps, reached=mean >= P1_GATE)
            return out
    return out


def gate(args) -> dict:
    """`python verdict.py gate --seeds ...`: probe P1's gate, one length at a time. Trains these seeds' own-
    adapter stage 1 (demo.student_stage1, --no-taf, the shipped lr) at the length in turn (gate_status) and
    records its validation colour accuracy; when every seed of that length has one, the gate decides: chosen
    (written to OUT/p1_gate.json, which `train --rows p1_kd,p1_vat_no_taf` reads) or the next length, which the
    same command trains when run again."""
    root = args.out
    setup = load_setup(root)
    threads = _set_threads(args.threads)
    status = gate_status(root, setup)
    steps_run = status["next"]
    if status["next"] is not None:
        steps = status["next"]
        for seed in [int(x) for x in args.seeds.split(",")] if args.seeds else list(SEEDS):
            if seed not in SEEDS:
                raise SystemExit(f"--seeds: {seed} is not one of the verdict's seeds {list(SEEDS)}")
            seed_dir = os.path.join(root, f"seed{seed}")
            os.makedirs(seed_dir, exist_ok=True)
            _same_threads(seed_dir, threads)
            s1 = demo.student_stage1(dict(setup["budget"], s1_steps=steps), setup["paths"], setup["teacher"],
                                     setup["lm_init"], gate_dir(seed_dir, steps, setup["budget"]["s1_steps"]), seed,
                                     ROWS["kd"][1], setup["qa"])
            path = os.path.join(s1, "gate.json")
            if not os.path.exists(path):
                r = demo.demo_evaluate(s1, os.path.join(setup["paths"]["dir"], "val"))
                if P1_QUESTION_TYPE not in r["vqa_by_question_type"]:
                    raise SystemExit(f"probe P1: the validation set {setup['paths']['dir']}/val has no "
                                     f"{P1_QUESTION_TYPE!r} question; its types: {list(r['vqa_by_question_type'])}")
                demo._demo_json({"steps": steps, "seed": seed, "threads": threads,
                                 "colour": r["vqa_by_question_type"][P1_QUESTION_TYPE], "validation": r}, path)
            with open(path, encoding="utf-8") as f:
                print(f"P1 gate: seed {seed}, stage 1 of {steps} steps: validation colour accuracy "
                      f"{json.load(f)['colour']:.1f}", flush=True)
        status = gate_status(root, setup)
    if status["chosen"] is not None:
        demo._demo_json(status, os.path.join(root, "p1_gate.json"))
        m = status["lengths"][status["chosen"]]["mean"]
        print(f"P1 gate: {status['chosen']} steps, mean colour accuracy {m:.1f} "
              f"({'passed' if status['reached'] else 'gate not reached'}; the gate is {P1_GATE:.0f})")
    elif status["next"] != steps_run:
        m = status["lengths"][steps_run]["mean"]
        print(f"P1 gate: {steps_run} steps, mean colour accuracy {m:.1f}: below the gate ({P1_GATE:.0f}); next "
              f"{status['next']} steps: run the command again")
    else:
        print(f"P1 gate: waiting for the other seeds at {status['next']} steps; run the command again when they are "
              f"done")
    return status


def p1_length(root: str, setup: dict) -> int:
    """The gate's chosen stage-1 length (OUT/p1_gate.json, checked against the files)."""
    status = gate_status(root, setup)
    if status["chosen"] is None:
        raise SystemExit(f"probe P1: the gate is not decided (next: {status['next']} steps); run "
                         f"`python verdict.py gate --out {root}` first")
    return status["chosen"]


# -----------------------------------------------------------------------------
# table: reads the results, the paired table


def _get(res: dict, metric: str) -> float:
    where, _ = METRICS[metric]
    v = res
    for k in where:
        v = v[k]
    return float("nan") if v is None else float(v)


def collect(root: str, rows, seeds=None) -> tuple[dict, list]:
    """{row: {seed: result.json}} of the finished students under root; the seeds are those given, else every
    seed with a result. Missing (row, seed) pairs are returned, not guessed."""
    found = {}
    for name in sorted(os.listdir(root)):
        if name.startswith("seed") and name[4:].isdigit():
            for row in rows:
                path = os.path.join(root, name, row, "result.json")
                if os.path.exists(path):
                    with open(path, encoding="utf-8") as f:
                        found.setdefault(row, {})[int(name[4:])] = json.load(f)
    seeds = sorted(seeds if seeds is not None else {s for r in found.values() for s in r})
    missing = [(row, s) for row in rows for s in seeds if s not in found.get(row, {})]
    return {row: {s: found[row][s] for s in seeds if s in found.get(row, {})} for row in rows}, missing


def _mean_sd(xs):
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


def make_table(root: str, rows=None, seeds=None, tag: str | None = None) -> dict:
    """The verdict's tables from the result files only: per row the mean +- sd over seeds of every METRICS
    entry and the per-subset CR; per claim (CLAIMS whose two rows are present) the paired difference with its
    95% interval on every metric (reading() on each); per row the misalignment split (wrong - right, paired over
    seeds). Refuses results of mixed thread counts, teachers or held-out sets, and a table with a missing
    (row, seed). -> {"markdown", "rows", "claims", ...}, written to OUT/verdict.json and OUT/verdict.md
    (OUT/verdict_{tag}.json / .md with a tag: a probe's table beside part 1's)."""
    setup = load_setup(root)
    rows = list(rows or PRIMARY_ROWS)
    results, missing = collect(root, rows, seeds)
    if missing:
        raise SystemExit(f"missing results (row, seed): {missing}; run `python verdict.py train` for them")
    all_res = [r for by_seed in results.values() for r in by_seed.values()]
    for key in ("threads", "teacher", "benchmark"):
        values = {json.dumps(r[key]) for r in all_res}
        if len(values) > 1:
            raise SystemExit(f"results of different {key}s in one table: {sorted(values)}")
    threads = all_res[0]["threads"]
    seeds = sorted(next(iter(results.values())))
    with open(os.path.join(root, "teacher_result.json"), encoding="utf-8") as f:
        teacher = json.load(f)
    subsets = list(teacher["heldout"]["cr_subsets"])
    summary = {row: {m: _mean_sd([_get(r, m) for r in results[row].values()]) for m in METRICS} for row in rows}
    shown = [m for m in METRICS if m != "val_cr"]
    lines = [f"Fresh held-out set: seed {setup['manifest']['recipe']['seed']}, {setup['manifest']['scenes']} scenes "
             f"(sha256 {setup['manifest']['sha256'][:16]}); {len(seeds)} seeds ({', '.join(map(str, seeds))}), every "
             f"student trained and evaluated at {threads} thread(s). Mean ± sd over seeds.", "",
             "| row | " + " | ".join(METRICS[m][1] for m in shown) + " | validation CR |",
             "|---" * (len(shown) + 2) + "|"]
    for row in rows:
        lines.append(f"| {LABELS[row]} | " + " | ".join(
            f"{summary[row][m][0]:.3f} ± {summary[row][m][1]:.3f}" if m in ("attn_dist", "answer_dist", "object_share")
            else f"{summary[row][m][0]:.1f} ± {summary[row][m][1]:.1f}" for m in shown + ["val_cr"]) + " |")
    t = teacher["heldout"]
    lines.append(f"| teacher (one model) | {t['cr']:.1f} | {t['cr_match']:.1f} | {t['vqa']:.1f} | - | - | "
                 f"{teacher['analysis']['object_share']:.3f} | - |")
    lines += ["", "CR per subset (2-choice, mean over seeds):", "",
              "| row | " + " | ".join(subsets) + " |", "|---" * (len(subsets) + 1) + "|"]
    for row in rows:
        lines.append(f"| {LABELS[row]} | " + " | ".join(
            f"{sum(r['heldout']['cr_subsets'][k] for r in results[row].values()) / len(seeds):.1f}" for k in subsets) + " |")
    claims = {}
    lines += ["", "Paired differences over seeds, mean [95% t-interval]; CR is each claim's primary metric, each "
              "claim at 95% on its own, not corrected for multiplicity (docs/verdict.md rule 5); probe P3's three "
              "variants at 98.33% each (Bonferroni for three, docs/verdict.md part 2):", "",
              "| claim | " + " | ".join(METRICS[m][1] for m in shown) + " | CR reading | CR per seed |",
              "|---" * (len(shown) + 3) + "|"]
    for a, b, name in CLAIMS:
        if a not in rows or b not in rows:
            continue
        table = T99167 if a in P3_ROWS else T975
        ivs = {m: paired_interval({s: _get(r, m) for s, r in results[a].items()},
                                  {s: _get(r, m) for s, r in results[b].items()}, table) for m in METRICS}
        claims[name] = {"a": a, "b": b, "level": 0.95 if table is T975 else 1 - 0.05 / 3, "intervals": ivs,
                        "readings": {m: reading(iv) for m, iv in ivs.items()}}
        fmt = lambda m: ".3f" if m in ("attn_dist", "answer_dist", "object_share") else ".1f"  # noqa: E731
        lines.append(f"| {name} | " + " | ".join(
            f"{ivs[m]['mean']:+{fmt(m)}} [{ivs[m]['lo']:{fmt(m)}}, {ivs[m]['hi']:{fmt(m)}}]" for m in shown) +
            f" | {claims[name]['readings']['cr']} | " + " / ".join(f"{d:+.1f}" for d in ivs["cr"]["diffs"]) + " |")
    w1 = claims.get("L_ADL weight 1 - weight 10 (secondary)")
    if w1:  # docs/verdict.md rule 3: the weight is chosen on validation CR only, a tie keeps the shipped 10
        iv = w1["intervals"]["val_cr"]
        w1["choice"] = "weight 1" if iv["lo"] > 0 else "weight 10 (shipped)"
        lines += ["", f"Rule 3, validation CR of L_ADL weight 1 - weight 10: {iv['mean']:+.1f} [{iv['lo']:.1f}, "
                  f"{iv['hi']:.1f}] -> {w1['choice']}"]
    premise = {}
    lines += ["", "Misalignment (paper's premise: wrong answers have the larger distance), held-out SugarCrepe items "
              "asked once, true caption as (A); wrong - right paired over seeds [95% interval]:", "",
              "| row | right / wrong items (mean) | attn dist right | wrong | wrong - right | answer-row dist right | "
              "wrong | wrong - right |", "|---" * 8 + "|"]
    for row in rows:
        rs = results[row]
        cells = [f"{sum(r['analysis']['n_right'] for r in rs.values()) / len(rs):.0f} / "
                 f"{sum(r['analysis']['n_wrong'] for r in rs.values()) / len(rs):.0f}"]
        premise[row] = {}
        for k in ("attn_dist", "answer_dist"):
            right = {s: _nan(r["analysis"][k + "_right"]) for s, r in rs.items()}
            wrong = {s: _nan(r["analysis"][k + "_wrong"]) for s, r in rs.items()}
            iv = paired_interval(wrong, right)
            premise[row][k] = {"right": _mean_sd(list(right.values()))[0], "wrong": _mean_sd(list(wrong.values()))[0],
                               "wrong_minus_right": iv, "reading": reading(iv)}
            cells += [f"{premise[row][k]['right']:.3f}", f"{premise[row][k]['wrong']:.3f}",
                      f"{iv['mean']:+.3f} [{iv['lo']:.3f}, {iv['hi']:.3f}]"]
        lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
    shares = {row: [sum(r["analysis"]["object_share_per_layer"][l] for r in results[row].values()) / len(seeds)
                    for l in range(len(next(iter(results[row].values()))["analysis"]["object_share_per_layer"]))]
              for row in rows}
    lines += ["", "Answer row's share on the named object, per layer (mean over seeds; chance "
              f"{teacher['analysis']['object_share_chance']:.3f}):", ""]
    lines += [f"- {LABELS[row]}: " + " ".join(f"{x:.2f}" for x in shares[row]) for row in rows]
    lines.append("- teacher: " + " ".join(f"{x:.2f}" for x in teacher["analysis"]["object_share_per_layer"]))
    markdown = "\n".join(lines)
    out = {"seeds": seeds, "threads": threads, "rows": {r: summary[r] for r in rows}, "claims": claims,
           "premise": premise, "object_share_per_layer": shares, "teacher": teacher, "markdown": markdown,
           "benchmark": setup["manifest"]}
    name = f"verdict_{tag}" if tag else "verdict"
    with open(os.path.join(root, name + ".json"), "w", encoding="utf-8") as f:
        json.dump(attention._json_safe(out), f, indent=2)
    with open(os.path.join(root, name + ".md"), "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    return out


def _nan(x):
    return float("nan") if x is None else float(x)


def analyse(args) -> dict:
    """`python verdict.py analyse --model DIR [--model DIR2]`: misalignment() of any student against the set-up
    teacher on the verdict's held-out set, printed and written to --json (default OUT/analysis.json)."""
    setup = load_setup(args.out)
    out = {m: misalignment(setup["teacher"], m, setup["heldout"]) for m in args.model}
    for m, r in out.items():
        print(f"{m}: attn dist {r['attn_dist']:.3f} (right {r['attn_dist_right']:.3f}, wrong {r['attn_dist_wrong']:.3f}); "
              f"answer row {r['answer_dist']:.3f} (right {r['answer_dist_right']:.3f}, wrong {r['answer_dist_wrong']:.3f}); "
              f"on the named object {r['object_share']:.3f} (layers {r['student_layers']}); {r['n_right']} right, "
              f"{r['n_wrong']} wrong")
    demo._demo_json(attention._json_safe(out), args.json or os.path.join(args.out, "analysis.json"))
    return out


# -----------------------------------------------------------------------------
# Command line


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("draw", help="the world, the students' init and the fresh held-out set, once")
    d.add_argument("--out", default=os.path.join("runs", "verdict"))
    d.add_argument("--teacher", help="default: the shipped assets/demo_teacher")
    d.add_argument("--student-lm", help="default: the shipped assets/demo_student_lm")
    d.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # the tests' tiny run
    t = sub.add_parser("train", help="the paired students of some seeds, each evaluated once (resumable)")
    t.add_argument("--out", default=os.path.join("runs", "verdict"))
    t.add_argument("--seeds", help=f"comma-separated (default {','.join(map(str, SEEDS))}); split them between "
                   "processes, never share one")
    t.add_argument("--rows", help=f"comma-separated (default {','.join(PRIMARY_ROWS)}); also: compodistill_w1, "
                   f"probe P3's {','.join(P3_ROWS)}, probe P1's {','.join(P1_ROWS)} (after `gate`)")
    t.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS}; one count for "
                   "every row of a table)")
    g = sub.add_parser("gate", help="probe P1's gate: the own adapter's stage 1, one length at a time (resumable)")
    g.add_argument("--out", default=os.path.join("runs", "verdict"))
    g.add_argument("--seeds", help=f"comma-separated (default {','.join(map(str, SEEDS))}); split them between "
                   "processes, never share one")
    g.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    b = sub.add_parser("table", help="the paired table, from the result files only")
    b.add_argument("--out", default=os.path.join("runs", "verdict"))
    b.add_argument("--seeds", help="comma-separated (default: every seed with results)")
    b.add_argument("--rows", help=f"comma-separated (default {','.join(PRIMARY_ROWS)})")
    b.add_argument("--tag", help="write OUT/verdict_TAG.md / .json (a probe's table), not OUT/verdict.md")
    a = sub.add_parser("analyse", help="the misalignment analysis of any student on the verdict's held-out set")
    a.add_argument("--out", default=os.path.join("runs", "verdict"))
    a.add_argument("--model", action="append", required=True)
    a.add_argument("--json", help="default OUT/analysis.json")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.command == "draw":
        return draw(args)
    if args.command == "train":
        return train(args)
    if args.command == "analyse":
        return analyse(args)
    if args.command == "gate":
        return gate(args)
    res = make_table(args.out, args.rows.split(",") if args.rows else None,
                     [int(x) for x in args.seeds.split(",")] if args.seeds else None, args.tag)
    print(res["markdown"])
    return res


if __name__ == "__main__":
    main()
