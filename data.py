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
import json
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100

# -----------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(path):
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
    return [t for t in toks if t]


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


def _tokenize_segments(tokenizer, segs, num_visual_tokens, image_token_id, sample_id):
    pieces = []  # (text or None for an image, supervised)
    for text, supervised in segs:
        parts = text.split(IMAGE_TOKEN)
        if supervised and len(parts) > 1:
            raise ValueError(f"sample {sample_id}: '{IMAGE_TOKEN}' inside an assistant turn")
        for j, part in enumerate(parts):
            if j > 0:
                pieces.append((None, False))
            if part:
                pieces.append((part, supervised))
    texts = [p for p, _ in pieces if p is not None]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    ids, labels = [], []
    for text, supervised in pieces:
        if text is None:  # the visual tokens replace the literal "<image>", never supervised
            ids += [image_token_id] * num_visual_tokens
            labels += [IGNORE_INDEX] * num_visual_tokens
        else:
            p = list(next(encoded))
            ids += p
            labels += p if supervised else [IGNORE_INDEX] * len(p)
    return ids, labels


def render_conversation(tokenizer, messages, num_visual_tokens, image_token_id, sample_id=None):
    """messages [{"role", "content"}] -> (ids, labels): labels = ids on the assistant content and
    its end-of-turn token, IGNORE_INDEX (-100) elsewhere (the header "<|im_start|>assistant\\n"
    included); each "<image>" becomes num_visual_tokens copies of image_token_id."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"sample {sample_id}: no assistant turn to supervise")
    segs = _segments(tokenizer, messages, False, sample_id)
    return _tokenize_segments(tokenizer, segs, num_visual_tokens, image_token_id, sample_id)


def render_prompt(tokenizer, messages, num_visual_tokens, image_token_id, sample_id=None):
    """Prompt ids for generation: messages end with a user turn; chat template + generation
    prompt. Segmented exactly as render_conversation, so the ids equal the training prefix."""
    if not messages or messages[-1]["role"] == "assistant":
        raise ValueError(f"sample {sample_id}: a prompt must end with a user turn")
    segs = _segments(tokenizer, messages, True, sample_id)
    return _tokenize_segments(tokenizer, segs, num_visual_tokens, image_token_id, sample_id)[0]

# -----------------------------------------------------------------------------
# LLaVA JSON


ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def llava_to_messages(sample):
    """LLaVA sample {"id", "image"?, "conversations": [{"from", "value"}]} -> messages, with
    validation. An "image" key requires exactly one "<image>" in a human turn, and vice versa
    (LLaVA's silent prepending is not applied)."""
    sid = sample.get("id", "<no id>") if isinstance(sample, dict) else "<not a dict>"
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
        n_image += c
        messages.append({"role": role, "content": value})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"sample {sid}: no gpt (assistant) turn")
    if n_image > 1:
        raise ValueError(f"sample {sid}: '{IMAGE_TOKEN}' occurs {n_image} times (at most once)")
    if n_image == 1 and not sample.get("image"):
        raise ValueError(f"sample {sid}: '{IMAGE_TOKEN}' in the text but no 'image' key")
    if n_image == 0 and sample.get("image"):
        raise ValueError(f"sample {sid}: has an 'image' but no '{IMAGE_TOKEN}' in any human turn "
                         f"(add it to the first human turn; it is not prepended silently)")
    return messages


def load_llava_json(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA samples, got {type(data).__name__}")
    return data

# -----------------------------------------------------------------------------
# Images


def load_image(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
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
    with open(path + f".tmp{os.getpid()}", "w") as fh:
        json.dump(obj, fh)
    os.replace(path + f".tmp{os.getpid()}", path)


def validate_images(samples, image_folder, skip_bad=False, allow_non_rgb=False, cache_dir=None, progress=True,
                    rank=0, world_size=1, barrier=None):
    """Check every sample's image BEFORE training (missing, unreadable, corrupt, not RGB), with a
    progress bar. The verdict is cached (keyed by each file's path, size and mtime), so a second run
    over the same files does not decode them again. Returns (kept samples, bad list of
    (sample id, file, reason)). Bad images are an error naming the sample and file, unless skip_bad.
    allow_non_rgb accepts other colour modes (they are converted to RGB when loaded).
    Under DDP (`rank`, `world_size`, `barrier` = a callable that waits for every rank) each rank checks every
    world_size-th file and writes its part of the verdict next to the cache; after the barrier every rank
    merges all parts (checking itself any part it cannot see, e.g. without a shared file system), and rank 0
    writes the merged cache. 1/world_size of the decoding per rank, and no rank idles at a barrier meanwhile."""
    import hashlib
    files = sorted({os.path.join(image_folder, s["image"]) for s in samples if isinstance(s, dict) and s.get("image")})
    key = hashlib.sha256()
    for f in files:
        st = os.stat(f) if os.path.exists(f) else None
        key.update(f"{os.path.abspath(f)}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    cache_dir = default_cache_dir(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    cache = os.path.join(cache_dir, f"images-{key.hexdigest()[:24]}.json")
    def part_path(r):
        return f"{cache}.part-{r}-of-{world_size}"
    hit = os.path.exists(cache)
    if hit:
        with open(cache) as fh:
            verdict = json.load(fh)
    else:
        verdict = {f: _check_image(f) for f in tqdm(files[rank::world_size], desc="validating images",
                                                     disable=not progress)}
    if world_size > 1:  # every rank takes both barriers, cache hit or not, so that none waits forever
        if not hit:
            _write_json_atomic(part_path(rank), verdict)
        barrier()
        if not hit:
            for r in range(world_size):
                if r == rank:
                    continue
                if os.path.exists(part_path(r)):
                    with open(part_path(r)) as fh:
                        verdict.update(json.load(fh))
                else:  # a part this rank cannot see (another machine's disk, or that rank had the cache)
                    verdict.update({f: _check_image(f) for f in files[r::world_size]})
        barrier()  # every rank has read every part
    if rank == 0 and not hit:
        _write_json_atomic(cache, verdict)
        for r in range(world_size if world_size > 1 else 0):
            with contextlib.suppress(FileNotFoundError):
                os.remove(part_path(r))
    kept, bad = [], []
    for s in samples:
        f = os.path.join(image_folder, s["image"]) if isinstance(s, dict) and s.get("image") else None
        reason = verdict.get(f) if f else None
        if reason and allow_non_rgb and reason.startswith("mode "):
            reason = None
        if reason:
            bad.append((s.get("id"), f, reason))
        else:
            kept.append(s)
    if bad and not skip_bad:
        head = "\n".join(f"  sample {sid}: {f}: {why}" for sid, f, why in bad[:10])
        raise ValueError(f"{len(bad)} sample(s) have a bad image (pass --skip-bad-images to skip and count them"
                         f"{'' if allow_non_rgb else ', --allow-non-rgb to convert other colour modes'}):\n{head}")
    return kept, bad


def process_image(processor, pil):
    return processor(images=pil, return_tensors="pt")["pixel_values"][0].float()

# -----------------------------------------------------------------------------
# Dataset and collate


def _render_one(tokenizer, s, num_visual_tokens, image_token_id):
    """One sample -> (compact int32 ids, compact supervised mask, full length, need, n visual, error or None):
    the visual run kept as ONE image token; need = positions that must fit in max_len (the visual tokens and the
    first supervised token). A malformed sample gives its error message instead (raised by the dataset, in order)."""
    sid = s.get("id", "<no id>") if isinstance(s, dict) else "<not a dict>"
    try:
        ids, labels = render_conversation(tokenizer, llava_to_messages(s), num_visual_tokens, image_token_id, sid)
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
    tokenizer, nv, img = _POOL_ARGS
    return [_render_one(tokenizer, s, nv, img) for s in chunk]


def render_samples(samples, tokenizer, num_visual_tokens, image_token_id, processes=0, progress=False):
    """Render `samples` into flat arrays: {"ids" int32, "sup" bool (concatenated compact rows), "offsets" int64
    (N + 1), "full_len", "need", "n_vis" int64 (N)} and {index: error message}. `processes` > 1 renders in a
    fork pool of that many processes (the tokenizer is inherited, not pickled)."""
    if processes > 1 and len(samples) >= 4 * processes:
        import multiprocessing as mp
        step = max(1, min(1000, len(samples) // (4 * processes)))
        chunks = [samples[i:i + step] for i in range(0, len(samples), step)]
        with mp.get_context("fork").Pool(processes, _pool_init, (tokenizer, num_visual_tokens, image_token_id)) as pool:
            rows = [r for part in tqdm(pool.imap(_pool_render, chunks), total=len(chunks), desc="render",
                                       disable=not progress) for r in part]
    else:
        rows = [_render_one(tokenizer, s, num_visual_tokens, image_token_id)
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


def render_key(samples, tokenizer, num_visual_tokens, image_token_id) -> str:
    """What the rendering depends on: the samples' content, the tokenizer (its full serialisation: vocabulary,
    merges, normaliser, added tokens), its chat template and special tokens, the visual token count and id, and
    the source of the rendering code itself (an edit to it re-renders)."""
    import hashlib
    import inspect
    h = hashlib.sha256()
    h.update(json.dumps(samples, sort_keys=True, ensure_ascii=False).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(repr((type(tokenizer).__name__, tokenizer.chat_template, tokenizer.eos_token,
                   sorted(_special_strings(tokenizer)), num_visual_tokens, image_token_id)).encode())
    for fn in (_render_one, render_conversation, _segments, _tokenize_segments, _end_of_turn, _special_strings,
               _content_style, _styled, _chat, llava_to_messages):
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()[:24]


def _save_render(path, arrays, errors):
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    for k in _RENDER_ARRAYS:
        np.save(os.path.join(tmp, f"{k}.npy"), arrays[k])
    _write_json_atomic(os.path.join(tmp, "errors.json"), {str(i): e for i, e in errors.items()})
    if os.path.exists(path):  # another process got there first: same key, same content
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        return
    os.replace(tmp, path)


def _load_render(path, mmap=True):
    arrays = {k: np.load(os.path.join(path, f"{k}.npy"), mmap_mode="r" if mmap else None) for k in _RENDER_ARRAYS}
    with open(os.path.join(path, "errors.json")) as fh:
        return arrays, {int(i): e for i, e in json.load(fh).items()}


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


def rendered(samples, tokenizer, num_visual_tokens, image_token_id, cache_dir=None, rank=0, world_size=1,
             barrier=None, processes=0, progress=False):
    """render_samples through a cache on disk, `cache_dir`/render-KEY/ (render_key: samples, tokenizer, template,
    visual tokens, code), shared by ranks, stages and runs: a hit memory-maps the arrays (no rendering, and the
    pages are shared by the ranks and the DataLoader workers of a machine). A miss under DDP: rank r renders the
    r-th contiguous shard (in `processes` processes) and writes it; after `barrier` rank 0 concatenates the
    shards into the cache (rendering any shard it cannot see) and every rank maps it (a rank that cannot see it,
    without a shared file system, renders everything itself)."""
    cache_dir = default_cache_dir(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"render-{render_key(samples, tokenizer, num_visual_tokens, image_token_id)}")
    hit = os.path.exists(path)
    n = len(samples)
    bounds = [n * r // world_size for r in range(world_size + 1)]

    def shard_path(r):
        return f"{path}.shard-{r}-of-{world_size}"

    def render_range(r):
        return render_samples(samples[bounds[r]:bounds[r + 1]], tokenizer, num_visual_tokens, image_token_id,
                              processes, progress)
    if not hit:
        mine = render_range(rank)
        if world_size == 1:
            _save_render(path, *mine)
        else:
            _save_render(shard_path(rank), *mine)
    if world_size > 1:  # every rank takes both barriers, cache hit or not
        barrier()
        if rank == 0 and not hit and not os.path.exists(path):
            parts = [mine if r == 0 else (_load_render(shard_path(r), mmap=False) if os.path.exists(shard_path(r))
                                          else render_range(r)) for r in range(world_size)]
            _save_render(path, *_concat_renders(parts))
        barrier()
        if rank == 0:
            import shutil
            for r in range(world_size):
                shutil.rmtree(shard_path(r), ignore_errors=True)
    if os.path.exists(path):
        return _load_render(path)
    return render_samples(samples, tokenizer, num_visual_tokens, image_token_id, processes, progress)


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
    rendered in memory here."""

    def __init__(self, samples, tokenizer, image_processor, image_folder, num_visual_tokens,
                 image_token_id, max_len, drop_overlong=False, progress=False, cache_dir=None, rank=0,
                 world_size=1, barrier=None, processes=0):
        self.image_processor, self.image_folder = image_processor, image_folder
        self.num_visual_tokens, self.image_token_id, self.max_len = num_visual_tokens, image_token_id, max_len
        if cache_dir is None:
            arrays, errors = render_samples(samples, tokenizer, num_visual_tokens, image_token_id, processes, progress)
        else:
            arrays, errors = rendered(samples, tokenizer, num_visual_tokens, image_token_id, cache_dir, rank,
                                      world_size, barrier, processes, progress)
        need, full_len, n_vis = (np.asarray(arrays[k]) for k in ("need", "full_len", "n_vis"))
        over = np.flatnonzero((need > max_len) & (full_len > 0))  # full_len 0: an error row
        first_over = int(over[0]) if len(over) and not drop_overlong else len(samples)
        if errors and min(errors) < first_over:  # the first problem in sample order, as when rendered one by one
            raise ValueError(errors[min(errors)])
        if first_over < len(samples):
            j = first_over
            sid = samples[j].get("id", "<no id>")
            raise ValueError(f"sample {sid}: {n_vis[j]} visual tokens and the first answer token need "
                             f"{need[j]} tokens > max_len {max_len} (sample length {full_len[j]}); raise max_len "
                             f"or pass drop_overlong=True")
        self.dropped = [samples[j].get("id", "<no id>") for j in over]
        self.index = np.flatnonzero(need <= max_len)  # rows of the rendering that are in the dataset
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
        pixel_values = None
        if image:
            if self.image_processor is None:
                raise ValueError(f"sample {self._sample_ids[i]}: has an image but the dataset has no image processor")
            pixel_values = process_image(self.image_processor, load_image(os.path.join(self.image_folder, image)))
        ids, labels = self.tokens(i)
        return {"id": self._sample_ids[i], "input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "pixel_values": pixel_values}


class MicroBatchSampler:
    """The DataLoader's batch sampler: each rank's share of every global batch (a GlobalBatchSampler, whose
    state is still the data position) cut into micro-batches of `micro` indices, in order. The loader's workers
    prefetch ahead of the loop; the trainer checkpoints the position of the steps it has TAKEN
    (GlobalBatchSampler.state_after), so prefetching changes nothing on resume."""

    def __init__(self, sampler, micro):
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
    pix = [b["pixel_values"] for b in batch if b.get("pixel_values") is not None]
    pixel_values = None
    if pix:  # in a DataLoader worker, stacked straight into shared memory (as torch's default_collate does)
        shared = torch.utils.data.get_worker_info() is not None
        out = torch.empty((len(pix), *pix[0].shape), dtype=pix[0].dtype)
        pixel_values = torch.stack(pix, out=out.share_memory_() if shared else out)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": pixel_values, "ids": [b.get("id") for b in batch]}

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
