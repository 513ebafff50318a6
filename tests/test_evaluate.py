"""evaluate.py: readers on tiny fixtures in each official layout, metrics against hand-worked numbers,
the protocols checked by recording what stub model callables receive. No model is needed."""
import json
import os
import re
import sys

import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate as ev  # noqa: E402

VQA_LINE = "Answer the question using a single word or phrase."


def png(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (2, 2), (255, 0, 0)).save(path)
    return str(path)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


class Recorder:
    """A stub generate_fn: answers with fn(request) and records every request it got."""
    def __init__(self, fn):
        self.fn, self.requests = fn, []

    def __call__(self, requests):
        self.requests += list(requests)
        return [self.fn(r) for r in requests]


# -----------------------------------------------------------------------------
# VQA normalisation and accuracy (vqa_normalization.txt)

def test_unanimous_gt_means_no_normalisation():
    assert ev.vqa_accuracy("Yes", ["yes"] * 10) == 0.0          # raw official metric: no normalisation
    assert ev.vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert ev.vqa_accuracy("dog", ["the dog"] * 10) == 0.0     # articles not dropped when unanimous
    assert ev.vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0      # \n/\t -> space and strip always happen
    # once the GT disagrees, both sides are normalised: "Yes" -> "yes" (m = 9 -> 1.0)
    assert ev.vqa_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0


def test_number_words_articles_and_periods():
    gts = ["2"] * 3 + ["3"] * 7
    # "two" -> "2", m = 3: three annotators see 2 matches (2/3), seven see 3 (1) -> (2 + 7) / 10
    assert ev.vqa_accuracy("two", gts) == pytest.approx(0.9)
    assert ev.vqa_accuracy("a dog", ["dog"] * 4 + ["cat"] * 6) == pytest.approx(1.0)
    assert ev.vqa_accuracy("3.", ["3"] * 5 + ["4"] * 5) == pytest.approx(1.0)   # "3." -> "3"
    assert ev.vqa_accuracy("3.5", ["3.5", "3"] + ["4"] * 8) == pytest.approx(0.3)


def test_process_punctuation_edge_cases():
    assert ev.process_punctuation("1,000") == "1000"            # digit,digit: every mark deleted
    assert ev.process_punctuation("hello, world") == "hello world"  # ", " occurs: deleted
    assert ev.process_punctuation("a-b") == "a b"               # no adjacent space: replaced by a space
    assert ev.process_punctuation("x- y-z") == "x yz"           # "- " anywhere: every "-" deleted
    # the condition tests the ORIGINAL text: ";" -> " " creates " !", yet "!" is still replaced by a space
    assert ev.process_punctuation("a;!b") == "a  b"
    assert ev.process_punctuation("3.5") == "3.5"
    assert ev.process_punctuation("3.") == "3"
    assert ev.process_punctuation("a.b") == "ab"
    assert ev.process_punctuation("." * 40) == "." * 8        # re.UNICODE passed as count: 32 at most
    assert ev.process_punctuation("it's 5:30") == "it's 5:30"   # apostrophe and colon kept


def test_process_digit_article():
    assert ev.process_digit_article("The  Two Dogs") == "2 dogs"
    assert ev.process_digit_article("none of an apple") == "0 of apple"
    assert ev.process_digit_article("dont") == "don't"
    assert ev.process_digit_article("somebody'd") == "somebodyd"   # the reverse-mapping quirk


def test_leave_one_out_closed_form():
    for m, want in zip(range(6), [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]):
        assert ev.leave_one_out("x", ["x"] * m + ["y"] * (10 - m)) == pytest.approx(want)


def test_evalai_processor_textvqa_vizwiz():
    assert ev.evalai_answer_processor("Girl's") == "girl 's"
    assert ev.evalai_answer_processor("Two Dogs?") == "2 dogs"
    assert ev.evalai_answer_processor("1,000") == "1000"
    assert ev.textvqa_accuracy("Nikon.", ["nikon"] * 10) == 1.0  # TextVQA always normalises both sides
    assert ev.textvqa_accuracy("canon", ["nikon"] * 9 + ["canon"]) == pytest.approx(0.3)
    # VizWiz: prediction normalised, GT as stored
    assert ev.vizwiz_accuracy("Yes", ["yes"] * 10) == 1.0
    assert ev.vizwiz_accuracy("yes", ["Yes"] * 10) == 0.0
    assert ev.vizwiz_accuracy("two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)


# -----------------------------------------------------------------------------
# VQAv2 / GQA / TextVQA / VizWiz readers and protocols

def vqav2_fixture(root, official_names=False, n_answers=10):
    qname, aname = (("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json")
                    if official_names else ("questions.json", "annotations.json"))
    qs = [{"image_id": 42, "question": "Is it red?", "question_id": 42001},
          {"image_id": 43, "question": "How many dogs?", "question_id": 43001}]
    ans = [{"question_id": 42001, "image_id": 42, "question_type": "is it", "answer_type": "yes/no",
            "multiple_choice_answer": "yes",
            "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": i + 1} for i in range(n_answers)]},
           {"question_id": 43001, "image_id": 43, "question_type": "how many", "answer_type": "number",
            "multiple_choice_answer": "2",
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in enumerate(["2"] * 2 + ["3"] * 8)]}]
    write_json(root / qname, {"questions": qs})
    write_json(root / aname, {"annotations": ans})
    for i in (42, 43):
        png(root / "images" / f"COCO_val2014_{i:012d}.jpg")
    return root


def test_vqav2_reader_and_protocol(tmp_path):
    root = vqav2_fixture(tmp_path / "vqav2", official_names=True)
    items = ev.read_vqav2(str(root))
    assert [it["id"] for it in items] == [42001, 43001]
    gen = Recorder(lambda r: "Yes" if "red" in r["prompt"] else "Two")
    metrics, records = ev.eval_vqav2(gen, items)
    assert gen.requests[0]["prompt"] == "<image>\nIs it red?\n" + VQA_LINE
    assert gen.requests[0]["image"].endswith("COCO_val2014_000000000042.jpg")
    # "Yes" -> "yes" before the official metric: 1.0; "Two" -> "2", m = 2: 0.6 -> mean 80.0
    assert metrics["accuracy"] == 80.0
    assert metrics["by_answer_type"] == {"yes/no": 100.0, "number": 60.0}
    assert metrics["by_question_type"] == {"is it": 100.0, "how many": 60.0}


def test_vqav2_image_pattern(tmp_path):
    root = vqav2_fixture(tmp_path / "v")
    for i in (42, 43):
        png(root / "images" / f"{i}.png")
    items = ev.read_vqav2(str(root), image_pattern="%d.png")
    assert items[1]["image"].endswith(os.path.join("images", "43.png"))


def test_vqav2_malformed(tmp_path):
    root = vqav2_fixture(tmp_path / "a", n_answers=9)
    with pytest.raises(ValueError, match=r"annotations\.json: record 42001: field 'answers' must hold exactly 10"):
        ev.read_vqav2(str(root))
    root = vqav2_fixture(tmp_path / "b")
    os.remove(root / "images" / "COCO_val2014_000000000043.jpg")
    with pytest.raises(FileNotFoundError, match=r"record 43001: image not found: .*COCO_val2014_000000000043"):
        ev.read_vqav2(str(root))
    root = vqav2_fixture(tmp_path / "c")
    write_json(root / "questions.json", {"questions": [{"image_id": 42, "question_id": 42001}]})
    with pytest.raises(ValueError, match=r"questions\.json: record 42001: missing field 'question'"):
        ev.read_vqav2(str(root))
    with pytest.raises(FileNotFoundError, match="no VQAv2 questions file"):
        ev.read_vqav2(str(tmp_path))


def test_gqa(tmp_path):
    q = {"1": {"imageId": "n1", "question": "Which side?", "answer": "left", "isBalanced": True,
               "types": {"structural": "query"}},
         "2": {"imageId": "n1", "question": "Is it?", "answer": "yes", "isBalanced": True,
               "types": {"structural": "verify"}},
         "3": {"imageId": "n2", "question": "Side?", "answer": "left", "isBalanced": True,
               "types": {"structural": "query"}},
         "4": {"imageId": "n9", "question": "x", "answer": "no", "isBalanced": False,
               "types": {"structural": "verify"}}}
    path = write_json(tmp_path / "gqa" / "testdev_balanced_questions.json", q)
    png(tmp_path / "gqa" / "images" / "n1.jpg")
    png(tmp_path / "gqa" / "images" / "n2.jpg")
    items = ev.read_gqa(str(tmp_path / "gqa"))
    assert [it["id"] for it in items] == ["1", "2", "3"]          # unbalanced one dropped
    answers = {"Which side?": "Left.", "Is it?": "Yes", "Side?": "the left"}
    gen = Recorder(lambda r: answers[r["prompt"].split("\n")[1]])
    m, _ = ev.eval_gqa(gen, items)
    assert m["accuracy"] == pytest.approx(200 / 3) and m["open"] == 50.0 and m["binary"] == 100.0
    del q["2"]["answer"]
    write_json(tmp_path / "gqa" / "testdev_balanced_questions.json", q)
    with pytest.raises(ValueError, match=r"testdev_balanced_questions\.json: record 2: missing field 'answer'"):
        ev.read_gqa(path)


def test_textvqa_with_ocr_line(tmp_path):
    data = {"dataset_name": "textvqa",
            "data": [{"question": "what brand?", "question_id": 7, "image_id": "abc",
                      "answers": ["nikon"] * 10, "set_name": "val"}]}
    write_json(tmp_path / "t" / "TextVQA_0.5.1_val.json", data)
    png(tmp_path / "t" / "train_images" / "abc.jpg")
    ocr = write_json(tmp_path / "ocr.json", {"data": [{"image_id": "abc", "ocr_tokens": ["NIKON", "D50"]}]})
    gen = Recorder(lambda r: "Nikon")
    m, _ = ev.eval_textvqa(gen, ev.read_textvqa(str(tmp_path / "t"), ocr))
    assert gen.requests[0]["prompt"] == ("<image>\nwhat brand?\nReference OCR token: NIKON, D50\n" + VQA_LINE)
    assert m["accuracy"] == 100.0
    gen = Recorder(lambda r: "canon")
    m, _ = ev.eval_textvqa(gen, ev.read_textvqa(str(tmp_path / "t")))
    assert gen.requests[0]["prompt"] == "<image>\nwhat brand?\n" + VQA_LINE and m["accuracy"] == 0.0
    data["data"][0]["answers"] = ["nikon"] * 11
    write_json(tmp_path / "t" / "TextVQA_0.5.1_val.json", data)
    with pytest.raises(ValueError, match="record 7: field 'answers' must hold exactly 10 answers, got 11"):
        ev.read_textvqa(str(tmp_path / "t"))


def test_vizwiz(tmp_path):
    items = [{"image": "VizWiz_val_00000001.jpg", "question": "What is this?",
              "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10,
              "answer_type": "unanswerable", "answerable": 0},
             {"image": "VizWiz_val_00000002.jpg", "question": "Color?",
              "answers": [{"answer": "red", "answer_confidence": "yes"}] * 3
              + [{"answer": "Red", "answer_confidence": "yes"}] * 7, "answer_type": "other", "answerable": 1}]
    write_json(tmp_path / "vw" / "Annotations" / "val.json", items)
    for it in items:
        png(tmp_path / "vw" / "val" / it["image"])
    gen = Recorder(lambda r: "Unanswerable" if "this" in r["prompt"] else "RED")
    m, _ = ev.eval_vizwiz(gen, ev.read_vizwiz(str(tmp_path / "vw")))
    assert gen.requests[0]["prompt"] == ("<image>\nWhat is this?\nWhen the provided information is insufficient, "
                                         "respond with 'Unanswerable'.\n" + VQA_LINE)
    # "RED" -> "red" matches the 3 lowercase GT only (GT "Red" is not normalised): m = 3 -> 0.9
    assert m["accuracy"] == pytest.approx(95.0)
    assert m["by_answer_type"] == {"unanswerable": 100.0, "other": pytest.approx(90.0)}
    items[1]["answers"] = items[1]["answers"][:4]
    write_json(tmp_path / "vw" / "Annotations" / "val.json", items)
    with pytest.raises(ValueError, match="record VizWiz_val_00000002.jpg: field 'answers' must hold exactly 10"):
        ev.read_vizwiz(str(tmp_path / "vw"))


# -----------------------------------------------------------------------------
# MME

def mme_fixture(root):
    # split layout (artwork), flat layout (existence, code_reasoning)
    png(root / "artwork" / "images" / "a1.jpg")
    os.makedirs(root / "artwork" / "questions_answers_YN")
    (root / "artwork" / "questions_answers_YN" / "a1.txt").write_text(
        "Is this by Monet?  Please answer yes or no.\tYes\nIs this by Dali? Please answer yes or no.\tNo\n")
    for stem, qa in (("e1", [("Is there a cat?", "Yes"), ("Is there a dog?", "No")]),
                     ("e2", [("Is there a car?", "Yes"), ("Is there a bus?", "No")])):
        png(root / "existence" / f"{stem}.png")
        (root / "existence" / f"{stem}.txt").write_text(
            "".join(f"{q} Please answer yes or no.\t{a}\n" for q, a in qa))
    png(root / "code_reasoning" / "c1.png")
    (root / "code_reasoning" / "c1.txt").write_text(
        "Is the output 3? Please answer yes or no.\tYes\nIs the output 4? Please answer yes or no.\tNo\n")
    return root


def test_mme_parse():
    assert ev.mme_parse("Yes") == "yes" and ev.mme_parse("No.") == "no"
    assert ev.mme_parse("Yes, it is") == "yes" and ev.mme_parse("Nope") == "no"
    assert ev.mme_parse("I think yes") == "other" and ev.mme_parse("") == "other"


def test_mme_scores(tmp_path):
    root = mme_fixture(tmp_path / "MME_Benchmark_release_version")
    subtasks = ev.read_mme(str(root))
    assert list(subtasks) == ["existence", "artwork", "code_reasoning"]
    answers = {"Is this by Monet?": "Yes", "Is this by Dali?": "No",          # artwork: 2/2
               "Is there a cat?": "Yes", "Is there a dog?": "No",            # e1: 2/2
               "Is there a car?": "yes", "Is there a bus?": "Yes",           # e2: 1/2
               "Is the output 3?": "Maybe", "Is the output 4?": "No"}        # c1: 1/2 ("other" is wrong)
    gen = Recorder(lambda r: answers[r["prompt"].split("\n")[1]])
    m, records = ev.eval_mme(gen, subtasks)
    assert gen.requests[0]["prompt"] == "<image>\nIs there a cat?\n" + VQA_LINE
    assert "<image>\nIs this by Monet?\n" + VQA_LINE in [r["prompt"] for r in gen.requests]  # double space
    ex = m["subtasks"]["existence"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (75.0, 50.0, 125.0)
    assert m["subtasks"]["artwork"]["score"] == 200.0
    assert m["subtasks"]["code_reasoning"] == {"n_images": 1, "acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert m["perception"] == 325.0 and m["cognition"] == 50.0
    assert [r["image"] for r in records[:4]] == ["e1", "e1", "e2", "e2"]  # pairs on consecutive lines


def test_mme_malformed(tmp_path):
    root = mme_fixture(tmp_path / "m")
    (root / "existence" / "e2.txt").write_text("Q1 Please answer yes or no.\tYes\n")
    with pytest.raises(ValueError, match=r"e2\.txt: expected 2 lines"):
        ev.read_mme(str(root))
    root = mme_fixture(tmp_path / "n")
    (root / "existence" / "e2.txt").write_text("Q1\tYes\nQ2\tMaybe\n")
    with pytest.raises(ValueError, match=r"e2\.txt: line 2"):
        ev.read_mme(str(root))
    root = mme_fixture(tmp_path / "o")
    os.remove(root / "artwork" / "images" / "a1.jpg")
    with pytest.raises(FileNotFoundError, match=r"a1\.txt: no image a1"):
        ev.read_mme(str(root))


# -----------------------------------------------------------------------------
# SugarCrepe

def sugarcrepe_fixture(root):
    # swap_obj with a key gap (no "1"), as in the official file after the fix
    write_json(root / "data" / "swap_obj.json", {
        "0": {"filename": "000000000001.jpg", "caption": "cat on mat", "negative_caption": "mat on cat"},
        "2": {"filename": "000000000002.jpg", "caption": "dog near car", "negative_caption": "car near dog"}})
    write_json(root / "data" / "add_att.json", {
        "0": {"filename": "000000000001.jpg", "caption": "a cat", "negative_caption": "a red cat"}})
    png(root / "images" / "000000000001.jpg")
    png(root / "images" / "000000000002.jpg")
    return root


def sugarcrepe_answer(r):
    a, b = re.search(r"\(A\) (.*)\n \(B\) (.*)\n", r["prompt"]).groups()
    if "cat on mat" in (a, b):
        return "A"                       # always A: right in pos_first only
    if "dog near car" in (a, b):
        return "(B)" if b == "dog near car" else "A."   # always right
    return "a cat sits there."           # verbose: parses as "A" (the article), right in pos_first only


def test_sugarcrepe_protocol_and_metric(tmp_path):
    root = sugarcrepe_fixture(tmp_path / "sc")
    subsets = ev.read_sugarcrepe(str(root))
    assert list(subsets) == ["swap_obj", "add_att"]          # authors' order, present subsets only
    assert [it["id"] for it in subsets["swap_obj"]] == ["0", "2"]
    gen = Recorder(sugarcrepe_answer)
    m, records = ev.eval_sugarcrepe(gen, subsets)
    prompts = [r["prompt"] for r in gen.requests]
    assert prompts[:2] == [
        "<image>\nWhich caption best describes the image?\n(A) cat on mat\n (B) mat on cat\n"
        "Answer with the option's alphabet from the given choices directly.",
        "<image>\nWhich caption best describes the image?\n(A) mat on cat\n (B) cat on mat\n"
        "Answer with the option's alphabet from the given choices directly."]
    assert len(prompts) == 6 and gen.requests[0]["image"].endswith("000000000001.jpg")
    so = m["subsets"]["swap_obj"]
    assert (so["acc_pos_first"], so["acc_neg_first"], so["average"]) == (100.0, 50.0, 75.0)
    aa = m["subsets"]["add_att"]
    assert (aa["acc_pos_first"], aa["acc_neg_first"], aa["average"]) == (100.0, 0.0, 50.0)
    assert m["average"] == 62.5 and m["complete"] is False
    assert m["subsets_present"] == ["swap_obj", "add_att"]
    assert records[0] == {"benchmark": "sugarcrepe", "subset": "swap_obj", "id": "0", "pos_first": "A",
                          "neg_first": "A"}


def test_sugarcrepe_original_protocol_is_pos_score_strictly_above_neg(tmp_path):
    """SugarCrepe's own metric, s(pos) > s(neg) strictly (main_eval.py): worked by hand on fixed scores,
    a tie counting as wrong; the requests are match_request's prompt per caption."""
    root = sugarcrepe_fixture(tmp_path / "sc")
    subsets = ev.read_sugarcrepe(str(root))
    table = {"cat on mat": 0.9, "mat on cat": 0.2,      # swap_obj 0: right
             "dog near car": 0.4, "car near dog": 0.4,  # swap_obj 2: a tie, wrong
             "a cat": 0.1, "a red cat": 0.7}            # add_att 0: wrong
    seen = []

    by_prompt = {ev.MATCH_PROMPT.format(caption=c): v for c, v in table.items()}

    def score(reqs):
        seen.extend(reqs)
        return [by_prompt[r["prompt"]] for r in reqs]
    m, records = ev.eval_sugarcrepe_match(score, subsets)
    assert [r["prompt"] for r in seen[:2]] == [ev.MATCH_PROMPT.format(caption="cat on mat"),
                                               ev.MATCH_PROMPT.format(caption="mat on cat")]
    assert m["subsets"]["swap_obj"] == {"n": 2, "acc": 50.0} and m["subsets"]["add_att"] == {"n": 1, "acc": 0.0}
    assert m["average"] == 25.0 and m["complete"] is False
    assert records[1] == {"benchmark": "sugarcrepe_match", "subset": "swap_obj", "id": "2", "s_pos": 0.4, "s_neg": 0.4}


def test_parse_choice():
    assert ev.parse_choice("a cat") == "A"            # the pitfall: .upper() then \bA\b
    assert ev.parse_choice(" (B) ") == "B"
    assert ev.parse_choice("Both") is None and ev.parse_choice("") is None
    assert ev.parse_choice("The answer is B") == "B"


def test_sugarcrepe_malformed(tmp_path):
    root = sugarcrepe_fixture(tmp_path / "a")
    write_json(root / "data" / "add_att.json", {"0": {"filename": "000000000001.jpg", "caption": "x"}})
    with pytest.raises(ValueError, match=r"add_att\.json: record 0: missing field 'negative_caption'"):
        ev.read_sugarcrepe(str(root))
    root = sugarcrepe_fixture(tmp_path / "b")
    os.remove(root / "images" / "000000000002.jpg")
    with pytest.raises(FileNotFoundError, match=r"swap_obj\.json: record 2: image not found"):
        ev.read_sugarcrepe(str(root))
    write_json(root / "data" / "swap_obj.json", [1, 2])
    with pytest.raises(ValueError, match="expected a JSON object keyed by item id"):
        ev.read_sugarcrepe(str(root))
    with pytest.raises(FileNotFoundError, match="no SugarCrepe subset found"):
        ev.read_sugarcrepe(str(tmp_path))


def test_sugarcrepe_coco_images_option(tmp_path):
    root = sugarcrepe_fixture(tmp_path / "sc")
    png(tmp_path / "coco" / "000000000001.jpg")
    png(tmp_path / "coco" / "000000000002.jpg")
    subsets = ev.read_sugarcrepe(str(root), image_dir=str(tmp_path / "coco"), limit=1)
    assert subsets["swap_obj"][0]["image"] == str(tmp_path / "coco" / "000000000001.jpg")
    assert len(subsets["swap_obj"]) == 1


# -----------------------------------------------------------------------------
# Winoground / BiVLC / SADE: the match score

def table_score_fn(table, calls):
    """score_fn stub: s(caption, image basename) from a table; records requests."""
    def score_fn(requests):
        out = []
        for r in requests:
            calls.append(r)
            cap = re.fullmatch(r"<image>\nDoes this image show '(.*)'\? Answer yes or no\.", r["prompt"]).group(1)
            out.append(table[(cap, os.path.basename(r["image"]))])
        return out
    return score_fn


def winoground_fixture(root):
    rows = [{"id": i, "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1", "caption_0": f"c{i}0",
             "caption_1": f"c{i}1", "tag": "Noun", "secondary_tag": "", "num_main_preds": 1,
             "collapsed_tag": tag} for i, tag in enumerate(["Object", "Relation", "Object"])]
    write_jsonl(root / "examples.jsonl", rows)
    for i in range(3):
        for j in (0, 1):
            png(root / "images" / f"ex_{i}_img_{j}.png")
    return root


def winoground_table():
    t = {}
    def put(i, s):  # s[c][img]
        for c in (0, 1):
            for j in (0, 1):
                t[(f"c{i}{c}", f"ex_{i}_img_{j}.png")] = s[c][j]
    put(0, [[-1.0, -3.0], [-2.0, -0.5]])   # text, image, group all correct
    put(1, [[-1.0, -1.0], [-1.0, -0.5]])   # ties: s00 == s10 (text fails) and s00 == s01 (image fails)
    put(2, [[-1.0, -0.5], [-2.0, -0.1]])   # text correct; image: s00 < s01 -> wrong
    return t


def test_winoground_strict_scores(tmp_path):
    items = ev.read_winoground(str(winoground_fixture(tmp_path / "wg")))
    calls = []
    m, records = ev.eval_pairs(table_score_fn(winoground_table(), calls), items)
    assert len(calls) == 12
    assert calls[0] == {"image": str(tmp_path / "wg" / "images" / "ex_0_img_0.png"),
                        "prompt": "<image>\nDoes this image show 'c00'? Answer yes or no."}
    assert m["text"] == pytest.approx(200 / 3) and m["image"] == pytest.approx(100 / 3)
    assert m["group"] == pytest.approx(100 / 3)
    assert m["by_tag"]["Object"] == {"n": 2, "text": 100.0, "image": 50.0, "group": 50.0}
    assert m["by_tag"]["Relation"] == {"n": 1, "text": 0.0, "image": 0.0, "group": 0.0}
    assert ev.winoground_scores([[0, 0], [0, 0]]) == (False, False, False)


def test_winoground_two_choice_text_score(tmp_path):
    items = ev.read_winoground(str(winoground_fixture(tmp_path / "wg")))
    calls = []
    # example 0: always right; example 1: answers "A" always (right only when its caption is A);
    # example 2: image 0 always right, image 1 always "B"
    def answer(r):
        a, b = re.search(r"\(A\) (.*)\n \(B\) (.*)\n", r["prompt"]).groups()
        img = os.path.basename(r["image"])
        if img.startswith("ex_0"):
            return "A" if a == f"c0{img[-5]}" else "B"
        if img.startswith("ex_1"):
            return "A"
        return ("A" if a == "c20" else "B") if img == "ex_2_img_0.png" else "B"
    gen = Recorder(answer)
    m, _ = ev.eval_pairs(table_score_fn(winoground_table(), calls), items, generate_fn=gen)
    assert len(gen.requests) == 12
    assert gen.requests[0]["prompt"].startswith("<image>\nWhich caption best describes the image?\n(A) c00\n (B) c01\n")
    assert gen.requests[1]["prompt"].startswith("<image>\nWhich caption best describes the image?\n(A) c01\n (B) c00\n")
    # right-first order: ex0 yes, ex1 yes (A, A), ex2 no (img1 says B) -> 2/3
    # right-second order: ex0 yes, ex1 no, ex2 yes (img0 right, img1 B right) -> 2/3
    assert m["text_2choice_right_first"] == pytest.approx(200 / 3)
    assert m["text_2choice_right_second"] == pytest.approx(200 / 3)
    assert m["text_2choice"] == pytest.approx(200 / 3)


def test_winoground_malformed(tmp_path):
    root = winoground_fixture(tmp_path / "wg")
    os.remove(root / "images" / "ex_2_img_1.png")
    with pytest.raises(FileNotFoundError, match=r"examples\.jsonl: record 2: image not found: .*ex_2_img_1\.png"):
        ev.read_winoground(str(root))
    write_jsonl(root / "examples.jsonl", [{"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1",
                                           "caption_0": "x"}])
    with pytest.raises(ValueError, match=r"record 0: missing field 'caption_1'"):
        ev.read_winoground(str(root))


def test_bivlc_jsonl(tmp_path):
    rows = [{"image": "img/p0.jpg", "caption": "c00", "negative_caption": "c01", "negative_image": "img/n0.png",
             "type": "swap", "subtype": "att"},
            {"image": "img/p1.jpg", "caption": "c10", "negative_caption": "c11", "negative_image": "img/n1.png",
             "type": "add", "subtype": "obj"}]
    path = write_jsonl(tmp_path / "bivlc" / "test.jsonl", rows)
    for n in ("p0.jpg", "n0.png", "p1.jpg", "n1.png"):
        png(tmp_path / "bivlc" / "img" / n)
    items = ev.read_bivlc(path)
    assert items[0]["captions"] == ("c00", "c01") and items[0]["tag"] == "swap/att"
    t = {("c00", "p0.jpg"): -1, ("c00", "n0.png"): -2, ("c01", "p0.jpg"): -3, ("c01", "n0.png"): -0.5,  # all right
         ("c10", "p1.jpg"): -1, ("c10", "n1.png"): -2, ("c11", "p1.jpg"): -0.5, ("c11", "n1.png"): -0.1}
    # row 1: I2T: s(C0,I0)=-1 > s(C1,I0)=-0.5? no -> text wrong; T2I: -1 > -2 and -0.1 > -0.5 -> image right
    m, _ = ev.eval_pairs(table_score_fn(t, []), items, benchmark="bivlc")
    assert (m["text"], m["image"], m["group"]) == (50.0, 100.0, 50.0)
    assert m["by_tag"]["add/obj"] == {"n": 1, "text": 0.0, "image": 100.0, "group": 0.0}
    del rows[1]["negative_image"]
    write_jsonl(tmp_path / "bivlc" / "test.jsonl", rows)
    with pytest.raises(ValueError, match=r"test\.jsonl: record 1: missing field 'negative_image'"):
        ev.read_bivlc(path)


def test_bivlc_parquet(tmp_path):
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        with pytest.raises(ImportError, match="needs pyarrow"):
            ev.read_bivlc(str(tmp_path / "test-00000.parquet"))
        return
    cell = {"bytes": open(png(tmp_path / "i.png"), "rb").read(), "path": None}
    table = pyarrow.Table.from_pylist([{"image": cell, "caption": "a", "negative_caption": "b",
                                        "negative_image": cell, "type": "swap", "subtype": "att"}])
    pq.write_table(table, tmp_path / "test-00000.parquet")
    items = ev.read_bivlc(str(tmp_path / "test-00000.parquet"))
    assert items[0]["captions"] == ("a", "b") and ev.open_image(items[0]["images"][1]).size == (2, 2)


def test_sade_recall_at_1(tmp_path):
    rows = [{"id": "r1", "image": "i.jpg", "positive": "p1", "negatives": ["n1"], "branch": "relation"},
            {"id": "r2", "image": "i.jpg", "positive": "p2", "negatives": ["n2"], "branch": "relation"},  # tie
            {"id": "a1", "image": "i.jpg", "positive": "p3", "negatives": ["n3", "m3", "o3"], "branch": "atomic"}]
    path = write_jsonl(tmp_path / "sade.jsonl", rows)
    png(tmp_path / "i.jpg")
    items = ev.read_sade(path)
    t = {(c, "i.jpg"): v for c, v in {"p1": -1, "n1": -2, "p2": -1, "n2": -1,
                                      "p3": -1, "n3": -2, "m3": -3, "o3": -1.5}.items()}
    calls = []
    m, _ = ev.eval_sade(table_score_fn(t, calls), items)
    assert m["branches"] == {"relation": {"n": 2, "recall_at_1": 50.0}, "atomic": {"n": 1, "recall_at_1": 100.0}}
    assert m["average"] == 75.0 and len(calls) == 8
    write_jsonl(tmp_path / "sade.jsonl", [{"id": "x", "image": "i.jpg", "positive": "p", "negatives": []}])
    with pytest.raises(ValueError, match="record x: field 'negatives' must be a non-empty list"):
        ev.read_sade(path)


# -----------------------------------------------------------------------------
# CLI (the model glue replaced by stubs)

def test_cli_cr_and_suite(tmp_path, monkeypatch):
    sc = sugarcrepe_fixture(tmp_path / "sc")
    wg = winoground_fixture(tmp_path / "wg")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    seen = {}

    def fake_make_model_fns(model, device, batch_size, max_new_tokens, dtype):
        seen.update(model=model, device=device, batch_size=batch_size, max_new_tokens=max_new_tokens)
        match = {("cat on mat", "000000000001.jpg"): 0.9, ("mat on cat", "000000000001.jpg"): 0.1,   # right
                 ("dog near car", "000000000002.jpg"): 0.2, ("car near dog", "000000000002.jpg"): 0.3,  # wrong
                 ("a cat", "000000000001.jpg"): 0.5, ("a red cat", "000000000001.jpg"): 0.4}  # right
        return Recorder(sugarcrepe_answer), table_score_fn({**winoground_table(), **match}, [])
    monkeypatch.setattr(ev, "make_model_fns", fake_make_model_fns)
    suite = write_json(tmp_path / "suite.json", {"winoground": "wg", "two_choice": False})
    results = ev.main(["cr", "--model", str(model_dir), "--sugarcrepe", str(sc), "--suite", suite,
                       "--device", "cpu"])
    assert seen == {"model": str(model_dir), "device": "cpu", "batch_size": 8, "max_new_tokens": 32}
    out = model_dir / "eval"
    saved = json.loads((out / "cr_results.json").read_text())
    assert saved["benchmarks"]["sugarcrepe"]["average"] == 62.5  # the headline: the 2-choice protocol
    match = saved["benchmarks"]["sugarcrepe"]["match_protocol"]  # SugarCrepe's own, beside it
    assert match["subsets"]["swap_obj"]["acc"] == 50.0 and match["average"] == 75.0
    assert saved["headline"]["winoground"] == ["group", pytest.approx(100 / 3)]
    assert saved["average"] == pytest.approx((62.5 + 100 / 3) / 2) == results["average"]
    md = (out / "cr_results.md").read_text()
    assert "| sugarcrepe | swap_obj | average | 75.00 |" in md and "| winoground | - | group | 33.33 |" in md
    assert len((out / "cr_predictions.jsonl").read_text().splitlines()) == 3 + 3 + 3  # + the match records
    assert wg.exists()


def test_cli_vqa_and_errors(tmp_path, monkeypatch):
    root = vqav2_fixture(tmp_path / "vqav2")
    mme = mme_fixture(tmp_path / "mme")
    monkeypatch.setattr(ev, "make_model_fns", lambda *a: (Recorder(lambda r: "Yes"), None))
    ev.main(["vqa", "--model", str(tmp_path), "--vqav2", str(root), "--mme", str(mme), "--out",
             str(tmp_path / "o"), "--device", "cpu"])
    saved = json.loads((tmp_path / "o" / "vqa_results.json").read_text())
    # "Yes": q1 1.0, q2 0.0 -> 50.0; MME "Yes" everywhere: every subtask acc 50, acc+ 0
    assert saved["benchmarks"]["vqav2"]["accuracy"] == 50.0
    assert saved["benchmarks"]["mme"]["perception"] == 100.0
    assert saved["average"] == pytest.approx((50.0 + 100.0 / 20) / 2)
    with pytest.raises(SystemExit, match="give at least one benchmark"):
        ev.main(["vqa", "--model", str(tmp_path)])
    bad = write_json(tmp_path / "bad_suite.json", {"sugarcrepe": "x"})
    with pytest.raises(ValueError, match="unknown option 'sugarcrepe' for the 'vqa' command"):
        ev.main(["vqa", "--model", str(tmp_path), "--suite", bad])


def test_attention_commands_moved_to_attention_py(monkeypatch):
    """The attention study is attention.py's; the old commands say where it went, without importing it."""
    monkeypatch.delitem(sys.modules, "attention", raising=False)
    with pytest.raises(SystemExit, match=r"`evaluate.py attention` is now `python attention.py distance`"):
        ev.main(["attention", "--teacher", "t", "--student", "s"])
    with pytest.raises(SystemExit, match=r"`evaluate.py layers` is now `python attention.py layers`"):
        ev.main(["layers"])
    assert "attention" not in sys.modules
    with open(ev.__file__, encoding="utf-8") as f:  # nor anywhere else, at the top or inside a function
        assert not re.search(r"^\s*(import attention|from attention import)\b", f.read(), re.M)


# -----------------------------------------------------------------------------
# The glue on a tiny real model (model.py + data.py), against unbatched, uncached references

GLUE_CORPUS = ["Yes No yes no " * 20 + "a red circle blue square left of what color", ev.CHOICE_PROMPT,
               ev.MATCH_PROMPT, ev.VQA_INSTRUCTION, "system user assistant"]


def test_model_glue_matches_unbatched_reference(tmp_path):
    import torch

    import data
    import shapes
    import model as M
    tok = shapes.train_tokenizer(GLUE_CORPUS, str(tmp_path / "tok"), vocab_size=400)
    yes = tok.encode("Yes", add_special_tokens=False)
    assert len(yes) == 1
    # Qwen2's default init: near-uniform attention and logits, so that with the rows below zeroed greedy
    # decoding emits text (at the preset's 0.125 one prompt's first token decodes to "")
    m = M.from_preset("student", tok, seed=1, initializer_range=0.02)
    with torch.no_grad():  # zero the (tied) rows of special tokens and "\n" so greedy decoding emits text
        m.language_model.get_input_embeddings().weight[tok.all_special_ids + tok.encode("\n")] = 0
    M.save_pretrained(m, str(tmp_path / "m"), tok)
    generate_fn, score_fn = ev.make_model_fns(str(tmp_path / "m"), batch_size=2, max_new_tokens=4)
    ref, _, proc = M.load_pretrained(str(tmp_path / "m"))
    ref.eval()
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green")]

    def prompt_ids(r):
        return data.render_prompt(tok, [{"role": "user", "content": r["prompt"]}], ref.num_visual_tokens,
                                  ref.image_token_id)

    def pixels(r):
        return None if r["image"] is None else proc(images=[r["image"]], return_tensors="pt")["pixel_values"]

    reqs = [ev.match_request(images[0], "a red circle"), ev.match_request(images[1], "a blue square left of a circle"),
            ev.match_request(images[2], "red")]   # 3 lengths, batch size 2: padded rows and a last short batch
    with torch.no_grad():
        for r, got in zip(reqs, score_fn(reqs)):
            logits = ref(torch.tensor([prompt_ids(r)]), pixel_values=pixels(r))["logits"][0, -1].double()
            assert got == pytest.approx(float(torch.log_softmax(logits, -1)[yes[0]]), abs=1e-4)
        greqs = [ev.vqa_request(images[0], "what color?"), ev.choice_request(images[1], "a red circle", "blue"),
                 {"image": None, "prompt": "red circle"}]
        stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
        outs = generate_fn(greqs)
        assert all(outs)  # real text, so the comparison below means something
        for r, got in zip(greqs, outs):
            ids, new = prompt_ids(r), []
            for _ in range(4):   # greedy without a KV cache, one sample at a time
                nxt = int(ref(torch.tensor([ids + new]), pixel_values=pixels(r))["logits"][0, -1].argmax())
                if nxt in stop:
                    break
                new.append(nxt)
            assert got == tok.decode(new, skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="exactly one '<image>'"):
        generate_fn([{"image": images[0], "prompt": "no placeholder"}])


def test_model_glue_yes_must_be_one_token(tmp_path):
    import shapes
    import model as M
    tok = shapes.train_tokenizer(["Y e s N o"], str(tmp_path / "tok"), vocab_size=280)
    assert len(tok.encode("Yes", add_special_tokens=False)) > 1
    M.save_pretrained(M.from_preset("student", tok), str(tmp_path / "m"), tok)
    with pytest.raises(ValueError, match="splits 'Yes' into"):
        ev.make_model_fns(str(tmp_path / "m"))


# -----------------------------------------------------------------------------
# Inputs that were silently wrong (issue 18, item 13)

def test_repeated_ids_empty_subsets_bad_limits_odd_values_and_unwritable_out_are_errors(tmp_path, monkeypatch):
    root = vqav2_fixture(tmp_path / "dq")  # a question_id twice in questions.json: it would be scored twice
    qs = json.loads((root / "questions.json").read_text())
    qs["questions"].append(dict(qs["questions"][0]))
    write_json(root / "questions.json", qs)
    with pytest.raises(ValueError, match=r"questions\.json: question_id 42001 occurs twice"):
        ev.read_vqav2(str(root))
    root = vqav2_fixture(tmp_path / "da")  # twice in the annotations: the last one silently won
    an = json.loads((root / "annotations.json").read_text())
    an["annotations"].append(dict(an["annotations"][0]))
    write_json(root / "annotations.json", an)
    with pytest.raises(ValueError, match=r"annotations\.json: question_id 42001 occurs twice"):
        ev.read_vqav2(str(root))
    root = vqav2_fixture(tmp_path / "ia")  # integer answers crashed in the metric without a record
    an = json.loads((root / "annotations.json").read_text())
    for a in an["annotations"][1]["answers"]:
        a["answer"] = 2
    write_json(root / "annotations.json", an)
    with pytest.raises(ValueError, match=r"annotations\.json: record 43001: field 'answer' must be a string, got int"):
        ev.read_vqav2(str(root))
    mme = mme_fixture(tmp_path / "mme")  # a latin-1 file: a UnicodeDecodeError without the file
    (mme / "existence" / "e2.txt").write_bytes("Is there a caf\xe9? Please answer yes or no.\tYes\nQ2\tNo\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"e2\.txt: not UTF-8"):
        ev.read_mme(str(mme))
    sc = sugarcrepe_fixture(tmp_path / "sc")  # an empty subset counted as 0% in the average
    write_json(sc / "data" / "add_att.json", {})
    with pytest.raises(ValueError, match=r"add_att\.json: no items"):
        ev.read_sugarcrepe(str(sc))
    # the CLI: --limit 0 / negative are errors; an unwritable output folder fails BEFORE the model loads
    monkeypatch.setattr(ev, "make_model_fns", lambda *a: (_ for _ in ()).throw(AssertionError("model loaded")))
    sc = sugarcrepe_fixture(tmp_path / "sc2")
    for limit in ("0", "-1"):
        with pytest.raises(SystemExit):
            ev.main(["cr", "--model", str(tmp_path), "--sugarcrepe", str(sc), "--limit", limit])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=r"a_file.*cannot write the report"):
        ev.main(["cr", "--model", str(tmp_path), "--sugarcrepe", str(sc), "--out", str(blocker / "eval")])


# -----------------------------------------------------------------------------
# Evaluation at a real vocabulary's cost (issue 38, item 2)

def _glue_model(tmp_path, **overrides):
    """A tiny model that emits text under greedy decoding (see test_model_glue_matches_unbatched_reference)."""
    import torch

    import model as M
    import shapes
    tok = shapes.train_tokenizer(GLUE_CORPUS, str(tmp_path / "tok"), vocab_size=400)
    m = M.from_preset("student", tok, seed=1, initializer_range=0.02)
    if overrides:  # the same architecture with another text config (a larger vocabulary)
        cfg = m.config_dict()
        cfg["text_config"].update(overrides)
        torch.manual_seed(1)
        m = M.model_from_config(cfg)
    with torch.no_grad():
        m.language_model.get_input_embeddings().weight[tok.all_special_ids + tok.encode("\n")] = 0
    return m.eval(), tok


def test_generation_applies_the_lm_head_to_the_last_position_only(tmp_path):
    """One greedy step over 8 prompts of ~220 tokens at a 32,000-row vocabulary: the largest tensor any op
    makes is far below the (8, T, V) fp32 logits the prompt's forward used to build (226 MB here; 4.1 GiB at
    Qwen2.5-0.5B's 151,936 rows and 770 tokens), and the answers equal greedy decoding without a cache, one
    prompt at a time, on full logits."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    m, tok = _glue_model(tmp_path, vocab_size=32000)

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel() * t.element_size())
            return out

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, 400, (200 + 3 * b,), generator=g).tolist() for b in range(8)]
    T = max(map(len, rows))
    ids = torch.full((8, T), tok.pad_token_id)
    mask = torch.zeros((8, T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
    with Largest():
        step = m.generate(ids, mask, max_new_tokens=1)
    full_logits = 8 * T * 32000 * 4
    assert Largest.biggest < full_logits / 20, (Largest.biggest, full_logits)
    got = m.generate(ids, mask, max_new_tokens=3)
    with torch.no_grad():
        for b, r in enumerate(rows):
            x, ref = torch.tensor([r]), []
            for _ in range(3):
                nxt = int(m(x, torch.ones_like(x))["logits"][0, -1].argmax())
                ref.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]])], 1)
            assert got[b] == ref and step[b] == ref[:1]


def _split_worker(rank, model_dir, sc_root, port, out):
    import torch.distributed as dist

    import model as M
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    m, tok, proc = M.load_pretrained(model_dir)
    items = ev.read_sugarcrepe(sc_root)
    generate, _ = ev.model_fns(m, tok, proc, batch_size=2, max_new_tokens=4, progress=False)
    reqs = [ev.choice_request(it["image"], it["pos"], it["neg"]) for sub in items.values() for it in sub] * 2
    answers = ev.split_over_ranks(generate)(reqs)
    val = ev.validate_cr(m, tok, proc, items, "cpu", split=True, batch_size=2)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"answers": answers, "val": val}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_validation_split_over_two_ranks_equals_one_process(tmp_path):
    """In-loop validation under DDP: each of 2 gloo ranks answers its share of the requests (odd counts,
    batches of 2), every rank gets every answer, in order: the same answers and val_cr as one process."""
    import torch.multiprocessing as mp

    import model as M
    m, tok = _glue_model(tmp_path)
    M.save_pretrained(m, str(tmp_path / "m"), tok)
    sc = sugarcrepe_fixture(tmp_path / "sc")
    m, tok, proc = M.load_pretrained(str(tmp_path / "m"))
    items = ev.read_sugarcrepe(str(sc))
    generate, _ = ev.model_fns(m, tok, proc, batch_size=2, max_new_tokens=4, progress=False)
    reqs = [ev.choice_request(it["image"], it["pos"], it["neg"]) for sub in items.values() for it in sub] * 2
    one = {"answers": generate(reqs), "val": ev.validate_cr(m, tok, proc, items, "cpu", batch_size=2)}
    assert len(reqs) == 6 and any(one["answers"])
    mp.spawn(_split_worker, args=(str(tmp_path / "m"), str(sc), 29661, str(tmp_path / "r")), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"r.{rank}").read_text()) == one
