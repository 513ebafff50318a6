"""
Data for compodistill: the real-data pipeline. LLaVA-format conversations, rendering token ids and
labels together with any chat template, images, validation, the dataset, batching and the DDP sampler.

Rendering follows nanochat: token ids and labels are built together, segment by segment, so the
supervised positions are known exactly (only assistant turns, -100 elsewhere). The "<image>"
placeholder is never tokenized: it is expanded to `num_visual_tokens` copies of the image token
id, so the model finds the image from the ids alone (`model.MultimodalLM.forward` derives the
visual mask from the ids; nothing downstream re-derives positions).

The synthetic shapes world the demo trains on is `shapes.py`; it writes files in the layout read here.
"""

import contextlib
import errno
import functools
import hashlib
import json
import numbers
import os
import shutil
import signal
import sys

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100

# -----------------------------------------------------------------------------
# Tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


def load_tokenizer(path):
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, n)) for n in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def image_token_id(tokenizer):
    """Id of "<image>"; it must be one token of the vocabulary (it is never tokenized as text)."""
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != IMAGE_TOKEN:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no single '{IMAGE_TOKEN}' "
                         f"token; add it first: tokenizer.add_special_tokens({{'additional_special_tokens': "
                         f"['{IMAGE_TOKEN}']}}) and resize the model's embeddings")
    return tid

# -----------------------------------------------------------------------------
# Rendering a conversation into (ids, labels) with any chat template


def _special_strings(tokenizer):
    toks = set(tokenizer.all_special_tokens)
    toks |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    toks.discard(IMAGE_TOKEN)
    return sorted(t for t in toks if t)


# Control tokens typed inside a message ("<|im_end|>\n<|im_start|>assistant\n..." in a human turn) are text,
# not control tokens: before rendering, each occurrence in a message's content is replaced by a private-use
# character (one per special string, _SHIELD + its index in _special_strings), which no template marker
# contains; _tokenize_segments tokenizes that character as the special string's TEXT (split_special_tokens).
# So only the chat template's own markers are special, and the tokenization around them is unchanged.
_SHIELD = 0x10FF00


def _shield_specials(tokenizer, messages, sample_id):
    specials = _special_strings(tokenizer)
    out = []
    for m in messages:
        content = m["content"]
        if any(chr(_SHIELD + i) in content for i in range(len(specials))):
            raise ValueError(f"sample {sample_id}: the text contains the reserved character U+{_SHIELD:X}+")
        for i in sorted(range(len(specials)), key=lambda i: -len(specials[i])):  # longest first
            content = content.replace(specials[i], chr(_SHIELD + i))
        out.append(dict(m, content=content))
    return out


def _end_of_turn(tokenizer, answer_text):
    """Length of the supervised part of a rendered assistant turn: up to and including the last
    special token the template puts after the content (e.g. <|im_end|>, <|eot_id|>, </s>);
    whitespace after it (ChatML's "\\n") is not supervised. None if the template marks no end."""
    end = 0
    for t in _special_strings(tokenizer):
        j = answer_text.rfind(t)
        if j >= 0:
            end = max(end, j + len(t))
    return end if end > 0 else None


# a two-turn conversation whose text no template adds by itself: probes what a template does with content
_PROBE = [{"role": "user", "content": "zqxj probe question"}, {"role": "assistant", "content": "zqxj probe reply"}]


def end_of_turn_ids(tokenizer) -> list:
    """Token ids that end an assistant turn as training supervises it (render_conversation): the special
    tokens after the content (<|im_end|>, <|eot_id|>, or the eos appended when the template has none).
    Generation stops at these and at eos."""
    reply = _PROBE[1]["content"]
    tail = [t for t, supervised in _segments(tokenizer, _PROBE, False, "<end-of-turn probe>") if supervised][-1]
    tail = tail[tail.rfind(reply) + len(reply):]
    special = {tokenizer.convert_tokens_to_ids(t) for t in _special_strings(tokenizer)}
    ids = [i for i in tokenizer(tail, add_special_tokens=False)["input_ids"] if i in special]
    return sorted(set(ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def check_tokenizers_agree(student_tok, teacher_tok):
    """Logit KD compares distributions token by token: the two vocabularies must be the same map.
    Raises with what differs (vocab entries, special tokens, chat template)."""
    problems = []
    vs, vt = student_tok.get_vocab(), teacher_tok.get_vocab()
    if vs != vt:
        only_s = sorted(set(vs) - set(vt))[:5]
        only_t = sorted(set(vt) - set(vs))[:5]
        moved = sorted(k for k in set(vs) & set(vt) if vs[k] != vt[k])[:5]
        problems.append(f"vocabularies differ (sizes {len(vs)} vs {len(vt)}; only in student {only_s}, only in "
                        f"teacher {only_t}, different ids {moved})")
    for name in ("eos_token", "pad_token", "bos_token", "unk_token"):
        if getattr(student_tok, name) != getattr(teacher_tok, name):
            problems.append(f"{name}: student {getattr(student_tok, name)!r} vs teacher {getattr(teacher_tok, name)!r}")
    if set(student_tok.all_special_tokens) != set(teacher_tok.all_special_tokens):
        problems.append(f"special tokens differ: {sorted(set(student_tok.all_special_tokens) ^ set(teacher_tok.all_special_tokens))}")
    if student_tok.chat_template != teacher_tok.chat_template:
        problems.append("chat templates differ")
    if problems:
        raise ValueError("teacher and student tokenizers disagree, so logit KD (L_KL) would compare different "
                         "tokens:\n  - " + "\n  - ".join(problems))


def pad_token_id(tokenizer) -> int:
    """The pad id for batching: the tokenizer's pad token, else eos (Llama-3 ships without a pad token;
    padded positions are masked out and never supervised, so any id works)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an eos token; "
                     "set tokenizer.pad_token")


def _content_style(tokenizer) -> str:
    """How the chat template takes a message's content: "str" (Qwen, Llama-3, ...) or "parts", a list
    of typed parts [{"type": "text", "text": ...}] (the templates llava-hf's LLaVA-1.5 checkpoints ship
    render a plain string as nothing). Probed once per tokenizer; a template that renders neither is
    an error rather than a conversation silently rendered without its text."""
    template = tokenizer.chat_template
    if not template:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template (llava-hf keeps it "
                         "in the processor's chat_template.json, which model.load_any reads); set "
                         "tokenizer.chat_template = ...")
    cached = getattr(tokenizer, "_compodistill_content_style", None)
    if cached and cached[0] == template:  # keyed by the template: a later tokenizer.chat_template = ... re-probes
        return cached[1]
    for style in ("str", "parts"):
        try:
            text = tokenizer.apply_chat_template(_styled(_PROBE, style), tokenize=False)
        except Exception:  # noqa: BLE001 - a template written for the other style may raise
            continue
        if all(m["content"] in text for m in _PROBE):
            tokenizer._compodistill_content_style = (template, style)
            return style
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: its chat template renders the "
                     "message text neither from string content nor from a list of text parts; set a chat "
                     "template that writes each message's content (tokenizer.chat_template = ...)")


def _styled(messages, style):
    if style == "str":
        return messages
    return [dict(m, content=[{"type": "text", "text": m["content"]}]) for m in messages]


def _chat(tokenizer, messages, add_generation_prompt=False):
    return tokenizer.apply_chat_template(_styled(messages, _content_style(tokenizer)), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _segments(tokenizer, messages, add_generation_prompt, sample_id):
    """Split the template's rendering into [(text, supervised)]. The assistant text of turn i is
    chat(messages[:i+1]) minus chat(messages[:i], generation prompt): this needs the prefix
    property, which is checked. A template that marks no end of turn with a special token (llava-hf's
    LLaVA-1.5: "ASSISTANT: red ") gets the tokenizer's eos after each assistant turn, supervised, as
    LLaVA trains ("ASSISTANT: red</s>"): otherwise the model never learns to stop."""
    segs, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError(f"sample {sample_id}: the conversation starts with an assistant turn")
        prefix = _chat(tokenizer, messages[:i], add_generation_prompt=True)
        full = _chat(tokenizer, messages[:i + 1])
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise ValueError(f"sample {sample_id}: the chat template is not prefix-stable at turn {i} "
                             f"(rendering the first {i} turns is not a prefix of rendering {i + 1})")
        answer = full[len(prefix):]
        end = _end_of_turn(tokenizer, answer)
        if end is None:  # no end-of-turn token in the template: eos after the answer (none without an eos)
            segs += [(prefix[len(done):], False), (answer + (tokenizer.eos_token or ""), True)]
        else:
            segs += [(prefix[len(done):], False), (answer[:end], True), (answer[end:], False)]
        done = full
    final = _chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    if not final.startswith(done):
        raise ValueError(f"sample {sample_id}: the chat template is not prefix-stable at the last turn")
    segs.append((final[len(done):], False))
    return [(t, s) for t, s in segs if t]


def _tokenize_segments(tokenizer, segs, num_visual_tokens, image_token_id, sample_id, with_ends=False):
    """-> (ids, labels), and with_ends also `ends`: per position, (segment index, the character of the
    segment's ORIGINAL text, typed control tokens written out, at which the token ends) for supervised
    tokens, None elsewhere (fast tokenizers' offset mapping)."""
    specials = _special_strings(tokenizer)
    shielded = {chr(_SHIELD + i): t for i, t in enumerate(specials)}
    # (text or None for an image, supervised, typed control token: tokenized as text, segment, start in the
    # segment's original text)
    split = []
    for k, (text, supervised) in enumerate(segs):
        parts = text.split(IMAGE_TOKEN)
        if supervised and len(parts) > 1:
            raise ValueError(f"sample {sample_id}: '{IMAGE_TOKEN}' inside an assistant turn")
        pos = 0  # in the original text
        for j, part in enumerate(parts):
            if j > 0:
                split.append((None, False, False, k, pos))
                pos += len(IMAGE_TOKEN)
            start = 0
            for i, c in enumerate(part):
                if c in shielded:
                    if i > start:
                        split.append((part[start:i], supervised, False, k, pos))
                        pos += i - start
                    split.append((shielded[c], supervised, True, k, pos))
                    pos += len(shielded[c])
                    start = i + 1
            if start < len(part):
                split.append((part[start:], supervised, False, k, pos))
                pos += len(part) - start

    def encode(texts, **kw):
        if not texts:
            return iter([]), iter([])
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=with_ends, **kw)
        return iter(enc["input_ids"]), iter(enc["offset_mapping"] if with_ends else [])
    encoded, offsets = encode([p for p, _, typed, _, _ in split if p is not None and not typed])
    encoded_typed, offsets_typed = encode([p for p, _, t, _, _ in split if t], split_special_tokens=True)
    ids, labels, ends = [], [], []
    for text, supervised, is_typed, k, pos in split:
        if text is None:  # the visual tokens replace the literal "<image>", never supervised
            ids += [image_token_id] * num_visual_tokens
            labels += [IGNORE_INDEX] * num_visual_tokens
            ends += [None] * num_visual_tokens
            continue
        p = list(next(encoded_typed if is_typed else encoded))
        ids += p
        labels += p if supervised else [IGNORE_INDEX] * len(p)
        if with_ends:
            o = next(offsets_typed if is_typed else offsets)
            ends += [(k, pos + int(end)) for _, end in o] if supervised else [None] * len(p)
    return (ids, labels, ends) if with_ends else (ids, labels)


def render_conversation(tokenizer, messages, num_visual_tokens, image_token_id, sample_id=None):
    """messages [{"role", "content"}] -> (ids, labels): labels = ids on the assistant content and
    its end-of-turn token, IGNORE_INDEX (-100) elsewhere (the header "<|im_start|>assistant\\n"
    included); each "<image>" becomes num_visual_tokens copies of image_token_id. Control tokens typed in
    the messages' text are tokenized as text (_shield_specials): only the template's markers are special."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"sample {sample_id}: no assistant turn to supervise")
    segs = _segments(tokenizer, _shield_specials(tokenizer, messages, sample_id), False, sample_id)
    return _tokenize_segments(tokenizer, segs, num_visual_tokens, image_token_id, sample_id)


def render_prompt(tokenizer, messages, num_visual_tokens, image_token_id, sample_id=None):
    """Prompt ids for generation: messages end with a user turn; chat template + generation
    prompt. Segmented exactly as render_conversation, so the ids equal the training prefix."""
    if not messages or messages[-1]["role"] == "assistant":
        raise ValueError(f"sample {sample_id}: a prompt must end with a user turn")
    segs = _segments(tokenizer, _shield_specials(tokenizer, messages, sample_id), True, sample_id)
    return _tokenize_segments(tokenizer, segs, num_visual_tokens, image_token_id, sample_id)[0]

def answer_char_keys(tokenizer, messages, num_visual_tokens, image_token_id, sample_id=None):
    """render_conversation's (ids, labels) and, per position, where its token ends in the conversation's
    TEXT: (k, c) for a supervised token of the k-th assistant turn that ends at character c of that turn's
    content (0 < c <= len(content)); (k, "end") for the turn's last supervised token (its end-of-turn
    marker, which templates spell differently); None elsewhere. Two tokenizers' keys match where their
    tokens end at the same character: the positions that cross-vocabulary distillation pairs."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"sample {sample_id}: no assistant turn to supervise")
    segs = _segments(tokenizer, messages, False, sample_id)
    ids, labels, ends = _tokenize_segments(tokenizer, segs, num_visual_tokens, image_token_id, sample_id,
                                           with_ends=True)
    turn_of = {k: n for n, k in enumerate(k for k, (_, sup) in enumerate(segs) if sup)}
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    keys, last = [None] * len(ids), {}
    for i, e in enumerate(ends):
        if e is None:
            continue
        seg, end = e
        turn = turn_of[seg]
        content = contents[turn] if turn < len(contents) else ""
        at = segs[seg][0].find(content) if content else -1
        if at >= 0 and at < end <= at + len(content):
            keys[i] = (turn, end - at)
        last[turn] = i
    for turn, i in last.items():
        if keys[i] is None:
            keys[i] = (turn, "end")
    return ids, labels, keys


def aligned_pairs(keys_a, keys_b) -> list:
    """[(i, j)]: positions of rendering a and rendering b whose tokens end at the same character of the
    same assistant turn (answer_char_keys), in order. Where the two tokenizers split a word differently
    only the common boundaries pair ("red" vs "r"+"ed": the position of "red" with that of "ed")."""
    at_b = {k: j for j, k in enumerate(keys_b) if k is not None}
    return [(i, at_b[k]) for i, k in enumerate(keys_a) if k is not None and k in at_b]


def with_system_prompt(tokenizer, messages, system_prompt):
    """messages with the run's system prompt (train.py / evaluate.py --system-prompt, recorded in the model
    config): None = as they are (the chat template's default system prompt, if it has one); "none" = no
    system turn, an error if the template then adds its own default; TEXT = a system turn with TEXT. A
    sample that has its own system turn keeps it."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    if system_prompt == "none":
        default = _default_system_text(tokenizer)
        if default:
            raise ValueError(f"--system-prompt none: the chat template of {getattr(tokenizer, 'name_or_path', '')!r} "
                             f"adds its own system turn when none is given ({default[:60]!r}...); pass "
                             "--system-prompt '' (an empty system turn) or TEXT, or set another chat template")
        return messages
    _check_system_turns(tokenizer)
    return [{"role": "system", "content": system_prompt}] + list(messages)


def _check_system_turns(tokenizer):
    """--system-prompt TEXT needs a chat template that renders a system turn; one that refuses it (Gemma's,
    Mistral's: raise_exception('System role not supported')) is an error naming the flag and the template,
    not a bare jinja TemplateError from the first sample. Probed once per template."""
    cached = getattr(tokenizer, "_compodistill_system_ok", None)
    if cached and cached[0] == tokenizer.chat_template:
        return
    try:
        _chat(tokenizer, [{"role": "system", "content": "zqxj system marker"}] + _PROBE)
    except Exception as e:  # noqa: BLE001 - jinja's TemplateError, or whatever the template raises
        raise ValueError(f"--system-prompt: the chat template of {getattr(tokenizer, 'name_or_path', '')!r} does "
                         f"not take a system turn ({type(e).__name__}: {e}); leave --system-prompt out (the "
                         "template's own default), or give a tokenizer whose chat template has system turns") from None
    tokenizer._compodistill_system_ok = (tokenizer.chat_template, True)


def _default_system_text(tokenizer):
    """The system text a chat template adds when the conversation has no system turn (Qwen2.5: "You are Qwen,
    created by Alibaba Cloud. ..."), or "" when it adds none: the probe rendered without a system turn is
    compared with the probe rendered with a marker system turn."""
    cached = getattr(tokenizer, "_compodistill_default_system", None)
    if cached and cached[0] == tokenizer.chat_template:
        return cached[1]
    marker = "zqxj system marker"
    plain = _chat(tokenizer, _PROBE)
    try:
        with_sys = _chat(tokenizer, [{"role": "system", "content": marker}] + _PROBE)
    except Exception:  # noqa: BLE001 - a template without system turns: it adds none either
        with_sys = None
    found = ""
    if with_sys and marker in with_sys:
        head, tail = with_sys.split(marker, 1)
        if plain.startswith(head) and plain.endswith(tail) and len(plain) > len(head) + len(tail):
            found = plain[len(head):len(plain) - len(tail)]
    tokenizer._compodistill_default_system = (tokenizer.chat_template, found)
    return found

# -----------------------------------------------------------------------------
# LLaVA JSON


ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def llava_to_messages(sample):
    """LLaVA sample {"id", "image"?, "conversations": [{"from", "value"}]} -> messages, with
    validation. An "image" key requires exactly one "<image>" in a human turn, and vice versa
    (LLaVA's silent prepending is not applied)."""
    sid = sample.get("id", "<no id>") if isinstance(sample, dict) else "<not a dict>"
    check_image_field(sample)
    convs = sample.get("conversations") if isinstance(sample, dict) else None
    if not isinstance(convs, list) or not convs:
        raise ValueError(f"sample {sid}: 'conversations' is missing or empty")
    messages, n_image = [], 0
    for k, turn in enumerate(convs):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            role = turn.get("from") if isinstance(turn, dict) else turn
            raise ValueError(f"sample {sid}: turn {k} has unknown role {role!r} or no string 'value' "
                             f"(roles: {sorted(ROLES)})")
        role, value = ROLES[turn["from"]], turn["value"]
        c = value.count(IMAGE_TOKEN)
        if c and role == "assistant":
            raise ValueError(f"sample {sid}: '{IMAGE_TOKEN}' in a gpt turn (turn {k})")
        if role == "assistant" and not value.strip():  # would train on the end-of-turn token alone
            raise ValueError(f"sample {sid}: empty answer in gpt turn {k} (nothing but whitespace)")
        n_image += c
        messages.append({"role": role, "content": value})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"sample {sid}: no gpt (assistant) turn")
    first = next(k for k, m in enumerate(messages) if m["role"] != "system")
    if messages[first]["role"] != "user":  # an answer to no question (LLaVA drops such a turn silently)
        raise ValueError(f"sample {sid}: the conversation starts with a {convs[first]['from']} turn (turn {first}), "
                         "not a human turn")
    if n_image > 1:
        raise ValueError(f"sample {sid}: '{IMAGE_TOKEN}' occurs {n_image} times (at most once)")
    if n_image == 1 and not sample.get("image"):
        raise ValueError(f"sample {sid}: '{IMAGE_TOKEN}' in the text but no 'image' key")
    if n_image == 0 and sample.get("image"):
        raise ValueError(f"sample {sid}: has an 'image' but no '{IMAGE_TOKEN}' in any human turn "
                         f"(add it to the first human turn; it is not prepended silently)")
    return messages


def check_image_field(sample):
    """A sample's "image" is absent, empty or ONE file name; a list (LLaVA-OneVision's multi-image samples)
    or a number is an error naming the sample."""
    if isinstance(sample, dict) and sample.get("image") and not isinstance(sample["image"], str):
        raise ValueError(f"sample {sample.get('id', '<no id>')}: 'image' must be one file name (a string), got "
                         f"{type(sample['image']).__name__} {sample['image']!r:.80}; multi-image samples are not "
                         f"supported")


SKIP_SAMPLES_HINT = "pass --skip-bad-samples to skip and count such samples"


def load_llava_json(path, check_images=True):
    """The samples of a LLaVA-format JSON file (a list). Each sample's "image" is checked to be one file name
    (check_image_field; an error names the file, the sample and --skip-bad-samples) unless `check_images` is
    False: train.py --skip-bad-samples leaves such samples to the rendering, which skips and counts them."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e}); JSON data files must be UTF-8") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA samples, got {type(data).__name__}")
    for s in data if check_images else ():
        try:
            check_image_field(s)
        except ValueError as e:
            raise ValueError(f"{path}: {e} ({SKIP_SAMPLES_HINT})") from None
    return data

# -----------------------------------------------------------------------------
# Images


def to_rgb(im):
    """A PIL image -> RGB as it is meant to be seen: EXIF orientation applied (phone photos), 16-bit
    greyscale scaled to 8 bits (PIL's convert saturates it to white), transparency composited onto
    white (convert drops alpha onto black)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit PNGs open as I;16 (or I)
        a = np.asarray(im).astype(np.float64)
        im = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _check_image(path):
    """None if `path` is a readable, uncorrupted RGB image, else the reason it is not."""
    if not os.path.isfile(path):
        return "file not found"
    try:
        with Image.open(path) as im:
            im.verify()  # structure / checksums
        with Image.open(path) as im:
            im.load()  # the pixels decode (catches truncated files)
            if im.mode != "RGB":
                return f"mode {im.mode}, not RGB"
    except Exception as e:  # PIL raises many types for corrupt files
        return f"unreadable: {type(e).__name__}: {e}"
    return None


def default_cache_dir(cache_dir=None):
    """Where verdicts and rendered data are cached: `cache_dir`, else $COMPODISTILL_CACHE, else
    ~/.cache/compodistill. Ranks that share it share the work (one validation, one rendering)."""
    return cache_dir or os.environ.get("COMPODISTILL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "compodistill"))


def _write_json_atomic(path, obj):
    with open(path + f".tmp{os.getpid()}", "w", encoding="utf-8") as fh:
        json.dump(obj, fh)
    os.replace(path + f".tmp{os.getpid()}", path)


def _read_json_or_none(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):  # absent, unreadable, or half-written
        return None


def shared_digest(share, rank=0, world_size=1, gather=None) -> str:
    """A digest of items spread over the ranks, each rank hashing only its share: `share(r)` yields rank r's
    items (bytes). The digest is the sum mod 2^256 of each item's sha256, so it does not depend on how the
    items are split (an item's position, where it matters, is part of its bytes): the same for any world
    size. `gather` (an all_gather of one Python object, distributed.gather_objects) collects the ranks'
    sums; without it every rank hashes every share itself."""
    def total(r):
        return sum(int.from_bytes(hashlib.sha256(x).digest(), "big") for x in share(r)) % (1 << 256)
    mine = total(rank)
    if world_size > 1:
        sums = gather(mine) if gather is not None else [mine if r == rank else total(r) for r in range(world_size)]
        mine = sum(sums) % (1 << 256)
    return f"{mine:064x}"


def validate_images(samples, image_folder, skip_bad=False, allow_non_rgb=True, cache_dir=None, progress=True,
                    stats=None, rank=0, world_size=1, barrier=None, gather=None, skip_bad_samples=False):
    """Check every sample's image BEFORE training (missing, unreadable, corrupt, not RGB), with a
    progress bar. The verdict is cached, so a second run over the same files does not decode them again.
    Returns (kept samples, bad list of (sample id, file, reason)). Bad images are an error naming the
    sample and file, unless skip_bad.
    Other colour modes (grayscale, RGBA, ...) are accepted and converted to RGB when loaded, as LLaVA does
    (allow_non_rgb=False, train.py's --strict-rgb, makes them bad images); `stats`, a dict, receives
    "converted_non_rgb": how many kept samples' images are converted.
    The cache is best effort (a cache folder that cannot be read or written only costs the re-check),
    and keyed on content too (_file_key: path, size, mtime and a hash of each file's head and tail), so an
    image rewritten in place with the same size and mtime is checked again.
    Under DDP (`rank`, `world_size`, `barrier` = a callable that waits for every rank) each rank checks every
    world_size-th file and writes its part of the verdict next to the cache; after the barrier every rank
    merges all parts (checking itself any part it cannot see, e.g. without a shared file system), and rank 0
    writes the merged cache. 1/world_size of the decoding per rank, and no rank idles at a barrier meanwhile.
    The cache key too: each rank stats and reads the head and tail of its share of the files only and `gather`
    sums the ranks' digests (shared_digest; without `gather` every rank reads every file's).
    A sample whose "image" is not one file name is an error (check_image_field), or with skip_bad_samples
    (train.py --skip-bad-samples) kept unchecked: its rendering fails, and the dataset skips and counts it."""
    malformed = set()
    for i, s in enumerate(samples):
        try:
            check_image_field(s)
        except ValueError as e:
            if not skip_bad_samples:
                raise ValueError(f"{e} ({SKIP_SAMPLES_HINT})") from None
            malformed.add(i)
    files = sorted({os.path.join(image_folder, s["image"]) for i, s in enumerate(samples)
                    if i not in malformed and isinstance(s, dict) and s.get("image")})
    key = shared_digest(lambda r: (_file_key(f).encode() for f in files[r::world_size]), rank, world_size, gather)
    cache_dir = default_cache_dir(cache_dir)
    cache = os.path.join(cache_dir, f"images-{key[:24]}.json")

    def part_path(r):
        return f"{cache}.part-{r}-of-{world_size}"

    def best_effort(write, what):
        try:
            os.makedirs(cache_dir, exist_ok=True)
            write()
        except OSError as e:
            print(f"note: image-validation {what} not written ({cache_dir}: {e.strerror or e}); continuing")
    verdict = _read_json_or_none(cache)
    hit = isinstance(verdict, dict) and set(verdict) == set(files)
    if not hit:
        verdict = {f: _check_image(f) for f in tqdm(files[rank::world_size], desc="validating images",
                                                     disable=not progress)}
    if world_size > 1:  # every rank takes both barriers, cache hit or not, so that none waits forever
        if not hit:
            best_effort(lambda: _write_json_atomic(part_path(rank), verdict), "part")
        barrier()
        if not hit:
            for r in range(world_size):
                if r == rank:
                    continue
                part = _read_json_or_none(part_path(r))
                if isinstance(part, dict):
                    verdict.update(part)
                else:  # a part this rank cannot see (another machine's disk, or that rank had the cache)
                    verdict.update({f: _check_image(f) for f in files[r::world_size]})
        barrier()  # every rank has read every part
    if rank == 0 and not hit:
        best_effort(lambda: _write_json_atomic(cache, verdict), "cache")
        for r in range(world_size if world_size > 1 else 0):
            with contextlib.suppress(OSError):
                os.remove(part_path(r))
    kept, bad, converted = [], [], 0
    for i, s in enumerate(samples):
        f = os.path.join(image_folder, s["image"]) if i not in malformed and isinstance(s, dict) and s.get("image") \
            else None
        reason = verdict.get(f) if f else None
        if reason and allow_non_rgb and reason.startswith("mode "):
            reason = None
            converted += 1
        if reason:
            bad.append((s.get("id"), f, reason))
        else:
            kept.append(s)
    if bad and not skip_bad:
        head = "\n".join(f"  sample {sid}: {f}: {why}" for sid, f, why in bad[:10])
        raise ValueError(f"{len(bad)} sample(s) have a bad image (pass --skip-bad-images to skip and count them"
                         f"{'' if allow_non_rgb else '; without --strict-rgb other colour modes are converted'}):\n{head}")
    if stats is not None:
        stats["converted_non_rgb"] = converted
    return kept, bad


def _file_key(path, span=4096):
    """One cache-key line per file: absolute path, size, mtime and a sha1 of its first and last `span`
    bytes (cheap: 8 KiB read per image), so a same-size, same-mtime rewrite is seen."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            head = f.read(span)
            if st.st_size > 2 * span:
                f.seek(-span, os.SEEK_END)
            tail = f.read(span)
        digest = hashlib.sha1(head + tail).hexdigest()
        return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{digest}\n"
    except OSError:
        return f"{os.path.abspath(path)}|-1|-1|-\n"


def process_image(processor, pil):
    return processor(images=pil, return_tensors="pt")["pixel_values"][0].float()


def same_processing(a, b) -> bool:
    """Whether two image processors give the same pixels: both run on one non-square probe image (where pad
    and squash, or two sizes or normalisations, differ) and compared exactly."""
    if a is b:
        return True
    probe = Image.fromarray(np.arange(37 * 23 * 3, dtype=np.uint8).reshape(23, 37, 3) * 7 % 251, mode="RGB")
    x, y = process_image(a, probe), process_image(b, probe)
    return x.shape == y.shape and torch.equal(x, y)

# -----------------------------------------------------------------------------
# Dataset and collate


def _sample_id(s):
    return s.get("id", "<no id>") if isinstance(s, dict) else "<not a dict>"


def _render_one(tokenizer, s, num_visual_tokens, image_token_id, system_prompt=None):
    """One sample -> (compact int32 ids, compact supervised mask, full length, need, n visual, error or None):
    the visual run kept as ONE image token; need = positions that must fit in max_len (the visual tokens and the
    first supervised token). A malformed sample gives its error message instead (raised by the dataset, in order)."""
    sid = s.get("id", "<no id>") if isinstance(s, dict) else "<not a dict>"
    try:
        messages = with_system_prompt(tokenizer, llava_to_messages(s), system_prompt)
        ids, labels = render_conversation(tokenizer, messages, num_visual_tokens, image_token_id, sid)
    except ValueError as e:
        return None, None, 0, 0, 0, str(e)
    ids, labels = np.asarray(ids, np.int64), np.asarray(labels, np.int64)
    vis = np.flatnonzero(ids == image_token_id)
    sup = np.flatnonzero(labels != IGNORE_INDEX)
    if len(sup) == 0:
        return None, None, 0, 0, 0, f"sample {sid}: renders to no supervised token"
    need = max(int(sup[0]), int(vis[-1]) if len(vis) else -1) + 1
    keep = np.ones(len(ids), dtype=bool)
    keep[vis[1:]] = False  # the visual run (one image, contiguous) kept as one token
    return ids[keep].astype(np.int32), (labels != IGNORE_INDEX)[keep], len(ids), need, len(vis), None


_POOL_ARGS = None


def _pool_init(*args):
    global _POOL_ARGS
    _POOL_ARGS = args


def _pool_render(chunk):
    tokenizer, nv, img, system_prompt = _POOL_ARGS
    return [_render_one(tokenizer, s, nv, img, system_prompt) for s in chunk]


def render_samples(samples, tokenizer, num_visual_tokens, image_token_id, processes=0, progress=False,
                   system_prompt=None):
    """Render `samples` into flat arrays: {"ids" int32, "sup" bool (concatenated compact rows), "offsets" int64
    (N + 1), "full_len", "need", "n_vis" int64 (N)} and {index: error message}. `processes` > 1 renders in a
    fork pool of that many processes (the tokenizer is inherited, not pickled)."""
    if processes > 1 and len(samples) >= 4 * processes:
        import multiprocessing as mp
        step = max(1, min(1000, len(samples) // (4 * processes)))
        chunks = [samples[i:i + step] for i in range(0, len(samples), step)]
        with mp.get_context("fork").Pool(processes, _pool_init,
                                         (tokenizer, num_visual_tokens, image_token_id, system_prompt)) as pool:
            rows = [r for part in tqdm(pool.imap(_pool_render, chunks), total=len(chunks), desc="render",
                                       disable=not progress) for r in part]
    else:
        rows = [_render_one(tokenizer, s, num_visual_tokens, image_token_id, system_prompt)
                for s in tqdm(samples, desc="render", disable=not progress)]
    lens = np.array([0 if r[0] is None else len(r[0]) for r in rows], np.int64)
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    out = {"ids": np.concatenate([r[0] for r in rows if r[0] is not None] or [np.zeros(0, np.int32)]),
           "sup": np.concatenate([r[1] for r in rows if r[1] is not None] or [np.zeros(0, bool)]),
           "offsets": offsets}
    for k, col in (("full_len", 2), ("need", 3), ("n_vis", 4)):
        out[k] = np.array([r[col] for r in rows], np.int64)
    return out, {i: r[5] for i, r in enumerate(rows) if r[5] is not None}


_RENDER_ARRAYS = ("ids", "sup", "offsets", "full_len", "need", "n_vis")


def render_key(samples, tokenizer, num_visual_tokens, image_token_id, system_prompt=None, rank=0, world_size=1,
               gather=None) -> str:
    """What the rendering depends on: the samples' content and order, the tokenizer (its full serialisation:
    vocabulary, merges, normaliser, added tokens), its chat template and special tokens, the visual token count
    and id, and the source of the rendering code itself (an edit to it re-renders). The samples are hashed one
    by one with their index, each rank its contiguous shard (the one it would render), the ranks' digests summed
    through `gather` (shared_digest): no rank serialises the whole data set. The key does not depend on the
    world size."""
    import inspect
    n = len(samples)

    def shard(r):
        lo, hi = n * r // world_size, n * (r + 1) // world_size
        return (f"{i}\n".encode() + json.dumps(samples[i], sort_keys=True, ensure_ascii=False).encode()
                for i in range(lo, hi))
    h = hashlib.sha256()
    h.update(f"{n} samples {shared_digest(shard, rank, world_size, gather)}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(repr((type(tokenizer).__name__, tokenizer.chat_template, tokenizer.eos_token,
                   sorted(_special_strings(tokenizer)), num_visual_tokens, image_token_id, system_prompt)).encode())
    for fn in (_render_one, render_conversation, _segments, _tokenize_segments, _end_of_turn, _special_strings,
               _content_style, _styled, _chat, llava_to_messages, with_system_prompt, _default_system_text,
               _shield_specials, check_image_field):
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()[:24]


def _cache_warning(path, what, e=None):
    """The render cache is best effort: what went wrong with it, naming the path, on stderr; training goes on."""
    why = ""
    if e is not None:
        why = ": disk full (ENOSPC)" if getattr(e, "errno", None) == errno.ENOSPC else \
            f": {getattr(e, 'strerror', None) or e}"
    print(f"warning: render cache: {path}: {what}{why}", file=sys.stderr, flush=True)


def _remove_entry(path) -> bool:
    """Remove a cache entry (a folder, or a file where a folder should be); True if it is gone."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return not os.path.lexists(path)


def _save_render(path, arrays, errors) -> bool:
    """Write a rendering as the cache entry `path`/: one .npy per array, errors.json, and, written last,
    manifest.json (every file's byte size, every array's shape and dtype: _load_render checks them), all into
    `path`.tmpPID/ first, renamed into place. Best effort: where it cannot be written (a read-only folder, a full
    disk) the tmp folder is removed, a warning names the path and the reason ("disk full (ENOSPC)"), and the
    result is False (the caller goes on with the rendering in memory)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(tmp, exist_ok=True)
        manifest = {"arrays": {}, "files": {}}
        for k in _RENDER_ARRAYS:
            arr = np.asarray(arrays[k])
            np.save(os.path.join(tmp, f"{k}.npy"), arr)
            manifest["arrays"][k] = {"shape": list(arr.shape), "dtype": arr.dtype.str}
        _write_json_atomic(os.path.join(tmp, "errors.json"), {str(i): e for i, e in errors.items()})
        manifest["files"] = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        _write_json_atomic(os.path.join(tmp, "manifest.json"), manifest)
        if os.path.lexists(path):  # another process got there first: same key, same content
            shutil.rmtree(tmp, ignore_errors=True)
            return True
        os.replace(tmp, path)
        return True
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json")):
            return True  # the rename lost a race to another process's complete entry
        _cache_warning(path, "not written, training goes on without the cache", e)
        return False


def _load_render(path, mmap=True):
    """A cache entry written by _save_render -> (arrays, {index: error}), checked against its manifest: every
    file's byte size, every array's shape and dtype, the offsets against the ids. An entry that fails (a crash
    or a partial copy truncated a file, an emptied folder, a file where the folder should be, an entry from
    before manifests) is a ValueError naming the entry and what is wrong."""
    try:
        try:
            with open(os.path.join(path, "manifest.json"), encoding="utf-8") as fh:
                manifest = json.load(fh)
        except FileNotFoundError:
            raise ValueError("no manifest.json (an incomplete entry, or one written before entries had one)") from None
        for name, size in manifest["files"].items():
            f = os.path.join(path, name)
            have = os.path.getsize(f) if os.path.isfile(f) else None
            if have != size:
                raise ValueError(f"{name} is {'missing' if have is None else f'{have} bytes'}, the manifest says "
                                 f"{size} bytes (truncated or partly copied)")
        arrays = {k: np.load(os.path.join(path, f"{k}.npy"), mmap_mode="r" if mmap else None) for k in _RENDER_ARRAYS}
        for k, spec in manifest["arrays"].items():
            if list(arrays[k].shape) != spec["shape"] or arrays[k].dtype.str != spec["dtype"]:
                raise ValueError(f"{k}.npy holds {arrays[k].dtype.str} {list(arrays[k].shape)}, the manifest says "
                                 f"{spec['dtype']} {spec['shape']}")
        n, offsets = len(arrays["full_len"]), arrays["offsets"]
        if len(offsets) != n + 1 or not int(offsets[-1]) == len(arrays["ids"]) == len(arrays["sup"]) or \
                len(arrays["need"]) != n or len(arrays["n_vis"]) != n:
            raise ValueError("its arrays do not fit together (offsets, ids, per-sample columns)")
        with open(os.path.join(path, "errors.json"), encoding="utf-8") as fh:
            return arrays, {int(i): e for i, e in json.load(fh).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"render cache entry {path}: {e}") from None


def _concat_renders(parts):
    """Shards (in sample order) -> one rendering, offsets and error indices shifted."""
    arrays, errors, base_rows, base_tok = {}, {}, 0, 0
    for a, e in parts:
        errors.update({i + base_rows: msg for i, msg in e.items()})
        base_rows += len(a["full_len"])
    arrays["ids"] = np.concatenate([a["ids"] for a, _ in parts])
    arrays["sup"] = np.concatenate([a["sup"] for a, _ in parts])
    offs = [np.zeros(1, np.int64)]
    for a, _ in parts:
        offs.append(np.asarray(a["offsets"][1:]) + base_tok)
        base_tok += int(a["offsets"][-1])
    arrays["offsets"] = np.concatenate(offs)
    for k in ("full_len", "need", "n_vis"):
        arrays[k] = np.concatenate([a[k] for a, _ in parts])
    return arrays, errors


def _cached_render(path, n, remove=True):
    """("hit", (arrays, errors)) for a usable entry of `n` samples at `path`; ("miss", None) where there is
    none; a bad one (_load_render) is removed with a warning naming it -> ("miss", None), or, if it cannot be
    removed, ("stuck", None): the cache is bypassed for this rendering. `remove=False` (every rank but 0:
    one rank removes, two would race in the same rmtree) leaves a bad or vanishing entry alone -> ("miss", None)."""
    if not os.path.lexists(path):
        return "miss", None
    try:
        arrays, errors = _load_render(path)
        if len(arrays["full_len"]) != n:
            raise ValueError(f"render cache entry {path}: {len(arrays['full_len'])} samples, the data has {n}")
        return "hit", (arrays, errors)
    except (ValueError, OSError) as e:
        if not remove:
            return "miss", None
        if isinstance(e, OSError) and not os.path.lexists(path):
            return "miss", None  # removed meanwhile
        if _remove_entry(path):
            _cache_warning(path, f"unusable, removed and rendered again: {e}")
            return "miss", None
        _cache_warning(path, f"unusable and cannot be removed, rendering without the cache: {e}")
        return "stuck", None


def _remove_stale_tmp(path, age_s=3600):
    """Remove `path`.tmpPID/ folders a killed writer left (older than `age_s`: a live writer takes seconds)."""
    import glob
    import time
    for tmp in glob.glob(glob.escape(path) + ".tmp*"):
        try:
            if time.time() - os.path.getmtime(tmp) > age_s:
                _remove_entry(tmp)
        except OSError:
            pass


def rendered(samples, tokenizer, num_visual_tokens, image_token_id, cache_dir=None, rank=0, world_size=1,
             barrier=None, processes=0, progress=False, system_prompt=None, gather=None):
    """render_samples through a cache on disk, `cache_dir`/render-KEY/ (render_key: samples, tokenizer, template,
    visual tokens, code), shared by ranks, stages and runs: a hit memory-maps the arrays (no rendering, and the
    pages are shared by the ranks and the DataLoader workers of a machine). A miss under DDP: rank r renders the
    r-th contiguous shard (in `processes` processes) and writes it; after `barrier` rank 0 concatenates the
    shards into the cache (rendering any shard it cannot see) and every rank maps it (a rank that cannot see it,
    without a shared file system, renders everything itself).
    Best effort: a cache folder that cannot be created or written (read-only, a file in its place, a full disk)
    costs a warning naming it and the rendering; an entry that fails its manifest (_load_render) is removed and
    rendered again (or, if it cannot be removed, bypassed), with a warning naming it. Every rank takes both
    barriers whatever happens to the cache."""
    cache_dir = default_cache_dir(cache_dir)
    path = os.path.join(cache_dir, "render-" + render_key(samples, tokenizer, num_visual_tokens, image_token_id,
                                                          system_prompt, rank, world_size, gather))
    n = len(samples)
    bounds = [n * r // world_size for r in range(world_size + 1)]

    def shard_path(r):
        return f"{path}.shard-{r}-of-{world_size}"

    def render_range(r):
        return render_samples(samples[bounds[r]:bounds[r + 1]], tokenizer, num_visual_tokens, image_token_id,
                              processes, progress, system_prompt)
    usable = True
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:  # read-only parent, a file where the folder should be, ...
        usable = False
        _cache_warning(cache_dir, "cannot be created, rendering without the cache", e)
    state, entry = _cached_render(path, n, remove=rank == 0) if usable else ("off", None)
    usable = usable and state != "stuck"
    mine = whole = None
    if entry is None:
        if usable:
            _remove_stale_tmp(path)
        mine = render_range(rank)
        if usable:
            usable = _save_render(path if world_size == 1 else shard_path(rank), *mine)
    if world_size > 1:  # every rank takes both barriers, cache hit or not
        barrier()
        if rank == 0 and entry is None and usable and not os.path.lexists(path):
            parts = [mine if r == 0 else (_cached_render(shard_path(r), bounds[r + 1] - bounds[r])[1]
                                          or render_range(r)) for r in range(world_size)]
            whole = _concat_renders(parts)
            _save_render(path, *whole)
        barrier()
        if rank == 0:
            for r in range(world_size):
                _remove_entry(shard_path(r))
    if world_size == 1 and entry is not None:
        return entry
    if usable:
        entry = _cached_render(path, n, remove=rank == 0)[1]  # memory-mapped: shared by ranks and workers
        if entry is not None:
            return entry
    if world_size == 1 and mine is not None:
        return mine
    if whole is not None:
        return whole
    return render_samples(samples, tokenizer, num_visual_tokens, image_token_id, processes, progress, system_prompt)


class SupervisedDataset(torch.utils.data.Dataset):
    """LLaVA samples -> {"id", "input_ids", "labels", "pixel_values" or None}. Token ids are rendered
    in __init__ (images are loaded lazily, per item: in the DataLoader's workers). Truncation never cuts
    visual tokens: if the visual tokens or the first supervised token do not fit in max_len the sample is
    an error, or with drop_overlong=True it is left out (ids in self.dropped). Longer samples are cut at
    max_len. Stored compactly, since every rank holds the whole set (665K samples x 729 visual tokens would
    be ~10 GB as int64 ids + labels): flat int32 ids with the visual run kept as ONE image token and a bool
    "supervised" mask (labels are the ids there), rows cut by offsets; __getitem__ expands them back.
    With `cache_dir` the rendering goes through `rendered` (a content-keyed cache on disk, shared by ranks,
    stages and runs, memory-mapped; rendering sharded over `rank`/`world_size` and `processes`); without it,
    rendered in memory here. `teacher_image_processor`: a teacher that processes images otherwise (pad vs
    squash, its own preprocessor config) gets its own "teacher_pixel_values" from the same decoded image.
    A malformed sample (llava_to_messages, the chat template) is an error naming it,
    `source` (the data file) and --skip-bad-samples, or with skip_bad_samples=True left out and listed in
    self.bad_samples as (id, reason)."""

    def __init__(self, samples, tokenizer, image_processor, image_folder, num_visual_tokens,
                 image_token_id, max_len, drop_overlong=False, progress=False, system_prompt=None, cache_dir=None,
                 rank=0, world_size=1, barrier=None, processes=0, skip_bad_samples=False, source=None, gather=None,
                 teacher_image_processor=None):
        self.image_processor, self.image_folder = image_processor, image_folder
        self.teacher_image_processor = teacher_image_processor
        self.num_visual_tokens, self.image_token_id, self.max_len = num_visual_tokens, image_token_id, max_len
        if cache_dir is None:
            arrays, errors = render_samples(samples, tokenizer, num_visual_tokens, image_token_id, processes, progress,
                                            system_prompt)
        else:
            arrays, errors = rendered(samples, tokenizer, num_visual_tokens, image_token_id, cache_dir, rank,
                                      world_size, barrier, processes, progress, system_prompt, gather)
        need, full_len, n_vis = (np.asarray(arrays[k]) for k in ("need", "full_len", "n_vis"))
        over = np.flatnonzero((need > max_len) & (full_len > 0))  # full_len 0: an error row
        first_over = int(over[0]) if len(over) and not drop_overlong else len(samples)
        # malformed samples (rendering errors): (id, message), skipped with skip_bad_samples, else the first is raised
        self.bad_samples = [(_sample_id(samples[j]), errors[j]) for j in sorted(errors)] if skip_bad_samples else []
        if errors and not skip_bad_samples and min(errors) < first_over:  # the first problem in sample order
            raise ValueError(f"{source + ': ' if source else ''}{errors[min(errors)]} ({SKIP_SAMPLES_HINT}; "
                             "SupervisedDataset(skip_bad_samples=True) from Python)")
        if first_over < len(samples):
            j = first_over
            sid = samples[j].get("id", "<no id>")
            raise ValueError(f"sample {sid}: {n_vis[j]} visual tokens and the first answer token need "
                             f"{need[j]} tokens > --max-len {max_len} (sample length {full_len[j]}); raise --max-len "
                             f"or pass --drop-overlong to drop and count such samples "
                             f"(SupervisedDataset(drop_overlong=True) from Python)")
        self.dropped = [samples[j].get("id", "<no id>") for j in over]
        self.index = np.flatnonzero((need <= max_len) & (full_len > 0))  # rows of the rendering in the dataset
        self.samples = [samples[j] for j in self.index]
        self._ids, self._sup, self._offsets = arrays["ids"], arrays["sup"], arrays["offsets"]
        self._images = np.array([s.get("image") or "" for s in self.samples], dtype=str)  # no per-item objects
        self._sample_ids = [s.get("id") for s in self.samples]
        self.lengths = np.minimum(full_len[self.index], max_len).tolist()

    def __len__(self):
        return len(self.index)

    def compact(self, i):
        """(ids int32, supervised bool) of sample i as stored: the visual run as one image token, not cut."""
        j = int(self.index[i])
        a, b = int(self._offsets[j]), int(self._offsets[j + 1])
        return np.asarray(self._ids[a:b]), np.asarray(self._sup[a:b])

    def tokens(self, i):
        """(input_ids, labels) of sample i as int64 arrays: the visual run expanded, cut at max_len."""
        ids, sup = self.compact(i)
        ids = ids.astype(np.int64)
        at = np.flatnonzero(ids == self.image_token_id)
        if len(at):
            j, n = int(at[0]), self.num_visual_tokens
            ids = np.concatenate([ids[:j], np.full(n, self.image_token_id, np.int64), ids[j + 1:]])
            sup = np.concatenate([sup[:j], np.zeros(n, bool), sup[j + 1:]])
        ids, sup = ids[:self.max_len], sup[:self.max_len]
        return ids, np.where(sup, ids, IGNORE_INDEX)

    def __getitem__(self, i):
        image = str(self._images[i])
        pixel_values = teacher_pixel_values = None
        if image:
            if self.image_processor is None:
                raise ValueError(f"sample {self._sample_ids[i]}: has an image but the dataset has no image processor")
            pil = load_image(os.path.join(self.image_folder, image))
            pixel_values = process_image(self.image_processor, pil)
            if self.teacher_image_processor is not None:
                teacher_pixel_values = process_image(self.teacher_image_processor, pil)
        ids, labels = self.tokens(i)
        item = {"id": self._sample_ids[i], "input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "pixel_values": pixel_values}
        if self.teacher_image_processor is not None:  # the teacher's own processing (train.py, docs/training.md)
            item["teacher_pixel_values"] = teacher_pixel_values
        return item


class CrossVocabDataset(torch.utils.data.Dataset):
    """Cross-vocabulary distillation (train.py --cross-vocab): the items of `student` (a SupervisedDataset)
    with the teacher tokenizer's rendering of the same conversation, "teacher_input_ids" /
    "teacher_labels" (with the teacher's own system prompt, `teacher_system_prompt`), and "pairs" (P, 2): the
    (student, teacher) positions of supervised tokens that end at
    the same character of an assistant turn (answer_char_keys / aligned_pairs), both within max_len.
    The visual tokens correspond one to one (same vision encoder, same count).
    Both renderings must fit: here, before any step, every sample is also rendered in the teacher's tokens
    (render_samples, through the render cache with `cache_dir`, as SupervisedDataset does) and a sample whose
    teacher rendering puts the visual tokens or the first answer token past max_len is an error giving the count
    and the first ids, or with drop_overlong=True left out (its id in self.dropped_teacher, and in
    self.dropped after the student's own). Items are rendered per item."""

    def __init__(self, student, student_tokenizer, teacher_tokenizer, teacher_image_token_id, system_prompt=None,
                 teacher_system_prompt=None, drop_overlong=False, cache_dir=None, rank=0, world_size=1,
                 barrier=None, processes=0, progress=False, gather=None):
        self.student, self.tok_s, self.tok_t = student, student_tokenizer, teacher_tokenizer
        self.image_token_t, self.system_prompt = teacher_image_token_id, system_prompt
        self.teacher_system_prompt = teacher_system_prompt  # each model reads the prompt it was trained with
        samples, n_vis, max_len = student.samples, student.num_visual_tokens, student.max_len
        if cache_dir is None:
            arrays, errors = render_samples(samples, teacher_tokenizer, n_vis, teacher_image_token_id, processes,
                                            progress, teacher_system_prompt)
        else:
            arrays, errors = rendered(samples, teacher_tokenizer, n_vis, teacher_image_token_id, cache_dir, rank,
                                      world_size, barrier, processes, progress, teacher_system_prompt, gather)
        if errors:
            raise ValueError(f"the teacher's tokenizer (--cross-vocab): {errors[min(errors)]}")
        need, full_len = np.asarray(arrays["need"]), np.asarray(arrays["full_len"])
        over = np.flatnonzero(need > max_len)
        ids = [samples[j].get("id", "<no id>") for j in over]
        if len(over) and not drop_overlong:
            j = int(over[0])
            raise ValueError(f"{len(over)} samples do not fit --max-len {max_len} in the teacher's tokens "
                             f"(--cross-vocab): their visual tokens and first answer token need more positions "
                             f"(sample {ids[0]}: {need[j]}, length {full_len[j]}; first ids {ids[:5]}); raise "
                             "--max-len or pass --drop-overlong to drop and count them")
        self.dropped_teacher = ids
        self.dropped = list(student.dropped) + ids
        self.index = np.flatnonzero(need <= max_len)  # items of `student` that are in this dataset
        self.samples = [samples[j] for j in self.index]
        self.lengths = [student.lengths[j] for j in self.index]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        j = int(self.index[i])
        item = self.student[j]
        s, n_vis, max_len = self.student.samples[j], self.student.num_visual_tokens, self.student.max_len
        sid = s.get("id", i)
        messages = llava_to_messages(s)
        ids_s, _, keys_s = answer_char_keys(self.tok_s, with_system_prompt(self.tok_s, messages, self.system_prompt),
                                            n_vis, self.student.image_token_id, sid)
        if ids_s[:max_len] != item["input_ids"].tolist():
            raise ValueError(f"sample {sid}: the student's rendering with offsets differs from the dataset's")
        ids_t, labels_t, keys_t = answer_char_keys(self.tok_t, with_system_prompt(self.tok_t, messages,
                                                                                   self.teacher_system_prompt),
                                                   n_vis, self.image_token_t, sid)
        vis_t = [j for j, t in enumerate(ids_t) if t == self.image_token_t]
        if vis_t and vis_t[-1] >= max_len:  # checked in __init__; a guard against the two renderings drifting
            raise ValueError(f"sample {sid}: the teacher's rendering puts visual tokens beyond --max-len {max_len}")
        n_s = len(item["input_ids"])
        pairs = [(a, b) for a, b in aligned_pairs(keys_s, keys_t) if a < n_s and b < max_len]
        return dict(item, teacher_input_ids=torch.tensor(ids_t[:max_len]), teacher_labels=torch.tensor(labels_t[:max_len]),
                    pairs=torch.tensor(pairs, dtype=torch.long).reshape(-1, 2))


def collate_cross_vocab(batch, pad_token_id, teacher_pad_token_id):
    """collate for CrossVocabDataset items: the student's batch, the teacher's "teacher_input_ids" /
    "teacher_attention_mask" padded with its own pad id, and "pairs" (P, 3) = (sample, student position,
    teacher position) of the aligned supervised tokens."""
    out = collate(batch, pad_token_id)
    teacher = collate([{"input_ids": b["teacher_input_ids"], "labels": b["teacher_labels"],
                        "pixel_values": b["pixel_values"]} for b in batch], teacher_pad_token_id)
    pairs = [torch.cat([torch.full((len(b["pairs"]), 1), k), b["pairs"]], 1) for k, b in enumerate(batch)]
    return dict(out, teacher_input_ids=teacher["input_ids"], teacher_attention_mask=teacher["attention_mask"],
                pairs=torch.cat(pairs) if pairs else torch.zeros(0, 3, dtype=torch.long))


class MicroBatchSampler:
    """The DataLoader's batch sampler: each rank's share of every global batch (a GlobalBatchSampler, whose
    state is still the data position) cut into micro-batches of `micro` indices, in order. The loader's workers
    prefetch ahead of the loop; the trainer checkpoints the position of the steps it has TAKEN
    (GlobalBatchSampler.state_after), so prefetching changes nothing on resume."""

    def __init__(self, sampler, micro):
        if isinstance(micro, bool) or not isinstance(micro, numbers.Integral) or micro < 1:
            raise ValueError(f"MicroBatchSampler: micro must be a positive integer, got {micro!r}")
        self.sampler, self.micro = sampler, micro

    def __iter__(self):
        for share in self.sampler:
            for j in range(0, len(share), self.micro):
                yield share[j:j + self.micro]


def collate(batch, pad_token_id):
    """Right padding; labels padded with -100; pixel_values stacked for the samples that have an
    image, in batch order (None if none)."""
    T = max(len(b["input_ids"]) for b in batch)
    B = len(batch)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        input_ids[i, :n] = b["input_ids"]
        labels[i, :n] = b["labels"]
        attention_mask[i, :n] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
           "pixel_values": _stack_images(batch, "pixel_values"), "ids": [b.get("id") for b in batch]}
    if any("teacher_pixel_values" in b for b in batch):  # the teacher's own image processing
        out["teacher_pixel_values"] = _stack_images(batch, "teacher_pixel_values")
    return out


def _stack_images(batch, key):
    pix = [b[key] for b in batch if b.get(key) is not None]
    if not pix:
        return None
    # in a DataLoader worker, stacked straight into shared memory (as torch's default_collate does)
    shared = torch.utils.data.get_worker_info() is not None
    out = torch.empty((len(pix), *pix[0].shape), dtype=pix[0].dtype)
    return torch.stack(pix, out=out.share_memory_() if shared else out)

# -----------------------------------------------------------------------------
# Global-batch sampler (DDP: each rank takes a contiguous share of the same global batch)


class GlobalBatchSampler:
    """Yields this rank's indices for each step. Epoch e uses torch.randperm seeded with seed+e; step
    s uses perm[s*G:(s+1)*G] (with drop_last=False the last batch is filled from the start of the
    permutation); rank r gets the r-th contiguous G/world_size slice. The ranks' shares at step s
    concatenated equal the 1-process batch at step s. state_dict() = position of the NEXT batch.
    Note: a DataLoader with workers prefetches batches; a trainer should checkpoint
    state_after(number of batches it consumed) rather than state_dict().

    With `lengths` (one per sample), batches are grouped by length, like LLaVA's
    `--group_by_modality_length` (which also separates image and text-only samples): the epoch's
    permutation is cut into mega-batches of `megabatch` global batches, each mega-batch is sorted by
    length (longest first) and cut into global batches, and the order of all full global batches of
    the epoch is then shuffled (seeded).
    Every sample is still seen once per epoch; only which samples share a batch changes, so that
    right padding wastes little (a batch pads to its longest sample)."""

    def __init__(self, num_samples, global_batch_size, rank=0, world_size=1, seed=0, drop_last=True, epochs=None,
                 lengths=None, megabatch=50):
        for name, v in (("global_batch_size", global_batch_size), ("world_size", world_size), ("megabatch", megabatch)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:  # negative: 0 steps, forever
                raise ValueError(f"GlobalBatchSampler: {name} must be a positive integer, got {v!r}")
        if epochs is not None and epochs < 0:
            raise ValueError(f"GlobalBatchSampler: epochs must be None (endless) or >= 0, got {epochs!r}")
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if num_samples < (global_batch_size if drop_last else 1):
            raise ValueError(f"{num_samples} samples cannot fill a global batch of {global_batch_size}")
        self.N, self.G, self.rank, self.world_size = num_samples, global_batch_size, rank, world_size
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"{len(lengths)} lengths for {num_samples} samples")
        self.seed, self.drop_last, self.epochs = seed, drop_last, epochs
        self.lengths, self.megabatch = (None if lengths is None else list(lengths)), megabatch
        self.local = global_batch_size // world_size
        self.steps_per_epoch = num_samples // global_batch_size if drop_last else -(-num_samples // global_batch_size)
        self.epoch, self.step = 0, 0

    def _perm(self, epoch):
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        perm = torch.randperm(self.N, generator=g).tolist()
        if self.lengths is None:
            return perm
        span = self.megabatch * self.G
        grouped = []
        for i in range(0, self.N, span):
            grouped += sorted(perm[i:i + span], key=lambda j: -self.lengths[j])  # stable: ties keep perm order
        n_full = self.N // self.G
        order = torch.randperm(n_full, generator=g).tolist()  # interleave long and short batches
        return [j for b in order for j in grouped[b * self.G:(b + 1) * self.G]] + grouped[n_full * self.G:]

    def global_batch(self, perm, step):
        batch = perm[step * self.G:(step + 1) * self.G]
        while len(batch) < self.G:  # drop_last=False: wrap around
            batch += perm[:self.G - len(batch)]
        return batch

    def __iter__(self):
        while self.epochs is None or self.epoch < self.epochs:
            perm = self._perm(self.epoch)
            while self.step < self.steps_per_epoch:
                batch = self.global_batch(perm, self.step)
                self.step += 1
                yield batch[self.rank * self.local:(self.rank + 1) * self.local]
            self.epoch, self.step = self.epoch + 1, 0

    def __len__(self):
        return self.steps_per_epoch * (self.epochs if self.epochs is not None else 1)

    def state_after(self, num_batches):
        return {"epoch": num_batches // self.steps_per_epoch, "step": num_batches % self.steps_per_epoch}

    def state_dict(self):
        if self.step >= self.steps_per_epoch:
            return {"epoch": self.epoch + 1, "step": 0}
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state):
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


# -----------------------------------------------------------------------------
# The loader: this rank's collated micro-batches, in the sampler's order

def num_workers_for(num_workers, device) -> int:
    """train.py's `--num-workers`, or by default: 0 on a CPU device (the cores that would load data are the ones
    training), else min(4, this rank's share of the CPUs - 1), at least 1. At 20-23 ms per 384 px sample (JPEG
    decode + SigLIP processor), 16 samples per rank are ~0.35 s of work per step: 4 workers keep that under the
    step time of any real model pair and leave a core to the training process."""
    if num_workers is not None:
        if num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {num_workers}")
        return num_workers
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(4, per_rank - 1))


def ignore_sigterm(worker_id: int = 0):
    """A DataLoader worker's init: SIGTERM ignored. A scheduler's preemption (scancel, a spot reclaim) sends
    SIGTERM to every process of the job; torch's worker handler would die of it, and the main process would
    then stop with "DataLoader worker ... exited unexpectedly" instead of finishing the step and saving
    (runs.sigterm_checkpoints). The main process ends the workers itself when it exits; SIGKILL still works."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def data_loader(dataset, sampler, micro, pad_id, num_workers, device, seed, collate_fn=None):
    """An iterator over this rank's collated micro-batches, in the sampler's order: a torch DataLoader over
    MicroBatchSampler with `num_workers` worker processes (0: in this process), pinned memory on CUDA and
    4 micro-batches prefetched per worker. Items (image decode + processor, ids expanded) and collate run in
    the workers; the order, hence every loss, is the same for any number of workers. Its own seeded generator,
    so that the global RNG (dropout) does not depend on the loader. Workers are forked (where the platform
    can), so they share the dataset's memory-mapped arrays instead of pickling them. Workers ignore SIGTERM
    (ignore_sigterm): a preemption's SIGTERM to the whole job reaches the main process, which saves."""
    import multiprocessing as mp
    if num_workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers never tokenize
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=MicroBatchSampler(sampler, micro),
        collate_fn=collate_fn or functools.partial(collate, pad_token_id=pad_id), num_workers=num_workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None,
        generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_sigterm if num_workers else None,
        multiprocessing_context=("fork" if "fork" in mp.get_all_start_methods() else None) if num_workers else None)
    return iter(loader)
