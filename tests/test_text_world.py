"""Tests for the text world (issue #16): shapes.scene_text says everything the image shows (a reference
parser written here recovers every object from the text alone, so every caption's truth can be decided
from it), text-world scenes are disjoint from the scenes they must exclude, the answers have the image
world's formats and are true of the scene, and evaluate.py asks text-only benchmark items about their text."""

import os
import random
import re

import pytest
from PIL import Image

import evaluate as E
import shapes

OBJECT = re.compile(r"^an? (small|large) (\w+) (\w+) ([1-4]) ([1-4])$")
TOKENS = re.compile(r"^\[(small|large) (\w+) (\w+)\]\[(\w+) at ([1-4]) ([1-4])\]$")  # the scene-token style


def parse_scene_text(text):
    """A reference reader of the scene text, independent of shapes.scene_text's code: "a SIZE COLOR SHAPE
    ROW COL" items (or, in the scene-token style, "[SIZE COLOR SHAPE][SHAPE at ROW COL]") separated by "; ",
    a final ".", rows and columns counted from 1."""
    assert text.endswith("."), text
    objects = []
    for part in text[:-1].split("; "):
        m = OBJECT.match(part) or TOKENS.match(part)
        assert m, f"not an object: {part!r}"
        if m.re is TOKENS:
            assert m.group(3) == m.group(4), f"position token of another shape: {part!r}"
            m = OBJECT.match(f"a {m.group(1)} {m.group(2)} {m.group(3)} {m.group(5)} {m.group(6)}")
        size, color, shape, row, col = m.groups()
        assert color in shapes.COLORS and shape in shapes.SHAPES, part
        objects.append({"shape": shape, "color": color, "size": size, "row": int(row) - 1, "col": int(col) - 1})
    return {"objects": objects}


def random_scenes(n, seed=0):
    rng = random.Random(seed)
    return [shapes.random_scene(rng) for _ in range(n)]


@pytest.mark.parametrize("tokens", [False, True])
def test_scene_text_names_every_object_with_all_its_attributes_and_cell(tokens):
    for scene in random_scenes(300):
        parsed = parse_scene_text(shapes.scene_text(scene, tokens))
        assert shapes.scene_key(parsed) == shapes.scene_key(scene)


def test_every_caption_can_be_decided_from_the_scene_text_alone():
    """Positives and hard negatives of all seven kinds, and the relation of every ordered pair: the truth
    function on the scene read back from its text agrees with the truth on the scene itself."""
    rng = random.Random(1)
    checked = {False: 0, True: 0}
    for scene in random_scenes(300, seed=2):
        parsed = parse_scene_text(shapes.scene_text(scene))
        for subset in shapes.SUGARCREPE_SUBSETS:
            pair = shapes.hard_negative(rng, scene, subset)
            for cap in pair or ():
                truth = shapes.caption_is_true(scene, cap)
                assert shapes.caption_is_true(parsed, cap) == truth
                checked[truth] += 1
        for a, b in zip(scene["objects"], scene["objects"][1:]):
            for rel in shapes.RELATIONS:
                cl = {"kind": "rel", "a": shapes.full_np(a), "rel": rel, "b": shapes.full_np(b)}
                assert shapes.caption_is_true(parsed, cl) == shapes.caption_is_true(scene, cl)
    assert min(checked.values()) > 500


def test_scene_text_is_deterministic_row_major_and_ignores_what_no_caption_mentions():
    scene = {"objects": [{"shape": "square", "color": "blue", "size": "large", "row": 2, "col": 0},
                         {"shape": "circle", "color": "red", "size": "small", "row": 0, "col": 1}],
             "bg": 0, "jitter": [[0.1, 0.2], [0.3, 0.4]]}
    assert shapes.scene_text(scene) == "a small red circle 1 2; a large blue square 3 1."
    assert shapes.scene_text(scene, tokens=True) == "[small red circle][circle at 1 2]; [large blue square][square at 3 1]."
    moved = dict(scene, objects=scene["objects"][::-1], bg=1, jitter=[[0.9, 0.9], [0.0, 0.0]])
    assert shapes.scene_text(moved) == shapes.scene_text(scene)
    assert shapes.scene_text(moved, tokens=True) == shapes.scene_text(scene, tokens=True)


def test_scene_text_words_are_single_tokens_of_the_world_tokenizer(tokenizer):
    for scene in random_scenes(50, seed=4):
        for word in re.findall(r"\w+", shapes.scene_text(scene)):
            assert len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1, word


def test_scene_tokens_are_single_tokens_of_a_tokenizer_that_adds_them(tmp_path):
    """train_tokenizer(extra_tokens=SCENE_TOKENS): every object and position token of a scene text is one id,
    the rest of the text tokenizes as before, and the text decodes back unchanged."""
    assert len(shapes.SCENE_TOKENS) == len(set(shapes.SCENE_TOKENS)) == \
        len(shapes.SHAPES) * len(shapes.COLORS) * len(shapes.SIZES) + len(shapes.SHAPES) * 16
    tok = shapes.train_tokenizer(shapes.world_vocabulary_corpus(50), str(tmp_path / "tok"), 600,
                                 extra_tokens=shapes.SCENE_TOKENS)
    plain = shapes.train_tokenizer(shapes.world_vocabulary_corpus(50), str(tmp_path / "plain"), 600)
    assert len(tok) == len(plain) + len(shapes.SCENE_TOKENS)
    for scene in random_scenes(40, seed=9):
        text = shapes.scene_text(scene, tokens=True)
        ids = tok.encode(text, add_special_tokens=False)
        units = re.findall(r"\[[^\]]+\]", text)
        assert [tok.convert_ids_to_tokens(i) for i in ids if tok.convert_ids_to_tokens(i) in units] == units
        assert tok.decode(ids) == text
        q = "What color is the circle?"
        assert tok.encode(q, add_special_tokens=False) == plain.encode(q, add_special_tokens=False)


@pytest.fixture(scope="module", params=[False, True], ids=["words", "tokens"])
def world(request):
    return shapes.text_world(n_train=60, n_val=8, seed=5, tasks=shapes.TEXT_TASKS, tokens=request.param)


def scene_of(sample):
    return parse_scene_text(sample["scene_text"])


def test_text_world_scenes_are_distinct_and_avoid_the_excluded_ones(world):
    keys = [shapes.scene_key(scene_of(x)) for x in world["val"]]
    assert len(set(keys)) == len(keys)  # one scene per validation item
    train_keys = {shapes.scene_key(scene_of(x)) for x in world["train"]}
    assert not train_keys & set(keys)
    # the same streams with those scenes excluded draw none of them (and so none of an image world's)
    again = shapes.text_world(n_train=60, n_val=8, seed=5, exclude=set(keys) | train_keys)
    again_keys = {shapes.scene_key(scene_of(x)) for split in again.values() for x in split}
    assert not again_keys & (set(keys) | train_keys)


def test_text_world_has_no_images_and_the_scene_text_where_the_image_would_be(world):
    for x in world["train"] + world["val"]:
        assert "image" not in x
        first = x["conversations"][0]["value"]
        assert shapes.IMAGE_TOKEN not in first and first.startswith(x["scene_text"] + "\n")
        assert all(shapes.IMAGE_TOKEN not in t["value"] for t in x["conversations"])


def test_text_world_choice_answers_are_the_image_worlds_letters_and_point_to_the_true_caption(world):
    choices = [x for x in world["train"] + world["val"] if x["task"] == "text_compositional"]
    assert {x["subset"] for x in choices} == set(shapes.SUGARCREPE_SUBSETS)
    letters = [x["conversations"][1]["value"] for x in choices if x["id"].startswith("text_choice")]
    assert set(letters) == {"A", "B"} and abs(letters.count("A") - letters.count("B")) <= len(letters) // 4
    for x in choices:
        scene, (human, gpt) = scene_of(x), x["conversations"]
        first, second = (x["caption"], x["negative_caption"])[::1 if gpt["value"] == "A" else -1]
        assert human["value"] == shapes.SUGARCREPE_PROMPT.format(a=first, b=second).replace(
            shapes.IMAGE_TOKEN, x["scene_text"])
        assert shapes.caption_is_true(scene, shapes.parse_caption(x["caption"]))
        assert not shapes.caption_is_true(scene, shapes.parse_caption(x["negative_caption"]))


def assert_true_answer(scene, q, a):
    """One question about `scene` and its answer, checked against the scene itself (not by the code that
    wrote it): verification answers yes exactly for true captions; every answer one word of the VQA format."""
    objs = {o["shape"]: o for o in scene["objects"]}
    if m := re.search(r"show '(.*)'\? Answer yes or no\.$", q):  # either case: a match-prompt answer
        assert a.lower() == ("yes" if shapes.caption_is_true(scene, shapes.parse_caption(m.group(1))) else "no"), a
        return
    assert re.fullmatch(r"[a-z0-9]+", a), a
    assert q.endswith(shapes.VQA_SUFFIX)
    if m := re.search(r"What (color|size) is the (\w+)\?", q):
        assert a == objs[m.group(2)][m.group(1)]
    elif m := re.search(r"What shape is the (\w+) object\?", q):
        assert [o["shape"] for o in scene["objects"] if o["color"] == m.group(1)] == [a]
    elif m := re.search(r"Is the (\w+) (to the left of|to the right of|above|below) the (\w+)\?", q):
        rel = {v.replace("is ", "", 1): k for k, v in shapes.RELATIONS.items()}[m.group(2)]
        assert a == ("yes" if shapes.rel_holds(rel, objs[m.group(1)], objs[m.group(3)]) else "no")
    elif m := re.search(r"Is the (\w+) (\w+)\?", q):  # an attribute of the object with that shape
        value = m.group(2)
        assert value in shapes.COLORS or value in shapes.SIZES, q
        assert a == ("yes" if value in (objs[m.group(1)]["color"], objs[m.group(1)]["size"]) else "no")
    elif m := re.search(r"What (row|column) is the (\w+) in\?", q):
        assert a == str(objs[m.group(2)]["row" if m.group(1) == "row" else "col"] + 1)
    elif m := re.search(r"How many (\w+ )?objects are there\?", q):
        color = (m.group(1) or "").strip()
        assert a == str(sum(color in ("", o["color"]) for o in scene["objects"]))
    else:
        m = re.search(r"Is there (an? .*)\?", q)
        assert m, q
        assert a == ("yes" if shapes.caption_is_true(scene, shapes.parse_caption(m.group(1))) else "no")


def test_text_world_questions_are_answered_truly_in_the_vqa_format(world):
    """Lookups, relations and counts checked against the scene read back from the text; verification
    answers yes exactly for true captions; every answer is one word of the VQA answer format."""
    seen = set()
    for x in world["train"] + world["val"]:
        if x["task"] == "text_compositional":
            continue
        scene, conv = scene_of(x), x["conversations"]
        if x["task"] == "text_describe":  # the image world's pretraining caption: every object, one relation
            assert conv[0]["value"] == shapes.CAPTION_PROMPT.replace(shapes.IMAGE_TOKEN, x["scene_text"])
            clauses = shapes.parse_caption(conv[1]["value"])
            assert shapes.caption_is_true(scene, clauses) and len(clauses[0]["nps"]) == len(scene["objects"])
            seen.add(x["task"])
            continue
        for q, a in zip(conv[::2], conv[1::2]):
            assert_true_answer(scene, q["value"], a["value"])
            seen.add("verify" if x["task"] == "text_verify" else x["task"])
    assert seen == {"verify", "text_lookup", "text_where", "text_vqa", "text_describe"}
    vqa = [x for x in world["val"] if x["task"] == "text_vqa"]
    assert {x["question_type"] for x in vqa} >= {"what color is the", "how many", "is there a", "is the"}
    assert all(len(x["answers"]) == 10 for x in vqa)


def test_text_questions_ask_one_true_question_about_each_new_scene():
    """shapes.text_questions: one question a sample, every task asked with balanced answers, each answer true of
    the scene read back from its text, no scene from `exclude`, the same samples for the same seed."""
    import collections
    exclude = {shapes.scene_key(s) for s in random_scenes(3000, seed=9)}
    samples = shapes.text_questions(3500, seed=2, exclude=exclude)
    assert samples == shapes.text_questions(3500, seed=2, exclude=exclude)
    answers, bound = collections.defaultdict(list), []
    for x in samples:
        scene = parse_scene_text(x["scene_text"])
        assert shapes.scene_key(scene) not in exclude and "image" not in x
        human, gpt = x["conversations"]
        assert human["value"].startswith(x["scene_text"] + "\n")
        if x["task"] == "text_compositional":
            first, second = (x["caption"], x["negative_caption"])[::1 if gpt["value"] == "A" else -1]
            assert human["value"] == shapes.SUGARCREPE_PROMPT.format(a=first, b=second).replace(
                shapes.IMAGE_TOKEN, x["scene_text"])
            assert shapes.caption_is_true(scene, shapes.parse_caption(x["caption"]))
            assert not shapes.caption_is_true(scene, shapes.parse_caption(x["negative_caption"]))
        else:
            assert_true_answer(scene, human["value"], gpt["value"])
        answers[x["task"]].append(gpt["value"])
        if x["task"] == "text_attribute" and gpt["value"] == "no":  # is the wrong value another object's?
            shape, value = re.search(r"Is the (\w+) (\w+)\?", human["value"]).groups()
            bound.append(any(value in (o["color"], o["size"]) for o in scene["objects"] if o["shape"] != shape))
    assert set(answers) == {"text_" + t for t in shapes.QUESTION_TASKS if t != "choice"} | {"text_compositional"}
    share = len(samples) / len(shapes.QUESTION_TASKS)
    assert all(abs(len(v) - share) < 0.2 * share for v in answers.values())  # tasks drawn uniformly
    for task, yes in (("text_relation", "yes"), ("text_attribute", "yes"), ("text_exist", "yes"),
                      ("text_verify", "Yes"), ("text_compositional", "A")):
        assert 0.35 < answers[task].count(yes) / len(answers[task]) < 0.65, task
    assert set(answers["text_verify"]) == {"Yes", "No"}  # what the match score reads (evaluate.match_request)
    assert 0.55 < sum(bound) / len(bound) < 0.9  # many a false attribute is another object's: binding, not presence
    assert {x["subset"] for x in samples if x["task"] in ("text_verify", "text_compositional")} == \
        set(shapes.SUGARCREPE_SUBSETS)
    only = shapes.text_questions(50, seed=3, tasks=("where",))
    assert {x["task"] for x in only} == {"text_where"}
    with pytest.raises(ValueError, match="unknown text-question tasks"):
        shapes.text_questions(5, tasks=("where", "describe"))


def test_image_questions_ask_the_text_world_questions_about_images():
    """shapes.image_questions: the text world's one-question samples with "<image>" where the scene text was,
    each answer true of that image's own scene (checked against the scene, not by the code that wrote it),
    every image and task drawn, deterministic, bad arguments refused."""
    import collections
    scenes = {f"images/train_{i:06d}.png": s for i, s in enumerate(random_scenes(40, seed=4))}
    samples = shapes.image_questions(scenes, 1600, seed=5)
    assert samples == shapes.image_questions(scenes, 1600, seed=5)
    tasks = collections.Counter()
    for x in samples:
        scene, (human, gpt) = scenes[x["image"]], x["conversations"]
        assert "scene_text" not in x and human["value"].startswith(shapes.IMAGE_TOKEN + "\n")
        assert human["value"].count(shapes.IMAGE_TOKEN) == 1 and "[" not in human["value"]  # no scene token left
        if x["task"] == "compositional":
            assert shapes.caption_is_true(scene, shapes.parse_caption(x["caption"]))
            assert not shapes.caption_is_true(scene, shapes.parse_caption(x["negative_caption"]))
            first, second = (x["caption"], x["negative_caption"])[::1 if gpt["value"] == "A" else -1]
            assert human["value"] == shapes.SUGARCREPE_PROMPT.format(a=first, b=second)
        else:
            assert_true_answer(scene, human["value"], gpt["value"])
        tasks[x["task"]] += 1
    assert set(tasks) == {t for t in shapes.QUESTION_TASKS if t != "choice"} | {"compositional"}
    assert {x["image"] for x in samples} == set(scenes)
    with pytest.raises(ValueError, match="unknown text-question tasks"):
        shapes.image_questions(scenes, 5, tasks=("describe",))
    with pytest.raises(ValueError, match="no scenes"):
        shapes.image_questions({}, 5)


def test_evaluator_asks_text_only_items_about_their_text():
    """eval_sugarcrepe / eval_vqav2 on items with a "context": no image, the context where "<image>" was;
    an oracle that reads the scene text from the prompt scores 100, one that answers blindly does not."""
    world = shapes.text_world(n_train=1, n_val=4, seed=6)["val"]
    subsets = {}
    for x in world:
        if x["task"] == "text_compositional":
            subsets.setdefault(x["subset"], []).append(
                {"id": x["id"], "image": None, "pos": x["caption"], "neg": x["negative_caption"],
                 "context": x["scene_text"]})
    vqa = [{"id": x["id"], "image": None, "question": x["question"], "answers": x["answers"],
            "answer_type": x["answer_type"], "question_type": x["question_type"], "context": x["scene_text"]}
           for x in world if x["task"] == "text_vqa"]
    answer = {(x["scene_text"], x["question"]): x["conversations"][1]["value"] for x in world if x["task"] == "text_vqa"}

    def oracle(reqs):
        out = []
        for r in reqs:
            assert r["image"] is None and shapes.IMAGE_TOKEN not in r["prompt"]
            text, rest = r["prompt"].split("\n", 1)
            scene = parse_scene_text(text)
            if rest.startswith("Which caption"):
                a = re.search(r"\(A\) (.*)\n", rest).group(1)
                out.append("A" if shapes.caption_is_true(scene, shapes.parse_caption(a)) else "B")
            else:
                out.append(answer[(text, rest.split("\n")[0])])
        return out
    cr, _ = E.eval_sugarcrepe(oracle, subsets)
    assert cr["average"] == 100.0 and cr["complete"]
    metrics, _ = E.eval_vqav2(oracle, vqa)
    assert metrics["accuracy"] > 90  # a few of the 10 answers disagree with the majority
    blind, _ = E.eval_sugarcrepe(lambda reqs: ["A"] * len(reqs), subsets)
    assert blind["average"] == 50.0
    # without a context the request still carries its image and the <image> placeholder
    assert E.choice_request("x.png", "a", "b") == {"image": "x.png", "prompt": E.CHOICE_PROMPT.format(a="a", b="b")}


def test_demo_text_world_excludes_every_image_world_scene(tmp_path, monkeypatch):
    """demo.text_world_data hands shapes.text_world the key of every scene in scenes.json (training,
    validation and benchmark scenes alike) and writes the train / val files it returns."""
    import json
    import demo
    scenes = {f"x/{i}.png": s for i, s in enumerate(random_scenes(20, seed=7))}
    path = tmp_path / "scenes.json"
    path.write_text(json.dumps(scenes))
    seen = {}

    def fake(**kw):
        seen.update(kw)
        return {"train": [{"id": "t"}], "val": [{"id": "v"}]}
    monkeypatch.setattr(shapes, "text_world", fake)
    out = demo.text_world_data(str(path), seed=3, n_train=5, n_val=2)
    assert seen["exclude"] == {shapes.scene_key(s) for s in scenes.values()} and seen["seed"] == 3
    assert json.loads(open(out["train"]).read()) == [{"id": "t"}] and json.loads(open(out["val"]).read()) == [{"id": "v"}]


def test_demo_text_world_evaluate_asks_every_validation_item_about_its_scene_text(tmp_path, monkeypatch):
    """demo.text_world_evaluate with an oracle in place of a model: 100 on every subset, both orders and by the
    match score, and on every VQA question type, so items, contexts and answers reach the evaluator intact."""
    import json
    import demo
    val = shapes.text_world(n_train=1, n_val=3, seed=8)["val"]
    path = tmp_path / "val.json"
    path.write_text(json.dumps(val))
    answer = {(x["scene_text"], x["question"]): x["conversations"][1]["value"] for x in val if x["task"] == "text_vqa"}

    def oracle(reqs):
        out = []
        for r in reqs:
            text, rest = r["prompt"].split("\n", 1)
            if rest.startswith("Which caption"):
                a = re.search(r"\(A\) (.*)\n", rest).group(1)
                out.append("A" if shapes.caption_is_true(parse_scene_text(text), shapes.parse_caption(a)) else "B")
            else:
                out.append(answer[(text, rest.split("\n")[0])])
        return out

    def oracle_score(reqs):  # SugarCrepe's protocol: 1 for a true caption of the scene in the prompt, else 0
        out = []
        for r in reqs:
            text, rest = r["prompt"].split("\n", 1)
            cap = re.search(r"show '(.*)'\?", rest).group(1)
            out.append(float(shapes.caption_is_true(parse_scene_text(text), shapes.parse_caption(cap))))
        return out
    monkeypatch.setattr(E, "make_model_fns", lambda *a, **k: (oracle, oracle_score))
    r = demo.text_world_evaluate("unused", str(path))
    assert set(r["cr_subsets"]) == set(shapes.SUGARCREPE_SUBSETS) and r["cr"] == 100.0
    assert set(r["cr_match_subsets"]) == set(shapes.SUGARCREPE_SUBSETS) and r["cr_match"] == 100.0
    assert set(r["vqa_by_question_type"]) >= {"what color is the", "how many", "is there a", "is the"}
    assert min(r["vqa_by_question_type"].values()) >= 90


def test_parse_scene_tokens_inverts_scene_text_and_refuses_other_text():
    for scene in random_scenes(200, seed=10):
        assert shapes.scene_key(shapes.parse_scene_tokens(shapes.scene_text(scene, tokens=True))) == shapes.scene_key(scene)
    for bad in ("a small red circle 1 2.", "[small red circle][square at 1 2].", "[small red circle]."):
        with pytest.raises(ValueError, match="not an object"):
            shapes.parse_scene_tokens(bad)


@pytest.mark.slow
def test_scene_token_text_world_runs_its_phases_on_its_own_tokenizer(tmp_path):
    """demo.scene_token_text_world end to end at a few steps: a tokenizer with every scene token, one training
    file per phase holding steps x batch one-question samples of that phase's tasks (cumulative), on scenes none
    of which is an image-world or validation scene, each phase a train.py run from the last at a constant lr
    after warmup, validation (both CR protocols) after each, the last phase's model the preset's LM."""
    import json
    import demo
    import model as M
    root = tmp_path / "w"
    shapes.synthesize(str(root), seed=0, n_pretrain=8, n_instruct=8, n_images=8, n_sugarcrepe=3, n_vqa=3,
                      n_val_sugarcrepe=2, n_val_vqa=2, progress=False)
    paths = {"dir": str(root), "images": str(root), "pretrain": str(root / "pretrain.json"),
             "instruct": str(root / "instruct.json")}
    recipe = dict(demo.SCENE_TOKEN_TEXT, batch=4, n_val=2,
                  phases=((("lookup", "where"), 2), (("lookup", "where", "choice"), 3)))
    out = demo.scene_token_text_world(paths, str(tmp_path), presets=("student",), recipe=recipe)
    files = demo.scene_token_data(paths, recipe)
    image_world = {shapes.scene_key(s) for s in json.loads((root / "scenes.json").read_text()).values()}
    val = json.loads(open(files["val"]).read())
    val_scenes = {shapes.scene_key(shapes.parse_scene_tokens(x["scene_text"])) for x in val}
    assert not val_scenes & image_world
    tasks = []
    for path, n in zip(files["phases"], (8, 12)):
        samples = json.loads(open(path).read())
        assert len(samples) == n and all(len(x["conversations"]) == 2 for x in samples)
        assert not {shapes.scene_key(shapes.parse_scene_tokens(x["scene_text"])) for x in samples} & (image_world | val_scenes)
        tasks.append({x["task"] for x in samples})
    assert tasks[0] <= {"text_lookup", "text_where"} and "text_compositional" in tasks[1] <= \
        {"text_lookup", "text_where", "text_compositional"}
    lm, tok, _ = M.load_pretrained(str(tmp_path / "student_tokens_lm"))
    assert lm.language_model.get_input_embeddings().weight.shape[0] >= len(tok) and all(
        len(tok.encode(t, add_special_tokens=False)) == 1 for t in shapes.SCENE_TOKENS)
    phases = json.loads((tmp_path / "student_tokens_lm" / "phases.json").read_text())
    assert [p["steps"] for p in phases] == [2, 3] and set(out["student"]["cr_subsets"]) == set(shapes.SUGARCREPE_SUBSETS)
    assert set(out["student"]["cr_match_subsets"]) == set(shapes.SUGARCREPE_SUBSETS)
    summary = json.loads((tmp_path / "student_tokens_lm" / "trainer_summary.json").read_text())
    assert summary["steps"] == 3 and summary["init"] == str(tmp_path / "student_tokens_lm" / "phase0")
    args = json.loads((tmp_path / "student_tokens_lm" / "args.json").read_text())
    assert args["min_lr"] == args["lr"] == recipe["lr"] and not args["group_by_length"]
    with pytest.raises(SystemExit, match="another recipe"):  # never a stale world taken for another recipe
        demo.scene_token_data(paths, dict(recipe, batch=5))
    # then the image model from that LM (demo.image_from_text_lm): the LM's weights carried over, the vision
    # encoder pre-trained, the adapter trained alone (the LM untouched), then both
    import torch
    text_lm = str(tmp_path / "student_tokens_lm")
    img = dict(demo.IMAGE_FROM_TEXT, batch=4, adapter_steps=2, steps=2, vision_steps=2, vision_scenes=520)
    demo.image_from_text_lm(paths, text_lm, str(tmp_path / "img"), img)
    qa = json.loads((root / "image_questions.json").read_text())
    train_images = {k for k in json.loads((root / "scenes.json").read_text()) if k.startswith("images/train_")}
    assert len(qa) == 4 * 4 and {x["image"] for x in qa} <= train_images
    sd = {n: M.load_pretrained(str(tmp_path / "img" / n))[0].state_dict() for n in ("init", "adapter", "")}
    lm_sd = lm.state_dict()
    part = lambda d, key: {k: v for k, v in d.items() if key in k}  # noqa: E731
    assert all(torch.equal(v, part(sd["init"], "language_model")[k]) for k, v in part(lm_sd, "language_model").items())
    assert any(not torch.equal(v, sd["init"][k]) for k, v in part(lm_sd, "vision_tower").items())
    assert all(torch.equal(v, sd["adapter"][k]) for k, v in part(sd["init"], "language_model").items())
    assert any(not torch.equal(v, sd["adapter"][k]) for k, v in part(sd["init"], "projector").items())
    assert any(not torch.equal(v, sd[""][k]) for k, v in part(sd["adapter"], "language_model").items())
    assert M.read_config(str(tmp_path / "img" / "init"))["vision_feature_layer"] == -1
    demo.image_from_text_lm(paths, text_lm, str(tmp_path / "img2"), img, vision_from=str(tmp_path / "img"))
    copied = M.load_pretrained(str(tmp_path / "img2" / "init"))[0].state_dict()
    assert all(torch.equal(v, copied[k]) for k, v in part(sd[""], "vision_tower").items())
    with pytest.raises(SystemExit, match="another recipe"):
        demo.image_question_data(paths, dict(img, steps=3))


def test_scene_token_recipes_share_their_common_phases(tmp_path):
    """scene_token_data for two recipes on one world (the student's and the teacher's, demo.TEXT_RECIPES): the
    phases they share are one file, made once (the second recipe does not rewrite it), a phase only the longer
    recipe has is made with its own tasks and seed, and a recipe that differs in a shared phase is refused.
    Also the shipped teacher recipe: the student's phases, then where + relation alone, then the last again."""
    import json
    import demo
    assert demo.TEACHER_TOKEN_TEXT["phases"][:3] == demo.SCENE_TOKEN_TEXT["phases"]
    assert demo.TEACHER_TOKEN_TEXT["phases"][3] == (("where", "relation"), 2000)
    assert demo.TEACHER_TOKEN_TEXT["phases"][4] == demo.SCENE_TOKEN_TEXT["phases"][-1]
    root = tmp_path / "w"
    shapes.synthesize(str(root), seed=0, n_pretrain=8, n_instruct=8, n_images=8, n_sugarcrepe=3, n_vqa=3,
                      n_val_sugarcrepe=2, n_val_vqa=2, progress=False)
    paths = {"dir": str(root), "images": str(root), "pretrain": str(root / "pretrain.json"),
             "instruct": str(root / "instruct.json")}
    short = dict(demo.SCENE_TOKEN_TEXT, batch=4, n_val=2, phases=((("lookup", "where"), 2), (("choice",), 3)))
    long = dict(short, phases=short["phases"] + ((("where", "relation"), 2),))
    a = demo.scene_token_data(paths, short)
    mtimes = [os.stat(p).st_mtime_ns for p in a["phases"]]
    b = demo.scene_token_data(paths, long)
    assert b["phases"][:2] == a["phases"] and [os.stat(p).st_mtime_ns for p in a["phases"]] == mtimes
    third = json.loads(open(b["phases"][2]).read())
    assert len(third) == 8 and {x["task"] for x in third} <= {"text_where", "text_relation"}
    assert json.loads(open(b["phases"][2].replace(".json", "_recipe.json")).read())["seed"] == 200
    first = {json.dumps(x, sort_keys=True) for x in json.loads(open(a["phases"][0]).read())}
    assert not first & {json.dumps(x, sort_keys=True) for x in third}
    with pytest.raises(SystemExit, match="another recipe"):
        demo.scene_token_data(paths, dict(short, phases=((("lookup",), 2),) + short["phases"][1:]))


def test_fresh_image_questions_ask_relation_captions_at_their_share():
    """shapes.fresh_image_questions: one question a sample about an image of the list, each answer true of
    that image's own scene; with relation_captions=p about a share p of the samples (plus the tasks' own
    verify / choice draws) are caption questions against a swap_obj or replace_rel negative, at p=1 all of them;
    deterministic per seed; bad arguments refused."""
    images = [(f"fresh/{i:06d}.png", s) for i, s in enumerate(random_scenes(60, seed=8))]
    scenes = dict(images)

    def relation_share(samples):
        return sum(x.get("subset") in shapes.RELATION_SUBSETS for x in samples) / len(samples)

    samples = shapes.fresh_image_questions(images, 2000, "s", relation_captions=0.3)
    assert samples == shapes.fresh_image_questions(images, 2000, "s", relation_captions=0.3)
    for x in samples:
        scene, (human, gpt) = scenes[x["image"]], x["conversations"]
        assert human["value"].startswith(shapes.IMAGE_TOKEN + "\n") and "[" not in human["value"]
        if x["task"] == "compositional":
            assert shapes.caption_is_true(scene, shapes.parse_caption(x["caption"]))
            assert not shapes.caption_is_true(scene, shapes.parse_caption(x["negative_caption"]))
        else:
            assert_true_answer(scene, human["value"], gpt["value"])
    # the tasks' own share: verify + 2 x choice of QUESTION_TASKS' 8, 2 of 7 subsets relation ones
    own = 2 / len(shapes.QUESTION_TASKS) * 2 / 7
    assert abs(relation_share(shapes.fresh_image_questions(images, 2000, "s")) - own) < 0.025
    assert abs(relation_share(samples) - (0.3 + 0.7 * own)) < 0.04
    only = shapes.fresh_image_questions(images, 300, "s", relation_captions=1.0)
    assert relation_share(only) == 1.0 and {x["task"] for x in only} == {"verify", "compositional"}
    assert {x["image"] for x in samples} == set(scenes)
    with pytest.raises(ValueError, match="relation_captions"):
        shapes.fresh_image_questions(images, 5, "s", relation_captions=1.5)
    with pytest.raises(ValueError, match="relation_captions"):
        shapes.fresh_image_questions([], 5, "s")


def test_fresh_images_pair_each_file_with_its_scene_and_refuse_stale_ones(tmp_path):
    """demo.fresh_images: n new scenes, none an image-world scene, each drawn to the file it is returned with
    (pixel for pixel, so no question is asked about another image); drawn once; the images of another seed or n
    in the same folder are refused, never taken for the new scenes."""
    import json

    import numpy as np

    import demo
    world = random_scenes(30, seed=3)
    d = tmp_path / "data"
    d.mkdir()
    (d / "scenes.json").write_text(json.dumps({f"images/train_{i}.png": s for i, s in enumerate(world)}))
    paths = {"dir": str(d)}
    images = demo.fresh_images(paths, 6, "f")
    assert len(images) == 6 and len({shapes.scene_key(s) for _, s in images}) == 6
    assert not {shapes.scene_key(s) for _, s in images} & {shapes.scene_key(s) for s in world}
    for name, scene in images:
        drawn = np.asarray(shapes.draw_scene(scene).convert("RGB"))
        with Image.open(d / name) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), drawn), name
    mtimes = [os.stat(d / name).st_mtime_ns for name, _ in images]
    assert demo.fresh_images(paths, 6, "f") == images
    assert [os.stat(d / name).st_mtime_ns for name, _ in images] == mtimes
    for other in ((6, "g"), (7, "f")):
        with pytest.raises(SystemExit, match="another recipe"):
            demo.fresh_images(paths, *other)
