"""Tests for shapes.py, the synthetic shapes world: determinism, the official benchmark layouts, truth of
positives and negatives, objects inside their cells, held-out scenes disjoint from training, the
tokenizer corpus, and hard negatives that a blind model cannot exploit."""

import glob
import json
import os
import random

import numpy as np
import pytest
from PIL import Image

import data
import shapes

SIZES = dict(n_pretrain=150, n_instruct=400, n_sugarcrepe=12, n_vqa=30, n_val_sugarcrepe=6, n_val_vqa=12)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    shapes.synthesize(out, seed=3, progress=False, **SIZES)
    return out


def read(path):
    with open(path) as f:
        return json.load(f)



def all_files(root):
    return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                  if os.path.isfile(p))


def test_synth_deterministic(tmp_path, world):
    small = dict(n_pretrain=40, n_instruct=60, n_sugarcrepe=3, n_vqa=6, n_val_sugarcrepe=2, n_val_vqa=4)
    a, b, c = (str(tmp_path / n) for n in "abc")
    shapes.synthesize(a, seed=11, progress=False, **small)
    shapes.main(["--out", b, "--seed", "11", "--n-pretrain", "40", "--n-instruct", "60", "--n-sugarcrepe",
               "3", "--n-vqa", "6", "--n-val-sugarcrepe", "2", "--n-val-vqa", "4"])
    shapes.synthesize(c, seed=12, progress=False, **small)
    fa = all_files(a)
    assert fa == all_files(b) and any(f.endswith(".png") for f in fa) and "tokenizer/tokenizer.json" in fa
    for f in fa:
        with open(os.path.join(a, f), "rb") as x, open(os.path.join(b, f), "rb") as y:
            assert x.read() == y.read(), f
    with open(os.path.join(a, "instruct.json"), "rb") as x, open(os.path.join(c, "instruct.json"), "rb") as y:
        assert x.read() != y.read()
    with open(os.path.join(a, "sugarcrepe", "swap_obj.json"), "rb") as x, \
            open(os.path.join(c, "sugarcrepe", "swap_obj.json"), "rb") as y:
        assert x.read() != y.read()


def test_benchmark_layouts(world):
    for split, n_sc, n_vqa in [("", SIZES["n_sugarcrepe"], SIZES["n_vqa"]),
                               ("val", SIZES["n_val_sugarcrepe"], SIZES["n_val_vqa"])]:
        root = os.path.join(world, split)
        for sub in shapes.SUGARCREPE_SUBSETS:
            d = read(os.path.join(root, "sugarcrepe", f"{sub}.json"))
            assert isinstance(d, dict) and list(d) == [str(i) for i in range(n_sc)]
            for v in d.values():
                assert set(v) == {"filename", "caption", "negative_caption"}
                assert v["caption"] != v["negative_caption"]
                assert os.path.isfile(os.path.join(root, "sugarcrepe", "images", v["filename"]))
        q = read(os.path.join(root, "vqav2", "questions.json"))["questions"]
        a = read(os.path.join(root, "vqav2", "annotations.json"))["annotations"]
        assert len(q) == len(a) == n_vqa
        assert len({x["question_id"] for x in q}) == n_vqa
        for qq, aa in zip(q, a):
            assert set(qq) == {"image_id", "question", "question_id"}
            assert set(aa) == {"question_id", "image_id", "question_type", "answer_type",
                               "multiple_choice_answer", "answers"}
            assert aa["question_id"] == qq["question_id"] and aa["image_id"] == qq["image_id"]
            assert aa["answer_type"] in ("yes/no", "number", "other")
            assert len(aa["answers"]) == 10 and [x["answer_id"] for x in aa["answers"]] == list(range(1, 11))
            assert all(set(x) == {"answer", "answer_confidence", "answer_id"} for x in aa["answers"])
            raw = [x["answer"] for x in aa["answers"]]
            assert max(set(raw), key=raw.count) == aa["multiple_choice_answer"]  # majority is the answer
            img = shapes.VQAV2_IMAGE_PATTERN.format(image_id=qq["image_id"])
            assert os.path.isfile(os.path.join(root, "vqav2", "images", img))


def test_positives_true_negatives_false(world):
    scenes = read(os.path.join(world, "scenes.json"))
    # benchmark files: parse the text back and check against the scene of the image
    for split in ("", "val"):
        for sub in shapes.SUGARCREPE_SUBSETS:
            for v in read(os.path.join(world, split, "sugarcrepe", f"{sub}.json")).values():
                sc = scenes[os.path.join(split, "sugarcrepe", "images", v["filename"])]
                assert shapes.caption_is_true(sc, shapes.parse_caption(v["caption"]))
                assert not shapes.caption_is_true(sc, shapes.parse_caption(v["negative_caption"]))
    # instruction data: the answered option is true, the other false; captions true; balanced orders
    letters = {s: [] for s in shapes.SUGARCREPE_SUBSETS}
    for s in read(os.path.join(world, "instruct.json")):
        if s["task"] != "compositional":
            continue
        q, a = s["conversations"][0]["value"], s["conversations"][1]["value"]
        opt_a = q.split("(A) ")[1].split("\n")[0]
        opt_b = q.split("(B) ")[1].split("\n")[0]
        assert q == shapes.SUGARCREPE_PROMPT.format(a=opt_a, b=opt_b)
        sc = scenes[s["image"]]
        good, bad = (opt_a, opt_b) if a == "A" else (opt_b, opt_a)
        assert shapes.caption_is_true(sc, shapes.parse_caption(good))
        assert not shapes.caption_is_true(sc, shapes.parse_caption(bad))
        letters[s["subset"]].append(a)
    for sub, ls in letters.items():
        assert abs(ls.count("A") - ls.count("B")) <= 1, sub
    for s in read(os.path.join(world, "pretrain.json")):
        assert shapes.caption_is_true(scenes[s["image"]], shapes.parse_caption(s["conversations"][1]["value"]))
    # many fresh scenes, every kind
    rng = random.Random(0)
    for _ in range(300):
        sc = shapes.random_scene(rng)
        for sub in shapes.SUGARCREPE_SUBSETS:
            pair = shapes.hard_negative(rng, sc, sub)
            if pair is None:
                continue
            pos, neg = pair
            assert shapes.caption_is_true(sc, pos) and not shapes.caption_is_true(sc, neg)
            assert shapes.parse_caption(shapes.clause_text(neg)) == [neg]


def test_truth_function_hand_worked():
    sc = {"objects": [{"shape": "circle", "color": "red", "size": "large", "row": 0, "col": 0},
                      {"shape": "square", "color": "blue", "size": "small", "row": 1, "col": 2}]}
    T = lambda t: shapes.caption_is_true(sc, shapes.parse_caption(t))  # noqa: E731
    assert T("a large red circle is to the left of a small blue square")
    assert T("a circle is above a square") and T("a blue square is below a red circle")
    assert not T("a square is to the left of a circle")  # swap_obj
    assert not T("a blue circle is to the left of a red square")  # swap_att
    assert not T("a red circle is below a blue square")  # replace_rel
    assert not T("a green circle and a blue square")  # replace_att
    assert not T("a red circle and a blue square and a triangle".replace(" and a blue", ", a blue"))  # add_obj
    assert T("a red circle and a blue square") and not T("a red circle and a red circle")


def test_objects_inside_their_cells(world):
    scenes = read(os.path.join(world, "scenes.json"))
    for path, sc in list(scenes.items())[:200]:
        im = np.asarray(Image.open(os.path.join(world, path)).convert("RGB")).astype(int)
        assert im.shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)
        fg = (im != np.array(shapes.BACKGROUNDS[sc["bg"]])).any(-1)
        cells = {(o["row"], o["col"]) for o in sc["objects"]}
        for r in range(shapes.GRID):
            for c in range(shapes.GRID):
                block = fg[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16]
                assert block.any() == ((r, c) in cells), (path, r, c)
                if block.any():  # the object does not touch the cell border
                    assert not (block[0].any() or block[-1].any() or block[:, 0].any() or block[:, -1].any())


def test_heldout_disjoint_from_training(world):
    scenes = read(os.path.join(world, "scenes.json"))
    train_paths = {s["image"] for f in ("pretrain.json", "instruct.json")
                   for s in read(os.path.join(world, f)) if "image" in s}
    assert train_paths and all(p.startswith("images/") for p in train_paths)
    bench = [p for p in scenes if "sugarcrepe" in p or "vqav2" in p]
    assert len(bench) > 0 and not (set(bench) & train_paths)
    keys_train = {shapes.scene_key(scenes[p]) for p in train_paths}
    keys_test = {shapes.scene_key(scenes[p]) for p in bench if not p.startswith("val")}
    keys_val = {shapes.scene_key(scenes[p]) for p in bench if p.startswith("val")}
    assert not (keys_train & keys_test) and not (keys_train & keys_val) and not (keys_val & keys_test)
    # every image file written is accounted for in scenes.json
    pngs = {p for p in all_files(world) if p.endswith(".png")}
    assert pngs == set(scenes)
    # text-only samples exist in the instruction mix
    tasks = {s["task"] for s in read(os.path.join(world, "instruct.json"))}
    assert tasks == {"recognition", "compositional", "text"}


def test_vqa_answers_match_scenes(world):
    """Re-derive the benchmark answers from the scene graph (independently of vqa_question)."""
    scenes = read(os.path.join(world, "scenes.json"))
    checked = 0
    for split in ("", "val"):
        qs = read(os.path.join(world, split, "vqav2", "questions.json"))["questions"]
        ans = {a["question_id"]: a["multiple_choice_answer"]
               for a in read(os.path.join(world, split, "vqav2", "annotations.json"))["annotations"]}
        for q in qs:
            sc = scenes[os.path.join(split, "vqav2", "images", shapes.VQAV2_IMAGE_PATTERN.format(image_id=q["image_id"]))]
            objs, text, a = sc["objects"], q["question"], ans[q["question_id"]]
            by_shape = {o["shape"]: o for o in objs}
            if text == "How many objects are there?":
                assert a == str(len(objs))
            elif text.startswith("What color is the "):
                assert a == by_shape[text[len("What color is the "):-1]]["color"]
            elif text.startswith("What size is the "):
                assert a == by_shape[text[len("What size is the "):-1]]["size"]
            elif text.startswith("Is there "):
                truth = shapes.caption_is_true(sc, shapes.parse_caption(text[len("Is there "):-1]))
                assert a == ("yes" if truth else "no")
            elif text.startswith("How many "):
                color = text.split()[2]
                assert a == str(sum(o["color"] == color for o in objs))
            else:
                continue
            checked += 1
    assert checked > 10


def test_world_vocabulary_corpus_tokenizer(tmp_path):
    tok = shapes.train_tokenizer(shapes.world_vocabulary_corpus(), str(tmp_path / "tok"))
    tok = data.load_tokenizer(str(tmp_path / "tok"))
    for w in shapes.world_texts()[0].split() + "color is the many objects are there".split():
        assert len(tok.encode(" " + w, add_special_tokens=False)) == 1, w
    for w in ["What", "How", "Is", "A", "B", "red", "yes", "3"]:  # answers / question starts follow "\n"
        assert len(tok.encode(w, add_special_tokens=False)) == 1, w
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_hard_negatives_give_a_blind_model_nothing():
    """A model that never looks at the image must be at chance on every subset: the true and the false
    caption have the same length distribution and the same word frequencies (an add_* negative that is
    simply the longer caption was solvable from the text alone)."""
    import collections
    import random
    rng = random.Random(5)
    n = 2000
    for subset in shapes.SUGARCREPE_SUBSETS:
        shorter_true, pos_words, neg_words, k = 0.0, collections.Counter(), collections.Counter(), 0
        while k < n:
            pair = shapes.hard_negative(rng, shapes.random_scene(rng), subset)
            if pair is None:
                continue
            a, b = shapes.clause_text(pair[0]).split(), shapes.clause_text(pair[1]).split()
            shorter_true += 1.0 if len(a) < len(b) else 0.5 if len(a) == len(b) else 0.0
            pos_words.update(set(a))
            neg_words.update(set(b))
            k += 1
        assert 0.45 <= shorter_true / n <= 0.55, (subset, shorter_true / n)
        gap, word = max((abs(pos_words[w] - neg_words[w]) / n, w) for w in set(pos_words) | set(neg_words))
        assert gap < 0.06, (subset, word, gap)  # ~4.5 standard errors at n = 2000


def test_layer_probe_names_the_patch_each_object_is_drawn_in(world):
    """The named object's colour is drawn inside the probe's patch (the scene says which colour)."""
    probe = shapes.layer_probe(os.path.join(world, "scenes.json"), "val")
    scenes = read(os.path.join(world, "scenes.json"))
    assert probe and all(r["image"].startswith(os.path.join("val", "vqav2")) for r in probe)
    for r in probe:
        shape = r["prompt"].split("What color is the ")[1].split("?")[0]
        (obj,) = [o for o in scenes[r["image"]]["objects"] if o["shape"] == shape]
        img = np.asarray(Image.open(os.path.join(world, r["image"])).convert("RGB")).astype(int)
        (p,) = r["object_patches"]
        row, col = divmod(p, shapes.GRID)
        assert (row, col) == (obj["row"], obj["col"])
        cell = img[row * shapes.CELL:(row + 1) * shapes.CELL, col * shapes.CELL:(col + 1) * shapes.CELL]
        assert (np.abs(cell - np.array(shapes.COLORS[obj["color"]])).sum(-1) < 30).sum() >= 4
