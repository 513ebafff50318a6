"""Evaluation of a compodistill MLLM: compositional reasoning (CR) and VQA (docs/method.md section 6).

Layouts and metric definitions: docs/benchmarks.md (cited below by its section numbers), with the
official evaluators named there. The file reads top to bottom:

  1. shared helpers: prompts, image references, clear errors on malformed files
  2. CR:  SugarCrepe, Winoground, BiVLC, SADE
  3. VQA: answer normalisation, VQAv2, GQA, TextVQA, VizWiz, MME
  4. reports (results JSON + markdown table)
  5. glue: `make_model_fns` binds a saved model to the two callables below
  6. CLI: `python evaluate.py cr | vqa ...`

The attention study (the misalignment analysis of docs/method.md section 7, heat maps and per-layer attention
profiles) is attention.py's: it builds on the readers, prompts and metrics here; this file imports nothing of it.

Every reader, protocol and metric is a pure function over two callables, so the tests drive them
with stubs and the glue is the only code that touches a model:

  generate_fn(requests) -> list[str]    greedy answer per request
  score_fn(requests)    -> list[float]  log P(first answer token == "Yes" | request)

A request is {"image": ref | None, "prompt": str}. `prompt` is the user turn; it starts with
"<image>\n" when there is an image. `ref` is a PIL.Image, a file path or encoded image bytes; the glue
opens it with `open_image` one batch at a time, so a 15k-request benchmark never holds 15k decoded
images in memory.

The match score s(caption, image) used by Winoground, BiVLC (image and group scores) and SADE is
defined once, in `match_request`: score_fn on the prompt
    "<image>\nDoes this image show '{caption}'? Answer yes or no."
i.e. the log-probability that the answer's first token is "Yes" (a P(Yes)-style VQAScore).
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import statistics
import sys

# -----------------------------------------------------------------------------
# 1. Shared helpers

VQA_INSTRUCTION = "Answer the question using a single word or phrase."  # LLaVA-1.5 short-answer prompt
CHOICE_PROMPT = ("<image>\nWhich caption best describes the image?\n(A) {a}\n (B) {b}\n"
                 "Answer with the option's alphabet from the given choices directly.")  # docs/benchmarks.md section 1 (note " (B)")
MATCH_PROMPT = "<image>\nDoes this image show '{caption}'? Answer yes or no."


def open_image(ref):
    """A request's image reference -> RGB PIL.Image (None stays None). Accepts a PIL.Image, a path, raw
    encoded bytes, or an HF-datasets image cell {"bytes": ..., "path": ...}."""
    from PIL import Image
    if ref is None:
        return None
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, dict):
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (bytes, bytearray)):
        return Image.open(io.BytesIO(ref)).convert("RGB")
    with Image.open(ref) as im:
        return im.convert("RGB")


def load_json(path):
    """json.load with an error that names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e})") from None


def load_jsonl(path):
    """One JSON object per non-empty line; errors name the file and line number."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {n} is not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e})") from None
    return rows


def field(record, key, path, rid):
    """record[key], or a ValueError naming the file, the record and the missing field."""
    if not isinstance(record, dict):
        raise ValueError(f"{path}: record {rid}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"{path}: record {rid}: missing field '{key}'")
    return record[key]


def text_field(record, key, path, rid):
    """record[key] that must be a string (answers, questions): an int or a list is an error naming the record."""
    value = field(record, key, path, rid)
    if not isinstance(value, str):
        raise ValueError(f"{path}: record {rid}: field '{key}' must be a string, got {type(value).__name__} {value!r:.40}")
    return value


def unique_ids(ids, path):
    """A question id twice would be scored twice (or, in annotations, silently keep the last): an error."""
    seen = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"{path}: question_id {i} occurs twice")
        seen.add(i)


def image_file(image_path, path, rid):
    """Check an image exists; the error names the annotation file, the record and the image path."""
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"{path}: record {rid}: image not found: {image_path}")
    return image_path


def ten_answers(answers, path, rid):
    """VQAv2 / TextVQA / VizWiz all have exactly 10 human answers per question."""
    if not isinstance(answers, list) or len(answers) != 10:
        n = len(answers) if isinstance(answers, list) else type(answers).__name__
        raise ValueError(f"{path}: record {rid}: field 'answers' must hold exactly 10 answers, got {n}")
    return answers


def read_parquet_rows(path, columns):
    """Rows of a parquet file (or of every *.parquet under a folder) as dicts. pyarrow is an optional
    dependency, imported only here."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow), which is optional and not "
                          "installed; or pass the documented JSON-lines export instead") from None
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)) if os.path.isdir(path) else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no *.parquet files")
    rows = []
    for f in files:
        table = pq.read_table(f)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValueError(f"{f}: missing column(s) {missing}; has {table.column_names}")
        rows.extend(table.select(columns).to_pylist())
    return rows


def take(items, limit):
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    return items if limit is None else items[:limit]


def positive_int(text):
    """argparse type for --limit (0 would score nothing (0.0), -1 would drop the last item), --batch-size (0:
    range() arg 3 must not be zero; -2: no batch at all) and --max-new-tokens."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def pct(xs):
    """100 * mean of booleans / numbers (0.0 for an empty list)."""
    xs = list(xs)
    return 100.0 * sum(xs) / len(xs) if xs else 0.0


def parse_choice(response):
    """The authors' SugarCrepe parser (docs/benchmarks.md section 1): the first standalone A or B of the upper-cased
    response, else None (wrong). Because of .upper(), "a cat ..." parses as "A" (kept on purpose)."""
    m = re.search(r"\b([AB])\b", response.strip().upper())
    return m.group(1) if m else None


def in_words(request, context):
    """A request about a scene given in words instead of an image (the text world, shapes.scene_text):
    `context` replaces "<image>" in the prompt and the request has no image. None leaves it as it is."""
    if context is None:
        return request
    return {"image": None, "prompt": request["prompt"].replace("<image>", context, 1)}


def choice_request(image, caption_a, caption_b, context=None):
    return in_words({"image": image, "prompt": CHOICE_PROMPT.format(a=caption_a, b=caption_b)}, context)


def match_request(image, caption, context=None):
    """The request whose score_fn value is s(caption, image), the one match score of this file
    (`context`: text in place of the image, in_words)."""
    return in_words({"image": image, "prompt": MATCH_PROMPT.format(caption=caption)}, context)


def two_order_choices(generate_fn, pairs):
    """Ask each (image, right, wrong) twice, right caption as (A) then as (B) (docs/method.md section 6);
    a 4th element, a text context, stands in for the image (in_words).
    Returns [(right_first_correct, right_second_correct, response1, response2)] per pair."""
    reqs = []
    for image, right, wrong, *context in pairs:
        c = context[0] if context else None
        reqs += [choice_request(image, right, wrong, c), choice_request(image, wrong, right, c)]
    out = generate_fn(reqs)
    if len(out) != len(reqs):
        raise RuntimeError(f"generate_fn returned {len(out)} answers for {len(reqs)} requests")
    return [(parse_choice(out[2 * k]) == "A", parse_choice(out[2 * k + 1]) == "B", out[2 * k], out[2 * k + 1])
            for k in range(len(pairs))]


def call_scores(score_fn, reqs):
    out = [float(s) for s in score_fn(reqs)]
    if len(out) != len(reqs):
        raise RuntimeError(f"score_fn returned {len(out)} scores for {len(reqs)} requests")
    return out

# -----------------------------------------------------------------------------
# 2. Compositional reasoning (CR)
# 2a. SugarCrepe (docs/benchmarks.md section 1). Item: {"id", "image", "pos", "neg"}.

SUGARCREPE_SUBSETS = ("swap_obj", "swap_att", "replace_obj", "replace_rel", "replace_att", "add_obj", "add_att")


def read_sugarcrepe_json(path, image_dir, limit=None):
    """One official `data/{subset}.json`: a JSON object {key: {filename, caption, negative_caption}}.
    Iterates over the values (swap_obj's keys have a gap at "108"); images are COCO val2017 files."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by item id, got a {type(data).__name__}")
    if not data:  # it would count as 0% in the average
        raise ValueError(f"{path}: no items (an empty SugarCrepe subset file)")
    items = []
    for key, rec in take(list(data.items()), limit):
        image = os.path.join(image_dir, field(rec, "filename", path, key))
        items.append({"id": key, "image": image_file(image, path, key),
                      "pos": text_field(rec, "caption", path, key), "neg": text_field(rec, "negative_caption", path, key)})
    return items


def read_sugarcrepe_parquet(path, limit=None):
    """The HF copy `HuggingFaceM4/SugarCrepe_{subset}` (parquet, pyarrow needed): `tested_labels[0]` is
    the positive, `[1]` the negative (the integer `true_label` is NOT used: its order is arbitrary)."""
    items = []
    for n, row in enumerate(take(read_parquet_rows(path, ["image", "tested_labels"]), limit)):
        labels = row["tested_labels"]
        if not isinstance(labels, list) or len(labels) != 2:
            raise ValueError(f"{path}: row {n}: 'tested_labels' must be [positive, negative], got {labels!r}")
        if not row["image"]:
            raise ValueError(f"{path}: row {n}: empty 'image'")
        items.append({"id": str(n), "image": row["image"], "pos": labels[0], "neg": labels[1]})
    return items


def read_sugarcrepe(root, image_dir=None, limit=None):
    """-> {subset: items} for the subsets found under `root`, in the authors' order. Per subset it takes
    the official `root/data/{subset}.json` (or `root/{subset}.json`; images in `image_dir`, default
    `root/images`), else an HF parquet copy (`root/{subset}.parquet` or `root/*{subset}/**/*.parquet`,
    e.g. `root/SugarCrepe_swap_obj/data/test-*.parquet`). `limit` applies per subset."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: SugarCrepe folder not found")
    data_dir = os.path.join(root, "data") if os.path.isdir(os.path.join(root, "data")) else root
    image_dir = image_dir or os.path.join(root, "images")
    subsets = {}
    for name in SUGARCREPE_SUBSETS:
        jpath = os.path.join(data_dir, name + ".json")
        parquet = sorted(glob.glob(os.path.join(root, name + ".parquet")) +
                         glob.glob(os.path.join(root, "*" + name, "**", "*.parquet"), recursive=True))
        if os.path.isfile(jpath):
            subsets[name] = read_sugarcrepe_json(jpath, image_dir, limit)
        elif parquet:
            subsets[name] = take([it for p in parquet for it in read_sugarcrepe_parquet(p)], limit)
            if not subsets[name]:
                raise ValueError(f"{parquet[0]}: no items (an empty SugarCrepe subset)")
    if not subsets:
        raise FileNotFoundError(f"{root}: no SugarCrepe subset found (expected data/{{subset}}.json for "
                                f"subsets {list(SUGARCREPE_SUBSETS)}, or HF parquet files)")
    return subsets


def eval_sugarcrepe(generate_fn, subsets):
    """The CompoDistill protocol (docs/benchmarks.md section 1 "How CompoDistill poses it", docs/method.md section 6): each
    item asked twice with CHOICE_PROMPT, positive as (A) ("pos_first", answer A) and as (B)
    ("neg_first", answer B), greedy; per subset acc = mean of the two orders' accuracies (in %);
    `average` = unweighted mean over the subsets PRESENT (listed in `subsets_present`; `complete` says
    whether all 7 were). An item with a "context" (text in place of its image, in_words) is asked about it."""
    pairs = [(it["image"], it["pos"], it["neg"], it.get("context")) for items in subsets.values() for it in items]
    results = two_order_choices(generate_fn, pairs)
    metrics, records, k = {"subsets": {}}, [], 0
    for name, items in subsets.items():
        res, k = results[k:k + len(items)], k + len(items)
        a1, a2 = pct(r[0] for r in res), pct(r[1] for r in res)
        metrics["subsets"][name] = {"n": len(items), "acc_pos_first": a1, "acc_neg_first": a2, "average": (a1 + a2) / 2}
        records += [{"benchmark": "sugarcrepe", "subset": name, "id": it["id"], "pos_first": r[2], "neg_first": r[3]}
                    for it, r in zip(items, res)]
    metrics["average"] = statistics.mean(m["average"] for m in metrics["subsets"].values())
    metrics["subsets_present"] = list(subsets)
    metrics["complete"] = set(subsets) == set(SUGARCREPE_SUBSETS)
    return metrics, records


def eval_sugarcrepe_match(score_fn, subsets):
    """SugarCrepe's original protocol (docs/benchmarks.md section 1, "Official metric"): an item is right when
    the match score of its positive caption is strictly above its negative's, s(pos) > s(neg) (ties are
    wrong); per subset the mean in %, `average` the unweighted mean over the subsets present. s is this
    file's one match score (match_request). Reported beside the 2-choice protocol, never instead of it. An item
    with a "context" is scored on it (in_words)."""
    reqs = [match_request(it["image"], c, it.get("context")) for items in subsets.values() for it in items
            for c in (it["pos"], it["neg"])]
    scores = call_scores(score_fn, reqs)
    metrics, records, k = {"subsets": {}}, [], 0
    for name, items in subsets.items():
        right = []
        for it in items:
            pos, neg = scores[k], scores[k + 1]
            k += 2
            right.append(pos > neg)
            records.append({"benchmark": "sugarcrepe_match", "subset": name, "id": it["id"], "s_pos": pos, "s_neg": neg})
        metrics["subsets"][name] = {"n": len(items), "acc": pct(right)}
    metrics["average"] = statistics.mean(m["acc"] for m in metrics["subsets"].values())
    metrics["complete"] = set(subsets) == set(SUGARCREPE_SUBSETS)
    return metrics, records


# 2b. Winoground (docs/benchmarks.md section 2) and BiVLC (docs/benchmarks.md section 3): 2 captions x 2 images.
# Item: {"id", "captions": (C0, C1), "images": (I0, I1), "tag"}; C_j matches I_j.

def read_winoground(root, limit=None):
    """`root/examples.jsonl` (or `root/data/examples.jsonl`) + `images/{image_j}.png` beside it.
    `tag` = collapsed_tag (Object / Relation / Both)."""
    path = next((p for p in (os.path.join(root, "examples.jsonl"), os.path.join(root, "data", "examples.jsonl"))
                 if os.path.isfile(p)), os.path.join(root, "examples.jsonl"))
    image_dir = os.path.join(os.path.dirname(path), "images")
    items = []
    for n, ex in enumerate(take(load_jsonl(path), limit)):
        rid = ex.get("id", f"line {n + 1}") if isinstance(ex, dict) else f"line {n + 1}"
        captions = tuple(field(ex, f"caption_{j}", path, rid) for j in (0, 1))
        images = tuple(image_file(os.path.join(image_dir, str(field(ex, f"image_{j}", path, rid)) + ".png"), path, rid)
                       for j in (0, 1))
        items.append({"id": rid, "captions": captions, "images": images, "tag": ex.get("collapsed_tag", "")})
    return items


BIVLC_COLUMNS = ["image", "caption", "negative_caption", "negative_image", "type", "subtype"]


def read_bivlc(path, limit=None):
    """BiVLC test split. Either the HF parquet (a file or a folder of `data/test-*.parquet`; pyarrow
    needed), or a JSON-lines export, one row per line with the same columns and the two images as
    paths relative to the .jsonl file:
        {"image": "img/000123.jpg", "caption": "...", "negative_caption": "...",
         "negative_image": "img/000123_neg.png", "type": "swap", "subtype": "att"}
    C0 = caption, C1 = negative_caption, I0 = image, I1 = negative_image; `tag` = "type/subtype"."""
    if path.endswith((".jsonl", ".json")):
        rows, base = load_jsonl(path), os.path.dirname(path)
    else:
        rows, base = read_parquet_rows(path, BIVLC_COLUMNS), None
    items = []
    for n, row in enumerate(take(rows, limit)):
        vals = {c: field(row, c, path, n) for c in BIVLC_COLUMNS}
        images = [vals["image"], vals["negative_image"]]
        if base is not None:
            images = [image_file(os.path.join(base, im), path, n) for im in images]
        items.append({"id": n, "captions": (vals["caption"], vals["negative_caption"]), "images": tuple(images),
                      "tag": f"{vals['type']}/{vals['subtype']}"})
    return items


def winoground_scores(s):
    """s[c][i] = s(C_c, I_i). Winoground's definitions with STRICT comparisons (ties fail), docs/benchmarks.md section 2:
    text: each image prefers its caption; image: each caption prefers its image; group: both.
    For BiVLC these are I2T (= text), T2I (= image) and Group (docs/benchmarks.md section 3)."""
    text = s[0][0] > s[1][0] and s[1][1] > s[0][1]
    image = s[0][0] > s[0][1] and s[1][1] > s[1][0]
    return text, image, text and image


def eval_pairs(score_fn, items, generate_fn=None, benchmark="winoground"):
    """Text / image / group scores (in %) from the match score s (score_fn on MATCH_PROMPT), overall and
    per tag. With generate_fn it also reports `text_2choice`: each image is asked CHOICE_PROMPT with its
    own caption vs the other one, in both orders; an example is text-correct in an order when both of
    its images pick their caption; text_2choice = mean of the two orders (the SugarCrepe protocol; a
    2-way choice cannot give the image score, which needs two images per prompt)."""
    reqs = [match_request(it["images"][i], it["captions"][c]) for it in items for c in (0, 1) for i in (0, 1)]
    scores = call_scores(score_fn, reqs)
    flags, records = [], []
    for k, it in enumerate(items):
        s = [[scores[4 * k], scores[4 * k + 1]], [scores[4 * k + 2], scores[4 * k + 3]]]
        flags.append(winoground_scores(s))
        records.append({"benchmark": benchmark, "id": it["id"], "tag": it["tag"], "scores": s})

    def summary(fl):
        return {"n": len(fl), "text": pct(f[0] for f in fl), "image": pct(f[1] for f in fl),
                "group": pct(f[2] for f in fl)}
    metrics = summary(flags)
    tags = sorted({it["tag"] for it in items if it["tag"]})
    metrics["by_tag"] = {t: summary([f for f, it in zip(flags, items) if it["tag"] == t]) for t in tags}
    if generate_fn is not None:
        pairs = [(it["images"][j], it["captions"][j], it["captions"][1 - j]) for it in items for j in (0, 1)]
        res = two_order_choices(generate_fn, pairs)
        first = [res[2 * k][0] and res[2 * k + 1][0] for k in range(len(items))]
        second = [res[2 * k][1] and res[2 * k + 1][1] for k in range(len(items))]
        metrics["text_2choice_right_first"], metrics["text_2choice_right_second"] = pct(first), pct(second)
        metrics["text_2choice"] = (pct(first) + pct(second)) / 2
        for k, rec in enumerate(records):
            rec["choices"] = [res[2 * k][2], res[2 * k][3], res[2 * k + 1][2], res[2 * k + 1][3]]
    return metrics, records


# 2c. SADE (docs/benchmarks.md section 4). Its released schema (Google Drive) could not be inspected, so this reads a
# documented JSON-lines layout that any branch file converts to. Item: {"id", "image", "refs", "branch"}.

def read_sade(path, limit=None):
    """JSON lines, one item per line, image path relative to the file:
        {"id": "rel-0001", "image": "vg/2345.jpg", "positive": "the man rides the horse",
         "negatives": ["the horse rides the man"], "branch": "relation_vg"}
    `negatives` holds 1..5 references (2-ref branches have 1, Atomic/Negate 5, Content 2); `branch`
    defaults to "all", `id` to the line number. The Comprehensive branch is Winoground (use --winoground)."""
    items = []
    base = os.path.dirname(path)
    for n, row in enumerate(take(load_jsonl(path), limit)):
        rid = row.get("id", f"line {n + 1}") if isinstance(row, dict) else f"line {n + 1}"
        negatives = field(row, "negatives", path, rid)
        if not isinstance(negatives, list) or not negatives:
            raise ValueError(f"{path}: record {rid}: field 'negatives' must be a non-empty list of strings")
        image = image_file(os.path.join(base, field(row, "image", path, rid)), path, rid)
        items.append({"id": rid, "image": image, "refs": [field(row, "positive", path, rid)] + list(negatives),
                      "branch": row.get("branch", "all")})
    return items


def eval_sade(score_fn, items):
    """Recall@1 (docs/benchmarks.md section 4): an item is correct when its positive reference (refs[0]) scores STRICTLY
    higher than every negative under the match score s. Per branch and `average` = unweighted mean over
    the branches present. (The SADE paper scores with VisualGPTScore; here s is the P(Yes) match score.)"""
    reqs = [match_request(it["image"], ref) for it in items for ref in it["refs"]]
    scores = call_scores(score_fn, reqs)
    hits, records, k = [], [], 0
    for it in items:
        s, k = scores[k:k + len(it["refs"])], k + len(it["refs"])
        hits.append(all(s[0] > x for x in s[1:]))
        records.append({"benchmark": "sade", "id": it["id"], "branch": it["branch"], "scores": s})
    branches = {}
    for b in dict.fromkeys(it["branch"] for it in items):
        hb = [h for h, it in zip(hits, items) if it["branch"] == b]
        branches[b] = {"n": len(hb), "recall_at_1": pct(hb)}
    metrics = {"branches": branches, "average": statistics.mean(v["recall_at_1"] for v in branches.values())}
    return metrics, records

# -----------------------------------------------------------------------------
# 3. VQA (docs/method.md section 6: the LLaVA-1.5 protocol, greedy, VQA_INSTRUCTION on a new line)
# 3a. Answer normalisation: the exact lists and procedures of the official VQA evaluator (vqaEval.py;
#     docs/benchmarks.md section 5)
#     (GT-Vision-Lab/VQA vqaEval.py; LLaVA's EvalAIAnswerProcessor uses the same lists).

PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ["a", "an", "the"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # verbatim: "(?!<=\d)" is a lookahead, so only (?!\d) acts
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")         # only ever used as a condition
CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've",
    'couldnt': "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    'didnt': "didn't", 'doesnt': "doesn't", 'dont': "don't", 'hadnt': "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't", 'havent': "haven't",
    'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd",
    'howll': "how'll", 'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm",
    'Ive': "I've", 'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    'itll': "it'll", "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", 'mightve': "might've",
    'mustnt': "mustn't", 'mustve': "must've", 'neednt': "needn't", 'notve': "not've",
    'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", 'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", 'shouldve': "should've", 'shouldnt': "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd',
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll",
    'somebodys': "somebody's", 'someoned': "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", 'someonell': "someone'll", 'someones': "someone's",
    'somethingd': "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", 'somethingll': "something'll", 'thats': "that's",
    'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're", 'theyve': "they've",
    'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've",
    'werent': "weren't", 'whatll': "what'll", 'whatre': "what're", 'whats': "what's",
    'whatve': "what've", 'whens': "when's", 'whered': "where'd", 'wheres': "where's",
    'whereve': "where've", 'whod': "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    'wholl': "who'll", 'whos': "who's", 'whove': "who've", 'whyll': "why'll", 'whyre': "why're",
    'whys': "why's", 'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", 'yall': "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're", 'youve': "you've",
}


def process_punctuation(text):
    """Official processPunctuation. For each mark p (list order): if "p " or " p" occurs in the ORIGINAL
    text, or the original text has a digit,digit comma, delete p, else replace it with a space. Then
    delete every "." not followed by a digit, at most 32 of them (re.UNICODE passed as count)."""
    out = text
    for p in PUNCT:
        if (p + " " in text) or (" " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=32)


def process_digit_article(text):
    """Official processDigitArticle: lowercase, split on whitespace, number words -> digits, drop
    a/an/the, expand contractions, join with one space."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def evalai_answer_processor(text):
    """LLaVA/MMF EvalAIAnswerProcessor: lowercase, delete every "," and "?", "'s" -> " 's", then the
    official punctuation and digit/article steps. Applied ALWAYS (unlike the official VQAv2 code)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def leave_one_out(pred, gts):
    """VQA accuracy of one question: mean over the 10 annotators of min(1, #(other 9 equal to pred) / 3).
    Closed form with m = #GT equal to pred: 0, 0.3, 0.6, 0.9, 1.0 for m = 0, 1, 2, 3, >=4."""
    return sum(min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))) / len(gts)


def vqa_accuracy(pred, gt_answers):
    """The official VQAv2 per-question accuracy in [0, 1] on RAW strings (the official vqaEval.py): strip
    \\n/\\t; ONLY if the 10 GT answers are not all identical, normalise GT and prediction
    (process_punctuation then process_digit_article); then leave-one-out. So a raw "Yes" against ten
    "yes" scores 0: normalise predictions first (eval_vqav2 does, as LLaVA does)."""
    gts = [g.replace("\n", " ").replace("\t", " ").strip() for g in gt_answers]
    pred = pred.replace("\n", " ").replace("\t", " ").strip()
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(g)) for g in gts]
        pred = process_digit_article(process_punctuation(pred))
    return leave_one_out(pred, gts)


def textvqa_accuracy(pred, gt_answers):
    """TextVQA (LLaVA's TextVQAAccuracyEvaluator, docs/benchmarks.md section 7): EvalAIAnswerProcessor on the prediction
    and on all 10 GT answers, always; then leave-one-out."""
    return leave_one_out(evalai_answer_processor(pred), [evalai_answer_processor(g) for g in gt_answers])


def vizwiz_accuracy(pred, gt_answers):
    """VizWiz VQAEval (docs/benchmarks.md section 8): the prediction is ALWAYS normalised (punctuation + digit/article),
    the GT answers are used as stored; then leave-one-out. (The VizWiz API's curly-apostrophe
    contraction map was not available verbatim; the VQA map is used, which only matters for predictions
    containing an apostrophe-less contraction such as "dont".)"""
    pred = pred.replace("\n", " ").replace("\t", " ").strip()
    return leave_one_out(process_digit_article(process_punctuation(pred)), list(gt_answers))


def vqa_request(image, question, *extra_lines, context=None):
    """The LLaVA-1.5 short-answer prompt: question, optional extra lines, VQA_INSTRUCTION, one per line
    (`context`: text in place of the image, in_words)."""
    return in_words({"image": image, "prompt": "\n".join(["<image>", question, *extra_lines, VQA_INSTRUCTION])},
                    context)


def ask(generate_fn, reqs):
    out = generate_fn(reqs)
    if len(out) != len(reqs):
        raise RuntimeError(f"generate_fn returned {len(out)} answers for {len(reqs)} requests")
    return out


def grouped(values, keys):
    """{key: 100 * mean of the values with that key}, keys in first-seen order."""
    return {k: pct(v for v, kk in zip(values, keys) if kk == k) for k in dict.fromkeys(keys)}


# 3b. VQAv2 (docs/benchmarks.md section 5). Item: {"id", "image", "question", "answers", "answer_type", "question_type"}.

VQAV2_FILES = {"questions": ("questions.json", "v2_OpenEnded_mscoco_val2014_questions.json"),
               "annotations": ("annotations.json", "v2_mscoco_val2014_annotations.json")}


def read_vqav2(root, image_pattern="COCO_val2014_%012d.jpg", limit=None):
    """`root/{questions,annotations}.json` (or the official file names) + `root/images/{image_pattern %
    image_id}`. Every question needs an annotation with exactly 10 answers, and its image."""
    paths = {}
    for kind, names in VQAV2_FILES.items():
        found = [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n))]
        if not found:
            raise FileNotFoundError(f"{root}: no VQAv2 {kind} file (expected one of {list(names)})")
        paths[kind] = found[0]
    qpath, apath = paths["questions"], paths["annotations"]
    questions = field(load_json(qpath), "questions", qpath, "top level")
    unique_ids([field(q, "question_id", qpath, f"#{n}") for n, q in enumerate(questions)], qpath)
    annotations = {}
    raw = field(load_json(apath), "annotations", apath, "top level")
    unique_ids([field(a, "question_id", apath, f"#{n}") for n, a in enumerate(raw)], apath)
    for a in raw:
        annotations[a["question_id"]] = a
    items = []
    for n, q in enumerate(take(questions, limit)):
        qid = field(q, "question_id", qpath, f"#{n}")
        if qid not in annotations:
            raise ValueError(f"{apath}: no annotation for question_id {qid} of {qpath}")
        a = annotations[qid]
        answers = [text_field(x, "answer", apath, qid) for x in ten_answers(field(a, "answers", apath, qid), apath, qid)]
        image = os.path.join(root, "images", image_pattern % field(q, "image_id", qpath, qid))
        items.append({"id": qid, "image": image_file(image, qpath, qid), "question": text_field(q, "question", qpath, qid),
                      "answers": answers, "answer_type": a.get("answer_type", ""),
                      "question_type": a.get("question_type", "")})
    return items


def eval_vqav2(generate_fn, items):
    """LLaVA-1.5 prompt; each prediction goes through EvalAIAnswerProcessor (LLaVA's submission step),
    then the official accuracy. `accuracy` = round(100 * mean, 2), also per answer type and per question
    type (the official evaluation's perAnswerType / perQuestionType). An item with a "context" is asked
    about that text instead of its image (in_words)."""
    preds = ask(generate_fn, [vqa_request(it["image"], it["question"], context=it.get("context")) for it in items])
    accs = [vqa_accuracy(evalai_answer_processor(p), it["answers"]) for p, it in zip(preds, items)]
    metrics = {"n": len(items), "accuracy": round(pct(accs), 2),
               "by_answer_type": {k: round(v, 2) for k, v in grouped(accs, [it["answer_type"] for it in items]).items()},
               "by_question_type": {k: round(v, 2) for k, v in
                                    grouped(accs, [it["question_type"] for it in items]).items()}}
    records = [{"benchmark": "vqav2", "question_id": it["id"], "answer": p, "accuracy": a}
               for it, p, a in zip(items, preds, accs)]
    return metrics, records


# 3c. GQA testdev-balanced (docs/benchmarks.md section 6). Item: {"id", "image", "question", "answer", "structural"}.

def read_gqa(path, limit=None):
    """`path` = testdev_balanced_questions.json, or a folder holding it; images `images/{imageId}.jpg`
    beside the file. Only `isBalanced` questions are kept (the official accuracy's set)."""
    qpath = os.path.join(path, "testdev_balanced_questions.json") if os.path.isdir(path) else path
    data = load_json(qpath)
    if not isinstance(data, dict):
        raise ValueError(f"{qpath}: expected a JSON object keyed by question id, got a {type(data).__name__}")
    items = []
    for qid, q in data.items():
        if not field(q, "isBalanced", qpath, qid):
            continue
        image = os.path.join(os.path.dirname(qpath), "images", f"{field(q, 'imageId', qpath, qid)}.jpg")
        items.append({"id": qid, "image": image, "question": text_field(q, "question", qpath, qid),
                      "answer": text_field(q, "answer", qpath, qid),
                      "structural": field(q, "types", qpath, qid).get("structural", "")})
    items = take(items, limit)
    for it in items:
        image_file(it["image"], qpath, it["id"])
    return items


def gqa_normalize(pred):
    """LLaVA's convert_gqa_for_eval: strip trailing periods, lowercase (nothing else: "the left" != "left")."""
    return pred.strip().rstrip(".").lower()


def eval_gqa(generate_fn, items):
    """Exact match of gqa_normalize(prediction) with `answer`; also binary (structural != query) / open."""
    preds = ask(generate_fn, [vqa_request(it["image"], it["question"]) for it in items])
    hits = [gqa_normalize(p) == it["answer"] for p, it in zip(preds, items)]
    kinds = ["open" if it["structural"] == "query" else "binary" for it in items]
    metrics = {"n": len(items), "accuracy": pct(hits), **grouped(hits, kinds)}
    records = [{"benchmark": "gqa", "questionId": it["id"], "prediction": gqa_normalize(p), "correct": h}
               for it, p, h in zip(items, preds, hits)]
    return metrics, records

# 3d. TextVQA val (docs/benchmarks.md section 7). Item: {"id", "image", "question", "answers", "ocr"}.

def read_textvqa(path, ocr_path=None, limit=None):
    """`path` = TextVQA_0.5.1_val.json or a folder holding it; images `train_images/{image_id}.jpg`
    beside it. `ocr_path` (optional) = a JSON {"data": [{"image_id", "ocr_tokens": [...]}, ...]} (the
    layout of the Rosetta OCR files; not verified) enabling LLaVA's OCR-token prompt line."""
    jpath = os.path.join(path, "TextVQA_0.5.1_val.json") if os.path.isdir(path) else path
    data = field(load_json(jpath), "data", jpath, "top level")
    ocr = {}
    if ocr_path:
        for n, r in enumerate(field(load_json(ocr_path), "data", ocr_path, "top level")):
            ocr[field(r, "image_id", ocr_path, f"#{n}")] = field(r, "ocr_tokens", ocr_path, f"#{n}")
    unique_ids([field(q, "question_id", jpath, f"#{n}") for n, q in enumerate(data)], jpath)
    items = []
    for n, q in enumerate(take(data, limit)):
        qid = field(q, "question_id", jpath, f"#{n}")
        image_id = field(q, "image_id", jpath, qid)
        if ocr_path and image_id not in ocr:
            raise ValueError(f"{ocr_path}: no OCR tokens for image_id {image_id} (question {qid} of {jpath})")
        image = os.path.join(os.path.dirname(jpath), "train_images", f"{image_id}.jpg")
        answers = ten_answers(field(q, "answers", jpath, qid), jpath, qid)
        if not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{jpath}: record {qid}: field 'answers' must hold strings, got {answers!r:.80}")
        items.append({"id": qid, "image": image_file(image, jpath, qid), "question": text_field(q, "question", jpath, qid),
                      "answers": answers,
                      "ocr": ocr.get(image_id) if ocr_path else None})
    return items


def eval_textvqa(generate_fn, items):
    """LLaVA-1.5 prompt, with "Reference OCR token: t1, t2, ..." before the instruction when the items
    carry OCR tokens (scores differ a lot with and without it: keep it fixed). Scored per question_id
    (LLaVA joins on (image, question) and so collapses repeated pairs; we do not)."""
    reqs = [vqa_request(it["image"], it["question"], *([f"Reference OCR token: {', '.join(it['ocr'])}"]
                                                       if it["ocr"] is not None else [])) for it in items]
    preds = ask(generate_fn, reqs)
    accs = [textvqa_accuracy(p, it["answers"]) for p, it in zip(preds, items)]
    records = [{"benchmark": "textvqa", "question_id": it["id"], "answer": p, "accuracy": a}
               for it, p, a in zip(items, preds, accs)]
    return {"n": len(items), "accuracy": pct(accs), "ocr_tokens": any(it["ocr"] is not None for it in items)}, records


# 3e. VizWiz-VQA val (docs/benchmarks.md section 8). Item: {"id", "image", "question", "answers", "answer_type"}.

VIZWIZ_INSTRUCTION = "When the provided information is insufficient, respond with 'Unanswerable'."


def read_vizwiz(path, limit=None):
    """`path` = val.json (a JSON list) or a folder holding val.json or Annotations/val.json; images
    `val/{image}` in the folder (beside the json, or above Annotations/)."""
    if os.path.isdir(path):
        root = path
        jpath = next((p for p in (os.path.join(path, "val.json"), os.path.join(path, "Annotations", "val.json"))
                      if os.path.isfile(p)), os.path.join(path, "val.json"))
    else:
        jpath, root = path, os.path.dirname(path)
    data = load_json(jpath)
    if not isinstance(data, list):
        raise ValueError(f"{jpath}: expected a JSON list of questions, got a {type(data).__name__}")
    items = []
    for n, q in enumerate(take(data, limit)):
        name = field(q, "image", jpath, f"#{n}")
        answers = ten_answers(field(q, "answers", jpath, name), jpath, name)
        items.append({"id": name, "image": image_file(os.path.join(root, "val", name), jpath, name),
                      "question": text_field(q, "question", jpath, name),
                      "answers": [text_field(a, "answer", jpath, name) for a in answers],
                      "answer_type": q.get("answer_type", "")})
    return items


def eval_vizwiz(generate_fn, items):
    """LLaVA-1.5 prompt with VIZWIZ_INSTRUCTION before the short-answer line. The prediction goes through
    EvalAIAnswerProcessor (LLaVA's submission step: "Unanswerable" -> "unanswerable") and is then scored
    by vizwiz_accuracy (prediction normalised, GT as stored). Also per answer type."""
    preds = ask(generate_fn, [vqa_request(it["image"], it["question"], VIZWIZ_INSTRUCTION) for it in items])
    accs = [vizwiz_accuracy(evalai_answer_processor(p), it["answers"]) for p, it in zip(preds, items)]
    records = [{"benchmark": "vizwiz", "image": it["id"], "answer": p, "accuracy": a}
               for it, p, a in zip(items, preds, accs)]
    return {"n": len(items), "accuracy": pct(accs),
            "by_answer_type": grouped(accs, [it["answer_type"] for it in items])}, records


# 3f. MME (docs/benchmarks.md section 9). Per subtask a list of images: {"id", "image", "qa": [(question, "Yes"|"No")] * 2}.

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_EXTS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def read_mme_txt(path):
    """A `<stem>.txt`: exactly 2 non-empty lines `question<TAB>Yes|No`."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [l.rstrip("\r\n") for l in f if l.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e}); convert it (e.g. iconv -f latin1 -t utf-8)") from None
    if len(lines) != 2:
        raise ValueError(f"{path}: expected 2 lines 'question<TAB>Yes|No', got {len(lines)}")
    qa = []
    for n, line in enumerate(lines, 1):
        parts = line.split("\t")
        if len(parts) != 2 or parts[1].strip() not in ("Yes", "No"):
            raise ValueError(f"{path}: line {n}: expected 'question<TAB>Yes|No', got {line!r}")
        qa.append((parts[0], parts[1].strip()))
    return qa


def read_mme(root, limit=None):
    """`root` = MME_Benchmark_release_version. Each subtask folder present is read in either layout:
    split (`images/<stem>.*` + `questions_answers_YN/<stem>.txt`) or flat (`<stem>.*` beside
    `<stem>.txt`). -> {subtask: images}, `limit` images per subtask."""
    out = {}
    for sub in MME_PERCEPTION + MME_COGNITION:
        d = os.path.join(root, sub)
        if not os.path.isdir(d):
            continue
        split = os.path.isdir(os.path.join(d, "questions_answers_YN"))
        txt_dir, img_dir = (os.path.join(d, "questions_answers_YN"), os.path.join(d, "images")) if split else (d, d)
        images = []
        for txt in take(sorted(glob.glob(os.path.join(txt_dir, "*.txt"))), limit):
            stem = os.path.splitext(os.path.basename(txt))[0]
            image = next((os.path.join(img_dir, stem + e) for e in IMAGE_EXTS
                          if os.path.isfile(os.path.join(img_dir, stem + e))), None)
            if image is None:
                raise FileNotFoundError(f"{txt}: no image {stem}.jpg/.png in {img_dir}")
            images.append({"id": stem, "image": image, "qa": read_mme_txt(txt)})
        if not images:
            raise ValueError(f"{d}: MME subtask folder without any question file")
        out[sub] = images
    if not out:
        raise FileNotFoundError(f"{root}: no MME subtask folder found (expected some of "
                                f"{list(MME_PERCEPTION + MME_COGNITION)})")
    return out


def mme_parse(pred):
    """Official calculation.py: lowercase; "yes"/"no" as is; else "yes" in the first 4 characters ->
    yes; elif "no" there -> no; else "other" (always wrong)."""
    pred = pred.lower()
    if pred in ("yes", "no"):
        return pred
    return "yes" if "yes" in pred[:4] else "no" if "no" in pred[:4] else "other"


def mme_question(question):
    """LLaVA's MME prompt: drop the trailing "Please answer yes or no." (single or double space)."""
    return re.sub(r"\s*Please answer yes or no\.\s*$", "", question)


def eval_mme(generate_fn, subtasks):
    """Per subtask acc = % questions right, acc_plus = % images with BOTH questions right,
    score = acc + acc_plus (max 200). perception / cognition = sums over the subtasks present (max
    2000 / 800 with all present; `*_subtasks` lists which)."""
    flat = [(sub, im, q, gt) for sub, ims in subtasks.items() for im in ims for q, gt in im["qa"]]
    preds = ask(generate_fn, [vqa_request(im["image"], mme_question(q)) for _, im, q, _ in flat])
    right = [mme_parse(p) == gt.lower() for p, (_, _, _, gt) in zip(preds, flat)]
    metrics, records, k = {"subtasks": {}}, [], 0
    for sub, ims in subtasks.items():
        r, k = right[k:k + 2 * len(ims)], k + 2 * len(ims)
        acc, acc_plus = pct(r), pct(r[2 * i] and r[2 * i + 1] for i in range(len(ims)))
        metrics["subtasks"][sub] = {"n_images": len(ims), "acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    for group, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [s for s in names if s in subtasks]
        metrics[group] = sum(metrics["subtasks"][s]["score"] for s in present)
        metrics[group + "_subtasks"] = present
    records = [{"benchmark": "mme", "subtask": sub, "image": im["id"], "question": q, "gt": gt, "prediction": p}
               for (sub, im, q, gt), p in zip(flat, preds)]  # consecutive pairs, as calculation.py expects
    return metrics, records

# -----------------------------------------------------------------------------
# 4. Reports: one results JSON, one markdown table, one predictions JSON-lines file per command

def headline(name, metrics):
    """(metric name, value) summarising one benchmark in the CR / VQA averages. Winoground and BiVLC use
    the 2-way-choice text score when it was computed (docs/method.md section 6 poses them as 2-way choices),
    else the group score; MME uses perception / 20 (its 2000 maximum scaled to 100). The paper does not
    say which single number it averages for these (docs/benchmarks.md): this is our convention."""
    if name in ("winoground", "bivlc"):
        key = "text_2choice" if "text_2choice" in metrics else "group"
        return key, metrics[key]
    if name == "mme":
        return "perception/20", metrics["perception"] / 20
    return ("average", metrics["average"]) if "average" in metrics else ("accuracy", metrics["accuracy"])


def summarize(benchmarks):
    """{"benchmarks": ..., "headline": {name: [metric, value]}, "average": mean of the headline values}."""
    heads = {name: headline(name, m) for name, m in benchmarks.items()}
    return {"benchmarks": benchmarks, "headline": heads,
            "average": statistics.mean(v for _, v in heads.values()) if heads else None}


def markdown_table(results, title):
    """Every numeric leaf as a row: | benchmark | subset | metric | value |, then the headline average."""
    rows = []

    def walk(bench, path, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(bench, path + [str(k)], v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            rows.append((bench, "/".join(p for p in path[:-1] if p not in ("subsets", "subtasks", "branches")) or "-",
                         path[-1], f"{x:.2f}" if isinstance(x, float) else str(x)))
    for bench, m in results["benchmarks"].items():
        walk(bench, [], m)
    lines = [f"# {title}", "", "| benchmark | subset | metric | value |", "|---|---|---|---|"]
    lines += [f"| {b} | {s} | {k} | {v} |" for b, s, k, v in rows]
    lines += ["", "| benchmark | headline metric | value |", "|---|---|---|"]
    lines += [f"| {b} | {k} | {v:.2f} |" for b, (k, v) in results["headline"].items()]
    if results["average"] is not None:
        lines.append(f"| **average** | mean of the above | **{results['average']:.2f}** |")
    return "\n".join(lines) + "\n"


def check_writable(out_dir):
    """The report's folder exists (made) and takes a file, checked BEFORE a benchmark runs: a read-only model
    folder must not cost a whole evaluation. -> out_dir."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test{os.getpid()}")
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(e.errno, f"{out_dir}: cannot write the report there ({e.strerror or e}); pass --out DIR") from None
    return out_dir


def write_report(results, records, out_dir, kind, title):
    """-> paths of {kind}_results.json, {kind}_results.md, {kind}_predictions.jsonl in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{kind}_results.{e}") for e in ("json", "md")]
    paths.append(os.path.join(out_dir, f"{kind}_predictions.jsonl"))
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(markdown_table(results, title))
    with open(paths[2], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return paths


# -----------------------------------------------------------------------------
# 5. Glue: a saved model -> (generate_fn, score_fn). The only code here that imports torch/model/data.

def make_model_fns(model_dir, device="cpu", batch_size=8, max_new_tokens=32, dtype=None):
    """Load `model_dir`, any model source (model.load_any: a model dir, RUN/checkpoint, llava:DIR or an HF
    LLaVA dir) and return model_fns(...) for it."""
    import model as modeling

    mllm, tokenizer, image_processor = modeling.load_any(model_dir, device=device, dtype=dtype)
    return model_fns(mllm, tokenizer, image_processor, device, batch_size, max_new_tokens, name=model_dir)


def model_fns(mllm, tokenizer, image_processor, device="cpu", batch_size=8, max_new_tokens=32, name="model",
              progress=True, system_prompt=None):
    """(generate_fn, score_fn) for a model in memory, both batched with a tqdm bar (train.py uses this
    for its in-loop validation). Each request's prompt is one user turn rendered by data.render_prompt
    (chat template + generation prompt, "<image>" expanded to the visual tokens).
    generate_fn: left-padded batch, model.generate (greedy, KV cache), stops at eos and the template's
        end-of-turn token (data.end_of_turn_ids: ChatML's <|im_end|>, Llama-3's <|eot_id|>, ...),
        decoded without special tokens and stripped.
    score_fn: one forward pass on a right-padded batch; at each row's last real position, the
        log-softmax (fp32, full vocabulary) of the "Yes" token id, i.e. log P(first answer token = Yes).
    system_prompt: as data.with_system_prompt; default, the one the model was trained with (its config's
    `system_prompt`, train.py --system-prompt)."""
    import torch
    from tqdm import tqdm

    import data

    mllm.eval()
    pad_id = data.pad_token_id(tokenizer)
    yes_ids = tokenizer.encode("Yes", add_special_tokens=False)
    if len(yes_ids) != 1:
        raise ValueError(f"{name}: the tokenizer splits 'Yes' into {len(yes_ids)} tokens {yes_ids}; the "
                         "match score needs 'Yes' to be exactly one token")
    stop = data.end_of_turn_ids(tokenizer)
    if system_prompt is None:
        system_prompt = mllm.extra_config.get("system_prompt")

    def pack(reqs, left):
        ids, images = [], []
        for r in reqs:
            image = open_image(r["image"])
            if (data.IMAGE_TOKEN in r["prompt"]) != (image is not None):
                raise ValueError(f"request {r['prompt'][:60]!r}: an image needs exactly one '<image>' in the "
                                 "prompt and a prompt with '<image>' needs an image")
            messages = data.with_system_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}], system_prompt)
            ids.append(data.render_prompt(tokenizer, messages, mllm.num_visual_tokens, mllm.image_token_id))
            if image is not None:
                images.append(image)
        T = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.long)
        for b, x in enumerate(ids):
            sl = slice(T - len(x), T) if left else slice(0, len(x))
            input_ids[b, sl], mask[b, sl] = torch.tensor(x), 1
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"].to(device) if images else None
        return input_ids.to(device), mask.to(device), pixels

    def batched(fn, desc):
        def run(requests):
            out = []
            for i in tqdm(range(0, len(requests), batch_size), desc=desc, unit="batch", disable=not progress):
                out += fn(requests[i:i + batch_size])
            return out
        return run

    @torch.no_grad()
    def generate_batch(reqs):
        input_ids, mask, pixels = pack(reqs, left=True)
        new = mllm.generate(input_ids, mask, pixels, max_new_tokens=max_new_tokens, eos_token_id=stop)
        return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]

    @torch.no_grad()
    def score_batch(reqs):
        input_ids, mask, pixels = pack(reqs, left=False)
        hidden = mllm(input_ids, attention_mask=mask, pixel_values=pixels, return_hidden=True)["hidden"]
        last = hidden[torch.arange(len(reqs), device=hidden.device), mask.sum(1) - 1]
        logits = mllm.language_model.get_output_embeddings()(last).float()
        return torch.log_softmax(logits, dim=-1)[:, yes_ids[0]].tolist()

    return batched(generate_batch, "generate"), batched(score_batch, "score")


def split_over_ranks(fn):
    """`fn` (requests -> one answer each) with the requests shared out over the ranks of the torch.distributed
    job: each rank answers a contiguous slice, the answers are gathered on every rank (all_gather_object) in
    the requests' order. Every rank must call it with the same requests."""
    import torch.distributed as dist

    def run(requests):
        rank, world = dist.get_rank(), dist.get_world_size()
        per = -(-len(requests) // world)
        mine = fn(requests[rank * per:(rank + 1) * per])
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        return [answer for part in parts for answer in part]
    return run


def validate_cr(student, tokenizer, image_processor, items: dict, device, split: bool = False,
                batch_size: int = 64) -> dict:
    """In-loop validation: CR accuracy of the model being trained on a SugarCrepe-layout set, by the
    paper's protocol (docs/method.md section 6; evaluate.eval_sugarcrepe: 2-choice, both orders, greedy). The
    learning curve. `split` (train.py under DDP: every rank calls this): each rank answers its share of the
    requests and every rank gets every answer (split_over_ranks), so no rank waits while another validates
    and the result is the one-process result. Under --fsdp every rank answers every request instead (the
    sharded model's forwards are collectives that every rank must join)."""
    generate, _ = model_fns(student, tokenizer, image_processor, device, batch_size=batch_size, max_new_tokens=4,
                            progress=False)
    metrics, _ = eval_sugarcrepe(split_over_ranks(generate) if split else generate, items)
    student.train()
    return {"val_cr": metrics["average"], "val_cr_subsets": {k: v["average"] for k, v in metrics["subsets"].items()}}


# -----------------------------------------------------------------------------
# 6. CLI
#   python evaluate.py cr  --model DIR --sugarcrepe DIR [--coco-images DIR] [--winoground DIR]
#                          [--bivlc PATH] [--sade PATH] [--suite FILE.json] [--out DIR] [--limit N]
#   python evaluate.py vqa --model DIR --vqav2 DIR [--gqa PATH] [--textvqa PATH] [--vizwiz PATH]
#                          [--mme DIR] [--suite FILE.json] [--out DIR] [--limit N]
# A suite file is a JSON object of the same options (dest names, e.g. {"sugarcrepe": "sc",
# "coco_images": "coco/val2017", "limit": 100}); relative paths are taken from the suite file's folder;
# options on the command line win.

CR_BENCHMARKS = ("sugarcrepe", "winoground", "bivlc", "sade")
VQA_BENCHMARKS = ("vqav2", "gqa", "textvqa", "vizwiz", "mme")
PATH_OPTIONS = {"sugarcrepe", "coco_images", "winoground", "bivlc", "sade", "vqav2", "gqa", "textvqa",
                "textvqa_ocr", "vizwiz", "mme"}


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a compodistill MLLM (docs/method.md section 6).",
                                epilog="The attention study (section 7): python attention.py distance | layers.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--model", required=True, help="a saved model directory, a run's checkpoint/ (mid-run), "
                        "llava:DIR or an HF LLaVA directory (model.load_any)")
        sp.add_argument("--suite", help="JSON file of benchmark paths/options (command-line options win)")
        sp.add_argument("--out", help="output folder (default: MODEL/eval)")
        sp.add_argument("--limit", type=positive_int, help="first N items per benchmark (per subset / subtask)")
        sp.add_argument("--device", help="default: cuda if available, else cpu")
        sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
        sp.add_argument("--batch-size", type=positive_int, help="default 8")

    cr = sub.add_parser("cr", help="compositional reasoning: SugarCrepe, Winoground, BiVLC, SADE")
    common(cr)
    cr.add_argument("--sugarcrepe", help="folder with data/{subset}.json (or HF parquet copies)")
    cr.add_argument("--coco-images", help="COCO val2017 images for SugarCrepe (default SUGARCREPE/images)")
    cr.add_argument("--winoground", help="folder with examples.jsonl and images/")
    cr.add_argument("--bivlc", help="BiVLC parquet file/folder, or a JSON-lines export")
    cr.add_argument("--sade", help="SADE JSON-lines file (layout in read_sade)")
    cr.add_argument("--two-choice", action=argparse.BooleanOptionalAction,
                    help="also the 2-way-choice text score for Winoground/BiVLC (default on)")
    cr.add_argument("--max-new-tokens", type=positive_int, help="default 32 (the authors' SugarCrepe setting)")

    vqa = sub.add_parser("vqa", help="VQA: VQAv2, GQA, TextVQA, VizWiz, MME")
    common(vqa)
    vqa.add_argument("--vqav2", help="folder with questions.json, annotations.json (or official names), images/")
    vqa.add_argument("--vqav2-image-pattern", help="file name %% image_id under VQAV2/images "
                     "(default COCO_val2014_%%012d.jpg)")
    vqa.add_argument("--gqa", help="testdev_balanced_questions.json or its folder (images/ beside it)")
    vqa.add_argument("--textvqa", help="TextVQA_0.5.1_val.json or its folder (train_images/ beside it)")
    vqa.add_argument("--textvqa-ocr", help="optional OCR-token JSON: adds LLaVA's 'Reference OCR token' line")
    vqa.add_argument("--vizwiz", help="val.json or its folder (val/ images)")
    vqa.add_argument("--mme", help="MME_Benchmark_release_version folder")
    vqa.add_argument("--max-new-tokens", type=positive_int, help="default 16")
    return p


DEFAULTS = {"batch_size": 8, "two_choice": True, "vqav2_image_pattern": "COCO_val2014_%012d.jpg",
            "max_new_tokens": {"cr": 32, "vqa": 16}}


def apply_suite(args):
    """Fill options missing on the command line from --suite (relative paths from the suite's folder),
    then from DEFAULTS (the parser itself has no defaults, so a suite value is never shadowed)."""
    suite = load_json(args.suite) if args.suite else {}
    if not isinstance(suite, dict):
        raise ValueError(f"{args.suite}: a suite must be a JSON object of options")
    for key, value in suite.items():
        if not hasattr(args, key) or key in ("command", "suite", "model"):
            raise ValueError(f"{args.suite}: unknown option '{key}' for the '{args.command}' command")
        if key in PATH_OPTIONS and isinstance(value, str):
            value = os.path.join(os.path.dirname(os.path.abspath(args.suite)), value)
        if key in ("batch_size", "max_new_tokens", "limit") and getattr(args, key) is None and \
                (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{args.suite}: {key} must be a positive integer, got {value!r}")
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key, value in DEFAULTS.items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value[args.command] if isinstance(value, dict) else value)
    return args


def read_cr(args):
    """Read every CR benchmark given (before loading the model, so bad files fail fast)."""
    d = {}
    if args.sugarcrepe:
        d["sugarcrepe"] = read_sugarcrepe(args.sugarcrepe, args.coco_images, args.limit)
    if args.winoground:
        d["winoground"] = read_winoground(args.winoground, args.limit)
    if args.bivlc:
        d["bivlc"] = read_bivlc(args.bivlc, args.limit)
    if args.sade:
        d["sade"] = read_sade(args.sade, args.limit)
    return d


def run_cr(data, generate_fn, score_fn, two_choice=True):
    """-> (results, records) for the benchmarks read by read_cr."""
    benchmarks, records = {}, []
    for name, items in data.items():
        if name == "sugarcrepe":  # the paper's 2-choice protocol (the headline) and SugarCrepe's own, both
            m, r = eval_sugarcrepe(generate_fn, items)
            m["match_protocol"], r_match = eval_sugarcrepe_match(score_fn, items)
            r = r + r_match
        elif name in ("winoground", "bivlc"):
            m, r = eval_pairs(score_fn, items, generate_fn if two_choice else None, benchmark=name)
        else:
            m, r = eval_sade(score_fn, items)
        benchmarks[name], records = m, records + r
    return summarize(benchmarks), records


def read_vqa(args):
    d = {}
    if args.vqav2:
        d["vqav2"] = read_vqav2(args.vqav2, args.vqav2_image_pattern, args.limit)
    if args.gqa:
        d["gqa"] = read_gqa(args.gqa, args.limit)
    if args.textvqa:
        d["textvqa"] = read_textvqa(args.textvqa, args.textvqa_ocr, args.limit)
    if args.vizwiz:
        d["vizwiz"] = read_vizwiz(args.vizwiz, args.limit)
    if args.mme:
        d["mme"] = read_mme(args.mme, args.limit)
    return d


VQA_EVALS = {"vqav2": eval_vqav2, "gqa": eval_gqa, "textvqa": eval_textvqa, "vizwiz": eval_vizwiz, "mme": eval_mme}


def run_vqa(data, generate_fn):
    benchmarks, records = {}, []
    for name, items in data.items():
        benchmarks[name], r = VQA_EVALS[name](generate_fn, items)
        records += r
    return summarize(benchmarks), records


def _source_dir(source):
    """The folder of a model source (model.load_any): `llava:DIR` -> DIR."""
    return source.split(":", 1)[1] if source.startswith("llava:") else source


def _default_out(source, kind):
    """MODEL/eval (MODEL/attention); for a run's checkpoint RUN/checkpoint: RUN/eval_step{N}, beside the
    checkpoint (which training replaces as a whole)."""
    import model as modeling
    if modeling.is_checkpoint_dir(source):
        run = os.path.dirname(os.path.abspath(source.rstrip("/")))
        return os.path.join(run, f"{kind}_step{modeling.checkpoint_step(source)}")
    return os.path.join(_source_dir(source), kind)


MOVED = {"attention": "python attention.py distance", "layers": "python attention.py layers"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in MOVED:
        raise SystemExit(f"`evaluate.py {argv[0]}` is now `{MOVED[argv[0]]}` (the attention study moved to "
                         "attention.py)")
    args = build_parser().parse_args(argv)
    args = apply_suite(args)
    names = CR_BENCHMARKS if args.command == "cr" else VQA_BENCHMARKS
    data = read_cr(args) if args.command == "cr" else read_vqa(args)
    if not data:
        raise SystemExit(f"evaluate.py {args.command}: give at least one benchmark: "
                         + ", ".join("--" + n for n in names))
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = None
    if args.dtype:
        import torch
        dtype = getattr(torch, args.dtype)
    out_dir = check_writable(args.out or _default_out(args.model, "eval"))  # before the benchmark, not after
    generate_fn, score_fn = make_model_fns(args.model, args.device, args.batch_size, args.max_new_tokens, dtype)
    if args.command == "cr":
        results, records = run_cr(data, generate_fn, score_fn, args.two_choice)
    else:
        results, records = run_vqa(data, generate_fn)
    results["model"], results["limit"] = os.path.abspath(args.model), args.limit
    title = f"{'Compositional reasoning' if args.command == 'cr' else 'VQA'}: {args.model}"
    paths = write_report(results, records, out_dir, args.command, title)
    print(markdown_table(results, title))
    print("wrote " + ", ".join(paths))
    return results


if __name__ == "__main__":
    main()
