"""The attention study of a compodistill teacher-student pair: the paper's misalignment analysis (docs/method.md
section 7, "Analysis": how similar the student's visual attention is to the teacher's correlates with whether
its answer is right), attention heat maps, and per-layer attention profiles with the "auto" VAT window found
from them (docs/method.md section 8, open question 3).

The benchmarks are evaluate.py's: this file reads them with its readers, asks its prompts (`choice_request`,
`vqa_request`), gets the student's answers through its glue (`model_fns`) and judges them by its metrics;
evaluate.py imports nothing of this file. It reads top to bottom:

  1. capture and distance: the same prompt ids through teacher and student, their visual attention maps
     (`capture_maps`), the Eq. 3 cosine per matched layer (`attention_distance`) and its split by answer
     correctness (`split_by_correctness`)
  2. layer profiles: per layer, how each model's attention treats the visual tokens (`layer_profile`), the
     "auto" VAT window found from them (`vat.auto_layers`), and the LLM's hidden states at the image
     (`visual_token_states`)
  3. pictures, Pillow + numpy only: line plots (`attention_plot`) and heat maps (`attention_heatmap`)
  4. CLI: `python attention.py distance | layers ...`

A request is evaluate.py's {"image": ref, "prompt": str} (`prompt` starts with "<image>\n"); every request
here needs an image. Models are compodistill MLLMs, or directories and sources that `model.load_any` opens.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics

from evaluate import (DEFAULTS, _default_out, _source_dir, ask, check_writable, choice_request,
                      evalai_answer_processor, load_jsonl, model_fns, open_image, parse_choice, pct,
                      positive_int, read_sugarcrepe, read_vqav2, take, vqa_accuracy, vqa_request)


# -----------------------------------------------------------------------------
# 1. Capture and distance: the paper's misalignment study (docs/method.md section 7, "Analysis": teacher-student
#    attention similarity correlates with answer correctness) and attention heat maps.
#
#   python attention.py distance --teacher DIR --student DIR [--student DIR2 ...]
#                                (--sugarcrepe DIR | --vqav2 DIR ...) [--layers middle] [--teacher-layers SPEC]
#                                [--matching group] [--limit N] [--out DIR] [--heatmaps N]
#
# Per benchmark item, the SAME prompt ids go through teacher and student (they share the tokenizer and the
# vision encoder, docs/method.md section 1); `vat.capture_visual_attention` (rows="all", no grad) records A~_l of the
# chosen layers, `vat.group_layer_matching` pairs each student layer s_j with its teacher window G_j and
# `vat.map_cosine` gives cos(Abar_t^j, A~_s^{s_j}) exactly as L_ADL (Eq. 3, variant "paper") defines it. The
# student's greedy answer to the same request (evaluate.py's section 5 glue, its section 2/3 protocols) says
# whether it was right, so the cosines can be split into right / wrong items. "attn_dist" = 1 - cos averaged over
# items and matched layers: the number the demo logs, = L_ADL of the untrained pair.
#
# Heat maps use ONE query row: the last prompt token, the position whose logits give the first answer token
# (the "answer position"); its attention over the visual tokens is averaged over the matched layers (student:
# its selected layers; teacher: every teacher layer of some window, each once) and reshaped to the patch grid.

VQA_RIGHT = 0.9  # a VQA answer is "right" when >= 3 of the 10 annotators gave it (leave-one-out accuracy >= 0.9)


def attention_items(benchmarks):
    """{"sugarcrepe": {subset: items}, "vqav2": items} (evaluate.py's section 2a / 3b readers) -> one list of
    {"benchmark", "id", "text", "request", "judge"}: SugarCrepe asks `choice_request` with the TRUE caption as
    (A) (right = the parsed answer is A); VQAv2 asks `vqa_request` (right = vqa_accuracy of the
    EvalAI-processed answer >= VQA_RIGHT). `text` is what a heat map prints under the image."""
    out = []
    for subset, items in benchmarks.get("sugarcrepe", {}).items():
        for it in items:
            out.append({"benchmark": "sugarcrepe", "subset": subset, "id": it["id"],
                        "text": f"(A) {it['pos']}  (B) {it['neg']}  [true: A]",
                        "request": choice_request(it["image"], it["pos"], it["neg"]),
                        "judge": lambda ans: parse_choice(ans) == "A"})
    for it in benchmarks.get("vqav2", []):
        out.append({"benchmark": "vqav2", "id": it["id"], "text": f"Q: {it['question']}  (GT: {it['answers'][0]})",
                    "request": vqa_request(it["image"], it["question"]),
                    "judge": lambda ans, gts=it["answers"]: (vqa_accuracy(evalai_answer_processor(ans), gts)
                                                             >= VQA_RIGHT)})
    return out


def _prompt_ids(tokenizer, mllm, prompt):
    import data
    messages = data.with_system_prompt(tokenizer, [{"role": "user", "content": prompt}],
                                       mllm.extra_config.get("system_prompt"))
    return data.render_prompt(tokenizer, messages, mllm.num_visual_tokens, mllm.image_token_id)


def _request_name(r):
    return r.get("where") or f"request {r['prompt'][:60]!r}"  # read_requests records the file and line


def why_prompts_differ(teacher, t_tok, student, s_tok) -> str:
    """What makes teacher and student render a prompt into different ids: the tokenizers' vocabularies (a
    --cross-vocab teacher), their chat templates, the system prompts the models were trained with
    (train.py --system-prompt, in each config), the visual token count or the image token id."""
    why = []
    if t_tok.get_vocab() != s_tok.get_vocab():
        why.append("the tokenizers differ (a teacher with its own vocabulary, as --cross-vocab trains with)")
    elif t_tok.chat_template != s_tok.chat_template:
        why.append("the chat templates differ")
    sp_t, sp_s = teacher.extra_config.get("system_prompt"), student.extra_config.get("system_prompt")
    if sp_t != sp_s:
        why.append(f"the system prompts differ (teacher {sp_t!r}, student {sp_s!r}: train.py --system-prompt, "
                   "recorded in each model's config)")
    if teacher.num_visual_tokens != student.num_visual_tokens:
        why.append(f"visual tokens {teacher.num_visual_tokens} vs {student.num_visual_tokens}")
    if teacher.image_token_id != student.image_token_id:
        why.append(f"image token id {teacher.image_token_id} vs {student.image_token_id}")
    return "; ".join(why) or "the same tokenizer renders them differently"


def check_same_prompt_ids(teacher, t_tok, student, s_tok, request, student_name="student"):
    """Before any generation: the attention maps are compared query row by query row, so teacher and student
    must render `request` into the same ids, each with its own tokenizer; else an error saying why."""
    if _prompt_ids(t_tok, teacher, request["prompt"]) != _prompt_ids(s_tok, student, request["prompt"]):
        raise ValueError(f"{student_name}: teacher and student render different prompt ids "
                         f"({why_prompts_differ(teacher, t_tok, student, s_tok)}); the attention maps are compared "
                         "position by position and cannot be")


def _attention_batch(models, tokenizer, processor, reqs, pad_id):
    """Right-padded ids (B, T), attention mask and pixel values of a batch of requests, for every model of
    `models` (a teacher and a student, or one model). Every request needs an image, and every model must
    render the same prompt ids (the maps are compared query row by query row)."""
    import torch
    ids = []
    for r in reqs:
        if r["image"] is None or r["prompt"].count("<image>") != 1:
            raise ValueError(f"{_request_name(r)}: the attention analysis needs an image and exactly one '<image>' "
                             f"in the prompt (it has {r['prompt'].count('<image>')})")
        a = _prompt_ids(tokenizer, models[0], r["prompt"])
        for other in models[1:]:
            if _prompt_ids(tokenizer, other, r["prompt"]) != a:
                raise ValueError(f"{_request_name(r)}: teacher and student render different prompt ids "
                                 f"({why_prompts_differ(models[0], tokenizer, other, tokenizer)}); the maps cannot "
                                 "be compared")
        ids.append(a)
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for b, x in enumerate(ids):
        input_ids[b, :len(x)], mask[b, :len(x)] = torch.tensor(x), 1
    pixels = processor(images=[open_image(r["image"]) for r in reqs], return_tensors="pt")["pixel_values"]
    return input_ids, mask, pixels


def capture_maps(mllm, layers, input_ids, attention_mask, pixel_values):
    """One no-grad forward of `mllm` with vat.capture_visual_attention on `layers` (rows="all"):
    -> ({layer: (B, T, N) fp32 map}, visual_mask (B, T)). Inputs are moved to the model's device."""
    import torch

    import vat
    dev = next(mllm.parameters()).device
    input_ids, attention_mask, pixel_values = input_ids.to(dev), attention_mask.to(dev), pixel_values.to(dev)
    vmask = input_ids == mllm.image_token_id
    with torch.no_grad(), vat.capture_visual_attention(mllm.language_model, layers, vmask, attention_mask,
                                                       rows="all") as maps:
        mllm(input_ids, attention_mask=attention_mask, pixel_values=pixel_values, return_hidden=True)
    return maps, vmask


def attention_distance(teacher, student, tok, processor, requests, layers_spec="middle", teacher_layers_spec=None,
                       matching="group", batch_size=8, answer_rows=0):
    """Teacher-student visual-attention similarity on `requests` ({"image", "prompt"} as everywhere here).

    Layers: vat.select_layers(depth, spec) for each model (teacher_layers_spec defaults to layers_spec, taken
    over the teacher's depth), paired by vat.group_layer_matching(..., matching). Per item and student layer
    s_j: cos_j = vat.map_cosine, the cosine of the flattened (all valid query rows x visual keys) maps, the
    teacher's side being the mean of its window's maps (Eq. 3). Returns
        {"student_layers": [s_j], "teacher_layers": [t], "windows": [G_j],
         "per_item": [[cos_j] per item],
         "per_layer": [{"student_layer", "teacher_layers", "cosine", "distance"}],   (means over items)
         "mean_cosine": mean over layers and items, "attn_dist": 1 - mean_cosine,
         "answer_cos": [[cos_j] per item], "answer_dist": 1 - their mean over layers and items}
    answer_cos is the same cosine on ONE query row, the answer position (the last prompt token, whose logits
    give the first answer token): the student's row against the mean of its window's teacher rows.
    With answer_rows = n > 0 it also returns "answer_rows": {"teacher": [...], "student": [...]}, for the first
    n items, the (N_visual,) numpy attention of the answer position (the last prompt token's row) over the
    visual tokens, averaged over the student's selected layers / the teacher layers of the windows.
    teacher / student may also be saved model directories (model.load_pretrained on the CPU); tok and
    processor may then be None (taken from the teacher's directory)."""
    import numpy as np
    import torch

    import data
    import model as modeling
    import vat
    if isinstance(teacher, str):
        teacher, t_tok, t_proc = modeling.load_any(teacher)
        tok, processor = tok or t_tok, processor or t_proc
    if isinstance(student, str):
        student = modeling.load_any(student)[0]
    if tok is None or processor is None:
        raise ValueError("attention_distance: pass the tokenizer and image processor (or the teacher as a directory)")
    modes = (teacher.training, student.training)
    teacher.eval()  # no dropout in the analysis; the callers' modes are restored at the end
    student.eval()
    t_depth = teacher.language_model.config.get_text_config().num_hidden_layers
    s_depth = student.language_model.config.get_text_config().num_hidden_layers
    s_layers = vat.select_layers(s_depth, layers_spec)
    t_layers = vat.select_layers(t_depth, layers_spec if teacher_layers_spec is None else teacher_layers_spec,
                                 teacher=True)
    windows = vat.group_layer_matching(s_layers, t_layers, matching)
    t_used = sorted({t for w in windows for t in w})
    pad_id = data.pad_token_id(tok)
    per_item, answer_cos, rows_t, rows_s = [], [], [], []
    for i in range(0, len(requests), batch_size):
        reqs = requests[i:i + batch_size]
        ids, mask, pixels = _attention_batch([teacher, student], tok, processor, reqs, pad_id)
        t_maps, _ = capture_maps(teacher, t_used, ids, mask, pixels)
        s_maps, vmask = capture_maps(student, s_layers, ids, mask, pixels)
        cos = vat.map_cosine(s_maps, t_maps, windows, s_layers, vmask, mask)  # (k, B)
        per_item += cos.T.double().cpu().tolist()
        answer_cos += _answer_row_cosine(s_maps, t_maps, s_layers, windows, vmask, mask).tolist()
        for b in range(min(len(reqs), answer_rows - len(rows_s))):
            last, vis = int(mask[b].sum()) - 1, vmask[b].cpu()
            rows_t.append(torch.stack([t_maps[t][b, last].cpu() for t in t_used]).mean(0)[:int(vis.sum())].numpy())
            rows_s.append(torch.stack([s_maps[s][b, last].cpu() for s in s_layers]).mean(0)[:int(vis.sum())].numpy())
    arr = np.array(per_item, dtype=np.float64).reshape(len(per_item), len(s_layers))
    means = [float(np.nanmean(arr[:, j])) if len(arr) else float("nan") for j in range(len(s_layers))]
    out = {"student_layers": s_layers, "teacher_layers": t_layers, "windows": windows, "per_item": arr.tolist(),
           "per_layer": [{"student_layer": s, "teacher_layers": w, "cosine": m, "distance": 1.0 - m}
                         for s, w, m in zip(s_layers, windows, means)]}
    out["mean_cosine"] = float(np.mean(means)) if means else float("nan")
    out["attn_dist"] = 1.0 - out["mean_cosine"]
    ans = np.array(answer_cos, dtype=np.float64).reshape(len(answer_cos), len(s_layers))
    out["answer_cos"] = ans.tolist()
    out["answer_dist"] = 1.0 - float(np.mean([np.nanmean(ans[:, j]) for j in range(len(s_layers))])) \
        if len(ans) and s_layers else float("nan")
    if answer_rows:
        out["answer_rows"] = {"teacher": rows_t, "student": rows_s}
    teacher.train(modes[0])
    student.train(modes[1])
    return out


def _answer_row_cosine(s_maps, t_maps, s_layers, windows, vmask, mask):
    """(B, k) float64 on the CPU: per item and matched layer j, the cosine between the student's answer-position
    row (the last valid query row) over its visual tokens and the mean of the teacher rows of window G_j."""
    import torch

    import vat
    mask, vmask = mask.cpu(), vmask.cpu()
    rows = torch.arange(mask.shape[0])
    last = mask.sum(1) - 1  # right-padded: the last prompt token
    _, key_valid = vat.visual_positions(vmask)
    out = []
    for s, window in zip(s_layers, windows):
        srow = s_maps[s].detach().cpu().double()[rows, last]                                     # (B, N)
        trow = torch.stack([t_maps[t].detach().cpu().double()[rows, last] for t in window]).mean(0)
        srow, trow = torch.where(key_valid, srow, 0.0), torch.where(key_valid, trow, 0.0)
        norm = srow.norm(dim=-1) * trow.norm(dim=-1)
        out.append(torch.where(norm > 0, (srow * trow).sum(-1) / norm.clamp_min(1e-300), float("nan")))
    return torch.stack(out, dim=1)


def _nanmean(xs):
    xs = [x for x in xs if x == x]
    return statistics.mean(xs) if xs else float("nan")


def split_by_correctness(per_item, right, student_layers, windows):
    """Per matched layer, the mean cosine over all items, over the items the student answered right and
    over those it answered wrong (NaN when a group is empty); plus the attention distance (1 - cos averaged
    over the layers) of each group. per_item: [[cos_j]] per item, right: [bool] per item."""
    if len(per_item) != len(right):
        raise ValueError(f"{len(per_item)} items of cosines but {len(right)} correctness flags")
    groups = {"all": [True] * len(right), "right": [bool(r) for r in right], "wrong": [not r for r in right]}
    layers = []
    for j, (s, w) in enumerate(zip(student_layers, windows)):
        row = {"student_layer": s, "teacher_layers": list(w)}
        for g, keep in groups.items():
            row["cos_" + g] = _nanmean([c[j] for c, k in zip(per_item, keep) if k])
        layers.append(row)
    out = {"per_layer": layers, "n_items": len(right), "n_right": sum(groups["right"]), "n_wrong": sum(groups["wrong"]),
           "accuracy": pct(right)}
    for g in groups:
        vals = [row["cos_" + g] for row in layers]
        out["attn_dist_" + g] = 1.0 - statistics.mean(vals) if vals and all(v == v for v in vals) else float("nan")
    out["attn_dist"] = out["attn_dist_all"]
    return out


# -----------------------------------------------------------------------------
# 2. Layer profiles: where each model's attention meets the image, and the "auto" VAT window
#
#   python attention.py layers --model TEACHER --model STUDENT (--sugarcrepe DIR | --vqav2 DIR |
#       --requests FILE.jsonl) [--limit N] [--out DIR]
#
# Per layer of each model (layer_profile, vat.visual_attention_profile): the text's attention share on the
# visual tokens, its entropy over them, and, for requests that name an object ("object_patches"), the share
# of the answer position's visual attention on that object. layers.json has the curves, the window
# vat.auto_layers picks from them (the rule is in its docstring) and the paper's middle window; layers.png
# draws the curves, one panel per model side by side.


def layer_profile_batches(mllm, batches) -> dict:
    """How every layer of `mllm` attends to the visual tokens (vat.visual_attention_profile), over
    `batches` of (input_ids, attention_mask, pixel_values, object_mask or None), no grad:
        {"layers": {l: {"share", "entropy", "object"}}   means over the items (NaN items left out; "object"
                                                          over the items that name an object, else NaN),
         "n_items": items with visual tokens and text after them,
         "auto": vat.auto_layers of the means, "middle": the paper's 30%-70% window}"""
    import torch

    import vat
    depth = mllm.language_model.config.get_text_config().num_hidden_layers
    layers = list(range(depth))
    per = {l: {k: [] for k in ("share", "entropy", "object")} for l in layers}
    mode = mllm.training
    mllm.eval()
    for ids, mask, pixels, objects in batches:
        maps, vmask = capture_maps(mllm, layers, ids, mask, pixels)
        prof = vat.visual_attention_profile(maps, vmask, mask, objects)
        for l in layers:
            for k in per[l]:
                per[l][k].append(prof[l][k])
        del maps
    mllm.train(mode)
    means = {l: {k: float(torch.cat(v).nanmean()) if v else float("nan") for k, v in per[l].items()} for l in layers}
    n_items = int((~torch.cat(per[0]["share"]).isnan()).sum()) if per[0]["share"] else 0
    return {"layers": means, "n_items": n_items, "auto": vat.auto_layers(means, depth),
            "middle": vat.select_layers(depth, "middle")}


def auto_vat_layers(student, teacher, dataset, idx, micro: int, collate, k_student=None, group=True) -> dict:
    """`train.py --vat-layers auto`: VAT's windows found from the models' own attention (docs/method.md section 8,
    open question 3). Each model given (None: its layers are fixed by a spec) is profiled (layer_profile_batches)
    on the training samples `idx` of `dataset`, collated `micro` at a time, and vat.auto_layers picks its window;
    under group matching (`group`) the teacher's grows to at least the student's layer count (Eq. 2 needs
    m >= k; `k_student` when the student's layers are fixed). Under --cross-vocab the teacher reads its own
    tokens, and its own pixels where it processes images otherwise. -> {"samples", "student"?, "teacher"?}."""
    device = next((student or teacher).parameters()).device

    def batches(who):
        for j in range(0, len(idx), micro):
            b = collate([dataset[i] for i in idx[j:j + micro]])
            theirs = who == "teacher"
            ids, mask = ((b["teacher_input_ids"], b["teacher_attention_mask"]) if theirs and "pairs" in b
                         else (b["input_ids"], b["attention_mask"]))
            pix = b["teacher_pixel_values"] if theirs and "teacher_pixel_values" in b else b["pixel_values"]
            yield ids, mask, pix.to(device), None
    auto = {"samples": len(idx)}
    if student is not None:
        auto["student"] = layer_profile_batches(student, batches("student"))["auto"]
    if teacher is not None:
        import vat
        n_t = teacher.language_model.config.num_hidden_layers
        k = len(auto["student"]) if student is not None else k_student
        if group and k > n_t:
            raise ValueError(f"--vat-layers auto: the student's window has {k} layers, more than the teacher's {n_t}; "
                             "give --vat-layers fewer layers or --vat-matching uniform")
        profile = layer_profile_batches(teacher, batches("teacher"))["layers"]
        auto["teacher"] = vat.auto_layers(profile, n_t, min_layers=k if group else 1)
    return auto


def layer_profile(mllm, tokenizer, processor, requests, batch_size=8) -> dict:
    """layer_profile_batches over `requests` ({"image", "prompt"[, "object_patches": [visual-token
    indices of the object the prompt names]]})."""
    import torch

    import data
    pad_id = data.pad_token_id(tokenizer)

    def batches():
        for i in range(0, len(requests), batch_size):
            reqs = requests[i:i + batch_size]
            ids, mask, pixels = _attention_batch([mllm], tokenizer, processor, reqs, pad_id)
            objects = None
            if any(r.get("object_patches") for r in reqs):
                objects = torch.zeros(len(reqs), mllm.num_visual_tokens, dtype=torch.bool)
                for b, r in enumerate(reqs):
                    for p in r.get("object_patches") or []:
                        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < mllm.num_visual_tokens:
                            raise ValueError(f"{_request_name(r)}: object patch {p!r} is not a visual-token index "
                                             f"(an integer in [0, {mllm.num_visual_tokens}))")
                        objects[b, int(p)] = True
            yield ids, mask, pixels, objects
    return layer_profile_batches(mllm, batches())


def visual_token_states(mllm, tokenizer, processor, requests, batch_size=32):
    """What the LLM holds at the image: the hidden states of every layer at the visual tokens, for
    `requests` ({"image", "prompt"} with one <image>), no grad. -> (layers + 1, n_requests, N, d) fp32 on the
    CPU (index 0 = the input embeddings, i.e. the projector's output; N = the visual tokens of one image).
    In a causal LM these states depend only on what precedes them (the image and the template's opening),
    never on the question after it. For a linear probe: can an object's attributes be read at its patch?"""
    import torch

    import data
    import vat
    pad_id = data.pad_token_id(tokenizer)
    dev = next(mllm.parameters()).device
    mode = mllm.training
    mllm.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(requests), batch_size):
            ids, mask, pixels = _attention_batch([mllm], tokenizer, processor, requests[i:i + batch_size], pad_id)
            ids, mask = ids.to(dev), mask.to(dev)
            embeds, vmask = mllm.embed(ids, pixels.to(dev))
            hs = mllm.language_model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True,
                                     return_dict=True).hidden_states
            index, _ = vat.visual_positions(vmask)  # (B, N): every request has the same N
            idx = index[:, :, None].expand(-1, -1, hs[0].shape[-1])
            out.append(torch.stack([h.gather(1, idx).float().cpu() for h in hs]))
    mllm.train(mode)
    return torch.cat(out, dim=1)


# -----------------------------------------------------------------------------
# 3. Pictures, Pillow + numpy only

PLOT_W, PLOT_H = 560, 400       # one attention_similarity.png panel per student
HEATMAP_PANEL, HEATMAP_PAD, HEATMAP_TITLE_H = 224, 10, 40  # heat map panel side, padding, title band (px)
SERIES_COLORS = {"all": (30, 30, 30), "right": (20, 140, 60), "wrong": (200, 40, 40),
                 "share": (40, 90, 200), "1 - entropy": (230, 140, 50), "object": (20, 140, 60)}

def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _text_w(draw, text, font):
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0]


def _wrap(draw, text, font, width):
    """Greedy word wrap of `text` into lines no wider than `width` pixels."""
    lines, line = [], ""
    for word in text.split():
        trial = word if not line else line + " " + word
        if line and _text_w(draw, trial, font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def attention_plot(panels, title="teacher-student attention similarity (cos, Eq. 3)", who="student",
                   ylabel="mean cosine", xlabel="student layer"):
    """A line plot of the mean cosine per student layer, one panel (PLOT_W x PLOT_H) per student side by
    side. panels: [(name, student_layers, {"all": [...], "right": [...], "wrong": [...]}, legend_counts)],
    legend_counts = {"all": n, ...} (shown in the legend). NaN points (an empty group) are left out."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (PLOT_W * max(1, len(panels)), PLOT_H), "white")
    draw = ImageDraw.Draw(img)
    f_title, f_text, f_small = _font(15), _font(13), _font(11)
    left, right, top, bottom = 70, 20, 64, 56
    for p, (name, layers, series, counts) in enumerate(panels):
        x0, x1, y0, y1 = p * PLOT_W + left, (p + 1) * PLOT_W - right, top, PLOT_H - bottom
        vals = [v for s in series.values() for v in s if v == v] or [0.0, 1.0]
        span = max(max(vals) - min(vals), 0.02)
        step = next(st for st in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5) if span / st <= 8)
        lo = math.floor(min(vals) / step - 0.5) * step  # a half-step margin below and above the data
        hi = math.ceil(max(vals) / step + 0.5) * step

        def ypix(v):
            return y1 - (v - lo) / (hi - lo) * (y1 - y0)

        def xpix(j):
            return (x0 + x1) / 2 if len(layers) == 1 else x0 + 20 + j * (x1 - x0 - 40) / (len(layers) - 1)
        draw.text((p * PLOT_W + 10, 8), f"{title}", fill="black", font=f_title)
        draw.text((p * PLOT_W + 10, 28), f"{who}: {name}", fill="black", font=f_text)
        digits = 1 if step >= 0.1 else 2 if step >= 0.01 else 3
        for t in range(int(round((hi - lo) / step)) + 1):  # y ticks, labels and light grid lines
            v = lo + t * step
            y = ypix(v)
            draw.line([x0 + 1, y, x1 - 1, y], fill=(225, 225, 225))
            draw.line([x0 - 5, y, x0, y], fill="black")
            label = f"{v:.{digits}f}"
            draw.text((x0 - 8 - _text_w(draw, label, f_small), y - 7), label, fill="black", font=f_small)
        draw.rectangle([x0, y0, x1, y1], outline="black")
        for j, layer in enumerate(layers):  # x ticks at the student layers
            x = xpix(j)
            draw.line([x, y1, x, y1 + 5], fill="black")
            draw.text((x - _text_w(draw, str(layer), f_small) / 2, y1 + 7), str(layer), fill="black", font=f_small)
        xl = xlabel
        draw.text(((x0 + x1 - _text_w(draw, xl, f_text)) / 2, y1 + 26), xl, fill="black", font=f_text)
        yl = Image.new("RGB", (110, 18), "white")  # rotated y label
        ImageDraw.Draw(yl).text((2, 1), ylabel, fill="black", font=f_text)
        yl = yl.rotate(90, expand=True)
        img.paste(yl, (p * PLOT_W + 4, int((y0 + y1 - yl.height) / 2)))
        lx = x0 + 8
        for g, pts in series.items():  # the lines, then the legend along the top of the axes
            color = SERIES_COLORS.get(g, (90, 90, 200))
            xy = [(xpix(j), ypix(v)) for j, v in enumerate(pts) if v == v]
            w, r = (6, 5) if g == "all" else (2, 3)  # "all" drawn wide underneath: visible when it equals a group
            if len(xy) > 1:
                draw.line(xy, fill=color, width=w)
            for x, y in xy:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
            label = f"{g} (n={counts.get(g, '?')})"
            draw.line([lx, y0 - 10, lx + 18, y0 - 10], fill=color, width=3)
            draw.text((lx + 22, y0 - 17), label, fill="black", font=f_small)
            lx += 32 + _text_w(draw, label, f_small)
    return img


def patch_grid(row):
    """(N,) attention over the visual tokens -> (g, g) array in row-major patch order, g = sqrt(N)."""
    import numpy as np
    row = np.asarray(row, dtype=np.float64).reshape(-1)
    g = int(round(math.sqrt(row.size)))
    if g * g != row.size or row.size == 0:
        raise ValueError(f"{row.size} visual tokens do not form a square patch grid; a heat map needs g*g tokens")
    return row.reshape(g, g)


# a perceptual dark-to-bright colour map (inferno-like anchors), value in [0, 1] -> RGB
_CMAP = [(0.0, (0, 0, 4)), (0.25, (87, 16, 110)), (0.5, (188, 55, 84)), (0.75, (249, 142, 9)), (1.0, (252, 255, 164))]


def colorize(grid):
    """(g, g) values -> (g, g, 3) uint8 colours, min-max scaled per map (relative importance, as Eq. 3's
    cosine compares; a constant map is drawn mid-scale)."""
    import numpy as np
    g = np.asarray(grid, dtype=np.float64)
    span = g.max() - g.min()
    u = (g - g.min()) / span if span > 0 else np.full_like(g, 0.5)
    xs = [a for a, _ in _CMAP]
    return np.stack([np.interp(u, xs, [c[k] for _, c in _CMAP]) for k in range(3)], -1).round().astype(np.uint8)


def attention_heatmap(image, maps, caption, alpha=0.6):
    """The image, then one panel per (title, grid) in `maps`: the (g, g) attention grid, colourised
    (`colorize`), upscaled (nearest: one block per patch) and blended over the image; titles above, the
    caption wrapped underneath. All panels are HEATMAP_PANEL px square; width =
    (1 + len(maps)) * HEATMAP_PANEL + (2 + len(maps)) * HEATMAP_PAD. Each panel states its map's max value.
    Pass the image as the encoder sees it (square resize for SigLIP; the crop for CLIP)."""
    import numpy as np
    from PIL import Image, ImageDraw
    P, pad, th = HEATMAP_PANEL, HEATMAP_PAD, HEATMAP_TITLE_H
    base = open_image(image).resize((P, P), Image.BICUBIC)
    n = 1 + len(maps)
    width = n * P + (n + 1) * pad
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    f_title, f_text = _font(14), _font(13)
    lines = _wrap(probe, caption, f_text, width - 2 * pad)
    height = pad + th + P + pad + 18 * len(lines) + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    panels = [("image", base, "")]
    for title, grid in maps:
        grid = np.asarray(grid, dtype=np.float64)
        if grid.ndim != 2 or grid.shape[0] != grid.shape[1]:
            raise ValueError(f"heat map {title!r}: expected a square (g, g) grid, got shape {grid.shape}")
        heat = Image.fromarray(colorize(grid)).resize((P, P), Image.NEAREST)
        panels.append((title, Image.blend(base, heat, alpha), f"max {grid.max():.3g}, sum {grid.sum():.3g}"))
    for k, (title, im, sub) in enumerate(panels):
        x = pad + k * (P + pad)
        draw.text((x, pad), title, fill="black", font=f_title)
        draw.text((x, pad + 19), sub, fill=(90, 90, 90), font=f_text)
        img.paste(im, (x, pad + th))
    for i, line in enumerate(lines):
        draw.text((pad, pad + th + P + pad + 18 * i), line, fill="black", font=f_text)
    return img


def model_view(processor, pixel_values):
    """(3, H, W) normalised pixel values -> the PIL image the encoder saw (undo mean/std)."""
    import numpy as np
    from PIL import Image
    x = pixel_values.detach().float().cpu().numpy()
    mean = np.asarray(getattr(processor, "image_mean", [0.5] * 3), dtype=np.float32)[:, None, None]
    std = np.asarray(getattr(processor, "image_std", [0.5] * 3), dtype=np.float32)[:, None, None]
    x = np.clip((x * std + mean) * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(x.transpose(1, 2, 0))


# -----------------------------------------------------------------------------
# 4. CLI: `python attention.py distance ...` (section 1) and `python attention.py layers ...` (section 2)

def _json_safe(x):
    """NaN -> None (JSON has no NaN), recursively."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def add_attention_parser(sub):
    ap = sub.add_parser("distance", help="teacher-student visual attention similarity and heat maps")
    ap.add_argument("--teacher", required=True, help="teacher: a model dir, RUN/checkpoint, llava:DIR or an HF "
                    "LLaVA dir (model.load_any)")
    ap.add_argument("--student", required=True, action="append", help="student, the same sources (repeatable)")
    ap.add_argument("--sugarcrepe", help="folder with data/{subset}.json (true caption asked as (A))")
    ap.add_argument("--coco-images", help="SugarCrepe images (default SUGARCREPE/images)")
    ap.add_argument("--vqav2", help="folder with questions.json, annotations.json, images/")
    ap.add_argument("--vqav2-image-pattern", default=DEFAULTS["vqav2_image_pattern"],
                    help="file name %% image_id under VQAV2/images (default COCO_val2014_%%012d.jpg)")
    ap.add_argument("--layers", default="middle", help="student layers, a vat.select_layers spec (default middle)")
    ap.add_argument("--teacher-layers", help="teacher layers spec (default: --layers over the teacher's depth)")
    ap.add_argument("--matching", default="group", choices=["group", "uniform", "one_to_one"])
    ap.add_argument("--limit", type=positive_int, help="first N items per benchmark (per SugarCrepe subset)")
    ap.add_argument("--out", help="output folder (default: FIRST_STUDENT/attention)")
    ap.add_argument("--heatmaps", type=int, default=0, help="write heatmap_{i}.png for the first N items")
    ap.add_argument("--device", help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", type=positive_int, default=8)


def _short(text, n=40):
    return text if len(text) <= n else text[:n - 3] + "..."


def _student_names(dirs):
    names = [os.path.basename(os.path.normpath(_source_dir(d))) or d for d in dirs]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def run_attention(args):
    """The `distance` command: read the benchmarks, get each student's greedy answers (evaluate.model_fns, the
    cr / vqa max_new_tokens), then the attention similarity of teacher vs each student; write
    attention.json, attention_similarity.png and heatmap_{i}.png."""
    import gc

    import torch

    import model as modeling
    benchmarks = {}
    if args.sugarcrepe:
        benchmarks["sugarcrepe"] = read_sugarcrepe(args.sugarcrepe, args.coco_images, args.limit)
    if args.vqav2:
        benchmarks["vqav2"] = read_vqav2(args.vqav2, args.vqav2_image_pattern, args.limit)
    if not benchmarks:
        raise SystemExit("attention.py distance: give at least one benchmark: --sugarcrepe, --vqav2")
    items = attention_items(benchmarks)
    requests = [it["request"] for it in items]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out_dir = check_writable(args.out or _default_out(args.student[0], "attention"))
    names = _student_names(args.student)
    teacher, t_tok, processor = modeling.load_any(args.teacher, device=device, dtype=dtype)
    teacher.eval()
    report = {"teacher": os.path.abspath(args.teacher), "layers": args.layers,
              "teacher_layers": args.teacher_layers or args.layers, "matching": args.matching,
              "benchmarks": list(benchmarks), "limit": args.limit, "vqa_right_threshold": VQA_RIGHT,
              "students": {}}
    panels, teacher_rows, student_rows = [], None, {}
    for name, sdir in zip(names, args.student):
        student, s_tok, s_proc = modeling.load_any(sdir, device=device, dtype=dtype)
        student.eval()
        check_same_prompt_ids(teacher, t_tok, student, s_tok, requests[0], sdir)  # before its generation pass
        answers = [None] * len(items)
        for bench, kind in (("sugarcrepe", "cr"), ("vqav2", "vqa")):
            idx = [i for i, it in enumerate(items) if it["benchmark"] == bench]
            if idx:  # evaluate.py's glue (make_model_fns) on the student loaded once
                generate_fn, _ = model_fns(student, s_tok, s_proc, device, args.batch_size,
                                           DEFAULTS["max_new_tokens"][kind], name=sdir)
                for i, a in zip(idx, ask(generate_fn, [requests[i] for i in idx])):
                    answers[i] = a
                del generate_fn
        right = [it["judge"](a) for it, a in zip(items, answers)]
        res = attention_distance(teacher, student, t_tok, processor, requests, args.layers, args.teacher_layers,
                                 args.matching, args.batch_size, answer_rows=args.heatmaps)
        summary = split_by_correctness(res["per_item"], right, res["student_layers"], res["windows"])
        summary["model"] = os.path.abspath(sdir)
        summary["teacher_layers_selected"] = res["teacher_layers"]
        summary["items"] = [{"benchmark": it["benchmark"], "subset": it.get("subset"), "id": it["id"], "answer": a,
                             "right": r, "cos": c} for it, a, r, c in zip(items, answers, right, res["per_item"])]
        report["students"][name] = summary
        panels.append((name, res["student_layers"], {g: [row["cos_" + g] for row in summary["per_layer"]]
                                                     for g in ("all", "right", "wrong")},
                       {"all": summary["n_items"], "right": summary["n_right"], "wrong": summary["n_wrong"]}))
        if args.heatmaps:  # the teacher's rows from the first student's pass (its windows' layers)
            teacher_rows = teacher_rows or res["answer_rows"]["teacher"]
            student_rows[name] = res["answer_rows"]["student"]
        print(f"{name}: attn_dist {summary['attn_dist']:.4f} (right {summary['attn_dist_right']:.4f}, wrong "
              f"{summary['attn_dist_wrong']:.4f}), accuracy {summary['accuracy']:.1f}% on {len(items)} items")
        del student
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    paths = [os.path.join(out_dir, "attention.json"), os.path.join(out_dir, "attention_similarity.png")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(_json_safe(report), f, indent=2)
    attention_plot(panels).save(paths[1])
    for i in range(min(args.heatmaps, len(items))):
        pixels = processor(images=[open_image(requests[i]["image"])], return_tensors="pt")["pixel_values"][0]
        maps = [("teacher", patch_grid(teacher_rows[i]))] + [(f"student: {n}", patch_grid(student_rows[n][i]))
                                                             for n in names]
        caption = (f"{items[i]['benchmark']} {items[i].get('subset') or ''} #{items[i]['id']}: {items[i]['text']}  | "
                   + "; ".join(f"{n} answered {_short(report['students'][n]['items'][i]['answer'])!r} "
                               f"({'right' if report['students'][n]['items'][i]['right'] else 'wrong'})" for n in names)
                   + "  | answer-position row, mean over matched layers")
        paths.append(os.path.join(out_dir, f"heatmap_{i}.png"))
        attention_heatmap(model_view(processor, pixels), maps, caption).save(paths[-1])
    print("wrote " + ", ".join(paths))
    return report


def add_layers_parser(sub):
    ap = sub.add_parser("layers", help="per-layer attention on the visual tokens, and the 'auto' VAT window")
    ap.add_argument("--model", required=True, action="append", help="any model source (model.load_any; "
                    "repeatable)")
    ap.add_argument("--sugarcrepe", help="folder with data/{subset}.json (the true caption asked as (A))")
    ap.add_argument("--coco-images", help="SugarCrepe images (default SUGARCREPE/images)")
    ap.add_argument("--vqav2", help="folder with questions.json, annotations.json, images/")
    ap.add_argument("--vqav2-image-pattern", default=DEFAULTS["vqav2_image_pattern"],
                    help="file name %% image_id under VQAV2/images (default COCO_val2014_%%012d.jpg)")
    ap.add_argument("--requests", help='JSON-lines calibration file, one {"image", "prompt"[, "object_patches"]} '
                    "per line, image paths relative to the file")
    ap.add_argument("--limit", type=positive_int, help="first N items per benchmark (per SugarCrepe subset)")
    ap.add_argument("--out", help="output folder (default: FIRST_MODEL/layers)")
    ap.add_argument("--device", help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", type=positive_int, default=8)


def read_requests(path, limit=None):
    """A JSON-lines calibration file: {"image": path relative to the file, "prompt": "<image>\\n...",
    "object_patches": [visual-token indices], optional} per line. Every error names the file and the line
    (kept as the request's "where" for the errors that need the model: an object patch past its visual tokens);
    a file without a request is an error."""
    load_jsonl(path)  # a missing file, invalid JSON or another encoding: its errors name the file and line
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r, where = json.loads(line), f"{path}: line {n}"
            if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not isinstance(r.get("image"), str):
                raise ValueError(f"{where}: needs 'image' (a path) and 'prompt' (text)")
            if r["prompt"].count("<image>") != 1:
                raise ValueError(f"{where}: the prompt has {r['prompt'].count('<image>')} '<image>'; a request has "
                                 "exactly one (its image)")
            patches = r.get("object_patches")
            if patches is not None and not (isinstance(patches, list) and all(
                    isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in patches)):
                raise ValueError(f"{where}: object_patches must be a list of visual-token indices (integers >= 0), "
                                 f"got {patches!r}")
            image = os.path.join(os.path.dirname(path), r["image"])
            if not os.path.isfile(image):
                raise FileNotFoundError(f"{where}: image not found: {image}")
            items.append(dict(r, image=image, where=where))
    if not items:
        raise ValueError(f"{path}: no request in the file (it is empty); one JSON object per line: "
                         '{"image": PATH, "prompt": "<image>\\n..."[, "object_patches": [...]]}')
    return take(items, limit)


def run_layers(args):
    """The `layers` command: layer_profile of every --model on the requests; writes layers.json and
    layers.png."""
    import torch

    import model as modeling
    requests = []
    if args.sugarcrepe:
        requests += [it["request"] for it in attention_items(
            {"sugarcrepe": read_sugarcrepe(args.sugarcrepe, args.coco_images, args.limit)})]
    if args.vqav2:
        requests += [it["request"] for it in attention_items(
            {"vqav2": read_vqav2(args.vqav2, args.vqav2_image_pattern, args.limit)})]
    if args.requests:
        requests += read_requests(args.requests, args.limit)
    if not requests:
        raise SystemExit("attention.py layers: give at least one of --sugarcrepe, --vqav2, --requests")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out_dir = check_writable(args.out or _default_out(args.model[0], "layers"))
    report, panels = {"requests": len(requests), "models": {}}, []
    for name, mdir in zip(_student_names(args.model), args.model):
        mllm, tok, processor = modeling.load_any(mdir, device=device, dtype=dtype)
        prof = layer_profile(mllm, tok, processor, requests, args.batch_size)
        report["models"][name] = dict(prof, model=os.path.abspath(mdir))
        layers = sorted(prof["layers"])
        panels.append((f"{name} (auto {prof['auto'][0]}-{prof['auto'][-1]}, middle {prof['middle'][0]}-"
                       f"{prof['middle'][-1]})", layers,
                       {"share": [prof["layers"][l]["share"] for l in layers],
                        "1 - entropy": [1 - prof["layers"][l]["entropy"] for l in layers],
                        "object": [prof["layers"][l]["object"] for l in layers]},
                       {k: prof["n_items"] for k in ("share", "1 - entropy", "object")}))
        print(f"{name}: auto window {prof['auto']}, middle {prof['middle']}, {prof['n_items']} items")
        del mllm
    paths = [os.path.join(out_dir, "layers.json"), os.path.join(out_dir, "layers.png")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(_json_safe(report), f, indent=2)
    attention_plot(panels, title="attention on the visual tokens, per layer", who="model", ylabel="fraction",
                   xlabel="layer").save(paths[1])
    print("wrote " + ", ".join(paths))
    return report


def build_parser():
    p = argparse.ArgumentParser(description="The attention study of a teacher-student pair (docs/method.md "
                                "sections 7 and 8); the benchmarks and their metrics are evaluate.py's.")
    sub = p.add_subparsers(dest="command", required=True)
    add_attention_parser(sub)  # section 1
    add_layers_parser(sub)  # section 2
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "distance":
        return run_attention(args)
    return run_layers(args)


if __name__ == "__main__":
    main()
