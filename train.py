"""Training: the standard LLaVA recipe and CompoDistill's three stages in ONE visible loop.

Stages (docs/method.md section 5; `--stage`):
  llava  the standard recipe without a teacher: adapter pre-training (`--trainable adapter`), then
         fine-tuning (`--trainable adapter+lora` or `adapter+llm`). On the teacher preset it trains the
         teacher; on the student preset it is the paper's SFT baseline.
  1      DPT, distilled pre-training: L_LM + L_KL; trains the TAF linear only (taf.py).
  2      DFT, distilled fine-tuning: L_LM + L_KL + L_ADL (vat.py); trains the TAF linear + LoRA (or the LLM).
  3      SFT: L_LM only; stage 2's LoRA is merged, a fresh LoRA + the TAF linear train; no teacher.
  all    1 -> 2 -> 3, each reading the previous stage's output directory (stages 1, 2 saved in fp32).

Losses (weights `--w-lm --w-kl --w-vat`, default 1 each):
  L_LM  next-token cross-entropy on assistant tokens (`logits[:, :-1]` vs `labels[:, 1:]`).
  L_KL  forward KL(p_teacher || p_student) on the same shifted positions, fp32, temperature T
        (docs/method.md section 4), computed chunk by chunk from the final hidden states so that neither
        model's full (B, T, V) logits ever exist (losses.lm_and_kd_loss). `--kd-divergence reverse|jsd` swaps in
        reverse KL or GKD's generalized JSD (`--kd-jsd-beta`) on the same path (losses.divergence_rows).
  L_ADL visual attention alignment, Eq. 3 (vat.py).
Both token losses are normalised by the supervised-token count of the whole GLOBAL batch (all ranks,
all micro-batches), so 1 process and N processes with the same global batch take the same step.
Under torchrun the student is wrapped in DDP; `--fsdp` shards the student and the teacher with PyTorch
FSDP2 instead (distributed.py), the same step within float rounding.

The losses themselves are losses.py. Read in this order: building the stage's models; `run_stage` and its
steps (set_up, build_models, build_data, build_optimizer, train_loop with the core step `distill_losses`,
finish); the command line. The run's plumbing (run directory, lock, checkpoints and exact resume, SIGTERM, log sinks,
argument checks) is runs.py; joining the torchrun job and FSDP2's sharding, distributed.py.

Run directory `--out` (one per stage; runs.py): model.safetensors + config.json + tokenizer (the stage's
output, LoRA merged), `checkpoint/` (trainable weights, optimizer, scheduler, step, data position, RNG;
written atomically), `log.jsonl` (one JSON line per logged step, each loss separately), `args.json`.

  python train.py --stage llava --init preset:teacher --data D/instruct.json --image-folder D/images --out runs/t
  torchrun --nproc_per_node=8 train.py --stage 2 --init runs/x/stage1 --teacher runs/t ...
  torchrun --nproc_per_node=8 train.py --stage 2 --fsdp ...     # teachers of 7B+ next to a 2B+ student
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import evaluate as E
import model as M
import runs
import vat
from losses import KD_DIVERGENCES, lm_and_kd_loss, pair_rows, uld_loss
from distributed import (fsdp_shard, full_tensor, gather_objects, gather_state_dict, gathered, meta_copy,
                         mixed_precision)
from distributed import setup as dist_setup

# -----------------------------------------------------------------------------
# Building the stage's models

LORA_TARGETS = M.LORA_TARGETS


def build_student(args, tokenizer_path_hint=None):
    """The model this stage trains, from `--init`, any source model.load_any reads: `preset:NAME`, a
    compodistill model dir, a run's checkpoint/, `llava:DIR` or an HF LLaVA dir, `parts:VISION,LLM,TOKENIZER`
    (with --vision-feature-layer / --vision-feature-select-strategy). -> (model, tokenizer, image_processor)."""
    return M.load_any(args.init, trust_remote_code=args.trust_remote_code, tokenizer=args.tokenizer,
                      seed=args.model_seed, vision_feature_layer=getattr(args, "vision_feature_layer", None),
                      vision_feature_select_strategy=getattr(args, "vision_feature_select_strategy", None))


def lora_dropout(args) -> float:
    """LoRA's dropout: `--lora-dropout`, else 0 in CompoDistill's stages 1-3 and 0.05 in the LLaVA recipe
    (`--stage llava`). The authors' distillation trainer sets every dropout of both models to 0 (its
    `disable_dropout`, on by default, in the trainer their DPT, DFT and SFT scripts all use), so a dropped
    LoRA input never blurs the L_KL / L_ADL targets; LLaVA-1.5's own LoRA fine-tuning keeps 0.05
    (docs/training.md)."""
    if getattr(args, "lora_dropout", None) is not None:
        return args.lora_dropout
    return 0.05 if args.stage == "llava" else 0.0


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
    """Which parameters train. Stage defaults follow docs/method.md section 5; `--trainable` overrides:
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
        add_lora(model, args.lora_r, args.lora_alpha, lora_dropout(args))  # peft marks only LoRA weights trainable
    model.projector.requires_grad_(True)
    if hasattr(model.projector, "teacher_adapter"):  # TAF: the fetched teacher adapter stays frozen
        model.projector.teacher_adapter.requires_grad_(False)
    if what == "adapter+llm":
        model.language_model.requires_grad_(True)
    return what


def load_teacher(args, device, student_tok, student: M.MultimodalLM, dtype=None, prepare=None, parts=None):
    """The teacher: frozen, eval mode, bf16 on CUDA (`dtype`, default: bf16 when `device` is CUDA), never
    wrapped in DDP (sharded like the student under --fsdp: `prepare`, see model.load_any; `parts`: only those
    parts' weights, for TAF's checks). -> (teacher, its tokenizer, its image processor: its own preprocessor
    config and recorded --image-aspect-ratio, which build_data gives the teacher).
    The teacher reads each sample as it was trained to: a system prompt it recorded that differs from the
    student's is an error (the ids, hence L_KL's positions, would differ), unless --cross-vocab, where the
    teacher renders every sample itself with its own prompt (data.CrossVocabDataset).
    Its tokenizer must be the student's (logit KD compares token by token), unless --cross-vocab, where it
    may be any: L_KL becomes ULD over text-aligned positions; the visual tokens must still correspond one
    to one (the same vision encoder, the same count)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else None)
    teacher, teacher_tok, teacher_proc = M.load_any(args.teacher, device=device, dtype=dtype,
                                         trust_remote_code=args.trust_remote_code, tokenizer=args.tokenizer,
                                         vision_feature_layer=getattr(args, "vision_feature_layer", None),
                                         vision_feature_select_strategy=getattr(args, "vision_feature_select_strategy", None),
                                         prepare=prepare, parts=parts)
    teacher.eval().requires_grad_(False)
    if getattr(args, "cross_vocab", False):
        if teacher.num_visual_tokens != student.num_visual_tokens:
            raise ValueError(f"--cross-vocab: the teacher ({args.teacher}) gives {teacher.num_visual_tokens} visual "
                             f"tokens per image, the student {student.num_visual_tokens}; they must share the vision "
                             "encoder (and TAF needs it anyway)")
        return teacher, teacher_tok, teacher_proc
    s_prompt, t_prompt = (m.extra_config.get("system_prompt") for m in (student, teacher))
    if s_prompt != t_prompt:  # L_KL compares position by position: both must read the same ids
        raise ValueError(f"the teacher ({args.teacher}) was trained with system prompt {_prompt_name(t_prompt)}, the "
                         f"student reads {_prompt_name(s_prompt)} (--system-prompt, or what --init recorded): the "
                         "teacher would distil from a prompt it never saw. Pass --system-prompt with the teacher's, or "
                         "--cross-vocab to let the teacher read its own rendering (L_KL then pairs positions by text, "
                         "as ULD; docs/training.md)")
    data.check_tokenizers_agree(student_tok, teacher_tok)
    V = student.language_model.get_output_embeddings().weight.shape[0]
    Vt = teacher.language_model.get_output_embeddings().weight.shape[0]
    if Vt < V:
        raise ValueError(f"the teacher's LM head has {Vt} rows, fewer than the student's {V}")
    return teacher, teacher_tok, teacher_proc


def _prompt_name(prompt) -> str:
    return "the chat template's default (none recorded)" if prompt is None else repr(prompt)


def apply_taf(student: M.MultimodalLM, teacher: M.MultimodalLM):
    """TAF (docs/method.md section 2): the student's projector becomes the teacher's frozen adapter + a trainable
    Linear(d_teacher -> d_student); the student's vision encoder must be the teacher's."""
    from taf import check_same_vision_features, check_shared_vision_encoder
    rounded = check_shared_vision_encoder(teacher.vision_tower, student.vision_tower)
    if rounded:
        print(f"TAF: the teacher's vision tower holds the student's weights rounded to a 16-bit dtype ({len(rounded)} "
              "tensors; a teacher saved whole in bf16 by an older version): the same encoder; the student keeps "
              "its own copy")
    check_same_vision_features(teacher, student)
    if hasattr(teacher.projector, "teacher_adapter"):
        raise ValueError("the teacher itself has a TAF projector; use a teacher trained with its own adapter")
    # taf_projector deep-copies the adapter, so the teacher (bf16 on CUDA) is left untouched
    return M.taf_student(student, teacher)


def record_run_choices(student: M.MultimodalLM, args):
    """What this run decides about prompts and images goes into the model's config, so that every later
    stage and evaluate.py render and preprocess the same way: --system-prompt (TEXT, or "none"; not given:
    what the init model recorded, else the template's default) and --image-aspect-ratio (squash / pad; not
    given: what the init model recorded, else squash)."""
    if getattr(args, "system_prompt", None) is not None:
        student.extra_config["system_prompt"] = args.system_prompt
    if getattr(args, "image_aspect_ratio", None) is not None:
        student.extra_config["image_aspect_ratio"] = args.image_aspect_ratio


# -----------------------------------------------------------------------------
# One stage: set up, build, loop, finish

def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup then cosine decay to min_lr (docs/method.md section 5: cosine, warmup 3%)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# the paper's global batch per stage (docs/method.md section 5: DPT 256, DFT 128, SFT 192); the LLaVA recipe's
# adapter pre-training 256 (`--stage llava --trainable adapter`), its fine-tuning 128
STAGE_GLOBAL_BATCH = {"1": 256, "2": 128, "3": 192, "llava": 128, "llava-adapter": 256}


@runs.guarded  # --out locked, SIGTERM turned into "finish the step, save, exit 143"
def run_stage(args) -> str:
    """One stage (docs/method.md section 5) in named steps. `stage` is a plain namespace: each step adds what
    it builds, the loop reads it. Returns the stage's output directory (args.out)."""
    stage = set_up(args)                # processes, device, seeds; --out prepared
    build_models(args, stage)           # student (+ TAF, trainable set, LoRA), teacher, sharded or on device
    runs.release_freed_host_memory()    # what loading read and dropped goes back to the OS
    stage.peak_gib = {"load": runs.peak_memory(stage.distributed, stage.device)}  # the phase's peak, every rank
    build_data(args, stage)             # checked samples, the rendered dataset, VAT's layers, the sampler
    stage.peak_gib["data"] = runs.peak_memory(stage.distributed, stage.device)
    build_optimizer(args, stage)        # AdamW + cosine schedule; resumes a checkpoint, or starts the log
    runs.release_freed_host_memory()
    stage.peak_gib["optimizer"] = runs.peak_memory(stage.distributed, stage.device)  # with a resumed checkpoint
    train_loop(args, stage)             # the one loop
    finish(args, stage)                 # the full model, LoRA merged, + trainer_summary.json
    return args.out


def set_up(args) -> SimpleNamespace:
    if args.global_batch is None:
        key = "llava-adapter" if args.stage == "llava" and args.trainable == "adapter" else args.stage
        args.global_batch = STAGE_GLOBAL_BATCH[key]
    fsdp = bool(getattr(args, "fsdp", False))
    rank, world, device, distributed = dist_setup(args.device, fsdp, getattr(args, "dist_timeout", 30))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    master = rank == 0
    if master:
        runs.prepare_out_dir(args)  # refuses a previous run's --out (or clears it with --overwrite), before loading
    if distributed:
        dist.barrier()
    return SimpleNamespace(rank=rank, world=world, device=device, distributed=distributed, fsdp=fsdp, master=master,
                           distill=args.stage in ("1", "2"), w_vat=args.w_vat if args.stage == "2" else 0.0)


def build_models(args, stage):
    """Student and teacher (docs/method.md sections 1-2, 5): the student from --init, TAF applied in stage 1
    (the teacher's frozen adapter + a trainable linear), the stage's trainable set; the frozen teacher in
    stages 1-2. Under --fsdp both are sharded: the teacher while it loads (built on the meta device, sharded,
    then each rank reads only its shards; TAF's checks read the teacher's encoder and adapter whole), the
    student after its trainable set is chosen; else on the device, the student wrapped in DDP under torchrun."""
    device, fsdp = stage.device, stage.fsdp
    stage.sources = runs.sources_trained_on(args, stage.distill)  # before loading: a re-made --init is refused here
    mesh = None
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        mesh, policy = init_device_mesh(device.type, (stage.world,)), mixed_precision(device)
    student, tokenizer, base_processor = build_student(args)
    record_run_choices(student, args)
    teacher = teacher_tok = None
    if stage.distill:
        if not args.teacher:
            raise ValueError(f"--stage {args.stage} needs --teacher DIR")
        dtype = torch.bfloat16 if device.type == "cuda" else None
        teacher, teacher_tok, stage.teacher_processor = load_teacher(
            args, torch.device("cpu") if fsdp else device, tokenizer, student, dtype=dtype,
            prepare=(lambda m: fsdp_shard(m, mesh, policy)) if fsdp else None)
        if args.taf and student.extra_config.get("projector") != "taf":
            with torch.random.fork_rng(devices=[]):  # a second load must not move the RNG that TAF's linear uses
                parts = load_teacher(args, torch.device("cpu"), tokenizer, student, dtype=dtype,
                                     parts=("vision_tower", "projector"))[0] if fsdp else teacher
            apply_taf(student, parts)
    stage.trainable_kind = set_trainable(student, args)
    if args.grad_checkpointing:
        student.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stage.skeleton = None
    if fsdp:
        stage.skeleton = meta_copy(student) if stage.master else None  # what the gathered weights are saved through
        fsdp_shard(student, mesh, policy)  # CUDA: gathered in bf16, gradients reduced in fp32
    else:
        student.to(device)
    for mllm in (student, teacher):
        if mllm is not None and getattr(mllm.language_model.get_output_embeddings(), "bias", None) is not None:
            raise ValueError("LM heads with a bias are not supported by the chunked loss")
    stage.student, stage.teacher, stage.tokenizer, stage.teacher_tok = student, teacher, tokenizer, teacher_tok
    stage.base_processor = base_processor


def build_data(args, stage):
    """The stage's data (data.py): images checked (split over the ranks), samples rendered and cached, under
    --cross-vocab each sample in the teacher's tokens too; VAT's layers (measured when `auto`); the sampler
    over the global batch and the DataLoader of this rank's micro-batches."""
    student, teacher, master, world = stage.student, stage.teacher, stage.master, stage.world
    skip_samples = getattr(args, "skip_bad_samples", False)
    samples = data.load_llava_json(args.data, check_images=not skip_samples)
    # the image checks, the rendering and their cache keys are split over the ranks
    barrier, gather = (dist.barrier, gather_objects) if stage.distributed else (None, None)
    stage.image_stats = {}
    samples, stage.bad_images = data.validate_images(samples, args.image_folder, skip_bad=args.skip_bad_images,
                                                     allow_non_rgb=not args.strict_rgb,
                                                     progress=master and not args.quiet, stats=stage.image_stats,
                                                     rank=stage.rank, world_size=world, barrier=barrier, gather=gather,
                                                     skip_bad_samples=skip_samples)
    stage.image_processor = M.image_processor_for(student, stage.base_processor)  # the checkpoint's own; pad or squash
    teacher_proc = getattr(stage, "teacher_processor", None)  # the teacher's own, where it processes otherwise
    if teacher_proc is not None and data.same_processing(teacher_proc, stage.image_processor):
        teacher_proc = None
    elif teacher_proc is not None and master:
        print(f"the teacher processes images as it was trained to (image_aspect_ratio "
              f"{teacher.extra_config.get('image_aspect_ratio') or 'squash'}, its own processor), the student as "
              f"{student.extra_config.get('image_aspect_ratio') or 'squash'}: each sample's image is processed twice")
    pad_id = data.pad_token_id(stage.tokenizer)
    num_workers = data.num_workers_for(args.num_workers, stage.device)
    dataset = data.SupervisedDataset(samples, stage.tokenizer, stage.image_processor, args.image_folder,
                                     student.num_visual_tokens, student.image_token_id, args.max_len,
                                     drop_overlong=args.drop_overlong, progress=master and not args.quiet,
                                     system_prompt=student.extra_config.get("system_prompt"),
                                     cache_dir=data.default_cache_dir(), rank=stage.rank, world_size=world,
                                     barrier=barrier, processes=num_workers, skip_bad_samples=skip_samples,
                                     source=args.data, gather=gather, teacher_image_processor=teacher_proc)
    stage.bad_samples = dataset.bad_samples
    stage.cross = bool(getattr(args, "cross_vocab", False) and teacher is not None)
    collate = None
    if stage.cross:  # the teacher reads the same conversation in its own tokens; L_KL pairs positions by text
        dataset = data.CrossVocabDataset(dataset, stage.tokenizer, stage.teacher_tok, teacher.image_token_id,
                                         student.extra_config.get("system_prompt"),
                                         teacher.extra_config.get("system_prompt"), args.drop_overlong,
                                         data.default_cache_dir(), stage.rank, world, barrier, num_workers,
                                         master and not args.quiet, gather)  # both renderings fit --max-len, now
        collate = functools.partial(data.collate_cross_vocab, pad_token_id=pad_id,
                                    teacher_pad_token_id=data.pad_token_id(stage.teacher_tok))
    if master and stage.bad_samples:
        print(f"--skip-bad-samples: skipped {len(stage.bad_samples)} malformed sample(s) of {args.data}; first: "
              + "; ".join(why for _, why in stage.bad_samples[:3]))
    if master and dataset.dropped:
        in_teacher = len(getattr(dataset, "dropped_teacher", []))
        print(f"--drop-overlong: dropped {len(dataset.dropped)} of {len(dataset.dropped) + len(dataset)} samples of "
              f"{args.data} (image + first answer token longer than --max-len {args.max_len}"
              + (f"; {in_teacher} of them only in the teacher's tokens" if in_teacher else "")
              + f"; first ids {dataset.dropped[:5]})")
    if len(dataset) < args.global_batch:
        raise ValueError(f"{args.data}: {len(dataset)} usable samples, fewer than --global-batch {args.global_batch}")
    stage.micro = micro_batch_size(args, world)
    stage.vat_cfg = None
    if stage.w_vat > 0:
        resumed = runs.find_checkpoint(args.out) if args.resume else None
        stage.vat_cfg = vat_layers(args, student, teacher, dataset, pad_id, stage.micro,
                                   runs.checkpoint_meta(resumed) if resumed else {}, collate)
        if master:
            cfg = stage.vat_cfg
            print(f"VAT: student layers {cfg['s_layers']} <- teacher windows {cfg['matching']}"
                  + (f" (auto, measured on {cfg['auto']['samples']} samples)" if cfg.get("auto") else ""))
    stage.steps_per_epoch = len(dataset) // args.global_batch
    stage.total_steps = args.max_steps or int(args.epochs * stage.steps_per_epoch)
    if stage.total_steps < 1:
        raise ValueError(f"--epochs {args.epochs} over {len(dataset)} samples at --global-batch {args.global_batch} "
                         f"gives 0 optimizer steps ({stage.steps_per_epoch} per epoch); raise --epochs or give "
                         "--max-steps")
    stage.sampler = data.GlobalBatchSampler(len(dataset), args.global_batch, stage.rank, world, seed=args.seed,
                                            lengths=dataset.lengths if args.group_by_length else None)
    stage.per_rank = args.global_batch // world
    if stage.per_rank % stage.micro:
        raise ValueError(f"per-rank batch {stage.per_rank} (= --global-batch / world size) is not a multiple of "
                         f"--micro-batch {stage.micro}")
    stage.dataset, stage.pad_id, stage.num_workers, stage.collate = dataset, pad_id, num_workers, collate


def build_optimizer(args, stage):
    """AdamW over the trainable parameters, the warmup + cosine schedule, the checkpoint's meta (what a resume
    must agree with); then resume from --out's checkpoint, or write a fresh run's args.json and log. The data
    loader starts where the step count says."""
    student = stage.student
    if stage.fsdp:  # a no-grad forward (--vat-layers auto) leaves the root unit gathered: its registered
        student.reshard()  # parameters would be the gathered copies, and AdamW would hold those, not the shards
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    if stage.fsdp and not all(hasattr(p, "device_mesh") for p in params):
        raise RuntimeError("--fsdp: some trainable parameters are not sharded (DTensor) when the optimizer is built")
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    total_steps = stage.total_steps
    stage.warmup = warmup = max(1, int(args.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, total_steps, warmup, args.lr, args.min_lr) / args.lr)
    distill, vat_cfg = stage.distill, stage.vat_cfg
    stage.meta = meta = {
        "stage": args.stage, "init": args.init, "trainable": stage.trainable_kind, "taf": bool(args.taf and distill),
        "global_batch": args.global_batch, "data": os.path.abspath(args.data), "seed": args.seed,
        **({"group_by_length": True} if args.group_by_length else {}),  # absent when off: older checkpoints
        **({"vat_auto": vat_cfg["auto"]} if vat_cfg and vat_cfg.get("auto") else {}),  # the layers auto chose
        **{k: student.extra_config[k] for k in ("system_prompt", "image_aspect_ratio") if k in student.extra_config},
        **kd_meta(args, distill),
        **({"cross_vocab": True} if getattr(args, "cross_vocab", False) and distill else {}),
        "n_trainable": sum(p.numel() for p in params),
        "lr": args.lr, "w_lm": args.w_lm, "w_kl": args.w_kl, "w_vat": args.w_vat,
        "kd_temperature": args.kd_temperature, "max_len": args.max_len, **runs.file_fingerprint(args.data),
        **stage.sources}
    stage.step, stage.last_checkpoint = 0, None
    if args.resume and runs.find_checkpoint(args.out):
        state = runs.load_checkpoint(runs.find_checkpoint(args.out), student, optimizer, scheduler, meta,
                                     rank=stage.rank)
        stage.step = stage.last_checkpoint = state["step"]
        if stage.master:
            print(f"resumed from {args.out} at step {stage.step}")
            runs.trim_log(os.path.join(args.out, "log.jsonl"), stage.step)
    elif stage.master:
        runs.write_run_files(args)
    stage.sampler.load_state_dict({"epoch": stage.step // stage.steps_per_epoch,
                                   "step": stage.step % stage.steps_per_epoch})
    stage.batches = data.data_loader(stage.dataset, stage.sampler, stage.micro, stage.pad_id, stage.num_workers,
                                     stage.device, args.seed, stage.collate)
    stage.params, stage.optimizer, stage.scheduler = params, optimizer, scheduler


def capture(mllm, layers, ids, mask, args, image_token_id):
    """VAT's attention capture on `layers` of `mllm`'s LLM (vat.capture_visual_attention), or nothing
    (an empty dict) when VAT is off."""
    if layers is None:
        return contextlib.nullcontext({})
    return vat.capture_visual_attention(mllm.language_model, layers, ids == image_token_id, mask,
                                        rows=vat_rows(args), headwise=args.vat_headwise)


def teacher_pixels(b):
    """The images as the teacher was trained to see them: its own processing where it differs from the
    student's ("teacher_pixel_values", build_data), else the student's."""
    return b["teacher_pixel_values"] if "teacher_pixel_values" in b else b["pixel_values"]


def distill_losses(args, stage, model, b, n_tok, n_vis, n_pairs):
    """The core step on one micro-batch `b` (docs/method.md sections 3-5): the teacher's forward with its visual
    attention captured (no gradient), the student's forward with its own captured, and the three losses

        loss = w_lm L_LM + w_kl L_KL + w_vat L_ADL

    L_LM and L_KL from the final hidden states, chunked (lm_and_kd_loss; across vocabularies L_KL is ULD on the
    text-aligned pairs); L_ADL (Eq. 3, vat.vat_loss) on the captured maps, a global per-sample mean. Token losses
    are normalised by the global batch's counts: supervised tokens `n_tok`, samples with an image `n_vis`,
    aligned pairs `n_pairs`. -> (loss, lm, kd, vat, teacher_bad)."""
    student, teacher, cfg, cross = stage.student, stage.teacher, stage.vat_cfg, stage.cross
    s_head = student.language_model.get_output_embeddings()
    t_head = teacher.language_model.get_output_embeddings() if teacher is not None else None
    teacher_bad = 0
    if teacher is not None:
        t_ids, t_mask = ((b["teacher_input_ids"], b["teacher_attention_mask"]) if cross
                         else (b["input_ids"], b["attention_mask"]))
        with torch.no_grad():
            with capture(teacher, cfg and cfg["t_layers"], t_ids, t_mask, args, teacher.image_token_id) as t_maps:
                t_out = teacher(t_ids, t_mask, teacher_pixels(b), return_hidden=True)
            teacher_bad = int(not torch.isfinite(t_out["hidden"]).all())
    with capture(student, cfg and cfg["s_layers"], b["input_ids"], b["attention_mask"], args,
                 student.image_token_id) as s_maps:
        out = model(b["input_ids"], b["attention_mask"], b["pixel_values"], return_hidden=True)
    lm, kd = lm_and_kd_loss(out["hidden"], s_head.weight, b["labels"], n_tok,
                            t_out["hidden"] if teacher is not None and not cross else None,
                            t_head.weight if teacher is not None else None,
                            args.kd_temperature, args.kd_chunk, args.kd_divergence, args.kd_jsd_beta)
    if cross:  # L_KL across vocabularies: ULD on the text-aligned pairs (global count n_pairs)
        kd = uld_loss(*pair_rows(out["hidden"], t_out["hidden"], b["pairs"]), s_head.weight,
                      t_head.weight, max(1.0, n_pairs), args.kd_temperature, args.kd_chunk)
    loss = args.w_lm * lm + (args.w_kl * kd if teacher is not None else 0.0)
    vat_l = torch.zeros((), device=stage.device)
    if cfg:
        local_vis = int(out["visual_mask"].any(1).sum())
        if local_vis:
            mean_l = vat.vat_loss(s_maps, t_maps, cfg["matching"], cfg["s_layers"], out["visual_mask"],
                                  b["attention_mask"], variant=args.vat_variant, distance=args.vat_distance,
                                  headwise=args.vat_headwise, rows=vat_rows(args))
            vat_l = mean_l * local_vis / max(1.0, n_vis)  # a global per-sample mean
        loss = loss + stage.w_vat * vat_l
    return loss, lm, kd, vat_l, teacher_bad


def global_counts(stage, micro_batches) -> tuple:
    """The loss normalisers over the whole global batch (all ranks, all micro-batches): supervised tokens,
    samples with visual tokens, text-aligned pairs (--cross-vocab). So 1 process and N processes with the same
    global batch take the same step."""
    counts = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches),
                           sum(int((b["input_ids"] == stage.student.image_token_id).any(1).sum()) for b in micro_batches),
                           sum(len(b["pairs"]) for b in micro_batches) if stage.cross else 0],
                          dtype=torch.float64, device=stage.device)
    if stage.distributed:
        dist.all_reduce(counts)
    return max(1.0, counts[0].item()), counts[1].item(), counts[2].item()


def train_loop(args, stage):
    """The one loop. Per optimizer step: this rank's micro-batches, the global normalisers, the core step
    (distill_losses) and backward per micro-batch (gradients synchronised after the last), clip, AdamW (a step
    with a non-finite loss or norm on any rank is skipped on all), schedule; then the log line, in-loop
    validation, the checkpoint, SIGTERM."""
    student, optimizer, device, world, master = stage.student, stage.optimizer, stage.device, stage.world, stage.master
    distributed, fsdp = stage.distributed, stage.fsdp
    model = (DDP(student, device_ids=[device.index] if device.type == "cuda" else None)
             if distributed and not fsdp else student)  # FSDP2's sharded student is called as it is
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    val_items = None
    if args.eval_sugarcrepe and args.eval_every:  # every rank: its share under DDP, all of it under --fsdp
        val_items = E.read_sugarcrepe(args.eval_sugarcrepe, args.eval_coco_images, limit=args.eval_limit)
    log_path = os.path.join(args.out, "log.jsonl")
    step, total_steps = stage.step, stage.total_steps
    sinks = runs.open_sinks(runs.parse_report_to(args.report_to), args.out, args.run_name, vars(args),
                            step > 0) if master else []
    if master:  # one line per (re)start: what the data checks dropped, where the run starts
        runs.write_record(log_path, {"event": "start", "from_step": step, "samples": len(stage.dataset),
                                     "skipped_bad_images": len(stage.bad_images),
                                     "skipped_bad_samples": len(stage.bad_samples),
                                     "dropped_overlong": len(stage.dataset.dropped),
                                     "converted_non_rgb": stage.image_stats.get("converted_non_rgb", 0),
                                     "peak_gib": stage.peak_gib}, sinks)
    save = lambda: runs.checkpoint_all_ranks(args, student, optimizer, stage.scheduler, step,  # noqa: E731
                                             stage.steps_per_epoch, stage.meta, distributed, master)
    student.train()
    bad_in_a_row, stage.skipped = 0, 0
    pbar = tqdm(total=total_steps, initial=step, desc=f"stage {args.stage}", disable=not master or args.quiet,
                dynamic_ncols=True)
    t_last, tokens_since, paused = time.time(), 0, 0.0  # paused: validation / checkpoint seconds, not in tokens_per_s
    try:
        while step < total_steps:
            micro_batches = [next(stage.batches) for _ in range(stage.per_rank // stage.micro)]
            n_tok, n_vis, n_pairs = global_counts(stage, micro_batches)
            lr = lr_at(step, total_steps, stage.warmup, args.lr, args.min_lr)
            sums = {"lm": 0.0, "kd": 0.0, "vat": 0.0, "teacher_bad": 0}
            with runs.out_of_memory_advice(args, device):
                for k, b in enumerate(micro_batches):
                    b = {key: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for key, v in b.items()}
                    last = k == len(micro_batches) - 1
                    if fsdp:  # gradients reduce-scattered after the last micro-batch only, like DDP's no_sync
                        student.set_requires_gradient_sync(last)
                    sync = contextlib.nullcontext() if (not distributed or fsdp or last) else model.no_sync()
                    with sync, autocast:
                        loss, lm, kd, vat_l, teacher_bad = distill_losses(args, stage, model, b, n_tok, n_vis, n_pairs)
                    (loss * world).backward()  # DDP averages over ranks; the losses are already global sums / N
                    sums["lm"] += lm.item()
                    sums["kd"] += kd.item()
                    sums["vat"] += vat_l.item()
                    sums["teacher_bad"] += teacher_bad
                    tokens_since += int(b["attention_mask"].sum())
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(stage.params, args.grad_clip if args.grad_clip > 0
                                                                   else float("inf")))  # --fsdp: the global norm
            stats = torch.tensor([sums["lm"], sums["kd"], sums["vat"], float(grad_norm), float(runs.sigterm_received()),
                                  sums["teacher_bad"]], device=device, dtype=torch.float64)
            if distributed:  # losses: partial sums of global means -> add; grad norm: the same on every rank; flags
                dist.all_reduce(stats)
                stats[3] /= world
            finite = bool(torch.isfinite(stats).all())
            if finite:
                optimizer.step()
                bad_in_a_row = 0
            else:
                stage.skipped += 1
                bad_in_a_row += 1
            optimizer.zero_grad(set_to_none=True)
            stage.scheduler.step()
            step += 1
            pbar.update(1)
            if not finite and bad_in_a_row >= args.max_nonfinite:
                raise FloatingPointError(runs.nonfinite_message(args, step, bad_in_a_row, stats,
                                                                stage.last_checkpoint))
            logging = step % args.log_every == 0 or step == total_steps
            peaks = runs.peak_memory(distributed, device) if logging else None  # since the last record, every rank
            if master and logging:
                dt = time.time() - t_last - paused
                rec = {"step": step, "loss": round(args.w_lm * stats[0].item() + args.w_kl * stats[1].item()
                                                    + stage.w_vat * stats[2].item(), 6),
                       "lm": stats[0].item(), "kd": stats[1].item(), "vat": stats[2].item(),
                       "lr": lr, "grad_norm": stats[3].item(), "tokens_per_s": tokens_since * world / max(dt, 1e-9),
                       "skipped": stage.skipped, **({"kd_pairs": int(n_pairs)} if stage.cross else {}),
                       "peak_gib": peaks}
                runs.write_record(log_path, rec, sinks)
                pbar.set_postfix(lm=f"{rec['lm']:.3f}", kd=f"{rec['kd']:.3f}", vat=f"{rec['vat']:.4f}")
                t_last, tokens_since, paused = time.time(), 0, 0.0
            t_pause = time.time()
            if args.eval_sugarcrepe and args.eval_every and (step % args.eval_every == 0 or step == total_steps):
                if val_items is not None:
                    with gathered(student) if fsdp else contextlib.nullcontext():  # --fsdp: every rank runs it
                        rec = {"step": step, **E.validate_cr(student, stage.tokenizer, stage.image_processor,
                                                              val_items, device, split=distributed and not fsdp)}
                peaks = runs.peak_memory(distributed, device)
                if master:
                    runs.write_record(log_path, {**rec, "peak_gib": peaks}, sinks)
                    pbar.set_postfix(val_cr=f"{rec['val_cr']:.1f}")
            # never while a non-finite streak is open: those weights are what the streak is about
            if args.save_every and step % args.save_every == 0 and step < total_steps and bad_in_a_row == 0:
                t_save = time.time()
                save()
                stage.last_checkpoint = step
                peaks = runs.peak_memory(distributed, device)
                if master:
                    runs.write_record(log_path, {"event": "checkpoint", "at_step": step, "peak_gib": peaks,
                                                 "seconds": round(time.time() - t_save, 3)}, sinks)
            paused += time.time() - t_pause
            if stats[4] > 0 and step < total_steps:  # SIGTERM on some rank: this step is done; save it, stop
                runs.sigterm_stop(args, step, bad_in_a_row, stage.last_checkpoint, save, master)
            runs.inject_fault(step, total_steps, stage.rank)  # tests only ($COMPODISTILL_FAULT)
    finally:
        pbar.close()
        runs.close_sinks(sinks)
    stage.step = step


def finish(args, stage):
    """The stage's output: the full model with LoRA merged, in the save dtype (the projector, TAF's trained
    linear, always fp32), beside trainer_summary.json (written last: runs.is_finished). Under --fsdp every
    rank gathers and rank 0 saves."""
    student, master = stage.student, stage.master
    if stage.fsdp:  # every rank gathers; rank 0 loads the whole weights into its unsharded copy
        whole = gather_state_dict(student, keep=master)
        if master:
            stage.skeleton.load_state_dict(whole, assign=True)
            student = stage.skeleton
    if master:
        merge_lora(student)
        student.language_model.config.use_cache = True
        save_dtype = M.cast_for_save(student, args.save_dtype)  # the run is over: the model is not used again
        M.save_pretrained(student, args.out, stage.tokenizer, stage.image_processor)
        with open(os.path.join(args.out, "trainer_summary.json"), "w", encoding="utf-8") as f:
            json.dump({"steps": stage.step, "skipped_nonfinite": stage.skipped,
                       "dropped_overlong": len(stage.dataset.dropped), "skipped_bad_images": len(stage.bad_images),
                       "skipped_bad_samples": len(stage.bad_samples),
                       "converted_non_rgb": stage.image_stats.get("converted_non_rgb", 0), "save_dtype": save_dtype,
                       "lora_dropout": lora_dropout(args),
                       **stage.meta, "args": vars(args),
                       "run_id": (runs.read_json(os.path.join(args.out, "args.json")) or {}).get("run_id")},
                      f, indent=2)
    if stage.distributed:
        dist.barrier()


# -----------------------------------------------------------------------------
# VAT's layers, the run's choices

def micro_batch_size(args, world: int) -> int:
    return min(args.micro_batch, args.global_batch // world)


def vat_layers(args, student, teacher, dataset, pad_id, micro: int, resumed_meta: dict, collate=None) -> dict:
    """VAT's layers and their matching (docs/method.md section 3): `--vat-layers` / `--vat-teacher-layers`
    are vat.select_layers specs. "auto" measures each model's attention profile on the first
    --vat-auto-samples training samples that have an image, before any step (attention.auto_vat_layers: under
    group matching the teacher's window grows to the student's layer count, Eq. 2 needs m >= k); a resumed run
    takes the layers its checkpoint recorded (the trained model would measure differently). Every rank
    measures the same samples with the same weights, so every rank picks the same layers.
    Returns {"s_layers", "t_layers" (the teacher layers of the windows), "matching"[, "auto"]}."""
    s_spec, t_spec = args.vat_layers, args.vat_teacher_layers or args.vat_layers
    n_s = student.language_model.config.num_hidden_layers
    n_t = teacher.language_model.config.num_hidden_layers
    auto = None
    if "auto" in (s_spec, t_spec):
        auto = resumed_meta.get("vat_auto")
        if auto is None:
            import attention
            idx = [i for i, x in enumerate(dataset.samples) if x.get("image")][:args.vat_auto_samples]
            if not idx:
                raise ValueError(f"--vat-layers auto: {args.data} has no sample with an image to measure on")
            k = None if s_spec == "auto" else len(vat.select_layers(n_s, s_spec))
            collate = collate or functools.partial(data.collate, pad_token_id=pad_id)
            auto = attention.auto_vat_layers(student if s_spec == "auto" else None,
                                             teacher if t_spec == "auto" else None, dataset, idx, micro, collate, k,
                                             group=args.vat_matching == "group")
    s_layers = auto["student"] if s_spec == "auto" else vat.select_layers(n_s, s_spec)
    t_layers = auto["teacher"] if t_spec == "auto" else vat.select_layers(n_t, t_spec, teacher=True)
    matching = vat.group_layer_matching(s_layers, t_layers, args.vat_matching)
    cfg = dict(s_layers=s_layers, t_layers=sorted({t for g in matching for t in g}), matching=matching)
    return dict(cfg, auto=auto) if auto else cfg


def kd_meta(args, distill: bool) -> dict:
    """The checkpoint meta's record of L_KL's divergence: absent for the paper's forward KL (so checkpoints written
    before the option resume), else {"kd_divergence", and for jsd "kd_jsd_beta"}; a resume with another is refused."""
    div = getattr(args, "kd_divergence", "forward")
    if not distill or div == "forward":
        return {}
    return {"kd_divergence": div, **({"kd_jsd_beta": args.kd_jsd_beta} if div == "jsd" else {})}


def vat_rows(args) -> str:
    """Query rows the VAT variant needs: all rows (paper) or the visual rows (the authors' code). Across
    vocabularies (--cross-vocab) the visual rows only, whatever the variant: the text rows of the two
    tokenizations do not correspond one to one, the visual ones do. --vat-text-rows (a diagnostic, not the
    paper's): only the text rows after the image, the question and the answer (vat._row_plan)."""
    if getattr(args, "vat_text_rows", False):
        return "text"
    return "all" if args.vat_variant == "paper" and not getattr(args, "cross_vocab", False) else "visual"


# -----------------------------------------------------------------------------
# Command line

def feature_layer(text: str):
    """--vision-feature-layer: one int (-2) or a comma-separated list (-2,-5)."""
    vals = [int(x) for x in text.split(",") if x.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected an int or ints separated by commas, got {text!r}")
    return vals[0] if len(vals) == 1 else vals


def per_stage(kind):
    """An option that takes one value (every stage) or three comma-separated values (stages 1, 2, 3 of
    --stage all), e.g. --max-steps 100,50,200. Three values come back as a tuple."""
    def parse(text):
        vals = [kind(x) for x in str(text).split(",")]
        if len(vals) == 1:
            return vals[0]
        if len(vals) != 3:
            raise argparse.ArgumentTypeError(f"expected one value or three (stages 1,2,3), got {text!r}")
        return tuple(vals)
    parse.__name__ = kind.__name__
    return parse


PER_STAGE = ("max_steps", "lr", "global_batch", "epochs")
# arguments that do not change what a stage trains: a finished stage is still finished when these differ

def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["llava", "1", "2", "3", "all"], default="llava")
    p.add_argument("--init", help="preset:NAME | model dir (previous stage) | RUN/checkpoint | llava:DIR (or an HF "
                   "LLaVA dir) | parts:VISION,LLM,TOKENIZER (<image> is added to the tokenizer if it lacks it)")
    p.add_argument("--vision-feature-layer", type=feature_layer, default=None, help="parts: the vision hidden "
                   "layer(s) the adapter reads, e.g. -2 (default, LLaVA's) or, several, --vision-feature-layer=-2,-5")
    p.add_argument("--vision-feature-select-strategy", choices=["default", "full"], default=None,
                   help="parts: 'default' drops the first (CLS) token, 'full' keeps all (default: CLIP default, SigLIP full)")
    p.add_argument("--tokenizer", help="tokenizer dir (for preset:NAME)")
    p.add_argument("--teacher", help="teacher: any --init source but preset/parts (a model dir, RUN/checkpoint, "
                   "llava:DIR or an HF LLaVA dir; stages 1, 2)")
    p.add_argument("--data", help="LLaVA-format JSON (stage all: --data-pretrain / --data-instruct)")
    p.add_argument("--data-pretrain", help="stage all: stage-1 data")
    p.add_argument("--data-instruct", help="stage all: stage-2/3 data")
    p.add_argument("--image-folder", default=".")
    p.add_argument("--out", required=False)
    p.add_argument("--trainable", default=None, help="adapter | adapter+lora | adapter+llm")
    p.add_argument("--full-llm", action="store_true", help="stage 2: train the whole LLM instead of LoRA")
    p.add_argument("--lora-r", type=int, default=128)
    p.add_argument("--lora-alpha", type=int, default=256)
    p.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout; default 0 in stages 1-3 (the "
                   "authors' distillation trainer turns every dropout off), 0.05 in --stage llava (LLaVA-1.5's)")
    p.add_argument("--taf", action=argparse.BooleanOptionalAction, default=True, help="TAF projector (stage 1)")
    p.add_argument("--w-lm", type=float, default=1.0)
    p.add_argument("--w-kl", type=float, default=1.0)
    p.add_argument("--w-vat", type=float, default=1.0, help="L_ADL weight in stage 2 (0 = the KD-only baseline)")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--kd-chunk", type=int, default=512, help="rows of logits materialised at a time in L_LM/L_KL")
    p.add_argument("--cross-vocab", action="store_true", help="a teacher with its own tokenizer: L_KL becomes ULD "
                   "(losses.uld_loss) over the positions whose tokens end at the same character of an answer "
                   "(data.aligned_pairs, counted as kd_pairs in the log); VAT aligns the visual query rows only")
    p.add_argument("--kd-divergence", choices=list(KD_DIVERGENCES), default="forward", help="L_KL's divergence: "
                   "forward KL(p_t||p_s) (the paper), reverse KL(p_s||p_t), or jsd, the generalized JSD of GKD as TRL "
                   "computes it (no T^2 factor; losses.divergence_rows)")
    p.add_argument("--kd-jsd-beta", type=float, default=0.5, help="--kd-divergence jsd: the teacher's weight in the "
                   "mixture beta*p_t + (1-beta)*p_s, in [0, 1] (TRL's beta: 0 = forward KL, 1 = reverse KL)")
    p.add_argument("--vat-layers", default="middle", help="student layers: middle|early|late|all|authors|auto|"
                   "0.3-0.7|8,9,10 (auto: the window vat.auto_layers finds in the model's measured attention)")
    p.add_argument("--vat-teacher-layers", default=None, help="teacher layers (default: same rule as the student)")
    p.add_argument("--vat-auto-samples", type=int, default=64, help="training samples with an image that "
                   "--vat-layers auto measures each model on, before the first step")
    p.add_argument("--vat-matching", default="group", choices=["group", "uniform", "one_to_one"])
    p.add_argument("--vat-distance", default="cosine", choices=["cosine", "mse", "kl"])
    p.add_argument("--vat-variant", default="paper", choices=["paper", "official"])
    p.add_argument("--vat-headwise", action="store_true")
    p.add_argument("--vat-text-rows", action="store_true", help="a diagnostic, not Eq. 3: align only the text rows "
                   "after the image (the question and the answer), not every row (docs/verdict.md, probe P3c)")
    p.add_argument("--lr", type=per_stage(float), default=2e-4, help="one value, or three for --stage all (1,2,3)")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--global-batch", type=per_stage(int), default=None, help="samples per optimizer step over all ranks "
                   "and micro-batches; default: the paper's per stage (docs/method.md section 5), "
                   + ", ".join(f"{k}: {v}" for k, v in STAGE_GLOBAL_BATCH.items()) + "; one value applies to every "
                   "stage, three comma-separated values to stages 1, 2, 3 of --stage all")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader worker processes per rank (image "
                   "decode, processor, collate; also the rendering pool at the start); default: 0 on CPU, else "
                   "min(4, CPUs per rank - 1)")
    p.add_argument("--group-by-length", action="store_true", help="batches of similar length (LLaVA's "
                   "group_by_modality_length): every sample still once per epoch, far less right padding")
    p.add_argument("--epochs", type=per_stage(float), default=1.0, help="one value, or three for --stage all")
    p.add_argument("--max-steps", type=per_stage(int), default=0, help="one value, or three for --stage all "
                   "(e.g. 100,50,200; 0 = --epochs)")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--drop-overlong", action="store_true", help="drop (and count) samples whose image + first "
                   "answer token do not fit --max-len, instead of stopping with an error")
    p.add_argument("--skip-bad-images", action="store_true", help="skip (and count) samples whose image is "
                   "missing, unreadable or corrupt, instead of stopping before training")
    p.add_argument("--skip-bad-samples", action="store_true", help="skip (and count) malformed samples (a "
                   "conversation starting with a gpt turn, an empty answer, <image> in a text-only sample, ...) "
                   "instead of stopping with an error that names the first one")
    p.add_argument("--strict-rgb", action="store_true", help="treat non-RGB images (grayscale, RGBA, ...) as bad "
                   "images; by default they are converted to RGB, as LLaVA does, and counted (converted_non_rgb)")
    p.add_argument("--allow-non-rgb", action="store_true", help="no-op, kept for old command lines: non-RGB images "
                   "are converted by default now (--strict-rgb for the old refusal)")
    p.add_argument("--image-aspect-ratio", choices=list(M.ASPECT_RATIOS), default=None, help="squash (resize to "
                   "the encoder's square) or pad (LLaVA-1.5: pad to a square with the processor's mean colour); "
                   "default: what the --init model recorded, else squash. Recorded in the saved config")
    p.add_argument("--system-prompt", default=None, help="system turn of every sample, replacing the chat "
                   "template's default (Qwen2.5 adds a 21-token one); 'none' for no system turn where the "
                   "template allows. Recorded in the saved config, so evaluate.py prompts the same way")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--fsdp", action="store_true", help="shard the student and the teacher with PyTorch FSDP2 "
                   "(fully_shard; parameters, gradients and optimizer state split over the ranks) instead of DDP; "
                   "under torchrun. Same losses, VAT capture and checkpoints (distributed.py; docs/training.md, 'Memory per model pair')")
    p.add_argument("--dist-timeout", type=float, default=30, help="minutes a collective may wait for the other "
                   "ranks before the job fails (NCCL's own default is 10; rank 0's checkpoint or validation can last longer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-seed", type=int, default=0, help="init seed of preset models")
    p.add_argument("--device", default="auto")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--report-to", default="none", help="none | wandb | tensorboard, comma-separated: sinks that receive "
                   "the same records as log.jsonl (rank 0; step is the x axis; the packages are optional)")
    p.add_argument("--run-name", default=None, help="the run's name in wandb / its TensorBoard subdirectory "
                   "(--stage all: NAME-stage1, ...)")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], default=None, help="dtype of the "
                   "saved LLM; default: the dtype the LLM came in (parts / llava), float32 for presets. The projector (TAF's "
                   "linear) is saved in float32 always, the frozen vision tower in the dtype it came in (model.cast_for_save); "
                   "--stage all saves stages 1 and 2 in float32 (what the next stage starts from) and stage 3 in this dtype")
    p.add_argument("--eval-sugarcrepe", help="validation set in the SugarCrepe layout: its CR accuracy (the paper's "
                   "2-choice protocol, greedy) is logged every --eval-every steps as {'step', 'val_cr'} lines")
    p.add_argument("--eval-coco-images", help="images of --eval-sugarcrepe (the official layout keeps COCO val2017 "
                   "elsewhere; default EVAL_SUGARCREPE/images)")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=None, help="items per subset in the in-loop validation")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint (an --out holding no "
                   "run starts fresh; a run without a usable checkpoint is an error)")
    p.add_argument("--overwrite", action="store_true", help="a fresh run into an --out holding a previous run: "
                   "remove that run's files first (without it, such an --out is refused)")
    p.add_argument("--max-nonfinite", type=int, default=5, help="stop after this many non-finite steps in a row")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--demo", action="store_true", help=argparse.SUPPRESS)  # moved: python demo.py
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        runs.parse_report_to(args.report_to)  # a missing sink package stops here, before any model loads
    except ValueError as e:
        get_parser().error(str(e))
    if not 0.0 <= args.kd_jsd_beta <= 1.0:
        get_parser().error(f"--kd-jsd-beta must be in [0, 1], got {args.kd_jsd_beta}")
    if args.demo:
        raise SystemExit("the demo is its own script now: python demo.py (python demo.py --help for its options)")
    problems = runs.check_args(args)
    if problems:
        get_parser().error("; ".join(problems))
    if args.stage == "all":
        base = args.out
        for i, (stage, data_path) in enumerate((("1", args.data_pretrain or args.data),
                                                ("2", args.data_instruct or args.data),
                                                ("3", args.data_instruct or args.data))):
            sub = argparse.Namespace(**vars(args))
            sub.stage, sub.data, sub.out = stage, data_path, os.path.join(base, f"stage{stage}")
            for name in PER_STAGE:  # three values: this stage's; one value: every stage's
                value = getattr(args, name)
                setattr(sub, name, value[i] if isinstance(value, tuple) else value)
            sub.global_batch = sub.global_batch or STAGE_GLOBAL_BATCH[stage]
            sub.run_name = f"{args.run_name}-stage{stage}" if args.run_name else None
            if stage != "1":
                sub.init = os.path.join(base, f"stage{int(stage) - 1}")
            if stage != "3":  # handed to the next stage in the master weights' fp32: a bf16 save would round
                sub.save_dtype = "float32"  # away merged LoRA deltas below bf16's resolution; stage 3: --save-dtype
            if args.resume and runs.stage_finished(sub):
                print(f"stage {stage}: finished in {sub.out} (trainer_summary.json), skipped")
                continue
            if args.resume:
                runs.resume_unfinished_stage(sub)  # its checkpoint, or (none at all) this stage alone afresh
            run_stage(sub)
        return base
    if not (args.init and args.data and args.out):
        get_parser().error("--init, --data and --out are required")
    for name in PER_STAGE:
        if isinstance(getattr(args, name), tuple):
            get_parser().error(f"--{name.replace('_', '-')} takes three values only with --stage all")
    return run_stage(args)


if __name__ == "__main__":
    main()
