"""Training: the standard LLaVA recipe and CompoDistill's three stages in ONE visible loop.

Stages (METHOD.md section 5; `--stage`):
  llava  the standard recipe without a teacher: adapter pre-training (`--trainable adapter`), then
         fine-tuning (`--trainable adapter+lora` or `adapter+llm`). On the teacher preset it trains the
         teacher; on the student preset it is the paper's SFT baseline.
  1      DPT, distilled pre-training: L_LM + L_KL; trains the TAF linear only (taf.py).
  2      DFT, distilled fine-tuning: L_LM + L_KL + L_ADL (vat.py); trains the TAF linear + LoRA (or the LLM).
  3      SFT: L_LM only; stage 2's LoRA is merged, a fresh LoRA + the TAF linear train; no teacher.
  all    1 -> 2 -> 3, each reading the previous stage's output directory.

Losses (weights `--w-lm --w-kl --w-vat`, default 1 each):
  L_LM  next-token cross-entropy on assistant tokens (`logits[:, :-1]` vs `labels[:, 1:]`).
  L_KL  forward KL(p_teacher || p_student) on the same shifted positions, fp32, temperature T
        (METHOD.md section 4), computed chunk by chunk from the final hidden states so that neither
        model's full (B, T, V) logits ever exist (`kd_loss`).
  L_ADL visual attention alignment, Eq. 3 (vat.py).
Both token losses are normalised by the supervised-token count of the whole GLOBAL batch (all ranks,
all micro-batches), so 1 process and N processes with the same global batch take the same step.

Run directory `--out` (one per stage): model.safetensors + config.json + tokenizer (the stage's output,
LoRA merged), `checkpoint/` (trainable weights, optimizer, scheduler, step, data position, RNG; written
atomically), `log.jsonl` (one JSON line per logged step, each loss separately), `args.json`.

  python train.py --stage llava --init preset:teacher --data D/instruct.json --image-folder D/images --out runs/t
  torchrun --nproc_per_node=8 train.py --stage 2 --init runs/x/stage1 --teacher runs/t ...
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import random
import shutil
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import model as M


# -----------------------------------------------------------------------------
# Losses: L_LM and the chunked L_KL (METHOD.md section 4)

def _shifted(hidden: torch.Tensor, labels: torch.Tensor):
    """Positions t whose next token t+1 is supervised: hidden[:, :-1] predicts labels[:, 1:].
    Returns (rows (N, D), targets (N,), row index tuple)."""
    target = labels[:, 1:]
    keep = target != -100
    return hidden[:, :-1][keep], target[keep], keep


def _chunk_losses(h_s, w_s, targets, h_t, w_t, temperature: float):
    """Sum over the rows of one chunk: (cross-entropy, KL). fp32 throughout (METHOD.md section 4)."""
    with torch.autocast(h_s.device.type, enabled=False):  # bf16 autocast would recast these matmuls
        logits_s = h_s.float() @ w_s.float().t()
        logits_t = None if h_t is None else h_t.float() @ w_t.float().t()
    ce = F.cross_entropy(logits_s, targets, reduction="sum")
    if h_t is None:
        return ce, ce.new_zeros(())
    logits_t = logits_t[:, :logits_s.shape[-1]]  # tokenizers checked equal: cut padded vocab rows
    logp_s = F.log_softmax(logits_s / temperature, dim=-1)
    logp_t = F.log_softmax(logits_t / temperature, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum() * temperature ** 2
    return ce, kl


def lm_and_kd_loss(student_hidden, student_head_weight, labels, num_tokens, teacher_hidden=None,
                   teacher_head_weight=None, temperature: float = 1.0, chunk_size: int = 512):
    """L_LM and L_KL (METHOD.md section 4) from the final hidden states, chunk by chunk.

    L_LM = -(1/N) sum_t log p_s(y_{t+1} | y_<=t)
    L_KL = (T^2/N) sum_t sum_v p_t(v) (log p_t(v) - log p_s(v)),  p = softmax(logits / T)
    over the supervised shifted positions t (labels[:, 1:] != -100), N = `num_tokens`, the count over
    the whole global batch. Each chunk's logits are rebuilt from the hidden states inside a
    checkpoint, so only (chunk, V) logits exist at a time, forward or backward.
    Returns (lm_loss, kd_loss) as 0-dim tensors (kd is 0 without a teacher)."""
    h_s, targets, keep = _shifted(student_hidden, labels)
    h_t = None if teacher_hidden is None else teacher_hidden[:, :-1][keep]
    lm = student_hidden.new_zeros((), dtype=torch.float32)
    kd = student_hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h_s.shape[0], chunk_size):
        hs = h_s[i:i + chunk_size]
        ht = None if h_t is None else h_t[i:i + chunk_size]
        if torch.is_grad_enabled() and hs.requires_grad:
            ce, kl = torch.utils.checkpoint.checkpoint(_chunk_losses, hs, student_head_weight, targets[i:i + chunk_size],
                                                       ht, teacher_head_weight, temperature, use_reentrant=False)
        else:
            ce, kl = _chunk_losses(hs, student_head_weight, targets[i:i + chunk_size], ht, teacher_head_weight, temperature)
        lm = lm + ce
        kd = kd + kl
    return lm / num_tokens, kd / num_tokens


def kd_loss(student_hidden, teacher_hidden, student_head_weight, teacher_head_weight, labels, num_tokens,
            temperature: float = 1.0, chunk_size: int = 512):
    """L_KL alone (METHOD.md section 4), chunked; see lm_and_kd_loss."""
    return lm_and_kd_loss(student_hidden, student_head_weight, labels, num_tokens, teacher_hidden,
                          teacher_head_weight, temperature, chunk_size)[1]


def kd_loss_reference(student_logits, teacher_logits, labels, num_tokens, temperature: float = 1.0):
    """Unchunked L_KL from full logits (the straightforward way; for tests and the benchmark)."""
    keep = labels[:, 1:] != -100
    V = student_logits.shape[-1]
    s = student_logits[:, :-1][keep].float() / temperature
    t = teacher_logits[:, :-1][keep][:, :V].float() / temperature
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") \
        * temperature ** 2 / num_tokens


# -----------------------------------------------------------------------------
# Checks before training

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


def trainable_state(model: torch.nn.Module) -> dict:
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


# -----------------------------------------------------------------------------
# Checkpoints: atomic directory swap, exact resume

def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out_dir: str, model, optimizer, scheduler, step: int, sampler_state: dict, meta: dict):
    """checkpoint/ = trainable weights (safetensors) + trainer_state.pt (optimizer, scheduler, step, data
    position, RNG). Written to checkpoint.tmp/, fsynced, then swapped in by renames, so a crash at any
    moment leaves either the old or the new checkpoint loadable (load_checkpoint falls back to .old)."""
    from safetensors.torch import save_file
    final, tmp, old = (os.path.join(out_dir, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(trainable_state(model), os.path.join(tmp, "trainable.safetensors"))
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "sampler": sampler_state, "meta": meta,
             "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                     "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    for name in os.listdir(tmp):
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out_dir: str) -> str | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old exists only if a crash hit the swap
        p = os.path.join(out_dir, name)
        if os.path.exists(os.path.join(p, "trainer_state.pt")):
            return p
    return None


def load_checkpoint(path: str, model, optimizer, scheduler, meta: dict) -> dict:
    """Restore trainable weights, optimizer, scheduler and RNG; returns the trainer state. Refuses a
    checkpoint written for another model/stage (names the mismatching fields or keys)."""
    from safetensors.torch import load_file
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True, map_location="cpu")
    diff = {k: (state["meta"].get(k), meta.get(k)) for k in {**state["meta"], **meta}
            if state["meta"].get(k) != meta.get(k)}
    if diff:
        raise ValueError(f"{path} was written by another run: " +
                         ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items()))
    weights = load_file(os.path.join(path, "trainable.safetensors"))
    own = dict(model.named_parameters())
    expected = {k for k, p in own.items() if p.requires_grad}
    if set(weights) != expected:
        raise ValueError(f"{path}: trainable keys differ from this model's: missing "
                         f"{sorted(expected - set(weights))[:6]}, unexpected {sorted(set(weights) - expected)[:6]}")
    with torch.no_grad():
        for k, v in weights.items():
            if own[k].shape != v.shape:
                raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, model has {tuple(own[k].shape)}")
            own[k].copy_(v)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


# -----------------------------------------------------------------------------
# Building the stage's models

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_student(args, tokenizer_path_hint=None):
    """The model this stage trains, from `--init`: `preset:NAME`, a compodistill model dir, `llava:DIR`
    (HF LLaVA checkpoint) or `parts:VISION,LLM,TOKENIZER`."""
    init = args.init
    if init.startswith("preset:"):
        import data
        tok = data.load_tokenizer(args.tokenizer)
        return M.from_preset(init.split(":", 1)[1], tok, seed=args.model_seed), tok
    if init.startswith("llava:"):
        from transformers import AutoTokenizer
        path = init.split(":", 1)[1]
        return M.from_llava(path), AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    if init.startswith("parts:"):
        from transformers import AutoTokenizer
        vision, llm, tokp = init.split(":", 1)[1].split(",")
        tok = AutoTokenizer.from_pretrained(tokp, trust_remote_code=args.trust_remote_code)
        return M.from_parts(vision, llm, tok, trust_remote_code=args.trust_remote_code), tok
    model, tok, _ = M.load_pretrained(init, trust_remote_code=args.trust_remote_code)
    return model, tok


def add_lora(model: M.MultimodalLM, r: int, alpha: int, dropout: float):
    """Wrap the LLM with fresh LoRA adapters (peft) on every attention and MLP projection."""
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")
    model.language_model = get_peft_model(model.language_model, cfg)
    return model


def merge_lora(model: M.MultimodalLM):
    """Fold LoRA into the base weights (stage 2 -> 3, and every stage's saved output)."""
    if hasattr(model.language_model, "merge_and_unload"):
        model.language_model = model.language_model.merge_and_unload()
    return model


def set_trainable(model: M.MultimodalLM, args):
    """Which parameters train. Stage defaults follow METHOD.md section 5; `--trainable` overrides:
    adapter | adapter+lora | adapter+llm. The vision encoder is always frozen (as in the paper)."""
    model.requires_grad_(False)
    what = args.trainable
    if what is None:
        what = {"llava": "adapter+lora", "1": "adapter", "2": "adapter+lora", "3": "adapter+lora"}[args.stage]
        if args.stage == "2" and args.full_llm:
            what = "adapter+llm"
    if what not in ("adapter", "adapter+lora", "adapter+llm"):
        raise ValueError(f"--trainable must be adapter, adapter+lora or adapter+llm, got {what!r}")
    if what == "adapter+lora":
        add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)  # peft marks only LoRA weights trainable
    model.projector.requires_grad_(True)
    if hasattr(model.projector, "teacher_adapter"):  # TAF: the fetched teacher adapter stays frozen
        model.projector.teacher_adapter.requires_grad_(False)
    if what == "adapter+llm":
        model.language_model.requires_grad_(True)
    return what


def load_teacher(args, device, student_tok, student: M.MultimodalLM):
    """The teacher: frozen, eval mode, bf16 on CUDA, never wrapped in DDP."""
    dtype = torch.bfloat16 if device.type == "cuda" else None
    teacher, teacher_tok, _ = M.load_pretrained(args.teacher, device=device, dtype=dtype,
                                                trust_remote_code=args.trust_remote_code)
    teacher.eval().requires_grad_(False)
    check_tokenizers_agree(student_tok, teacher_tok)
    V = student.language_model.get_output_embeddings().weight.shape[0]
    Vt = teacher.language_model.get_output_embeddings().weight.shape[0]
    if Vt < V:
        raise ValueError(f"the teacher's LM head has {Vt} rows, fewer than the student's {V}")
    return teacher


def apply_taf(student: M.MultimodalLM, teacher: M.MultimodalLM):
    """TAF (METHOD.md section 2): the student's projector becomes the teacher's frozen adapter + a trainable
    Linear(d_teacher -> d_student); the student's vision encoder must be the teacher's."""
    from taf import check_shared_vision_encoder, taf_projector
    check_shared_vision_encoder(teacher.vision_tower, student.vision_tower)
    teacher_adapter = teacher.projector
    if hasattr(teacher_adapter, "teacher_adapter"):
        raise ValueError("the teacher itself has a TAF projector; use a teacher trained with its own adapter")
    # taf_projector deep-copies the adapter, so the teacher (bf16 on CUDA) is left untouched
    student.projector = taf_projector(teacher_adapter, teacher.d_llm, student.d_llm).float()
    student.extra_config.update(projector="taf", taf_teacher_hidden=teacher.d_llm,
                                projector_bias=teacher.extra_config.get("projector_bias", True))
    return student


# -----------------------------------------------------------------------------
# One stage

def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup then cosine decay to min_lr (METHOD.md section 5: cosine, warmup 3%)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def init_distributed(backend: str):
    """Join the torchrun job. torchrun --max-restarts brings every worker back up after one dies, and
    the new workers meet in the SAME store as the dead ones: a survivor could read a dead worker's
    stale address (gloo: "connectFullMesh ... Connection refused"; NCCL: an old unique id, a hang).
    So each attempt's keys live under their own prefix (TORCHELASTIC_RESTART_COUNT)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun hosts the store
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, multi_tenant=True,
                          timeout=datetime.timedelta(minutes=30))  # torch's default process-group timeout
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"compodistill/attempt_{attempt}", store),
                            rank=rank, world_size=world)


def validate_cr(student, tokenizer, image_processor, items: dict, device) -> dict:
    """In-loop validation: CR accuracy of the model being trained on a SugarCrepe-layout set, by the
    paper's protocol (METHOD.md section 6; evaluate.eval_sugarcrepe: 2-choice, both orders, greedy). The
    learning curve."""
    import evaluate as E
    generate, _ = E.model_fns(student, tokenizer, image_processor, device, batch_size=64, max_new_tokens=4,
                              progress=False)
    metrics, _ = E.eval_sugarcrepe(generate, items)
    student.train()
    return {"val_cr": metrics["average"], "val_cr_subsets": {k: v["average"] for k, v in metrics["subsets"].items()}}


# the paper's global batch per stage (METHOD.md section 5: DPT 256, DFT 128, SFT 192); the LLaVA recipe's
# adapter pre-training 256 (`--stage llava --trainable adapter`), its fine-tuning 128
STAGE_GLOBAL_BATCH = {"1": 256, "2": 128, "3": 192, "llava": 128, "llava-adapter": 256}


def run_stage(args) -> str:
    import data
    if args.global_batch is None:
        key = "llava-adapter" if args.stage == "llava" and args.trainable == "adapter" else args.stage
        args.global_batch = STAGE_GLOBAL_BATCH[key]
    # --- distributed setup (torchrun sets RANK/WORLD_SIZE; plain python is one process) ---------------
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        if not dist.is_initialized():
            init_distributed("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, world, local_rank = 0, 1, 0
    master = rank == 0
    if args.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device if args.device != "cuda" else f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    # --- models ---------------------------------------------------------------------------------------
    student, tokenizer = build_student(args)
    teacher = None
    distill = args.stage in ("1", "2")
    if distill:
        if not args.teacher:
            raise ValueError(f"--stage {args.stage} needs --teacher DIR")
        teacher = load_teacher(args, device, tokenizer, student)
        if args.taf and student.extra_config.get("projector") != "taf":
            apply_taf(student, teacher)
    trainable_kind = set_trainable(student, args)
    student.to(device)
    if args.grad_checkpointing:
        student.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    w_vat = args.w_vat if args.stage == "2" else 0.0
    vat_cfg = None
    if w_vat > 0:
        import vat
        n_s = student.language_model.config.num_hidden_layers
        n_t = teacher.language_model.config.num_hidden_layers
        s_layers = vat.select_layers(n_s, args.vat_layers)
        t_layers = vat.select_layers(n_t, args.vat_teacher_layers or args.vat_layers)
        matching = vat.group_layer_matching(s_layers, t_layers, args.vat_matching)
        vat_cfg = dict(s_layers=s_layers, t_layers=sorted({t for g in matching for t in g}), matching=matching)
        if master:
            print(f"VAT: student layers {s_layers} <- teacher windows {matching}")

    # --- data -----------------------------------------------------------------------------------------
    samples = data.load_llava_json(args.data)
    if ddp and not master:
        dist.barrier()  # rank 0 validates first and caches the verdict; the others then read the cache
    samples, bad_images = data.validate_images(samples, args.image_folder, skip_bad=args.skip_bad_images,
                                               allow_non_rgb=args.allow_non_rgb, progress=master and not args.quiet)
    if ddp and master:
        dist.barrier()
    image_processor = M.make_image_processor(student.vision_tower.config)
    pad_id = data.pad_token_id(tokenizer)
    dataset = data.SupervisedDataset(samples, tokenizer, image_processor, args.image_folder,
                                     student.num_visual_tokens, student.image_token_id, args.max_len,
                                     drop_overlong=args.drop_overlong)
    if len(dataset) < args.global_batch:
        raise ValueError(f"{args.data}: {len(dataset)} usable samples, fewer than --global-batch {args.global_batch}")
    steps_per_epoch = len(dataset) // args.global_batch
    total_steps = args.max_steps or int(args.epochs * steps_per_epoch)
    sampler = data.GlobalBatchSampler(len(dataset), args.global_batch, rank, world, seed=args.seed,
                                      lengths=dataset.lengths if args.group_by_length else None)
    per_rank = args.global_batch // world
    micro = min(args.micro_batch, per_rank)
    if per_rank % micro:
        raise ValueError(f"per-rank batch {per_rank} (= --global-batch / world size) is not a multiple of "
                         f"--micro-batch {micro}")

    # --- optimizer, schedule, resume ------------------------------------------------------------------
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    warmup = max(1, int(args.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, total_steps, warmup, args.lr, args.min_lr) / args.lr)
    meta = {"stage": args.stage, "init": args.init, "trainable": trainable_kind, "taf": bool(args.taf and distill),
            "global_batch": args.global_batch, "data": os.path.abspath(args.data), "seed": args.seed,
            **({"group_by_length": True} if args.group_by_length else {}),  # absent when off: older checkpoints
            "n_trainable": sum(p.numel() for p in params)}
    os.makedirs(args.out, exist_ok=True)
    step = 0
    if args.resume and find_checkpoint(args.out):
        state = load_checkpoint(find_checkpoint(args.out), student, optimizer, scheduler, meta)
        step = state["step"]
        if master:
            print(f"resumed from {args.out} at step {step}")
    elif master:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        open(os.path.join(args.out, "log.jsonl"), "w").close()
    sampler.load_state_dict({"epoch": step // steps_per_epoch, "step": step % steps_per_epoch})
    batches = iter(sampler)

    model = DDP(student, device_ids=[device.index] if device.type == "cuda" else None) if ddp else student
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    s_head = student.language_model.get_output_embeddings()
    t_head = teacher.language_model.get_output_embeddings() if teacher is not None else None
    for head in (s_head, t_head):
        if head is not None and getattr(head, "bias", None) is not None:
            raise ValueError("LM heads with a bias are not supported by the chunked loss")

    val_items = None
    if args.eval_sugarcrepe and args.eval_every and master:
        import evaluate as E
        val_items = E.read_sugarcrepe(args.eval_sugarcrepe, limit=args.eval_limit)

    # --- the loop -------------------------------------------------------------------------------------
    log_path = os.path.join(args.out, "log.jsonl")
    if master:  # one line per (re)start: what the data checks dropped, where the run starts
        with open(log_path, "a") as f:
            f.write(json.dumps({"event": "start", "from_step": step, "samples": len(dataset),
                                "skipped_bad_images": len(bad_images), "dropped_overlong": len(dataset.dropped)}) + "\n")
    student.train()
    bad_in_a_row, skipped = 0, 0
    pbar = tqdm(total=total_steps, initial=step, desc=f"stage {args.stage}", disable=not master or args.quiet,
                dynamic_ncols=True)
    t_last = time.time()
    tokens_since = 0
    while step < total_steps:
        share = next(batches)
        micro_batches = [data.collate([dataset[i] for i in share[j:j + micro]], pad_id)
                         for j in range(0, len(share), micro)]
        # global normalisers: supervised tokens and samples with visual tokens, over all ranks
        counts = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches),
                               sum(int((b["input_ids"] == student.image_token_id).any(1).sum()) for b in micro_batches)],
                              dtype=torch.float64, device=device)
        if ddp:
            dist.all_reduce(counts)
        n_tok, n_vis = max(1.0, counts[0].item()), counts[1].item()
        lr = lr_at(step, total_steps, warmup, args.lr, args.min_lr)
        sums = {"lm": 0.0, "kd": 0.0, "vat": 0.0}
        if step == args.fail_at_step and rank == args.fail_rank and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os._exit(17)  # test hook: this rank dies (first attempt only) so that torchrun restarts the job
        try:
            for k, b in enumerate(micro_batches):
                b = {key: (v.to(device) if torch.is_tensor(v) else v) for key, v in b.items()}
                sync = contextlib.nullcontext() if (not ddp or k == len(micro_batches) - 1) else model.no_sync()
                with sync, autocast:
                    t_maps, s_maps = {}, {}
                    if teacher is not None:
                        with torch.no_grad():
                            cap = (vat.capture_visual_attention(teacher.language_model, vat_cfg["t_layers"],
                                                                b["input_ids"] == teacher.image_token_id,
                                                                b["attention_mask"], rows=vat_rows(args),
                                                                headwise=args.vat_headwise)
                                   if vat_cfg else contextlib.nullcontext({}))
                            with cap as t_maps:
                                t_out = teacher(b["input_ids"], b["attention_mask"], b["pixel_values"], return_hidden=True)
                    cap = (vat.capture_visual_attention(student.language_model, vat_cfg["s_layers"],
                                                        b["input_ids"] == student.image_token_id, b["attention_mask"],
                                                        rows=vat_rows(args), headwise=args.vat_headwise)
                           if vat_cfg else contextlib.nullcontext({}))
                    with cap as s_maps:
                        out = model(b["input_ids"], b["attention_mask"], b["pixel_values"], return_hidden=True)
                    lm, kd = lm_and_kd_loss(out["hidden"], s_head.weight, b["labels"], n_tok,
                                            t_out["hidden"] if teacher is not None else None,
                                            t_head.weight if teacher is not None else None,
                                            args.kd_temperature, args.kd_chunk)
                    loss = args.w_lm * lm + (args.w_kl * kd if teacher is not None else 0.0)
                    vat_l = torch.zeros((), device=device)
                    if vat_cfg:
                        local_vis = int(out["visual_mask"].any(1).sum())
                        if local_vis:
                            mean_l = vat.vat_loss(s_maps, t_maps, vat_cfg["matching"], vat_cfg["s_layers"],
                                                  out["visual_mask"], b["attention_mask"], variant=args.vat_variant,
                                                  distance=args.vat_distance, headwise=args.vat_headwise,
                                                  rows=vat_rows(args))
                            vat_l = mean_l * local_vis / max(1.0, n_vis)  # a global per-sample mean
                        loss = loss + w_vat * vat_l
                (loss * world).backward()  # DDP averages over ranks; the losses are already global sums / N
                sums["lm"] += lm.item()
                sums["kd"] += kd.item()
                sums["vat"] += vat_l.item()
                tokens_since += int(b["attention_mask"].sum())
        except torch.OutOfMemoryError as e:
            raise RuntimeError(out_of_memory_message(args, device)) from e
        except RuntimeError as e:
            if "can't allocate memory" not in str(e) and "out of memory" not in str(e):
                raise
            raise RuntimeError(out_of_memory_message(args, device)) from e
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        stats = torch.tensor([sums["lm"], sums["kd"], sums["vat"], float(grad_norm)], device=device, dtype=torch.float64)
        if ddp:  # losses: partial sums of global means -> add; grad norm: identical on every rank
            dist.all_reduce(stats)
            stats[3] /= world
        finite = bool(torch.isfinite(stats).all())
        if finite:
            optimizer.step()
            bad_in_a_row = 0
        else:
            skipped += 1
            bad_in_a_row += 1
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        pbar.update(1)
        if not finite and bad_in_a_row >= args.max_nonfinite:
            pbar.close()
            raise FloatingPointError(
                f"{bad_in_a_row} consecutive non-finite losses/gradients at step {step}; stopping. The last good "
                f"checkpoint in {args.out}/checkpoint is intact. Try a lower --lr, --grad-clip, or fp32.")
        if master and (step % args.log_every == 0 or step == total_steps):
            dt = time.time() - t_last
            rec = {"step": step, "loss": round(args.w_lm * stats[0].item() + args.w_kl * stats[1].item()
                                                + w_vat * stats[2].item(), 6),
                   "lm": stats[0].item(), "kd": stats[1].item(), "vat": stats[2].item(),
                   "lr": lr, "grad_norm": stats[3].item(), "tokens_per_s": tokens_since * world / max(dt, 1e-9),
                   "skipped": skipped}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            pbar.set_postfix(lm=f"{rec['lm']:.3f}", kd=f"{rec['kd']:.3f}", vat=f"{rec['vat']:.4f}")
            t_last, tokens_since = time.time(), 0
        if val_items is not None and (step % args.eval_every == 0 or step == total_steps):
            rec = {"step": step, **validate_cr(student, tokenizer, image_processor, val_items, device)}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            pbar.set_postfix(val_cr=f"{rec['val_cr']:.1f}")
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            if master:
                save_checkpoint(args.out, student, optimizer, scheduler, step,
                                {"epoch": step // steps_per_epoch, "step": step % steps_per_epoch}, meta)
            if ddp:
                dist.barrier()
        if args.stop_after and step >= args.stop_after:  # for tests: simulate a kill after this step
            pbar.close()
            return args.out
    pbar.close()

    # --- the stage's output: the full model, LoRA merged ----------------------------------------------
    if master:
        merge_lora(student)
        student.language_model.config.use_cache = True
        M.save_pretrained(student, args.out, tokenizer)
        with open(os.path.join(args.out, "trainer_summary.json"), "w") as f:
            json.dump({"steps": step, "skipped_nonfinite": skipped, "dropped_overlong": len(dataset.dropped),
                       "skipped_bad_images": len(bad_images),
                       **meta}, f, indent=2)
    if ddp:
        dist.barrier()
    return args.out


def out_of_memory_message(args, device) -> str:
    return (f"out of memory on {device} at micro-batch {args.micro_batch} x max_len {args.max_len}. Turn, in this "
            f"order: --micro-batch (smaller; --global-batch stays, gradient accumulation makes up the rest), "
            f"--grad-checkpointing (on: {args.grad_checkpointing}), --kd-chunk (smaller: {args.kd_chunk}), "
            f"--max-len (shorter: {args.max_len}; with --drop-overlong for the few long samples).")


def vat_rows(args) -> str:
    """Query rows the VAT variant needs: all rows (paper) or the visual rows (the authors' code)."""
    return "all" if args.vat_variant == "paper" else "visual"


# -----------------------------------------------------------------------------
# The demo: the paper's table in miniature, from nothing, on a CPU (`python train.py --demo`)

DEMO_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo_teacher")
# One budget for every student (same data, steps, seed). Micro-batch = global batch on one CPU.
DEMO = dict(batch=16, lr=2e-3, text_steps=400, s1_steps=200, s2_steps=900, s3_steps=300,
            teacher_lr=2e-3, vision_steps=1500, vision_scenes=8000, teacher_lookup_steps=1000,
            teacher_mix_steps=3000, teacher_cr_steps=3000, teacher_cr_batch=32, teacher_focus_steps=4000,
            teacher_focus_lr=1.5e-3, max_len=256,
            eval_every=150, eval_limit=20, w_vat=10.0)
# w_vat: the L_ADL weight of the CompoDistill students (the paper's is 1, the CLI default). Here L_ADL ends stage 2
# near 0.08 against L_LM near 0.4; 10 was chosen over 1 and 3 on the validation split (README, "Demo results").


def _demo_json(samples, path):
    """Written to a temporary file, then renamed: a second demo process on the same --out never reads a
    half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(samples, f)
    os.replace(tmp, path)
    return path


def _finished(out: str) -> bool:
    """A stage's output directory is complete: main writes trainer_summary.json after the model."""
    return os.path.exists(os.path.join(out, "trainer_summary.json"))


def _demo_stage(argv: list) -> str:
    """main(argv), unless its --out already holds that stage, finished (trainer_summary.json is written
    last) with the same arguments (args.json), and resumed from its checkpoint if it has one. So an
    interrupted demo picks up where it stopped, and demo processes started on one --out share what is
    done (README: the --full run)."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if _finished(args.out):
        with open(os.path.join(args.out, "args.json")) as f:
            saved = json.load(f)
        now = json.loads(json.dumps(vars(args)))
        # an option added to train.py after that run, left at its default, changes nothing it did
        saved.update({k: v for k, v in now.items() if k not in saved and v == parser.get_default(k)})
        if saved == now:
            return args.out
        raise SystemExit(f"{args.out} holds a finished run made with other arguments (see its args.json); "
                         f"give the demo another --out")
    return main(argv + (["--resume"] if find_checkpoint(args.out) else []))


def caption_verification(instruct: list) -> list:
    """A stepping stone for tiny models: each 2-choice compositional sample becomes two yes/no questions
    about ONE caption (evaluate.MATCH_PROMPT -> yes for the true caption, no for the hard negative),
    so binding can be learnt before comparing two captions."""
    import evaluate as E
    return [{"id": f"{x['id']}_verify_{ans}", "image": x["image"], "task": "verification",
             "conversations": [{"from": "human", "value": E.MATCH_PROMPT.format(caption=x[key])},
                               {"from": "gpt", "value": ans}]}
            for x in instruct if x["task"] == "compositional"
            for key, ans in (("caption", "yes"), ("negative_caption", "no"))]


def lookup_questions(scenes_json: str, images: set, seed: int = 0) -> list:
    """The teacher's first curriculum step: for every training image, one conversation that asks the colour
    and the size of each object by its shape, and the shape of each object whose colour is unique
    (data.lookup_question, the wording of the VQA questions; all of them, shuffled).
    Every answer needs the one-hop grounding (find the cell the question names, read it out) that the
    compositional questions build on."""
    import data
    with open(scenes_json) as f:
        scenes = json.load(f)
    rng, out = random.Random(seed), []
    for k in sorted(images):
        objs = scenes[k]["objects"]
        qa = [q for kind in ("color", "size", "shape") for o in objs
              if (q := data.lookup_question(kind, o, objs)) is not None]
        rng.shuffle(qa)
        conv = []
        for i, (q, a) in enumerate(qa):
            conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q + data.VQA_SUFFIX},
                     {"from": "gpt", "value": a}]
        out.append({"id": f"lookup_{len(out):06d}", "image": k, "task": "recognition", "conversations": conv})
    return out


TEACHER_CR_SUBSETS = ("replace_att", "swap_att", "replace_obj", "swap_obj", "replace_rel", "add_att", "add_obj")
# The subsets the tiny teacher learns (its last phase trains on these only): attributes and objects replaced or
# added. Swapped bindings and relations stay at chance after 3,000 steps on every subset (README).
TEACHER_FOCUS_SUBSETS = ("replace_att", "replace_obj", "add_obj", "add_att")


def compositional_questions(scenes_json: str, images: set, seed: int = 0,
                            subsets=TEACHER_CR_SUBSETS) -> list:
    """The teacher's last curriculum step: for every training image, one 2-choice question per SugarCrepe
    subset (the official prompt, data.SUGARCREPE_PROMPT) with a fresh hard negative of that subset's kind
    (data.hard_negative), the true caption first or second at random. 4,000 images x 7 subsets is ~3.5x the
    compositional questions of the instruction mix: a tiny teacher leaves chance on CR only after
    thousands of such steps (README, "What is known about the miniature's teacher")."""
    import data
    with open(scenes_json) as f:
        scenes = json.load(f)
    rng, out = random.Random(seed), []
    for k in sorted(images):
        for subset in subsets:
            pair = data.hard_negative(rng, scenes[k], subset)
            if pair is None:  # this scene has no negative of that kind (e.g. no attribute to swap)
                continue
            out.append(data.choice_sample(f"cr_{len(out):06d}", k, subset, pair, pos_first=rng.random() < 0.5))
    return out


def demo_data(root: str, seed: int = 0, sizes: dict | None = None) -> dict:
    """Synthesise the shapes world once and derive the demo's data files from it: the teacher's curriculum
    (one-hop lookup questions, then the instruction mix + caption verification + the lookup questions, then
    fresh 2-choice compositional questions + the lookups + the instruction mix, then three fresh draws of
    the 2-choice questions of the subsets the teacher learns + the lookups + the instruction mix) and
    text-only data (the student LM's pre-training: captions and questions without images, so the student
    starts as a *language* model like the paper's)."""
    import data
    d = os.path.join(root, "data")
    if not os.path.exists(os.path.join(d, "instruct.json")):
        data.synthesize(d, seed=seed, **(sizes or {}))
    instruct = data.load_llava_json(os.path.join(d, "instruct.json"))
    pretrain = data.load_llava_json(os.path.join(d, "pretrain.json"))
    verify = caption_verification(instruct)
    text = []
    for x in pretrain + instruct:
        conv = [dict(c, value=c["value"].replace("<image>\n", "").replace("<image>", "")) for c in x["conversations"]]
        text.append({"id": "text_" + x["id"], "task": "text", "conversations": conv})
    scenes_json, images = os.path.join(d, "scenes.json"), {x["image"] for x in pretrain}
    lookup = lookup_questions(scenes_json, images, seed)
    cr = compositional_questions(scenes_json, images, seed)
    focus = [dict(x, id=f"cr5_{i:06d}") for i, x in enumerate(
        q for k in (11, 12, 13) for q in compositional_questions(scenes_json, images, seed + k, TEACHER_FOCUS_SUBSETS))]
    return {"dir": d, "images": d, "tokenizer": os.path.join(d, "tokenizer"),
            "lookup": _demo_json(lookup, os.path.join(d, "lookup.json")),
            "teacher_mix": _demo_json(instruct + verify + lookup, os.path.join(d, "teacher_mix.json")),
            "teacher_cr": _demo_json(cr + lookup + instruct, os.path.join(d, "teacher_cr.json")),
            "teacher_focus": _demo_json(focus + lookup + instruct, os.path.join(d, "teacher_focus.json")),
            "pretrain": os.path.join(d, "pretrain.json"), "instruct": os.path.join(d, "instruct.json"),
            "text": _demo_json(text, os.path.join(d, "text_only.json"))}


def _common(b, paths, out, steps, seed, *extra, lr=None):
    return ["--data-pretrain", paths["pretrain"], "--data-instruct", paths["instruct"],
            "--image-folder", paths["images"], "--out", out, "--global-batch", str(b["batch"]),
            "--micro-batch", str(b["batch"]), "--max-steps", str(steps), "--lr", str(lr or b["lr"]),
            "--warmup-ratio", "0.05", "--max-len", str(b["max_len"]), "--seed", str(seed), "--log-every", "25",
            "--quiet", *extra]


def pretrain_vision_encoder(vision: nn.Module, processor, scenes_json: str, steps: int = 1500, batch: int = 64,
                            n_scenes: int = 8000, lr: float = 2e-3, seed: int = 0) -> dict:
    """The tiny encoder's stand-in for SigLIP's pre-training: a linear read-out of every patch's last hidden
    state is trained to name that cell's shape (or "empty"), colour and size (data.patch_labels), on freshly
    drawn scenes that exclude every benchmark scene in `scenes_json`. Updates `vision` in place and leaves it
    frozen; returns the held-out per-object accuracies. (The paper's students and teacher share a pretrained
    encoder; a random one hands the LLM raw pixels and makes grounding far slower to learn.)"""
    import data
    n_held_out = 500
    if n_scenes <= n_held_out:
        raise ValueError(f"pretrain_vision_encoder: n_scenes={n_scenes} leaves no training scenes after the "
                         f"{n_held_out} held out for the accuracy check")
    with open(scenes_json) as f:
        benchmark = {data.scene_key(s) for k, s in json.load(f).items() if "sugarcrepe" in k or "vqav2" in k}
    rng, scenes = random.Random(seed), []
    while len(scenes) < n_scenes:
        s = data.random_scene(rng)
        if data.scene_key(s) not in benchmark:
            scenes.append(s)
    pixels = torch.stack([data.process_image(processor, data.draw_scene(s)) for s in scenes])
    labels = torch.tensor([data.patch_labels(s) for s in scenes])  # (N, patches, 3)
    sizes = (len(data.SHAPES) + 1, len(data.COLORS) + 1, len(data.SIZES) + 1)
    torch.manual_seed(seed)
    head = nn.Linear(vision.config.hidden_size, sum(sizes))
    vision.requires_grad_(True).train()
    opt = torch.optim.AdamW([*vision.parameters(), *head.parameters()], lr=lr, weight_decay=0.0)
    n_train = n_scenes - n_held_out

    def losses_and_logits(idx):
        logits = head(vision(pixels[idx], output_hidden_states=True).hidden_states[-1]).split(sizes, dim=-1)
        return sum(F.cross_entropy(lg.flatten(0, 1), labels[idx][..., k].flatten()) for k, lg in enumerate(logits)), logits
    for _ in tqdm(range(steps), desc="vision encoder pre-training", dynamic_ncols=True, leave=False):
        loss, _ = losses_and_logits(torch.randint(0, n_train, (batch,)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vision.requires_grad_(False).eval()
    with torch.no_grad():
        _, logits = losses_and_logits(torch.arange(n_train, n_scenes))
    y = labels[n_train:]
    obj = y[..., 0] > 0
    return {k: round(100 * float((lg.argmax(-1)[obj] == y[..., i][obj]).float().mean()), 1)
            for i, (k, lg) in enumerate(zip(("shape", "colour", "size"), logits))}


def demo_teacher(b: dict, paths, out: str) -> str:
    """The tiny teacher. Its vision encoder is first pre-trained (pretrain_vision_encoder) and read at its
    last layer; then the standard LLaVA recipe with a grounding-first curriculum: the one-hop lookup
    questions alone (lookup_questions), then the full instruction mix (2-choice compositional questions
    included) plus yes/no caption-verification questions (caption_verification) and the lookup questions,
    then a long compositional phase: fresh 2-choice questions of every subset for every training image
    (compositional_questions) + the lookups + the instruction mix, at batch 32, its validation CR logged
    every 250 steps; last a focus phase on the subsets it learns (TEACHER_FOCUS_SUBSETS: three fresh draws
    of their 2-choice questions + the lookups + the instruction mix, batch 32, lr 1.5e-3, grouped by length),
    its validation CR logged every 500 steps. This is how the shipped assets/demo_teacher was made
    (`python train.py --demo --demo-train-teacher`)."""
    import data
    tok = data.load_tokenizer(paths["tokenizer"])
    init = os.path.join(out, "init")
    if not os.path.exists(os.path.join(init, "vision_pretraining.json")):  # written last: init is complete
        teacher = M.from_preset("teacher", tok)
        acc = pretrain_vision_encoder(teacher.vision_tower, M.make_image_processor(teacher.vision_tower.config),
                                      os.path.join(paths["dir"], "scenes.json"), steps=b["vision_steps"],
                                      n_scenes=b["vision_scenes"])
        teacher.vision_feature_layer = -1  # the pre-trained encoder's output (the preset reads layer 0)
        M.save_pretrained(teacher, init, tok)
        with open(os.path.join(init, "vision_pretraining.json"), "w") as f:
            json.dump({"steps": b["vision_steps"], "held_out_accuracy": acc}, f)
    prev = init
    val = ["--eval-sugarcrepe", os.path.join(paths["dir"], "val", "sugarcrepe"), "--save-every", "500", "--eval-every"]
    lr, focus_lr = b["teacher_lr"], b["teacher_focus_lr"]
    for name, data_key, steps, batch, phase_lr, extra in (
            ("lookup", "lookup", b["teacher_lookup_steps"], b["batch"], lr, ()),
            ("mix", "teacher_mix", b["teacher_mix_steps"], b["batch"], lr, ()),
            ("cr", "teacher_cr", b["teacher_cr_steps"], b["teacher_cr_batch"], lr, (*val, "250")),
            (None, "teacher_focus", b["teacher_focus_steps"], b["teacher_cr_batch"], focus_lr,
             (*val, "500", "--group-by-length"))):
        phase_out = os.path.join(out, name) if name else out
        _demo_stage(["--stage", "llava", "--init", prev, "--data", paths[data_key], "--trainable", "adapter+llm",
                     *_common(dict(b, batch=batch), paths, phase_out, steps, 0, lr=phase_lr), *extra])
        prev = phase_out
    return out


def demo_student(b: dict, kind: str, paths, teacher: str, lm_init: str, out: str, seed: int, extra=()) -> str:
    """One student. `sft`: the LLaVA recipe without a teacher (adapter pre-training on captions, then
    fine-tuning); `kd` / `compodistill`: stages 1 -> 2 -> 3, L_ADL weight 0 for kd, b["w_vat"] for
    compodistill. Same data, steps, seed.
    After stage 1 every student logs its validation CR every b["eval_every"] steps (the learning curve)."""
    val = ["--eval-sugarcrepe", os.path.join(paths["dir"], "val", "sugarcrepe"), "--eval-every",
           str(b["eval_every"]), "--eval-limit", str(b["eval_limit"])] if b["eval_every"] else []
    if kind == "sft":
        a = os.path.join(out, "adapter")
        _demo_stage(["--stage", "llava", "--init", lm_init, "--data", paths["pretrain"], "--trainable", "adapter",
                     *_common(b, paths, a, b["s1_steps"], seed)])
        _demo_stage(["--stage", "llava", "--init", a, "--data", paths["instruct"], "--trainable", "adapter+llm",
                     *_common(b, paths, out, b["s2_steps"] + b["s3_steps"], seed), *val])
        return out
    w_vat = ["--w-vat", "0" if kind == "kd" else str(b["w_vat"])]
    s1, s2, s3 = (os.path.join(out, f"stage{k}") for k in (1, 2, 3))
    _demo_stage(["--stage", "1", "--init", lm_init, "--teacher", teacher, "--data", paths["pretrain"],
                 *_common(b, paths, s1, b["s1_steps"], seed), *extra])
    _demo_stage(["--stage", "2", "--init", s1, "--teacher", teacher, "--data", paths["instruct"], "--full-llm",
                 *w_vat, *_common(b, paths, s2, b["s2_steps"], seed), *val, *extra])
    _demo_stage(["--stage", "3", "--init", s2, "--data", paths["instruct"], "--trainable", "adapter+llm",
                 *_common(b, paths, s3, b["s3_steps"], seed), *val, *extra])
    return s3


def demo_student_lm(b: dict, paths, teacher: str, out: str) -> str:
    """The student's "pretrained LLM": the student preset trained on text only (no image), sharing the
    teacher's vision encoder (TAF needs the same one). Shared by every student."""
    import data
    init = os.path.join(out, "init")
    if not _finished(out):  # else _demo_stage below checks that it was made with these arguments
        tok = data.load_tokenizer(teacher)
        student = M.from_preset("student", tok)
        te, _, _ = M.load_pretrained(teacher)
        student.vision_tower.load_state_dict(te.vision_tower.state_dict())
        student.vision_feature_layer = te.vision_feature_layer
        M.save_pretrained(student, init, tok)
    _demo_stage(["--stage", "llava", "--init", init, "--data", paths["text"], "--trainable", "adapter+llm",
                 *_common(b, paths, out, b["text_steps"], 0)])
    return out


def demo_evaluate(model_dir: str, bench_dir: str) -> dict:
    """CR (SugarCrepe layout, 7 subsets, both orders) and VQA accuracy (VQAv2 layout) of one model."""
    import data
    import evaluate as E
    gen, _ = E.make_model_fns(model_dir, batch_size=64, max_new_tokens=8)
    cr, _ = E.eval_sugarcrepe(gen, E.read_sugarcrepe(os.path.join(bench_dir, "sugarcrepe")))
    vqa, _ = E.eval_vqav2(gen, E.read_vqav2(os.path.join(bench_dir, "vqav2"), data.VQAV2_IMAGE_PATTERN.replace(
        "{image_id:012d}", "%012d")))
    return {"cr": cr["average"], "cr_subsets": {k: v["average"] for k, v in cr["subsets"].items()},
            "vqa": vqa["accuracy"], "vqa_by_question_type": vqa["by_question_type"]}


def learning_curve(out: str) -> list[tuple[int, float]]:
    """(step after stage 1, validation CR) pairs of one demo student, read from its log.jsonl files."""
    curve, offset = [], 0
    for d in ([os.path.join(out, "..", "stage2"), out] if os.path.basename(out) == "stage3" else [out]):
        with open(os.path.join(d, "log.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        curve += [(offset + r["step"], r["val_cr"]) for r in rows if "val_cr" in r]
        offset += max([r["step"] for r in rows if "step" in r], default=0)
    return curve


CHART_W, CHART_H, CHART_LEFT, CHART_TOP, CHART_BOTTOM = 760, 420, 60, 40, 60


def percent_canvas(title: str, lo: float, right: int, step: int):
    """A white Pillow canvas with a title and a percent y axis from `lo` to 100 (grid line every `step`);
    returns (image, draw, Y) with Y mapping a percentage to a pixel row. Shared by the demo's charts."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (CHART_W, CHART_H), "white")
    d = ImageDraw.Draw(img)
    d.text((CHART_LEFT, 10), title, fill="black")
    Y = lambda y: CHART_H - CHART_BOTTOM - (CHART_H - CHART_TOP - CHART_BOTTOM) * (y - lo) / (100 - lo)
    for v in range(int(lo) // step * step, 101, step):
        if v >= lo:
            d.line([(CHART_LEFT, Y(v)), (CHART_W - right, Y(v))], fill=(225, 225, 225))
            d.text((10, Y(v) - 6), f"{v}%", fill="black")
    return img, d, Y


def line_chart(curves: dict, path: str, title: str):
    """Validation CR against training steps, one line per model."""
    lo = min([40.0] + [y for c in curves.values() for _, y in c])
    img, d, Y = percent_canvas(title, lo, right=150, step=10)
    xs = sorted({x for c in curves.values() for x, _ in c}) or [1]
    X = lambda x: CHART_LEFT + (CHART_W - CHART_LEFT - 150) * x / xs[-1]
    d.text((CHART_W // 2 - 60, CHART_H - 20), "training steps after stage 1", fill="black")
    for x in xs[::max(1, len(xs) // 10)]:
        d.text((X(x) - 10, CHART_H - CHART_BOTTOM + 6), str(x), fill="black")
    palette = [(120, 120, 120), (230, 140, 50), (70, 110, 200), (40, 160, 80), (200, 60, 60), (140, 60, 180)]
    for i, (name, c) in enumerate(curves.items()):
        colour = palette[i % len(palette)]
        if len(c) > 1:
            d.line([(X(x), Y(y)) for x, y in c], fill=colour, width=2)
        for x, y in c:
            d.ellipse([X(x) - 2, Y(y) - 2, X(x) + 2, Y(y) + 2], fill=colour)
        d.text((CHART_W - 140, CHART_TOP + 16 * i), name, fill=colour)
    img.save(path)


def bar_chart(rows: list[tuple[str, float, float]], path: str, title: str):
    """A grouped bar chart (CR and VQA accuracy per model)."""
    img, d, Y = percent_canvas(title, 0.0, right=20, step=20)
    slot = (CHART_W - CHART_LEFT - 20) / max(1, len(rows))
    colours = {"CR": (70, 110, 200), "VQA": (230, 140, 50)}
    for i, (name, cr, vqa) in enumerate(rows):
        x0 = CHART_LEFT + i * slot + slot * 0.15
        for j, (metric, v) in enumerate((("CR", cr), ("VQA", vqa))):
            bx = x0 + j * slot * 0.35
            d.rectangle([bx, Y(v), bx + slot * 0.3, Y(0)], fill=colours[metric])
            d.text((bx, Y(v) - 14), f"{v:.1f}", fill="black")
        d.text((x0, Y(0) + 8), name, fill="black")
    for j, (metric, c) in enumerate(colours.items()):
        d.rectangle([CHART_W - 160 + j * 70, 12, CHART_W - 150 + j * 70, 22], fill=c)
        d.text((CHART_W - 146 + j * 70, 10), metric, fill="black")
    img.save(path)


def demo_heatmaps(teacher: str, students: dict, requests: list, out_dir: str):
    """Attention heat maps: for each request, the image and the answer position's attention over the
    visual tokens (mean over the matched layers) of the teacher and of each student, side by side."""
    import evaluate as E
    os.makedirs(out_dir, exist_ok=True)
    rows = {name: E.attention_distance(teacher, d, None, None, requests, answer_rows=len(requests))["answer_rows"]
            for name, d in students.items()}
    for i, req in enumerate(requests):
        first = next(iter(rows.values()))
        panels = [("teacher", E.patch_grid(first["teacher"][i]))] + \
                 [(f"student: {n}", E.patch_grid(r["student"][i])) for n, r in rows.items()]
        image = E.open_image(req["image"])
        img = E.attention_heatmap(image.resize((256, 256)), panels, req["prompt"].replace("<image>\n", ""))
        img.save(os.path.join(out_dir, f"heatmap_{i}.png"))


def demo(args):
    """`python train.py --demo [--full]`: the whole pipeline on the synthetic shapes world, then the table.
    Prints a markdown table, writes results.json, a bar chart and attention heat maps under --out
    (default runs/demo); the last line is the RESULT line."""
    import data
    import evaluate as E
    if args.demo_steps_x <= 0:
        raise SystemExit(f"--demo-steps-x must be positive, got {args.demo_steps_x}")
    root = args.out or os.path.join("runs", "demo")
    os.makedirs(root, exist_ok=True)
    b = dict(DEMO)
    sizes = None
    if args.demo_steps_x != 1:  # a longer (or shorter) student budget: stages 2-3 and the validation interval
        b.update({k: max(1, round(b[k] * args.demo_steps_x)) for k in ("s2_steps", "s3_steps", "eval_every")})
    if args.demo_quick:  # the end-to-end test: the same pipeline with a few steps on a tiny world
        b.update(batch=4, text_steps=2, s1_steps=2, s2_steps=2, s3_steps=2, teacher_mix_steps=2,
                 teacher_cr_steps=2, teacher_cr_batch=4, teacher_focus_steps=2, vision_steps=2, vision_scenes=600,
                 teacher_lookup_steps=2, eval_every=1, eval_limit=1)
        sizes = dict(n_pretrain=24, n_instruct=48, n_images=24, n_sugarcrepe=2, n_vqa=4, n_val_sugarcrepe=2,
                     n_val_vqa=2, progress=False)
    timings = {}
    t0 = time.time()
    phases = tqdm(total=3, desc="demo: data, teacher, student LM", dynamic_ncols=True)
    paths = demo_data(root, seed=0, sizes=sizes)
    phases.update(1)
    teacher = args.teacher or (DEMO_TEACHER if os.path.exists(os.path.join(DEMO_TEACHER, "config.json"))
                               and not args.demo_train_teacher else None)
    if teacher is None:
        t = time.time()
        teacher = demo_teacher(b, paths, os.path.join(root, "teacher"))
        timings["teacher"] = time.time() - t
    check_tokenizers_agree(data.load_tokenizer(paths["tokenizer"]), data.load_tokenizer(teacher))
    phases.update(1)
    lm_init = demo_student_lm(b, paths, teacher, os.path.join(root, "student_lm"))
    phases.update(1)
    phases.close()

    seeds = [args.seed]
    if args.demo_seeds:
        seeds = [int(x) for x in args.demo_seeds.split(",")]
    elif args.full:
        seeds = [0, 1, 2]
    # kd = LLaVA-KD-style logit distillation (no VAT, no TAF); compodistill = VAT + TAF
    variants = [("sft", "sft", ()), ("kd", "kd", ("--no-taf",)), ("compodistill", "compodistill", ())]
    if args.full:  # the paper's ablations (METHOD.md section 7)
        variants += [("vat_no_taf", "compodistill", ("--no-taf",)), ("taf_no_vat", "kd", ()),
                     ("layers_early", "compodistill", ("--vat-layers", "early")),
                     ("layers_late", "compodistill", ("--vat-layers", "late")),
                     ("layers_all", "compodistill", ("--vat-layers", "all")),
                     ("loss_mse", "compodistill", ("--vat-distance", "mse")),
                     ("loss_kl", "compodistill", ("--vat-distance", "kl")),
                     ("matching_uniform", "compodistill", ("--vat-matching", "uniform")),
                     # at this depth the middle windows are 2 student and 2 teacher layers, so group and uniform
                     # matching pair the same layers; against all 6 teacher layers they differ (group: the mean
                     # of teacher layers 0-4 / 1-5; uniform: teacher layer 0 / 5)
                     ("matching_group_t_all", "compodistill", ("--vat-teacher-layers", "all")),
                     ("matching_uniform_t_all", "compodistill", ("--vat-teacher-layers", "all",
                                                                 "--vat-matching", "uniform")),
                     ("variant_official", "compodistill", ("--vat-variant", "official")),
                     ("headwise", "compodistill", ("--vat-headwise",))]
    bench = paths["dir"]
    results = {"teacher": {**demo_evaluate(teacher, bench), "seconds": timings.get("teacher", 0.0)}}
    # the attention distance (1 - cos of the matched maps, as L_ADL defines it) on 20 items per subset
    attention_requests = [E.choice_request(it["image"], it["pos"], it["neg"]) for items in
                          E.read_sugarcrepe(os.path.join(bench, "sugarcrepe"), limit=20).values() for it in items]
    runs = tqdm([(name, kind, extra, seed) for seed in seeds for name, kind, extra in variants],
                desc="demo: students", dynamic_ncols=True)
    for name, kind, extra, seed in runs:
        runs.set_postfix(run=f"{name}/seed{seed}")
        t = time.time()
        run_dir = os.path.join(root, f"{name}_seed{seed}")
        out = demo_student(b, kind, paths, teacher, lm_init, run_dir, seed, extra)  # finished stages are reused
        cached, res = os.path.join(run_dir, "result.json"), None
        if os.path.exists(cached):  # evaluated by an earlier (interrupted or parallel) demo on this --out
            with open(cached) as f:
                res = json.load(f)
            if res.get("teacher") != os.path.abspath(teacher):  # the attention distance is to another teacher
                res = None
        if res is None:
            seconds = time.time() - t
            r = demo_evaluate(out, bench)
            att = E.attention_distance(teacher, out, None, None, attention_requests, batch_size=32)
            res = {**r, "attn_dist": att["attn_dist"], "seconds": seconds, "seed": seed, "dir": out,
                   "teacher": os.path.abspath(teacher)}
            _demo_json(res, cached)
        results.setdefault(name, []).append(res)
    total = time.time() - t0

    # --- the table ---------------------------------------------------------------------------------
    def runs_of(name):  # the teacher is one run, each student one run per seed
        return results[name] if isinstance(results[name], list) else [results[name]]

    def agg(name, key):
        vals = [r[key] for r in runs_of(name)]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
        return mean, std

    names = [n for n, _, _ in variants] + ["teacher"]
    subsets = list(results["teacher"]["cr_subsets"])
    fmt = (lambda m, s: f"{m:.1f} ± {s:.1f}") if len(seeds) > 1 else (lambda m, s: f"{m:.1f}")
    lines = ["| model | " + " | ".join(subsets) + " | CR avg | VQA | attn dist (1-cos) | time (s) |",
             "|---" * (len(subsets) + 5) + "|"]
    summary = {}
    for name in names:
        rs = runs_of(name)
        sub = [sum(r["cr_subsets"][k] for r in rs) / len(rs) for k in subsets]
        cr, vqa = agg(name, "cr"), agg(name, "vqa")
        dist = agg(name, "attn_dist") if name != "teacher" else None  # to itself: not measured
        secs = sum(r["seconds"] for r in rs) / len(rs)
        summary[name] = {"cr": cr, "vqa": vqa, "attn_dist": dist}
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in sub) +
                     f" | {fmt(*cr)} | {fmt(*vqa)} | {'-' if dist is None else f'{dist[0]:.4f}'} | {secs:.0f} |")
    # VQA per question type: which recognition skills each model has (a "What color is the X?" answered
    # by one fixed colour shows up here, not in the average)
    qtypes = list(results["teacher"]["vqa_by_question_type"])
    lines += ["", "| model (VQA by question type) | " + " | ".join(qtypes) + " |", "|---" * (len(qtypes) + 1) + "|"]
    for name in names:
        rs = runs_of(name)
        lines.append(f"| {name} | " + " | ".join(
            f"{sum(r['vqa_by_question_type'][q] for r in rs) / len(rs):.1f}" for q in qtypes) + " |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump({"results": results, "summary": summary, "seeds": seeds, "budget": b,
                   "total_seconds": total}, f, indent=2)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(table + "\n")
    bar_chart([(n, summary[n]["cr"][0], summary[n]["vqa"][0]) for n in ("sft", "kd", "compodistill", "teacher")],
              os.path.join(root, "results.png"), "shapes world: CR (SugarCrepe layout) and VQA accuracy")
    curves = {}  # validation CR during training, the mean over seeds at each logged step
    for name in [n for n, _, _ in variants]:
        per_seed = [dict(learning_curve(r["dir"])) for r in results[name]]
        steps = sorted(set.intersection(*[set(c) for c in per_seed])) if per_seed else []
        curves[name] = [(x, sum(c[x] for c in per_seed) / len(per_seed)) for x in steps]
    if any(curves.values()):
        line_chart(curves, os.path.join(root, "learning_curve.png"),
                   "validation CR (SugarCrepe layout, paper protocol) during training")
    with open(os.path.join(root, "learning_curves.json"), "w") as f:
        json.dump(curves, f)
    demo_heatmaps(teacher, {"KD": results["kd"][0]["dir"], "CompoDistill": results["compodistill"][0]["dir"]},
                  attention_requests[::20][:6], os.path.join(root, "heatmaps"))
    print(f"total time {total / 60:.1f} min; results in {root}")
    v = summary
    print(f"RESULT sft_cr={v['sft']['cr'][0]:.1f} kd_cr={v['kd']['cr'][0]:.1f} "
          f"compodistill_cr={v['compodistill']['cr'][0]:.1f} teacher_cr={v['teacher']['cr'][0]:.1f} "
          f"sft_vqa={v['sft']['vqa'][0]:.1f} kd_vqa={v['kd']['vqa'][0]:.1f} "
          f"compodistill_vqa={v['compodistill']['vqa'][0]:.1f} kd_attn_dist={v['kd']['attn_dist'][0]:.4f} "
          f"compodistill_attn_dist={v['compodistill']['attn_dist'][0]:.4f}")
    return results


# -----------------------------------------------------------------------------
# Command line

def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["llava", "1", "2", "3", "all"], default="llava")
    p.add_argument("--init", help="preset:NAME | model dir (previous stage) | llava:DIR | parts:VISION,LLM,TOKENIZER")
    p.add_argument("--tokenizer", help="tokenizer dir (for preset:NAME)")
    p.add_argument("--teacher", help="teacher model dir (stages 1, 2)")
    p.add_argument("--data", help="LLaVA-format JSON (stage all: --data-pretrain / --data-instruct)")
    p.add_argument("--data-pretrain", help="stage all: stage-1 data")
    p.add_argument("--data-instruct", help="stage all: stage-2/3 data")
    p.add_argument("--image-folder", default=".")
    p.add_argument("--out", required=False)
    p.add_argument("--trainable", default=None, help="adapter | adapter+lora | adapter+llm")
    p.add_argument("--full-llm", action="store_true", help="stage 2: train the whole LLM instead of LoRA")
    p.add_argument("--lora-r", type=int, default=128)
    p.add_argument("--lora-alpha", type=int, default=256)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--taf", action=argparse.BooleanOptionalAction, default=True, help="TAF projector (stage 1)")
    p.add_argument("--w-lm", type=float, default=1.0)
    p.add_argument("--w-kl", type=float, default=1.0)
    p.add_argument("--w-vat", type=float, default=1.0, help="L_ADL weight in stage 2 (0 = the KD-only baseline)")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--kd-chunk", type=int, default=512, help="rows of logits materialised at a time in L_LM/L_KL")
    p.add_argument("--vat-layers", default="middle", help="student layers: middle|early|late|all|authors|0.3-0.7|8,9,10")
    p.add_argument("--vat-teacher-layers", default=None, help="teacher layers (default: same rule as the student)")
    p.add_argument("--vat-matching", default="group", choices=["group", "uniform", "one_to_one"])
    p.add_argument("--vat-distance", default="cosine", choices=["cosine", "mse", "kl"])
    p.add_argument("--vat-variant", default="paper", choices=["paper", "official"])
    p.add_argument("--vat-headwise", action="store_true")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--global-batch", type=int, default=None, help="samples per optimizer step over all ranks "
                   "and micro-batches; default: the paper's per stage (METHOD.md section 5), "
                   + ", ".join(f"{k}: {v}" for k, v in STAGE_GLOBAL_BATCH.items()) + "; given, it applies to every stage")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--group-by-length", action="store_true", help="batches of similar length (LLaVA's "
                   "group_by_modality_length): every sample still once per epoch, far less right padding")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--drop-overlong", action="store_true", help="drop (and count) samples whose image + first "
                   "answer token do not fit --max-len, instead of stopping with an error")
    p.add_argument("--skip-bad-images", action="store_true", help="skip (and count) samples whose image is "
                   "missing, corrupt or not RGB, instead of stopping before training")
    p.add_argument("--allow-non-rgb", action="store_true", help="accept non-RGB images (converted to RGB)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-seed", type=int, default=0, help="init seed of preset models")
    p.add_argument("--device", default="auto")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--eval-sugarcrepe", help="validation set in the SugarCrepe layout: its CR accuracy (the paper's "
                   "2-choice protocol, greedy) is logged every --eval-every steps as {'step', 'val_cr'} lines")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=None, help="items per subset in the in-loop validation")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-nonfinite", type=int, default=5, help="stop after this many non-finite steps in a row")
    p.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--fail-at-step", type=int, default=-1, help=argparse.SUPPRESS)  # test hook (rank death)
    p.add_argument("--fail-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--demo", action="store_true", help="the main job: the paper's table in miniature (see README)")
    p.add_argument("--full", action="store_true", help="with --demo: 3 seeds and the paper's ablations")
    p.add_argument("--demo-seeds", help="with --demo: comma-separated seeds for every student (mean ± std); "
                   "with --full it replaces the default 0,1,2")
    p.add_argument("--demo-steps-x", type=float, default=1.0, help="with --demo: multiply the students' stage-2 "
                   "and stage-3 steps (and the validation interval) by this factor; same for every student")
    p.add_argument("--demo-quick", action="store_true", help=argparse.SUPPRESS)  # CI's end-to-end run
    p.add_argument("--demo-train-teacher", action="store_true", help="with --demo: train the teacher instead of "
                   "loading the shipped assets/demo_teacher")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.demo:
        return demo(args)
    if args.stage == "all":
        base = args.out
        for stage, data_path in (("1", args.data_pretrain or args.data), ("2", args.data_instruct or args.data),
                                 ("3", args.data_instruct or args.data)):
            sub = argparse.Namespace(**vars(args))
            sub.stage, sub.data, sub.out = stage, data_path, os.path.join(base, f"stage{stage}")
            sub.global_batch = args.global_batch or STAGE_GLOBAL_BATCH[stage]
            if stage != "1":
                sub.init = os.path.join(base, f"stage{int(stage) - 1}")
            run_stage(sub)
        return base
    if not (args.init and args.data and args.out):
        get_parser().error("--init, --data and --out are required")
    return run_stage(args)


if __name__ == "__main__":
    main()
