"""
The shapes world: a synthetic world in which the paper's compositional-reasoning benchmarks exist in
miniature, written as LLaVA-format training files and held-out benchmarks in the official layouts
that `evaluate.py` reads. The demo (`demo.py`) trains on it; nothing in the core modules imports it.

A 64x64 RGB image (white or light-grey background) is a 4x4 grid of 16 px cells. A scene has 2-3
objects in distinct cells, each drawn entirely inside its cell (one 16 px vision patch = one
object). An object is a shape (circle, square, triangle, diamond, cross; all shapes in a scene are
distinct, so "the circle" always names one object), a colour (red, green, blue, yellow, purple,
orange; may repeat) and a size (small = 7 px, large = 13 px). Relations come from the cells:
"left of"/"right of" (strictly different columns), "above"/"below" (strictly different rows).

A caption is a conjunction of clauses; a clause is either {"kind": "and", "nps": [np, ...]}
("a red circle and a small square": every noun phrase matches a distinct object) or
{"kind": "rel", "a": np, "rel": r, "b": np} ("a red circle is to the left of a blue square").
A noun phrase np = {"size", "color", "shape"} with size/color optional (None). `caption_is_true`
is the truth function; every hard negative of the 7 SugarCrepe kinds is verified false and every
positive true. `parse_caption` inverts `caption_text`.

File layout written by `python shapes.py --out DIR --seed S`:
    DIR/images/train_XXXXXX.png           training images (pretrain + instruct)
    DIR/pretrain.json                     LLaVA format, stage 1 ("<image>\\nDescribe the image.")
    DIR/instruct.json                     LLaVA format, stages 2-3: recognition VQA, compositional
                                          2-choice questions (SugarCrepe prompt), text-only samples;
                                          extra keys "task" (and "subset" for compositional ones)
    DIR/scenes.json                       {relative image path: scene} for every image written
    DIR/sugarcrepe/{subset}.json          official layout {"0": {filename, caption, negative_caption}}
    DIR/sugarcrepe/images/XXXXXXXXXXXX.png
    DIR/vqav2/questions.json              {"questions": [{image_id, question, question_id}]}
    DIR/vqav2/annotations.json            {"annotations": [{..., "answers": [10 x {...}]}]}
    DIR/vqav2/images/COCO_val2014_XXXXXXXXXXXX.png   (VQAV2_IMAGE_PATTERN)
    DIR/val/sugarcrepe/..., DIR/val/vqav2/...         validation split (choose settings here)
    DIR/tokenizer/                        a small byte-level BPE tokenizer with a ChatML template
The text world (issue #16), built in memory by `text_world` (demo.text_world_data writes it beside
scenes.json): every scene in words (`scene_text`, e.g. "a small red circle 1 2; a large blue square 3 1."),
the image world's tasks and answer formats with that text where "<image>" is, on scenes disjoint from
every image-world scene; the LMs are pre-trained on it before they see an image.
Image paths in the LLaVA JSON are relative to DIR (use image_folder=DIR). Held-out benchmark scenes
come from their own RNG streams and never coincide with a training scene (checked while writing).
A tokenizer for other LLaVA JSON: `python shapes.py --tokenizer-for A.json B.json --out TOKDIR`.
"""

import argparse
import itertools
import json
import os
import random

from PIL import Image, ImageDraw
from tqdm import tqdm

import data
import evaluate as E

IMAGE_TOKEN = data.IMAGE_TOKEN
SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# the prompts of the benchmarks as evaluate.py poses them (docs/benchmarks.md sections 1 and 5, LLaVA-1.5)
SUGARCREPE_PROMPT = E.CHOICE_PROMPT
VQA_SUFFIX = "\n" + E.VQA_INSTRUCTION
CAPTION_PROMPT = "<image>\nDescribe the image."
SUGARCREPE_SUBSETS = ["add_att", "add_obj", "replace_att", "replace_obj", "replace_rel",
                      "swap_att", "swap_obj"]
SUGARCREPE_IMAGE_PATTERN = "{image_id:012d}.png"          # under DIR/[val/]sugarcrepe/images/
VQAV2_IMAGE_PATTERN = "COCO_val2014_{image_id:012d}.png"  # under DIR/[val/]vqav2/images/

# -----------------------------------------------------------------------------
# A tokenizer for the world (the tiny models' vocabulary)


def train_tokenizer(texts, out_dir, vocab_size=1024, extra_tokens=()):
    """Train a byte-level BPE tokenizer (no unknown tokens possible) on `texts` and save it with
    save_pretrained, ChatML chat template, eos = <|im_end|>, pad = <pad>. `extra_tokens` (e.g. SCENE_TOKENS)
    are added after the BPE vocabulary as whole, non-special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                 additional_special_tokens=["<|im_start|>", IMAGE_TOKEN])
    hf.add_tokens(list(extra_tokens))
    hf.chat_template = CHATML_TEMPLATE
    hf.model_max_length = 1 << 20
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    return hf


# -----------------------------------------------------------------------------
# The shapes world: scenes, captions, truth function


IMAGE_SIZE, GRID, CELL = 64, 4, 16
SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
COLORS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 70, 230),
          "yellow": (235, 205, 0), "purple": (145, 40, 185), "orange": (250, 130, 0)}
SIZES = {"small": 7, "large": 13}
BACKGROUNDS = [(255, 255, 255), (215, 215, 215)]
RELATIONS = {"left": "is to the left of", "right": "is to the right of", "above": "is above", "below": "is below"}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def random_scene(rng, n_objects=(2, 3)):
    n = rng.choice(list(n_objects))
    cells = rng.sample(range(GRID * GRID), n)
    shapes = rng.sample(SHAPES, n)
    objects = [{"shape": sh, "color": rng.choice(list(COLORS)), "size": rng.choice(list(SIZES)),
                "row": c // GRID, "col": c % GRID} for sh, c in zip(shapes, cells)]
    return {"objects": objects, "bg": rng.randrange(len(BACKGROUNDS)),
            "jitter": [[rng.random(), rng.random()] for _ in objects]}


def patch_labels(scene):
    """Per vision patch (row-major over the GRID x GRID cells, one object per cell at most): (shape, colour,
    size) as 1-based indices into SHAPES / COLORS / SIZES, 0 for an empty cell. The targets of the tiny
    vision encoder's pre-training (demo.pretrain_vision_encoder)."""
    labels = [[0, 0, 0] for _ in range(GRID * GRID)]
    for o in scene["objects"]:
        labels[o["row"] * GRID + o["col"]] = [1 + SHAPES.index(o["shape"]), 1 + list(COLORS).index(o["color"]),
                                              1 + list(SIZES).index(o["size"])]
    return labels


def scene_key(scene):
    return tuple(sorted((o["shape"], o["color"], o["size"], o["row"], o["col"]) for o in scene["objects"]))


def draw_scene(scene):
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene["bg"]])
    d = ImageDraw.Draw(img)
    for o, (jx, jy) in zip(scene["objects"], scene["jitter"]):
        s = SIZES[o["size"]]
        slack = CELL - 2 - s  # keep a 1 px margin inside the cell
        x0 = o["col"] * CELL + 1 + int(jx * (slack + 1))
        y0 = o["row"] * CELL + 1 + int(jy * (slack + 1))
        x1, y1, c = x0 + s - 1, y0 + s - 1, COLORS[o["color"]]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if o["shape"] == "circle":
            d.ellipse([x0, y0, x1, y1], fill=c)
        elif o["shape"] == "square":
            d.rectangle([x0, y0, x1, y1], fill=c)
        elif o["shape"] == "triangle":
            d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=c)
        elif o["shape"] == "diamond":
            d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=c)
        elif o["shape"] == "cross":
            t = max(2, s // 3)
            a = (s - t) // 2
            d.rectangle([x0, y0 + a, x1, y0 + a + t - 1], fill=c)
            d.rectangle([x0 + a, y0, x0 + a + t - 1, y1], fill=c)
    return img


def np_matches(np_, o):
    return all(np_.get(k) is None or np_[k] == o[k] for k in ("size", "color", "shape"))


def rel_holds(rel, a, b):
    return {"left": a["col"] < b["col"], "right": a["col"] > b["col"],
            "above": a["row"] < b["row"], "below": a["row"] > b["row"]}[rel]


def clause_is_true(scene, cl):
    objs = scene["objects"]
    if cl["kind"] == "and":  # every noun phrase matches a distinct object
        return any(all(np_matches(n, o) for n, o in zip(cl["nps"], p))
                   for p in itertools.permutations(objs, len(cl["nps"])))
    if cl["kind"] == "rel":
        return any(np_matches(cl["a"], a) and np_matches(cl["b"], b) and rel_holds(cl["rel"], a, b)
                   for a, b in itertools.permutations(objs, 2))
    raise ValueError(f"unknown clause kind {cl['kind']!r}")


def caption_is_true(scene, caption):
    """caption: a clause or a list of clauses (a conjunction)."""
    clauses = caption if isinstance(caption, list) else [caption]
    return all(clause_is_true(scene, c) for c in clauses)


def np_text(np_):
    words = [w for w in (np_.get("size"), np_.get("color")) if w] + [np_["shape"]]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def clause_text(cl):
    if cl["kind"] == "rel":
        return f"{np_text(cl['a'])} {RELATIONS[cl['rel']]} {np_text(cl['b'])}"
    t = [np_text(n) for n in cl["nps"]]
    return t[0] if len(t) == 1 else ", ".join(t[:-1]) + " and " + t[-1]


def caption_text(caption):
    clauses = caption if isinstance(caption, list) else [caption]
    return ". ".join(clause_text(c) for c in clauses)


def parse_caption(text):
    """Inverse of caption_text -> list of clauses (raises ValueError on text outside the grammar)."""
    def parse_np(s):
        w = s.split()
        if len(w) < 2 or w[0] not in ("a", "an") or w[-1] not in SHAPES:
            raise ValueError(f"not a noun phrase: {s!r}")
        np_ = {"size": None, "color": None, "shape": w[-1]}
        for x in w[1:-1]:
            key = "size" if x in SIZES else "color" if x in COLORS else None
            if key is None or np_[key] is not None:
                raise ValueError(f"bad noun phrase: {s!r}")
            np_[key] = x
        return np_
    clauses = []
    for part in text.split(". "):
        for rel, phrase in RELATIONS.items():
            if f" {phrase} " in part:
                a, b = part.split(f" {phrase} ")
                clauses.append({"kind": "rel", "a": parse_np(a), "rel": rel, "b": parse_np(b)})
                break
        else:
            head, _, last = part.rpartition(" and ")
            nps = ([parse_np(x) for x in head.split(", ")] if head else []) + [parse_np(last)]
            clauses.append({"kind": "and", "nps": nps})
    return clauses

# -----------------------------------------------------------------------------
# Positives and the 7 SugarCrepe hard-negative kinds (each negative verified false)


def describe(rng, o, p_color=0.85, p_size=0.5):
    return {"size": o["size"] if rng.random() < p_size else None,
            "color": o["color"] if rng.random() < p_color else None, "shape": o["shape"]}


def full_np(o):
    return {"size": o["size"], "color": o["color"], "shape": o["shape"]}


def _pos_rel(rng, scene, a=None, b=None):
    if a is None:
        a, b = rng.sample(scene["objects"], 2)
    rels = [r for r in RELATIONS if rel_holds(r, a, b)]
    return {"kind": "rel", "a": describe(rng, a), "rel": rng.choice(rels), "b": describe(rng, b)}, (a, b)


def _pos_and(rng, scene, n=2):
    objs = rng.sample(scene["objects"], n)
    return {"kind": "and", "nps": [describe(rng, o) for o in objs]}, objs


def _nps(cl):
    return [cl["a"], cl["b"]] if cl["kind"] == "rel" else cl["nps"]


def _matches_none(scene, np_):
    return not any(np_matches(np_, o) for o in scene["objects"])


def _copy(cl):
    return json.loads(json.dumps(cl))


def _neg_replace_att(rng, scene):
    pos, objs = _pos_rel(rng, scene) if rng.random() < 0.5 else _pos_and(rng, scene)
    k = rng.randrange(2)
    att = "color" if rng.random() < 0.7 else "size"
    _nps(pos)[k][att] = objs[k][att]  # the positive names the attribute that is replaced
    neg = _copy(pos)
    values = [v for v in (COLORS if att == "color" else SIZES) if v != objs[k][att]]
    _nps(neg)[k][att] = rng.choice(values)
    return pos, neg, _matches_none(scene, _nps(neg)[k])


def _neg_replace_obj(rng, scene):
    pos, objs = _pos_rel(rng, scene) if rng.random() < 0.5 else _pos_and(rng, scene)
    k = rng.randrange(2)
    neg = _copy(pos)
    present = {o["shape"] for o in scene["objects"]}
    _nps(neg)[k]["shape"] = rng.choice([s for s in SHAPES if s not in present])
    return pos, neg, _matches_none(scene, _nps(neg)[k])


def _neg_replace_rel(rng, scene):
    pos, (a, b) = _pos_rel(rng, scene)
    false = [r for r in RELATIONS if not rel_holds(r, a, b)]
    neg = _copy(pos)
    neg["rel"] = rng.choice(false)
    return pos, neg, True


def _neg_swap_att(rng, scene):
    pos, objs = _pos_rel(rng, scene) if rng.random() < 0.5 else _pos_and(rng, scene)
    atts = [a for a in ("color", "size") if objs[0][a] != objs[1][a]]
    if not atts:
        return pos, None, False
    att = "color" if "color" in atts and rng.random() < 0.75 else rng.choice(atts)
    for k in range(2):
        _nps(pos)[k][att] = objs[k][att]
    neg = _copy(pos)
    _nps(neg)[0][att], _nps(neg)[1][att] = objs[1][att], objs[0][att]
    return pos, neg, True


def _neg_swap_obj(rng, scene):
    pos, _ = _pos_rel(rng, scene)
    neg = _copy(pos)
    neg["a"], neg["b"] = pos["b"], pos["a"]
    return pos, neg, True


def _neg_add_att(rng, scene):
    """Both captions add ONE attribute to the same base caption: the positive's is true, the negative's
    (SugarCrepe's "added attribute") is false. Length-matched, with the two added slots drawn from the
    same distribution, so a model that never looks at the image is at chance (SugarCrepe removes such
    text-only cues by adversarial refinement; an unmatched negative is simply the longer caption)."""
    pos, objs = _pos_rel(rng, scene) if rng.random() < 0.5 else _pos_and(rng, scene)

    def slot():
        return rng.randrange(2), "color" if rng.random() < 0.7 else "size"
    (k, att), (j, att_p) = slot(), slot()
    while (j, att_p) == (k, att):
        j, att_p = slot()
    for i, a in ((k, att), (j, att_p)):
        _nps(pos)[i][a] = None  # the base caption lacks both
    neg = _copy(pos)
    _nps(pos)[j][att_p] = objs[j][att_p]
    _nps(neg)[k][att] = rng.choice([v for v in (COLORS if att == "color" else SIZES) if v != objs[k][att]])
    return pos, neg, _matches_none(scene, _nps(neg)[k])


def _neg_add_obj(rng, scene):
    """Both captions add one object to the same base caption: the positive's is in the image, the
    negative's (an absent shape; SugarCrepe's "added object") is not. Length-matched like add_att."""
    n = rng.choice([1, 2]) if len(scene["objects"]) > 2 else 1
    objs = rng.sample(scene["objects"], n + 1)
    base = [describe(rng, o) for o in objs[:n]]
    present = {o["shape"] for o in scene["objects"]}
    fake = {"shape": rng.choice([sh for sh in SHAPES if sh not in present]), "color": rng.choice(list(COLORS)),
            "size": rng.choice(list(SIZES))}
    pos = {"kind": "and", "nps": base + [describe(rng, objs[n])]}
    neg = {"kind": "and", "nps": _copy(base) + [describe(rng, fake)]}
    return pos, neg, _matches_none(scene, neg["nps"][-1])


NEGATIVES = {"add_att": _neg_add_att, "add_obj": _neg_add_obj, "replace_att": _neg_replace_att,
             "replace_obj": _neg_replace_obj, "replace_rel": _neg_replace_rel,
             "swap_att": _neg_swap_att, "swap_obj": _neg_swap_obj}


def hard_negative(rng, scene, subset, tries=30):
    """(positive clause, negative clause) for one SugarCrepe kind, positive verified true and
    negative verified false (and different text); None if the scene does not allow it."""
    for _ in range(tries):
        pos, neg, ok = NEGATIVES[subset](rng, scene)
        if (ok and neg is not None and caption_is_true(scene, pos) and not caption_is_true(scene, neg)
                and clause_text(pos) != clause_text(neg)):
            return pos, neg
    return None

# -----------------------------------------------------------------------------
# Recognition questions (VQA style, single-word answers) and text-only questions


def lookup_question(kind, o, objs):
    """The one-hop questions (name an object by one attribute, ask for another): "color" / "size" of the
    object with o's shape, or "shape" of the object with o's colour. -> (question, answer), or None for
    "shape" when o's colour is not unique in `objs` (the question would be ambiguous)."""
    if kind == "color":
        return f"What color is the {o['shape']}?", o["color"]
    if kind == "size":
        return f"What size is the {o['shape']}?", o["size"]
    if sum(p["color"] == o["color"] for p in objs) == 1:
        return f"What shape is the {o['color']} object?", o["shape"]
    return None


def layer_probe(scenes_json: str, split: str = "val", limit: int | None = None) -> list:
    """Calibration requests for `python attention.py layers --requests`: for every object of every VQAv2-layout
    image of `split` ("val" or "" for the held-out test split), "What color is the <shape>?" in the VQA
    prompt, with "object_patches" = the one vision patch (row-major cell) the object is drawn in; image
    paths relative to the scenes file's folder."""
    with open(scenes_json, encoding="utf-8") as f:
        scenes = json.load(f)
    prefix = os.path.join(split, "vqav2", "images") if split else os.path.join("vqav2", "images")
    out = []
    for path in sorted(p for p in scenes if p.startswith(prefix + os.sep)):
        for o in scenes[path]["objects"]:
            q, _ = lookup_question("color", o, scenes[path]["objects"])
            out.append({"image": path, "prompt": f"{IMAGE_TOKEN}\n{q}{VQA_SUFFIX}",
                        "object_patches": [o["row"] * GRID + o["col"]]})
    return out[:limit] if limit else out


def vqa_question(rng, scene):
    """-> (question, answer, question_type, answer_type) about one scene."""
    objs = scene["objects"]
    kind = rng.choice(["color", "shape", "count", "count_color", "exist", "size", "where"])
    o = rng.choice(objs)
    if kind == "color":
        return *lookup_question("color", o, objs), "what color is the", "other"
    if kind == "shape":
        qa = lookup_question("shape", o, objs)
        if qa is not None:
            return *qa, "what", "other"
        kind = "size"
    if kind == "size":
        return *lookup_question("size", o, objs), "what", "other"
    if kind == "count":
        return *count_question(scene), "how many", "number"
    if kind == "count_color":
        return *count_question(scene, rng.choice(list(COLORS))), "how many", "number"
    if kind == "exist":
        np_ = describe(rng, o, p_color=1.0, p_size=0.3)
        if rng.random() < 0.5:  # a false one: change colour or shape
            np_ = dict(np_, color=rng.choice([c for c in COLORS if c != o["color"]]))
        ans = "yes" if not _matches_none(scene, np_) else "no"
        return f"Is there {np_text(np_)}?", ans, "is there a", "yes/no"
    a, b = rng.sample(objs, 2)  # where: a yes/no spatial question with an unambiguous answer
    return *relation_question(rng, a, b), "is the", "yes/no"


def count_question(scene, color=None):
    """"How many objects are there?", or of one colour -> (question, the count as a digit)."""
    if color is None:
        return "How many objects are there?", str(len(scene["objects"]))
    return f"How many {color} objects are there?", str(sum(p["color"] == color for p in scene["objects"]))


def relation_question(rng, a, b):
    """"Is the <a> <relation> the <b>?" for a relation that holds one way or the other between the two
    objects (so "no" means the reverse holds) -> (question, "yes" | "no")."""
    r = rng.choice([r for r in RELATIONS if rel_holds(r, a, b) or rel_holds(r, b, a)])
    return f"Is the {a['shape']} {RELATIONS[r].replace('is ', '', 1)} the {b['shape']}?", \
        "yes" if rel_holds(r, a, b) else "no"


SIDES = {"triangle": 3, "square": 4, "diamond": 4, "circle": 0, "cross": 12}


def text_question(rng):
    if rng.random() < 0.5:
        s = rng.choice(SHAPES)
        return f"How many corners does a {s} have?", str(SIDES[s])
    x, y = rng.randrange(6), rng.randrange(5)
    return f"What is {x} plus {y}?", str(x + y)


ANSWER_VARIANTS = {str(i): [w, f"{i}."] for i, w in enumerate(NUMBER_WORDS)}
ANSWER_VARIANTS.update({"yes": ["Yes", "yes."], "no": ["No", "no."]})


def vqa_answers(rng, answer, answer_type):
    """10 human answers: a majority of the correct one, some variants that normalise to it
    ("two", "Yes"), and at most two wrong ones."""
    n_wrong = rng.choice([0, 0, 1, 2])
    n_var = rng.choice([0, 1, 2])
    variants = ANSWER_VARIANTS.get(answer, [answer.capitalize(), answer + "."])
    pool = {"number": [str(i) for i in range(5)], "yes/no": ["yes", "no"]}.get(answer_type, list(COLORS) + SHAPES + list(SIZES))
    wrong = [a for a in pool if a != answer]
    out = [answer] * (10 - n_wrong - n_var) + [rng.choice(variants) for _ in range(n_var)] + \
          [rng.choice(wrong) for _ in range(n_wrong)]
    rng.shuffle(out)
    return [{"answer": a, "answer_confidence": rng.choice(["yes"] * 4 + ["maybe"]), "answer_id": j + 1}
            for j, a in enumerate(out)]

# -----------------------------------------------------------------------------
# Writing the data set


def choice_sample(sid: str, image: str, subset: str, pair, pos_first: bool) -> dict:
    """One 2-choice compositional training sample in the paper's SugarCrepe prompt (docs/method.md section 6):
    `pair` = (true clauses, hard-negative clauses) from hard_negative; the answer is the true caption's letter."""
    pos, neg = clause_text(pair[0]), clause_text(pair[1])
    a, b = (pos, neg) if pos_first else (neg, pos)
    return {"id": sid, "image": image, "task": "compositional", "subset": subset,
            "caption": pos, "negative_caption": neg,  # SugarCrepe's field names
            "conversations": [{"from": "human", "value": SUGARCREPE_PROMPT.format(a=a, b=b)},
                              {"from": "gpt", "value": "A" if pos_first else "B"}]}


def _dump(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def _fresh_scenes(rng, n, taken, n_objects=(2, 3)):
    """n scenes whose keys are not in `taken` (updated), so splits never share a scene."""
    out = []
    while len(out) < n:
        s = random_scene(rng, n_objects)
        if scene_key(s) not in taken:
            taken.add(scene_key(s))
            out.append(s)
    return out


def write_benchmarks(out_dir, split, rng, taken, n_sugarcrepe, n_vqa, scenes, id_base):
    """SugarCrepe (7 subsets, n_sugarcrepe items each, one image per item) and VQAv2 (n_vqa
    questions, up to 3 per image) in the official layouts under out_dir/split. scenes gets
    {image path relative to out_dir: scene}."""
    root, image_id = os.path.join(out_dir, split), id_base
    for subset in SUGARCREPE_SUBSETS:
        items = {}
        while len(items) < n_sugarcrepe:
            scene = _fresh_scenes(rng, 1, taken)[0]
            pair = hard_negative(rng, scene, subset)
            if pair is None:
                taken.discard(scene_key(scene))
                continue
            fn = SUGARCREPE_IMAGE_PATTERN.format(image_id=image_id)
            image_id += 1
            scenes[os.path.join(split, "sugarcrepe", "images", fn)] = scene
            items[str(len(items))] = {"filename": fn, "caption": clause_text(pair[0]),
                                      "negative_caption": clause_text(pair[1])}
        _dump(items, os.path.join(root, "sugarcrepe", f"{subset}.json"))
    questions, annotations = [], []
    while len(questions) < n_vqa:
        scene = _fresh_scenes(rng, 1, taken)[0]
        scenes[os.path.join(split, "vqav2", "images", VQAV2_IMAGE_PATTERN.format(image_id=image_id))] = scene
        asked = set()
        for k in range(min(3, n_vqa - len(questions))):
            q, a, qtype, atype = vqa_question(rng, scene)
            if q in asked:
                continue
            asked.add(q)
            qid = image_id * 10 + k
            questions.append({"image_id": image_id, "question": q, "question_id": qid})
            annotations.append({"question_id": qid, "image_id": image_id, "question_type": qtype,
                                "answer_type": atype, "multiple_choice_answer": a,
                                "answers": vqa_answers(rng, a, atype)})
        image_id += 1
    _dump({"task_type": "OpenEnded", "data_type": "mscoco", "data_subtype": "val2014", "questions": questions},
          os.path.join(root, "vqav2", "questions.json"))
    _dump({"data_type": "mscoco", "data_subtype": "val2014", "annotations": annotations},
          os.path.join(root, "vqav2", "annotations.json"))


def synthesize(out_dir, seed=0, n_pretrain=4000, n_instruct=8000, n_images=None, n_sugarcrepe=100,
               n_vqa=300, n_val_sugarcrepe=40, n_val_vqa=120, text_frac=0.04, multi_turn_frac=0.3,
               tokenizer=True, vocab_size=1024, progress=True):
    """Write the shapes world (see the module docstring) to out_dir; deterministic per seed.
    The held-out benchmark is drawn first from its own stream, then val, then training, each
    split rejecting scenes already taken, so the benchmark does not depend on the training sizes."""
    n_images = n_images or max(n_pretrain, 1)
    taken, scenes = set(), {}  # scenes: relative image path -> scene (written to scenes.json)
    # 1) held-out benchmark, then the validation benchmark (own RNG streams, distinct image ids)
    write_benchmarks(out_dir, "", random.Random(f"{seed}-test"), taken, n_sugarcrepe, n_vqa, scenes, 10 ** 6)
    write_benchmarks(out_dir, "val", random.Random(f"{seed}-val"), taken, n_val_sugarcrepe, n_val_vqa, scenes, 2 * 10 ** 6)
    # 2) training scenes and images
    rng = random.Random(f"{seed}-train")
    train = _fresh_scenes(rng, n_images, taken)
    names = [f"images/train_{i:06d}.png" for i in range(n_images)]
    scenes.update(zip(names, train))
    # 3) pretrain captions: every object with all attributes, plus one true relation
    pretrain = []
    for i in range(n_pretrain):
        k = i % n_images
        sc = train[k]
        objs = rng.sample(sc["objects"], len(sc["objects"]))
        cap = [{"kind": "and", "nps": [full_np(o) for o in objs]}, _pos_rel(rng, sc)[0]]
        assert caption_is_true(sc, cap)
        pretrain.append({"id": f"pretrain_{i:06d}", "image": names[k], "task": "caption",
                         "conversations": [{"from": "human", "value": CAPTION_PROMPT},
                                           {"from": "gpt", "value": caption_text(cap)}]})
    # 4) instruction mix: recognition VQA (some multi-turn), compositional A/B, text-only
    instruct, order = [], {s: 0 for s in SUGARCREPE_SUBSETS}
    for i in range(n_instruct):
        sid, u = f"instruct_{i:06d}", rng.random()
        if u < text_frac:
            q, a = text_question(rng)
            instruct.append({"id": sid, "task": "text", "conversations": [
                {"from": "human", "value": q + VQA_SUFFIX}, {"from": "gpt", "value": a}]})
            continue
        k = rng.randrange(n_images)
        sc = train[k]
        if u < text_frac + (1 - text_frac) / 2:
            conv, asked = [], set()
            for t in range(rng.choice([2, 3]) if rng.random() < multi_turn_frac else 1):
                q, a, _, _ = vqa_question(rng, sc)
                if q in asked:
                    continue
                asked.add(q)
                conv += [{"from": "human", "value": ("<image>\n" if not conv else "") + q + VQA_SUFFIX},
                         {"from": "gpt", "value": a}]
            instruct.append({"id": sid, "image": names[k], "task": "recognition", "conversations": conv})
        else:
            subset = rng.choice(SUGARCREPE_SUBSETS)
            pair = None
            while pair is None:
                pair = hard_negative(rng, sc, subset)
                if pair is None:
                    k = rng.randrange(n_images)
                    sc = train[k]
            pos_first = order[subset] % 2 == 0  # both orders balanced within each subset
            order[subset] += 1
            instruct.append(choice_sample(sid, names[k], subset, pair, pos_first))
    _dump(pretrain, os.path.join(out_dir, "pretrain.json"))
    _dump(instruct, os.path.join(out_dir, "instruct.json"))
    _dump(scenes, os.path.join(out_dir, "scenes.json"))
    # 5) images
    for path, sc in tqdm(sorted(scenes.items()), desc="images", disable=not progress):
        full = os.path.join(out_dir, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        draw_scene(sc).save(full, format="PNG")
    # 6) tokenizer trained on the training text plus the whole world vocabulary
    if tokenizer:
        train_tokenizer(tokenizer_corpus(pretrain + instruct), os.path.join(out_dir, "tokenizer"), vocab_size)
    return out_dir


# -----------------------------------------------------------------------------
# The text world: every scene in words, the image world's tasks with the scene text where "<image>" is
# (issue #16). The LMs learn to reason about scenes in language before they see an image, as the paper's
# pretrained LLMs already do (docs/method.md section 1: the student starts from a pretrained LLM).


def object_token(o):
    """The scene-token text world's object unit: one token for everything the object's patch shows,
    e.g. "[small red circle]" (SCENE_TOKENS)."""
    return f"[{o['size']} {o['color']} {o['shape']}]"


def position_token(o):
    """Its cell, as one token keyed by the shape (shapes are distinct in a scene, so the shape names the
    object): "[circle at 1 2]", row then column, 1-4 top to bottom and left to right."""
    return f"[{o['shape']} at {o['row'] + 1} {o['col'] + 1}]"


# Every object and position token: added to a tokenizer (train_tokenizer's extra_tokens) they are single
# tokens, so nothing has to be bound across tokens (docs/design-log.md section 10: binding across neighbouring tokens
# is what the tiny LMs do not learn in their budget).
SCENE_TOKENS = [object_token({"size": si, "color": c, "shape": sh}) for sh in SHAPES for c in COLORS for si in SIZES] + \
    [position_token({"shape": sh, "row": r, "col": k}) for sh in SHAPES for r in range(GRID) for k in range(GRID)]


def scene_text(scene, tokens=False):
    """The scene in words, everything its image shows: one noun phrase with every attribute per object,
    followed by its row and column (1-4, top to bottom and left to right), objects in row-major order (the
    order of the vision patches), e.g. "a small red circle 1 2; a large blue square 3 1." Every relation of
    a caption follows from the rows and columns (rel_holds); the background, which no caption or question
    mentions, is left out. Only words the world's tokenizer already has (world_texts).
    tokens=True: the same in SCENE_TOKENS, an object token and its position token per object,
    "[small red circle][circle at 1 2]; [large blue square][square at 3 1]." (needs a tokenizer that has them)."""
    objs = sorted(scene["objects"], key=lambda o: (o["row"], o["col"]))
    if tokens:
        return "; ".join(object_token(o) + position_token(o) for o in objs) + "."
    return "; ".join(f"{np_text(full_np(o))} {o['row'] + 1} {o['col'] + 1}" for o in objs) + "."


def parse_scene_tokens(text):
    """Inverse of scene_text(scene, tokens=True) -> {"objects": [...]} (raises ValueError on other text)."""
    objects = []
    for part in text.removesuffix(".").split("; "):
        head, sep, pos = part.partition("][")
        obj, where = head.removeprefix("[").split(), pos.removesuffix("]").split()
        if not sep or len(obj) != 3 or len(where) != 4 or where[0] != obj[2] or where[1] != "at":
            raise ValueError(f"not an object and its position token: {part!r}")
        objects.append({"shape": obj[2], "color": obj[1], "size": obj[0], "row": int(where[2]) - 1,
                        "col": int(where[3]) - 1})
    return {"objects": objects}


def with_scene(prompt, scene, tokens=False):
    """An image-world prompt with the scene text where "<image>" is."""
    if IMAGE_TOKEN not in prompt:
        raise ValueError(f"no {IMAGE_TOKEN!r} in {prompt!r}")
    return prompt.replace(IMAGE_TOKEN, scene_text(scene, tokens), 1)


TEXT_TASKS = ("describe", "lookup", "where", "verify", "choice")  # every task text_world knows
WORDS_TEXT_TASKS = ("describe", "lookup", "verify", "choice")  # the demo's student LM (scene in words)


def _text_describe(rng, sid, scene, tokens=False):
    """Dense supervision, every answer token: the image world's caption of the scene (its pretraining
    caption, CAPTION_PROMPT: every object with all its attributes, in a random order, then one true relation)
    from the scene text. Naming each object's colour after its size, and its shape after both, is binding."""
    objs = rng.sample(scene["objects"], len(scene["objects"]))
    cap = [{"kind": "and", "nps": [full_np(o) for o in objs]}, _pos_rel(rng, scene)[0]]
    return {"id": sid, "task": "text_describe", "scene_text": scene_text(scene, tokens), "conversations": [
        {"from": "human", "value": with_scene(CAPTION_PROMPT, scene, tokens)}, {"from": "gpt", "value": caption_text(cap)}]}


def _text_lookup(rng, sid, scene, tokens=False):
    """Dense one-hop supervision, one conversation a scene: colour and size of every object by its shape,
    the shape of every object whose colour is unique, a yes/no relation question for every ordered pair,
    the counts and an existence question (the VQA question types, shapes.vqa_question's wording), shuffled;
    the scene text opens the first turn."""
    objs = scene["objects"]
    qa = [lookup_question(kind, o, objs) for kind in ("color", "size", "shape") for o in objs]
    qa = [x for x in qa if x is not None]
    for a, b in itertools.permutations(objs, 2):
        qa.append(relation_question(rng, a, b))
    for _ in range(2):
        qa.append(vqa_question(rng, scene)[:2])
    return _qa_conversation(rng, sid, "text_lookup", scene, qa, tokens)


def _qa_conversation(rng, sid, task, scene, qa, tokens):
    """One conversation of (question, answer) turns in the VQA prompt, shuffled, repeats dropped; the scene
    text opens the first turn."""
    rng.shuffle(qa)
    text, conv, asked = scene_text(scene, tokens), [], set()
    for q, a in qa:
        if q in asked:
            continue
        asked.add(q)
        conv += [{"from": "human", "value": (text + "\n" if not conv else "") + q + VQA_SUFFIX},
                 {"from": "gpt", "value": a}]
    return {"id": sid, "task": task, "scene_text": text, "conversations": conv}


def where_questions(o):
    """"What row / column is the <shape> in?" -> the digit, 1-4 (top to bottom, left to right): the one-hop
    position lookups, the dense supervision under every relation (a relation compares two of these)."""
    return [(f"What row is the {o['shape']} in?", str(o["row"] + 1)),
            (f"What column is the {o['shape']} in?", str(o["col"] + 1))]


def _text_where(rng, sid, scene, tokens=False):
    """Dense one-hop position supervision, one conversation a scene: row and column of every object."""
    return _qa_conversation(rng, sid, "text_where", scene, [x for o in scene["objects"] for x in where_questions(o)],
                            tokens)


def _text_verify(rng, sid, scene, n_kinds=3, tokens=False):
    """Caption verification (evaluate.MATCH_PROMPT, yes/no), one conversation a scene: for `n_kinds` random
    SugarCrepe kinds the scene allows, the true caption and its hard negative, shuffled."""
    turns = []
    for subset in rng.sample(SUGARCREPE_SUBSETS, len(SUGARCREPE_SUBSETS))[:n_kinds]:
        pair = hard_negative(rng, scene, subset)
        if pair is not None:
            turns += [(clause_text(pair[0]), "yes"), (clause_text(pair[1]), "no")]
    rng.shuffle(turns)
    conv = []
    for cap, a in turns:
        prompt = E.MATCH_PROMPT.format(caption=cap)
        conv += [{"from": "human", "value": with_scene(prompt, scene, tokens) if not conv else
                  prompt.replace(IMAGE_TOKEN + "\n", "")}, {"from": "gpt", "value": a}]
    return {"id": sid, "task": "text_verify", "scene_text": scene_text(scene, tokens), "conversations": conv}


def _wrong_value(rng, o, att, objs):
    """A value of `att` that `o` does not have: half the time (when there is one) another object's value, so
    that a check must bind the value to `o` (the swap_att kind of error), else any other value."""
    others = [p[att] for p in objs if p[att] != o[att]]
    if others and rng.random() < 0.5:
        return rng.choice(others)
    return rng.choice([v for v in {"color": list(COLORS), "size": list(SIZES), "shape": SHAPES}[att] if v != o[att]])


def attribute_question(rng, o, objs):
    """"Is the <shape> <colour | size>?" -> (question, "yes" | "no"), true half the time (the wrong value is
    _wrong_value's): one object's attribute checked against a word of the question, the step every *_att
    caption needs."""
    att = "color" if rng.random() < 0.7 else "size"
    value = o[att] if rng.random() < 0.5 else _wrong_value(rng, o, att, objs)
    return f"Is the {o['shape']} {value}?", "yes" if value == o[att] else "no"


def noun_phrase_question(rng, scene):
    """"Is there <noun phrase>?" with a caption's noun phrase (describe: the words before the shape, as in
    every caption), false about half the time (its colour, size or shape changed, _wrong_value) -> (question,
    "yes" | "no"). Matching a caption's noun phrase against the scene is what add_att, replace_att and swap_att
    ask; a wrong value taken from another object is what only binding rejects."""
    o = rng.choice(scene["objects"])
    np_ = describe(rng, o)
    if rng.random() < 0.5:
        att = rng.choices(["color", "size", "shape"], [0.6, 0.2, 0.2])[0]
        np_[att] = _wrong_value(rng, o, att, scene["objects"])
    return f"Is there {np_text(np_)}?", "no" if _matches_none(scene, np_) else "yes"


# The tasks of text_questions, each one question about one scene: the one-hop lookups, the row / column
# lookups, a relation yes/no, the two noun-phrase checks above, a count (the VQA questions' wording), a caption
# verification (evaluate.MATCH_PROMPT) and a 2-choice question in the official SugarCrepe prompt.
QUESTION_TASKS = ("lookup", "where", "relation", "attribute", "exist", "count", "verify", "choice")


def text_question_sample(rng, sid, scene, task, tokens=True, subsets=SUGARCREPE_SUBSETS):
    """One training conversation, one question about `scene` for `task` (QUESTION_TASKS), the scene text
    first (with_scene); None when the scene does not allow the task (a hard negative of the drawn kind).
    `subsets`: the hard-negative kinds that "verify" and "choice" draw from."""
    objs = scene["objects"]
    o = rng.choice(objs)
    if task == "lookup":
        qa = lookup_question(rng.choice(["color", "size", "shape"]), o, objs) or lookup_question("color", o, objs)
    elif task == "where":
        qa = rng.choice(where_questions(o))
    elif task == "relation":
        qa = relation_question(rng, *rng.sample(objs, 2))
    elif task == "attribute":
        qa = attribute_question(rng, o, objs)
    elif task == "exist":
        qa = noun_phrase_question(rng, scene)
    elif task == "count":
        qa = count_question(scene, rng.choice(list(COLORS)) if rng.random() < 0.5 else None)
    elif task in ("verify", "choice"):
        subset = rng.choice(subsets)
        pair = hard_negative(rng, scene, subset)
        if pair is None:
            return None
        if task == "choice":
            return text_choice_sample(sid, scene, subset, pair, rng.random() < 0.5, tokens)
        # "Yes" / "No", capitalised: the match score (evaluate.match_request, SugarCrepe's own protocol) reads
        # log P("Yes") on this prompt, as for LLaVA models (the VQA answers stay lowercase, VQAv2's format)
        true = rng.random() < 0.5
        prompt = with_scene(E.MATCH_PROMPT.format(caption=clause_text(pair[0 if true else 1])), scene, tokens)
        return {"id": sid, "task": "text_verify", "subset": subset, "scene_text": scene_text(scene, tokens),
                "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "Yes" if true else "No"}]}
    else:
        raise ValueError(f"unknown text-question task {task!r}; known: {QUESTION_TASKS}")
    return _qa_conversation(rng, sid, f"text_{task}", scene, [qa], tokens)


def _check_question_tasks(tasks):
    unknown = set(tasks) - set(QUESTION_TASKS)
    if unknown:
        raise ValueError(f"unknown text-question tasks {sorted(unknown)}; known: {QUESTION_TASKS}")


def text_questions(n, seed=0, tasks=QUESTION_TASKS, exclude=(), tokens=True, subsets=SUGARCREPE_SUBSETS):
    """n training samples of the text world, each ONE question (text_question_sample, its task drawn uniformly
    from `tasks`) about its own newly drawn scene, none of them a scene in `exclude`. docs/design-log.md section 12:
    with a new scene per question (nothing to memorise) and enough steps, both presets learn the 2-choice
    comparisons of attributes and objects that they never learnt from a few passes over one conversation per
    scene. Relations: the yes / no relation questions are learnt (docs/design-log.md section 13), the captions that need
    a relation (swap_obj, replace_rel) not yet. `subsets`: the hard-negative kinds of "verify" and "choice"."""
    return [s for _, s in itertools.islice(text_question_stream(seed, tasks, exclude, tokens, subsets), n)]


def text_question_stream(seed=0, tasks=QUESTION_TASKS, exclude=(), tokens=True, subsets=SUGARCREPE_SUBSETS):
    """text_questions one sample at a time, without end: (scene, sample) pairs, the first n samples being
    text_questions(n, ...)'s. So the scenes a long text-world phase was trained on can be replayed without
    holding its samples (the verdict's held-out benchmark excludes them, verdict.seen_scenes)."""
    _check_question_tasks(tasks)
    if not subsets or set(subsets) - set(SUGARCREPE_SUBSETS):
        raise ValueError(f"subsets must be SugarCrepe subsets {SUGARCREPE_SUBSETS}, got {subsets}")

    def stream(rng, exclude):
        k = 0
        while True:
            scene = random_scene(rng)
            if scene_key(scene) in exclude:
                continue
            s = text_question_sample(rng, f"text_q_{k:07d}", scene, rng.choice(tasks), tokens, subsets)
            if s is not None:
                k += 1
                yield scene, s
    return stream(random.Random(f"{seed}-text-questions"), set(exclude))


def image_questions(scenes, n, seed=0, tasks=QUESTION_TASKS):
    """text_questions on images: n training samples, each ONE question (text_question_sample) about an image
    drawn uniformly from `scenes` ({image path: scene}, e.g. the image world's training images), "<image>"
    where the scene text was. The same questions, prompts and answers as the text world, so an LM pre-trained
    on it (SCENE_TOKEN_TEXT in demo.py) has only to learn to read the scene from the visual tokens."""
    _check_question_tasks(tasks)
    if not scenes:
        raise ValueError("image_questions: no scenes to ask about")
    rng, names, out = random.Random(f"{seed}-image-questions"), sorted(scenes), []
    while len(out) < n:
        name = rng.choice(names)
        s = text_question_sample(rng, f"image_q_{len(out):07d}", scenes[name], rng.choice(tasks), tokens=True)
        if s is not None:
            out.append(_on_image(s, name))
    return out


def _on_image(s, name):
    """A text-world sample about the image `name`: "<image>" where the scene text opens the first turn."""
    text = s.pop("scene_text")
    first = s["conversations"][0]["value"]
    if not first.startswith(text):
        raise AssertionError(f"the scene text does not open {s['id']}: {first[:80]!r}")
    s["conversations"][0] = {"from": "human", "value": IMAGE_TOKEN + first[len(text):]}
    return dict(s, image=name, task=s["task"].removeprefix("text_"))


RELATION_SUBSETS = ("swap_obj", "replace_rel")  # the hard negatives that only a relation between two objects rejects


def fresh_image_questions(images, n, seed, tasks=QUESTION_TASKS, relation_captions=0.0):
    """n training samples, each ONE question about an image drawn uniformly from `images` (a list of (path,
    scene), e.g. newly drawn scenes): with probability `relation_captions` a caption verification or 2-choice
    question whose hard negative is a relation one (RELATION_SUBSETS), else a task drawn uniformly from
    `tasks` (text_question_sample). docs/design-log.md section 18: the image teacher, which answered the relation
    questions, learnt the relation captions at 0.3 (36% of samples with the tasks' own draws) in 4,000 steps,
    and not at the tasks' own share (about 8%) in 3,000 (section 17); which of the two changes mattered was not
    separated. `seed`: any random.Random seed (int or str)."""
    _check_question_tasks(tasks)
    if not images or not 0.0 <= relation_captions <= 1.0:
        raise ValueError(f"fresh_image_questions: need images and 0 <= relation_captions <= 1, got "
                         f"{len(images)} images, {relation_captions}")
    rng, out = random.Random(seed), []
    while len(out) < n:
        name, scene = images[rng.randrange(len(images))]
        if rng.random() < relation_captions:
            s = text_question_sample(rng, f"fresh_q_{len(out):07d}", scene, rng.choice(["verify", "choice"]),
                                     tokens=True, subsets=list(RELATION_SUBSETS))
        else:
            s = text_question_sample(rng, f"fresh_q_{len(out):07d}", scene, rng.choice(tasks), tokens=True)
        if s is not None:
            out.append(_on_image(s, name))
    return out


def text_choice_sample(sid, scene, subset, pair, pos_first, tokens=False):
    """choice_sample with the scene text where the image is (no "image" key)."""
    s = choice_sample(sid, None, subset, pair, pos_first)
    del s["image"]
    s["conversations"][0]["value"] = with_scene(s["conversations"][0]["value"], scene, tokens)
    return dict(s, task="text_compositional", scene_text=scene_text(scene, tokens))


def text_vqa_sample(sid, scene, rng, tokens=False):
    """One VQA question (vqa_question) on the scene text, with the 10 answers of the VQAv2 layout."""
    q, a, qtype, atype = vqa_question(rng, scene)
    return {"id": sid, "task": "text_vqa", "scene_text": scene_text(scene, tokens), "question": q,
            "question_type": qtype, "answer_type": atype, "answers": [x["answer"] for x in vqa_answers(rng, a, atype)],
            "conversations": [{"from": "human", "value": scene_text(scene, tokens) + "\n" + q + VQA_SUFFIX},
                              {"from": "gpt", "value": a}]}


def text_world(n_train=6000, n_val=150, seed=0, exclude=(), tasks=WORDS_TEXT_TASKS, choices_per_scene=2,
               train_objects=(2, 3), tokens=False):
    """The text world (issue #16): -> {"train": [...], "val": [...]} LLaVA-format samples without images,
    the scene text (scene_text) where "<image>" would be. Scenes are fresh (their own RNG stream), distinct
    from each other and from every scene key in `exclude` (the image world's scenes, scenes.json), so no
    benchmark or validation scene is ever described in text. Per training scene, the tasks in `tasks`:
      "describe" the image world's full caption of the scene, every token supervised (_text_describe);
      "lookup"  one dense conversation of one-hop questions (_text_lookup);
      "where"   one conversation of row / column questions, every object (_text_where);
      "verify"  one conversation of yes/no caption verifications, all seven hard-negative kinds (_text_verify);
      "choice"  `choices_per_scene` 2-choice questions in the official SugarCrepe prompt, subsets and answer
                letters balanced (text_choice_sample).
    Validation, on n_val other scenes per subset: one 2-choice item per scene and subset ("text_compositional",
    with caption / negative_caption / subset as in SugarCrepe; evaluate both orders) and one VQA question per
    scene ("text_vqa", question_type and 10 answers as in the VQAv2 layout). tokens=True: every scene text in
    SCENE_TOKENS (scene_text). The validation split depends on seed, n_val and exclude only (not on the tasks)."""
    unknown = set(tasks) - set(TEXT_TASKS)
    if unknown:
        raise ValueError(f"unknown text-world tasks {sorted(unknown)}; known: {TEXT_TASKS}")
    taken = set(exclude)
    rng = random.Random(f"{seed}-text-val")
    val = []
    for subset in SUGARCREPE_SUBSETS:
        while sum(x["subset"] == subset for x in val) < n_val:
            scene = _fresh_scenes(rng, 1, taken)[0]
            pair = hard_negative(rng, scene, subset)
            if pair is not None:
                val.append(text_choice_sample(f"text_val_cr_{len(val):06d}", scene, subset, pair, True, tokens))
    for i, scene in enumerate(_fresh_scenes(rng, 7 * n_val, taken)):
        val.append(text_vqa_sample(f"text_val_vqa_{i:06d}", scene, rng, tokens))
    rng = random.Random(f"{seed}-text-train")
    train, k = [], 0
    for i, scene in enumerate(_fresh_scenes(rng, n_train, taken, train_objects)):
        if "describe" in tasks:
            train.append(_text_describe(rng, f"text_describe_{i:06d}", scene, tokens))
        if "lookup" in tasks:
            train.append(_text_lookup(rng, f"text_lookup_{i:06d}", scene, tokens))
        if "where" in tasks:
            train.append(_text_where(rng, f"text_where_{i:06d}", scene, tokens))
        if "verify" in tasks:
            train.append(_text_verify(rng, f"text_verify_{i:06d}", scene, tokens=tokens))
        if "choice" in tasks:
            for _ in range(choices_per_scene):
                pair = None
                while pair is None:
                    subset = SUGARCREPE_SUBSETS[k % len(SUGARCREPE_SUBSETS)]
                    pair = hard_negative(rng, scene, subset)
                    k += 1
                train.append(text_choice_sample(f"text_choice_{len(train):06d}", scene, subset, pair,
                                                pos_first=(k // len(SUGARCREPE_SUBSETS)) % 2 == 0, tokens=tokens))
    rng.shuffle(train)
    return {"train": train, "val": val}


def world_texts():
    """Every word and fixed prompt the world can produce (so a tokenizer covers them)."""
    words = SHAPES + list(COLORS) + list(SIZES) + NUMBER_WORDS + [str(i) for i in range(20)] + \
        ["a", "an", "and", "yes", "no", "A", "B", "Yes", "No"] + [p for p in RELATIONS.values()]
    return [" ".join(words), SUGARCREPE_PROMPT, VQA_SUFFIX, CAPTION_PROMPT, "system user assistant"]


def world_vocabulary_corpus(n_scenes=200, seed=0):
    """A corpus (list of str) shaped like the world's text, generated in memory without writing files:
    captions, recognition questions and answers, compositional prompts, text-only questions.
    train_tokenizer on it gives a tokenizer where every world word is one token."""
    rng = random.Random(f"{seed}-vocabulary")
    texts = world_texts()
    for _ in range(n_scenes):
        sc = random_scene(rng)
        texts.append(caption_text([{"kind": "and", "nps": [full_np(o) for o in sc["objects"]]}, _pos_rel(rng, sc)[0]]))
        q, a, _, _ = vqa_question(rng, sc)
        texts += ["<image>\n" + q + VQA_SUFFIX, a, " ".join(text_question(rng))]
        pair = hard_negative(rng, sc, rng.choice(SUGARCREPE_SUBSETS))
        if pair:
            texts.append(SUGARCREPE_PROMPT.format(a=clause_text(pair[0]), b=clause_text(pair[1])))
    return texts


def tokenizer_corpus(samples):
    """world_vocabulary_corpus() plus every turn of the given LLaVA samples."""
    texts = world_vocabulary_corpus()
    for s in samples:
        texts += [t["value"] for t in s["conversations"]]
    return texts


# -----------------------------------------------------------------------------
# CLI


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write the synthetic shapes world (module docstring): "
                                 "`python shapes.py --out DIR --seed S`")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    for name, default in [("n-pretrain", 4000), ("n-instruct", 8000), ("n-images", None), ("n-sugarcrepe", 100),
                          ("n-vqa", 300), ("n-val-sugarcrepe", 40), ("n-val-vqa", 120), ("vocab-size", 1024)]:
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--no-tokenizer", action="store_true")
    ap.add_argument("--tokenizer-for", nargs="+", metavar="JSON", help="instead of the world: train a tokenizer "
                    "on these LLaVA JSON files plus the world's vocabulary, saved to --out")
    args = ap.parse_args(argv)
    if args.tokenizer_for:
        samples = [s for path in args.tokenizer_for for s in data.load_llava_json(path)]
        train_tokenizer(tokenizer_corpus(samples), args.out, args.vocab_size)
        print(f"wrote a tokenizer to {args.out}")
        return
    synthesize(args.out, args.seed, n_pretrain=args.n_pretrain, n_instruct=args.n_instruct,
               n_images=args.n_images, n_sugarcrepe=args.n_sugarcrepe, n_vqa=args.n_vqa,
               n_val_sugarcrepe=args.n_val_sugarcrepe, n_val_vqa=args.n_val_vqa,
               tokenizer=not args.no_tokenizer, vocab_size=args.vocab_size)
    print(f"wrote the shapes world (seed {args.seed}) to {args.out}")


if __name__ == "__main__":
    main()
