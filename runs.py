"""The run's plumbing for train.py: the run directory, its lock, args.json and the log, checkpoints and
exact resume, SIGTERM, the logging sinks, the argument checks, and the tests' fault injection.

Nothing here is the method (that is train.py, vat.py, taf.py); everything here is what lets a run of days
stop and go on without losing a step. Run directory `--out` (one per stage):

  args.json             the arguments, with a run_id (trainer_summary.json repeats it: is_finished)
  log.jsonl             one JSON line per logged step, each loss separately (write_record); sinks get the same
  checkpoint/           trainable weights (safetensors) + trainer_state.pt (optimizer, scheduler, step, data
                        position, every rank's RNG, the run's meta); written atomically (save_checkpoint).
                        Under --fsdp the weights and the optimizer are sharded/ instead, each rank's shards
                        (torch.distributed.checkpoint; save_sharded_checkpoint)
  model.safetensors, config.json, tokenizer, trainer_summary.json
                        the stage's output, written last
  .lock                 held while a run trains into --out (lock_out_dir)

docs/what-happens-when.md lists each failure and what the run does about it.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import threading
import uuid
import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException  # DCP's error: a BaseException, not an Exception

from distributed import (load_sharded_state, optimizer_state, read_whole, shard_like, shard_optimizer_state,
                         sharded_state, trainable_state)


# -----------------------------------------------------------------------------
# The run directory: what a previous run left, one run at a time

# what a run writes into --out (the tokenizer files are rewritten with the model; .lock is the lock); the last
# three are the --report-to sinks' (open_sinks): TensorBoard's event files, wandb's run id and its local files
RUN_FILES = ("args.json", "log.jsonl", "checkpoint", "checkpoint.old", "checkpoint.tmp", "model.safetensors",
             "config.json", "trainer_summary.json", "tensorboard", "wandb_id", "wandb")


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_finished(out: str) -> bool:
    """OUT holds a finished run: trainer_summary.json (written last) comes from the run whose args.json is
    there (the same run_id; runs saved before run ids existed have none in either file)."""
    args, summary = read_json(os.path.join(out, "args.json")), read_json(os.path.join(out, "trainer_summary.json"))
    return isinstance(args, dict) and isinstance(summary, dict) and args.get("run_id") == summary.get("run_id")


def _nothing_to_resume(out: str, found: list) -> str:
    why = []
    if os.path.isdir(os.path.join(out, "checkpoint")) or os.path.isdir(os.path.join(out, "checkpoint.old")):
        why.append("checkpoint/ has no trainer_state.pt (an incomplete checkpoint)")
    if os.path.isdir(os.path.join(out, "checkpoint.tmp")):
        why.append("only checkpoint.tmp/, a checkpoint whose write did not finish (if you know it is complete, "
                   "rename it to checkpoint/)")
    if not why:
        why.append("no checkpoint (the run stopped before its first --save-every checkpoint, or ran without "
                   "--save-every)" + ("; it finished" if is_finished(out) else ""))
    return (f"nothing to resume in {out}: it holds a run ({', '.join(found)}) but {'; '.join(why)}. Nothing was "
            f"changed (the log is kept). To start again: --overwrite without --resume.")


def prepare_out_dir(args) -> str:
    """Decide what this run does with --out, before anything loads (rank 0; --out is locked by then):
    - `--resume` with a usable checkpoint: resume ("resume");
    - `--resume` on an --out holding no run at all: start fresh (torchrun --max-restarts relaunches
      the same command) ("fresh");
    - `--resume` on a run without a usable checkpoint: an error saying so; nothing is touched;
    - no `--resume`: an --out holding anything of a previous run (RUN_FILES) is refused, unless
      `--overwrite`, which removes those files first (a run that then dies leaves no old model or
      summary beside its own args.json and log) ("fresh")."""
    out = args.out
    os.makedirs(out, exist_ok=True)
    found = [n for n in RUN_FILES if os.path.exists(os.path.join(out, n))]
    if args.resume:
        if find_checkpoint(out):
            return "resume"
        if found:
            raise ValueError(_nothing_to_resume(out, found))
        return "fresh"
    if found and not args.overwrite:
        raise ValueError(f"{out} holds a previous run ({', '.join(found)}): pass --resume to continue it or "
                         f"--overwrite to replace it")
    for name in found:
        p = os.path.join(out, name)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    return "fresh"


def write_run_files(args):
    """A fresh run's args.json (with a new run_id, which trainer_summary.json repeats: is_finished) and an
    empty log. --overwrite is not recorded: it says what to do with the directory, not how to train. The
    working directory is recorded too (`cwd`): relative --init / --teacher / --tokenizer paths are resolved
    against it when the run's checkpoint is opened from elsewhere (model.load_checkpoint_model)."""
    run = {k: v for k, v in vars(args).items() if k != "overwrite"}
    run["run_id"], run["cwd"] = uuid.uuid4().hex, os.getcwd()
    with open(os.path.join(args.out, "args.json"), "w", encoding="utf-8") as f:
        json.dump(run, f, indent=2)
    open(os.path.join(args.out, "log.jsonl"), "w", encoding="utf-8").close()


@contextlib.contextmanager
def lock_out_dir(out: str, enabled: bool = True):
    """An exclusive lock on OUT/.lock (fcntl.flock) for as long as the run lasts: a second training on the
    same --out stops with a clear error instead of interleaving logs and leaving whichever model came last.
    The OS drops the lock when the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    if not enabled or fcntl is None or not out:
        yield
        return
    os.makedirs(out, exist_ok=True)
    f = open(os.path.join(out, ".lock"), "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            who = f.read().strip() or "another process"
            raise RuntimeError(f"{out}: another training ({who}) holds the lock on this --out; wait for it to end "
                               f"or give another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()

def file_fingerprint(path: str) -> dict:
    """Size and sha256 of a data file, recorded in the checkpoint: --resume on a file whose content changed
    under the same path is refused (the data position would point into other samples)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"data_size": os.path.getsize(path), "data_sha256": h.hexdigest()}


def trim_log(log_path: str, step: int):
    """On resume from the checkpoint at `step`: drop the log lines of steps after it (they ran before the
    kill and run again now), so that each step is logged once. Rewritten atomically (tmp + rename)."""
    if not os.path.exists(log_path):
        return
    with open(log_path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        if rec.get("step", rec.get("at_step", 0)) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    with open(log_path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(log_path + ".tmp", log_path)



# arguments that do not change what a stage trains: a finished stage is still finished when these differ. Where
# the data is read from (--num-workers: the order is the sampler's, docs/training.md), what is logged and where
# (--report-to, --run-name, --quiet, ...), and how the same sums are computed: --fsdp (sharded, the same
# reductions in another order: float rounding only), --grad-checkpointing (recomputes the same forward; dropout
# masks replayed) and --kd-chunk (L_LM / L_KL summed in other chunks). --data-pretrain / --data-instruct: each
# stage's own data file is --data. Not here: --micro-batch (LoRA dropout draws its masks per micro-batch).
NOT_TRAINING = {"resume", "quiet", "device", "log_every", "save_every",
                "eval_sugarcrepe", "eval_coco_images", "eval_every", "eval_limit", "max_nonfinite",
                "trust_remote_code", "demo", "allow_non_rgb", "overwrite", "save_dtype", "dist_timeout",
                "num_workers", "report_to", "run_name", "fsdp", "grad_checkpointing", "kd_chunk",
                "data_pretrain", "data_instruct",
                "stop_after", "fail_at_step", "fail_rank"}  # the last three: test hooks that older runs recorded


def stage_finished(sub) -> bool:
    """--stage all --resume: True when sub.out holds a finished stage (trainer_summary.json) trained with these
    arguments; a finished stage with other arguments is an error naming them (retraining it silently would
    overwrite a result)."""
    path = os.path.join(sub.out, "trainer_summary.json")
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        done = json.load(f).get("args")
    if done is None:
        print(f"{path} records no arguments (an older run): stage {sub.stage} is trained again")
        return False
    now = json.loads(json.dumps(vars(sub), default=str))
    diff = sorted(k for k in set(done) | set(now) if k not in NOT_TRAINING and done.get(k) != now.get(k))
    if diff:
        raise ValueError(f"--resume: stage {sub.stage} in {sub.out} finished with other arguments: "
                         + ", ".join(f"--{k.replace('_', '-')} {done.get(k)!r} then vs {now.get(k)!r} now" for k in diff)
                         + "; give the same arguments, or another --out")
    return True


def resume_unfinished_stage(sub):
    """--stage all --resume, for a stage that has not finished (stage_finished False): resume its checkpoint;
    one that left files but no checkpoint at all (it died before its first --save-every) starts again, on its
    own: only its --out is cleared, the finished stages before it are kept (--overwrite would retrain them
    too). A checkpoint that cannot be used (checkpoint/ without trainer_state.pt, only checkpoint.tmp/) is still
    an error, telling to remove that stage's directory. Sets sub.resume / sub.overwrite."""
    if find_checkpoint(sub.out):
        return
    left = [n for n in ("checkpoint", "checkpoint.old", "checkpoint.tmp") if os.path.exists(os.path.join(sub.out, n))]
    found = [n for n in RUN_FILES if os.path.exists(os.path.join(sub.out, n))]
    if left:
        raise ValueError(_nothing_to_resume(sub.out, found).replace(
            "To start again: --overwrite without --resume.",
            f"To train stage {sub.stage} again (the finished stages before it are kept): remove {sub.out}, then "
            "--resume."))
    if found:
        print(f"stage {sub.stage}: {sub.out} holds an unfinished run without a checkpoint ({', '.join(found)}); "
              f"stage {sub.stage} starts again (the finished stages before it are kept)")
    sub.resume, sub.overwrite = False, True


# -----------------------------------------------------------------------------
# What a checkpoint was trained on: a fingerprint of its --init and --teacher files

def _safetensors_digest(path: str, sample: int = 4096) -> str:
    """sha256 of a safetensors file's header (every tensor's name, dtype, shape and byte range, and the
    metadata), its size, and the first and last `sample` bytes of every tensor. Reads a few KiB per tensor,
    not the file: a multi-GB checkpoint is fingerprinted in well under a second. What it catches: another
    architecture, dtype or vocabulary (the header), a truncated or padded file (the size), and re-trained or
    re-merged weights, which change every tensor they touch from its first bytes to its last (a LoRA merge, a
    fine-tuned adapter or LLM, another seed). What it cannot: an edit confined to the middle of a tensor."""
    import struct
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: not a safetensors file, or truncated (header of {n} bytes in {size})")
        header = f.read(n)
        h.update(header)
        try:
            entries = json.loads(header)
        except ValueError:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
        spans = sorted(tuple(v["data_offsets"]) for k, v in entries.items() if k != "__metadata__")
        for begin, end in spans:
            for start in sorted({begin, max(begin, end - sample)}):
                f.seek(8 + n + start)
                h.update(f.read(min(sample, end - start)))
    return h.hexdigest()


def source_fingerprint(source: str | None) -> dict | None:
    """{file: digest} of the files a model source (load_any's spelling) is read from: every top-level
    *.safetensors (_safetensors_digest) and config.json (sha256) of its directory, keyed by file name, so a
    directory moved whole still matches (parts:VISION,LLM,TOKENIZER: keyed DIR/name, each directory; a run's
    checkpoint/ holds trainable.safetensors). None for a preset (built
    from code and a seed) or no source. train.py records it in a checkpoint's meta ("init_fingerprint",
    "teacher_fingerprint"); --resume and load_checkpoint_model refuse a source whose files changed
    (check_fingerprint)."""
    if not source or source.startswith("preset:"):
        return None
    if source.startswith("parts:"):
        dirs = source.split(":", 1)[1].split(",")
    else:
        dirs = [source.split(":", 1)[1] if source.startswith("llava:") else source]
    out = {}
    for i, d in enumerate(dirs):
        if not os.path.isdir(d):
            continue  # load_any names a missing source itself
        for name in sorted(os.listdir(d)):
            f, key = os.path.join(d, name), name if len(dirs) == 1 else f"{d}/{name}"
            if name.endswith(".safetensors") and os.path.isfile(f):
                out[key] = _safetensors_digest(f)
            elif name == "config.json":
                with open(f, "rb") as fh:
                    out[key] = hashlib.sha256(fh.read()).hexdigest()
    return out


def check_fingerprint(recorded: dict | None, source: str | None, flag: str, checkpoint: str):
    """Refuse to put a checkpoint's trained weights on a `source` whose files are not the ones it was trained
    on (a directory re-made under the same path): a ValueError naming the flag, the path and each file that
    changed, appeared or disappeared. `recorded` None (a checkpoint written before fingerprints, or a
    preset): nothing to check."""
    if recorded is None:
        return
    now = source_fingerprint(source) or {}
    changed = sorted(f for f in recorded.keys() & now.keys() if recorded[f] != now[f])
    gone, new = sorted(recorded.keys() - now.keys()), sorted(now.keys() - recorded.keys())
    if changed or gone or new:
        what = "; ".join(x for x in (f"changed: {', '.join(changed)}" if changed else "",
                                     f"missing now: {', '.join(gone)}" if gone else "",
                                     f"new: {', '.join(new)}" if new else "") if x)
        raise ValueError(f"{checkpoint} was trained on {flag} {source}, whose files are not the same now ({what}): "
                         f"its trained weights would land on other base weights. Put back the {flag} the run "
                         "started from, or start again (--overwrite)")


def sources_trained_on(args, distill: bool) -> dict:
    """The checkpoint meta's fingerprints of the files the stage trains on (source_fingerprint):
    {"init_fingerprint"[, "teacher_fingerprint"]}. On --resume, checked first against what the checkpoint
    recorded: an --init or --teacher re-made under the same path is refused before any model loads (the
    trained LoRA / adapter would land on other base weights). A checkpoint without them (older) is not."""
    now = {"init_fingerprint": source_fingerprint(args.init),
           **({"teacher_fingerprint": source_fingerprint(args.teacher)} if distill else {})}
    resumed = find_checkpoint(args.out) if args.resume else None
    if resumed:
        meta = checkpoint_meta(resumed)
        for key, flag, source in (("init_fingerprint", "--init", args.init), ("teacher_fingerprint", "--teacher",
                                                                               args.teacher if distill else None)):
            if key in meta:
                check_fingerprint(meta[key], source, flag, resumed)
    return now


# -----------------------------------------------------------------------------
# Argument checks, before anything loads

# every size, count and rate on the command line: (flags, check, what it must be)
_ARG_RULES = (
    (("global_batch", "micro_batch", "log_every", "kd_chunk", "max_len", "lora_r", "max_nonfinite", "eval_limit",
      "vat_auto_samples"),
     lambda v: v > 0, "a positive integer"),
    (("max_steps", "save_every", "eval_every", "lora_alpha"), lambda v: v >= 0, "0 or more"),
    (("epochs", "kd_temperature", "lr", "dist_timeout"), lambda v: math.isfinite(v) and v > 0, "a positive number"),
    (("min_lr", "weight_decay", "grad_clip", "w_lm", "w_kl", "w_vat"), lambda v: math.isfinite(v) and v >= 0,
     "a number >= 0"),
    (("warmup_ratio", "lora_dropout"), lambda v: 0 <= v < 1, "in [0, 1)"),
)


def _input_paths(args) -> dict:
    """{flag: directory} of the models a run reads, to keep --out off them."""
    paths = {"--teacher": args.teacher}
    init = args.init or ""
    if init.startswith("llava:"):
        paths["--init"] = init.split(":", 1)[1]
    elif init.startswith("parts:"):
        for k, part in enumerate(init.split(":", 1)[1].split(",")):
            paths[f"--init (part {k + 1})"] = part
    elif init and not init.startswith("preset:"):
        paths["--init"] = init
    return {k: v for k, v in paths.items() if v}


def check_args(args) -> list:
    """Problems with the command line, each naming its flag, found before anything loads: sizes, counts and
    rates in range (a negative --global-batch hung, 0 divided by zero, --epochs 0 saved an untrained model),
    and an --out that is not one of the models the run reads (it would overwrite the teacher)."""
    problems = []
    for names, ok, what in _ARG_RULES:
        for name in names:
            v = getattr(args, name, None)
            for x in (v if isinstance(v, tuple) else (v,)):  # per-stage options hold three values
                if x is not None and not ok(x):
                    problems.append(f"--{name.replace('_', '-')} must be {what}, got {x}")
    if getattr(args, "fsdp", False) and "WORLD_SIZE" not in os.environ:
        problems.append("--fsdp shards over the processes torchrun starts: run it under torchrun "
                        "(torchrun --nproc_per_node N train.py ...; N = 1 works too)")
    div = getattr(args, "kd_divergence", "forward")
    if getattr(args, "cross_vocab", False) and div != "forward" and args.stage in ("1", "2", "all"):
        # ULD compares the two distributions sorted, with no token map between the vocabularies: there is no
        # forward / reverse / JSD choice to make there (losses.uld_loss), and the checkpoint would record one
        problems.append(f"--kd-divergence {div} does not apply with --cross-vocab: L_KL across vocabularies is ULD "
                        "(losses.uld_loss), which has no divergence to choose; drop --kd-divergence, or --cross-vocab")
    if getattr(args, "vat_text_rows", False) and (getattr(args, "vat_variant", "paper") != "paper"
                                                  or getattr(args, "cross_vocab", False)):
        problems.append("--vat-text-rows aligns Eq. 3's maps on the text rows after the image: it needs --vat-variant "
                        "paper and the same vocabulary (the official variant and --cross-vocab use the visual rows)")
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        problems.append("--resume and --overwrite exclude each other (continue the run, or replace it)")
    if args.out:
        outs = ([os.path.join(args.out, f"stage{k}") for k in "123"] if args.stage == "all" else [args.out])
        for flag, path in _input_paths(args).items():
            for out in outs:
                if os.path.realpath(out) == os.path.realpath(path):
                    problems.append(f"--out {out} is the model {flag} reads; the run would overwrite it")
    return problems


# -----------------------------------------------------------------------------
# Logging: log.jsonl is the record; Weights & Biases / TensorBoard receive the same records (`--report-to`)

SINK_PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("torch.utils.tensorboard", "tensorboard")}


def parse_report_to(value: str | None) -> list:
    """`--report-to none|wandb|tensorboard` (comma-separated) -> the sink names, [] for none. Each sink's package
    is imported here, so a missing one is an error naming it before any model loads; none is a dependency."""
    import importlib
    names = [n.strip() for n in (value or "none").split(",") if n.strip()]
    unknown = [n for n in names if n != "none" and n not in SINK_PACKAGES]
    if unknown or ("none" in names and len(names) > 1):
        raise ValueError(f"--report-to takes none, or one or more of {', '.join(SINK_PACKAGES)} separated by commas; "
                         f"got {value!r}")
    names = [n for n in names if n != "none"]
    for n in names:
        module, package = SINK_PACKAGES[n]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"--report-to {n} needs the '{package}' package, which is not installed "
                              f"(pip install {package}); log.jsonl is written without it ({e})") from None
    return names


def open_sinks(names: list, out: str, run_name: str | None, config: dict, resume: bool) -> list:
    """The sinks as (log(step, numbers), close) pairs, rank 0 only. wandb: project $WANDB_PROJECT (default
    compodistill), files under `out`, the run id kept in `out`/wandb_id so that a --resume continues the same
    run; TensorBoard: event files in `out`/tensorboard[/run_name]. Closed by close_sinks, or at exit."""
    import atexit
    sinks = []
    for n in names:
        if n == "wandb":
            import uuid
            import wandb
            id_path = os.path.join(out, "wandb_id")
            run_id = open(id_path, encoding="utf-8").read().strip() if resume and os.path.exists(id_path) else uuid.uuid4().hex[:16]
            with open(id_path, "w", encoding="utf-8") as f:
                f.write(run_id)
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "compodistill"), name=run_name, id=run_id,
                             resume="allow", dir=out, config=config)
            sinks.append((lambda step, nums, run=run: run.log(nums, step=step), run.finish))
        else:
            from torch.utils.tensorboard import SummaryWriter
            w = SummaryWriter(log_dir=os.path.join(out, "tensorboard", *([run_name] if run_name else [])))

            def log_tb(step, nums, w=w):
                for k, v in nums.items():
                    w.add_scalar(k, v, global_step=step)
                w.flush()
            sinks.append((log_tb, w.close))
    for _, close in sinks:
        atexit.register(close)  # a run that stops on an error still flushes what it logged
    return sinks


def sink_numbers(rec: dict) -> tuple:
    """(x, numbers) of one log.jsonl record for a sink: x = its "step" ("at_step" for a checkpoint line, "from_step"
    for the start line); numbers = every numeric field but "step", nested dicts and per-rank lists flattened as
    "outer/inner" and "outer/RANK"; strings are left out."""
    nums = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}/", v)
            elif isinstance(v, list):  # one number per rank (peak_gib): host/0, host/1, ...
                walk(f"{prefix}{k}/", {str(i): x for i, x in enumerate(v)})
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and f"{prefix}{k}" != "step":
                nums[f"{prefix}{k}"] = v
    walk("", rec)
    return int(rec.get("step", rec.get("at_step", rec.get("from_step", 0)))), nums


def write_record(log_path: str, rec: dict, sinks=()):
    """Append one record to log.jsonl (the source of truth), then hand the same record to every sink."""
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    x, nums = sink_numbers(rec)
    for log, _ in sinks:
        log(x, nums)


def close_sinks(sinks):
    import atexit
    for _, close in sinks:
        close()
        atexit.unregister(close)


# -----------------------------------------------------------------------------
# Checkpoints: atomic directory swap, exact resume

def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """This process's RNG state (torch CPU, CUDA, python random), as a checkpoint stores it."""
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(rng: dict):
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _disk_full(e: BaseException) -> bool:
    """ENOSPC however it arrives: an OSError, or safetensors' error text ("os error 28")."""
    return getattr(e, "errno", None) == errno.ENOSPC or "os error 28" in str(e) or "No space left" in str(e)


SHARDED = "sharded"  # inside checkpoint/: an --fsdp run's weights and optimizer, a torch.distributed.checkpoint dir


def _disk_full_error(tmp: str, final: str) -> OSError:
    return OSError(errno.ENOSPC, f"disk full (ENOSPC) while writing the checkpoint to {tmp}; the previous "
                   f"checkpoint ({final}) is left as it was. Free space there and --resume")


def _swap_in(out_dir: str, tmp: str, state: dict):
    """Rank 0: trainer_state.pt (written last: find_checkpoint looks for it) into `tmp`, every file and folder
    under it fsynced, then `tmp` swapped in for checkpoint/ by renames, so a crash at any moment leaves either
    the old or the new checkpoint loadable (load_checkpoint falls back to .old)."""
    final, old = os.path.join(out_dir, "checkpoint"), os.path.join(out_dir, "checkpoint.old")
    try:
        with open(os.path.join(tmp, "trainer_state.pt"), "wb") as f:  # a file object: ENOSPC stays an OSError
            torch.save(state, f)
        for folder, _, names in os.walk(tmp):
            for name in names:
                with open(os.path.join(folder, name), "rb") as f:
                    os.fsync(f.fileno())
            _fsync_dir(folder)
    except Exception as e:
        if not _disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_full_error(tmp, final) from None
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out_dir: str, weights: dict, optimizer_state: dict, scheduler, step: int, sampler_state: dict,
                    meta: dict, rng_per_rank: list | None = None):
    """A DDP (or 1-process) run's checkpoint/, written by rank 0: trainable weights (safetensors; `weights`,
    trainable_state) + trainer_state.pt (optimizer (`optimizer_state`, optimizer_state), scheduler, step, data
    position, RNG of every rank: `rng_per_rank`, gathered by checkpoint_all_ranks). Whole tensors: every DDP
    rank holds them anyway, and one safetensors file is what other tools read. Written to checkpoint.tmp/,
    fsynced, then swapped in (_swap_in). A full disk is an OSError(ENOSPC) naming the path (the previous
    checkpoint stays)."""
    from safetensors.torch import save_file
    final, tmp = os.path.join(out_dir, "checkpoint"), os.path.join(out_dir, "checkpoint.tmp")
    rng_per_rank = rng_per_rank or [rng_state()]
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(weights, os.path.join(tmp, "trainable.safetensors"))
    except Exception as e:
        if not _disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_full_error(tmp, final) from None
    _swap_in(out_dir, tmp, {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                            "sampler": sampler_state, "meta": meta, "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank})


def save_sharded_checkpoint(out_dir: str, model, optimizer, scheduler, step: int, sampler_state: dict, meta: dict,
                            rng_per_rank: list, master: bool):
    """An --fsdp run's checkpoint/ (a collective: every rank calls it): sharded/ holds the trainable weights and
    the optimizer state (distributed.sharded_state), each rank writing only its own shards with
    torch.distributed.checkpoint (no rank gathers a whole tensor: a 7B full-LLM student's weights and moments
    are 84 GB); trainer_state.pt the rest, as save_checkpoint's but without "optimizer". checkpoint.tmp/ and
    the swap as save_checkpoint (every rank's files are fsynced before it: DCP's sync_files, then rank 0's
    walk). --out must be a file system every rank sees (as --resume needs anyway)."""
    import torch.distributed.checkpoint as dcp
    final, tmp = os.path.join(out_dir, "checkpoint"), os.path.join(out_dir, "checkpoint.tmp")
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    try:
        dcp.save(sharded_state(model, optimizer),
                 storage_writer=dcp.FileSystemWriter(os.path.join(tmp, SHARDED), sync_files=True))
    except (Exception, CheckpointException) as e:  # DCP raises on every rank when any rank's write failed
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e):
            raise _disk_full_error(tmp, final) from None
        raise
    if master:
        _swap_in(out_dir, tmp, {"step": step, "scheduler": scheduler.state_dict(), "sampler": sampler_state,
                                "meta": meta, "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank})


def find_checkpoint(out_dir: str) -> str | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old exists only if a crash hit the swap
        p = os.path.join(out_dir, name)
        if os.path.exists(os.path.join(p, "trainer_state.pt")):
            return p
    return None


# meta fields recorded since a later version: a checkpoint without them is not refused for their absence
LATER_META = ("lr", "w_lm", "w_kl", "w_vat", "kd_temperature", "max_len", "data_size", "data_sha256",
              "init_fingerprint", "teacher_fingerprint")


def _corrupt(path: str, name: str, e: Exception) -> RuntimeError:
    """The checkpoint file cannot be read: say so, name it and the fallback. (torch's own message advises
    weights_only=False, i.e. unpickling arbitrary code: never.)"""
    old = os.path.join(os.path.dirname(path), "checkpoint.old")
    hint = (f" {old} holds the previous checkpoint: move it to {os.path.join(os.path.dirname(path), 'checkpoint')} "
            f"to resume from there, or start again with --overwrite." if os.path.isdir(old) and path != old
            else " Start again with --overwrite (without --resume).")
    return RuntimeError(f"the checkpoint {os.path.join(path, name)} is corrupt or truncated and cannot be read "
                        f"({type(e).__name__}).{hint}")


def checkpoint_meta(path: str) -> dict:
    """The meta dict a checkpoint was written with (what the run decided before its first step)."""
    try:
        return torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True, map_location="cpu")["meta"]
    except Exception as e:  # noqa: BLE001 - any unreadable file: the same clear message as load_checkpoint
        raise _corrupt(path, "trainer_state.pt", e) from None


def _check_trainable(path: str, shapes: dict, model):
    """The checkpoint's trainable weights ({name: shape}) are this model's trainable parameters."""
    own = dict(model.named_parameters())
    expected = {k for k, p in own.items() if p.requires_grad}
    if set(shapes) != expected:
        raise ValueError(f"{path}: trainable keys differ from this model's: missing "
                         f"{sorted(expected - set(shapes))[:6]}, unexpected {sorted(set(shapes) - expected)[:6]}")
    for k, shape in shapes.items():
        if tuple(own[k].shape) != tuple(shape):  # a DTensor's shape is the whole tensor's
            raise ValueError(f"{path}: {k} has shape {tuple(shape)}, model has {tuple(own[k].shape)}")


def _load_sharded(path: str, model, optimizer):
    """An --fsdp checkpoint's sharded/ into this run's model and optimizer: each rank reads what it holds
    (its shards under --fsdp, at any world size; whole tensors under DDP or in one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    where = os.path.join(path, SHARDED)
    try:
        stored = dcp.FileSystemReader(where).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - a missing or truncated .metadata
        raise _corrupt(path, os.path.join(SHARDED, ".metadata"), e) from None
    _check_trainable(path, {k[len("model."):]: m.size for k, m in stored.items()
                            if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}, model)
    state = sharded_state(model, optimizer)
    try:
        with warnings.catch_warnings():  # one process without a process group: DCP warns that it assumes so
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=where, no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a truncated or missing shard file
        raise _corrupt(path, SHARDED, e) from None
    load_sharded_state(model, optimizer, state)


def load_checkpoint(path: str, model, optimizer, scheduler, meta: dict, rank: int = 0) -> dict:
    """Restore trainable weights, optimizer, scheduler and this rank's RNG; returns the trainer state.
    Either format loads into either kind of run: a DDP checkpoint's whole tensors are split like an --fsdp
    run's parameters (shard_like), an --fsdp checkpoint's shards are read as each rank needs them (DCP
    reshards, to any world size; a collective when a process group is up: every rank calls this).
    Refuses a checkpoint written for another model/stage/run setting (names the mismatching fields or
    keys); a corrupt file is an error naming it."""
    from safetensors.torch import load_file
    try:
        state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, ...
        raise _corrupt(path, "trainer_state.pt", e) from None
    diff = {k: (state["meta"].get(k), meta.get(k)) for k in {**state["meta"], **meta}
            if state["meta"].get(k) != meta.get(k) and not (k in LATER_META and k not in state["meta"])}
    if diff:
        raise ValueError(f"{path} was written by another run: " +
                         ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items()) +
                         " (resume with the same settings and data)")
    if os.path.isdir(os.path.join(path, SHARDED)):
        _load_sharded(path, model, optimizer)
    else:
        try:
            weights = load_file(os.path.join(path, "trainable.safetensors"))
        except Exception as e:  # noqa: BLE001
            raise _corrupt(path, "trainable.safetensors", e) from None
        _check_trainable(path, {k: v.shape for k, v in weights.items()}, model)
        own = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in weights.items():
                own[k].copy_(shard_like(v.to(own[k].dtype), own[k]))
        optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], optimizer))
    scheduler.load_state_dict(state["scheduler"])
    per_rank = state.get("rng_per_rank") or [state["rng"]]  # older checkpoints: rank 0's only
    set_rng_state(per_rank[rank] if rank < len(per_rank) else per_rank[0])
    return state


def checkpoint_weights(path: str) -> dict:
    """A checkpoint's trainable weights, whole, on the CPU, in this process alone, whichever format
    (model.load_checkpoint_model: evaluating RUN/checkpoint)."""
    from safetensors.torch import load_file
    if os.path.isdir(os.path.join(path, SHARDED)):
        try:
            return read_whole(os.path.join(path, SHARDED), "model")
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            raise _corrupt(path, SHARDED, e) from None
    try:
        return load_file(os.path.join(path, "trainable.safetensors"))
    except Exception as e:  # noqa: BLE001
        raise _corrupt(path, "trainable.safetensors", e) from None


def checkpoint_all_ranks(args, student, optimizer, scheduler, step: int, steps_per_epoch: int, meta: dict,
                         ddp: bool, master: bool):
    """Every rank's RNG state is gathered (LoRA dropout draws differ per rank, so rank 0's state alone does
    not resume the others exactly); then under --fsdp every rank writes its shards (save_sharded_checkpoint),
    else rank 0 writes the whole tensors (save_checkpoint); all wait for it. (`ddp`: a process group is up.)"""
    states = [rng_state()]
    if ddp:
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng_state())
    position = {"epoch": step // steps_per_epoch, "step": step % steps_per_epoch}
    if getattr(args, "fsdp", False):
        save_sharded_checkpoint(args.out, student, optimizer, scheduler, step, position, meta, states, master)
    elif master:
        save_checkpoint(args.out, trainable_state(student), optimizer_state(optimizer), scheduler, step, position,
                        meta, rng_per_rank=states)
    if ddp:
        dist.barrier()


# -----------------------------------------------------------------------------
# SIGTERM, and the messages a run stops with

_SIGTERM = {"received": False}


@contextlib.contextmanager
def sigterm_checkpoints():
    """While a stage runs, SIGTERM (what schedulers send before a kill) only raises a flag; the loop ends the
    step, saves a checkpoint and exits with 143 (128 + SIGTERM). The previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _SIGTERM["received"] = False
    prev = signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.update(received=True))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)


def guarded(run):
    """run_stage with --out locked (lock_out_dir, rank 0 only) and SIGTERM handled (sigterm_checkpoints),
    both released however the stage ends."""
    @functools.wraps(run)
    def stage(args):
        with lock_out_dir(args.out, enabled=int(os.environ.get("RANK", "0")) == 0), sigterm_checkpoints():
            return run(args)
    return stage

def sigterm_stop(args, step: int, bad_in_a_row: int, last_checkpoint, save, master: bool):
    """After SIGTERM: save a checkpoint of the finished step (unless a non-finite streak is open), say so on
    stderr, exit 143."""
    if bad_in_a_row == 0 and last_checkpoint != step:
        save()
        last_checkpoint = step
    if master:
        where = (f"checkpoint of step {last_checkpoint} in {os.path.join(args.out, 'checkpoint')}; continue with --resume"
                 if last_checkpoint is not None else "no checkpoint (a non-finite streak was open)")
        print(f"SIGTERM: stopped after step {step}: {where}", file=sys.stderr, flush=True)
    raise SystemExit(143)


def nonfinite_message(args, step: int, bad_in_a_row: int, stats, last_checkpoint: int | None) -> str:
    """Why the run stops after --max-nonfinite bad steps: WHAT went non-finite (a NaN teacher is not the
    student's --lr) and which checkpoint, if any, there is to resume from."""
    lm, kd, vat_l, gnorm, teacher_bad = (stats[i].item() for i in (0, 1, 2, 3, 5))
    what = []
    if teacher_bad:
        what.append(f"the teacher's hidden states ({args.teacher})")
    if not math.isfinite(lm):
        what.append("the student's L_LM")
    if not math.isfinite(kd) and not teacher_bad:
        what.append("L_KL")
    if not math.isfinite(vat_l):
        what.append("L_ADL")
    if math.isfinite(lm) and math.isfinite(kd) and math.isfinite(vat_l) and not math.isfinite(gnorm):
        what.append("the gradient norm")
    advice = (f"The teacher itself is non-finite: check its weights (a forward pass of {args.teacher} alone) or "
              f"its dtype; the student's settings do not cause this." if teacher_bad
              else "Try a lower --lr, --grad-clip, or fp32.")
    where = (f"The last checkpoint, {os.path.join(args.out, 'checkpoint')} (step {last_checkpoint}), was saved before "
             f"the streak: --resume starts from it." if last_checkpoint is not None
             else "There is no checkpoint to resume from (none was saved before the streak).")
    return (f"{bad_in_a_row} consecutive non-finite steps at step {step} ({', '.join(what) or 'losses'}); "
            f"stopping. {where} {advice}")


def out_of_memory_message(args, device) -> str:
    return (f"out of memory on {device} at micro-batch {args.micro_batch} x max_len {args.max_len}. Turn, in this "
            f"order: --micro-batch (smaller; --global-batch stays, gradient accumulation makes up the rest), "
            f"--grad-checkpointing (on: {args.grad_checkpointing}), --kd-chunk (smaller: {args.kd_chunk}), "
            f"--max-len (shorter: {args.max_len}; with --drop-overlong for the few long samples).")



@contextlib.contextmanager
def out_of_memory_advice(args, device):
    """Around the step: an out-of-memory error (CUDA's, or the CPU allocator's) becomes one that says which
    flags to turn (out_of_memory_message), the original chained."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise RuntimeError(out_of_memory_message(args, device)) from e
    except RuntimeError as e:
        if "can't allocate memory" not in str(e) and "out of memory" not in str(e):
            raise
        raise RuntimeError(out_of_memory_message(args, device)) from e


def sigterm_received() -> bool:
    """Whether SIGTERM arrived since the stage started (sigterm_checkpoints); the loop shares it over the ranks."""
    return _SIGTERM["received"]


# -----------------------------------------------------------------------------
# Fault injection, for the tests only: $COMPODISTILL_FAULT is never set in a real run

FAULT_ENV = "COMPODISTILL_FAULT"


class SimulatedKill(SystemExit):
    """The stage stopped after a step as a kill would have left it: no model saved, the checkpoint and the
    log as they were. Exit status 0, so that a torchrun job stopped this way is not restarted."""


def inject_fault(step: int, total_steps: int, rank: int):
    """Called after each step (`step` steps done). $COMPODISTILL_FAULT (unset: nothing happens):
      stop_after=N     every rank stops after step N (SimulatedKill), as if the job were killed there;
      die_at=N,rank=R  rank R dies with os._exit(17) after step N, on torchrun's first attempt only, so that
                       torchrun --max-restarts restarts the job (the others meet it in a collective)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or step >= total_steps:
        return
    fault = {k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
    if "die_at" in fault and step == fault["die_at"] and rank == fault.get("rank", 0) \
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os._exit(17)
    if "stop_after" in fault and step >= fault["stop_after"]:
        raise SimulatedKill(0)


# -----------------------------------------------------------------------------
# Memory per phase: what log.jsonl records as "peak_gib" (load, data, each logged step, validation, checkpoint)

def release_freed_host_memory() -> bool:
    """Hand the pages that freed tensors left in the C heap back to the OS (glibc's `malloc_trim(0)`). Loading
    reads whole tensors that are then sharded, cast or dropped (the student under --fsdp, TAF's teacher parts);
    glibc keeps most of those pages, so every rank stayed about 3 GiB above its shards on the CPU rehearsal
    (`bench.py --rehearsal`). -> whether anything was trimmed; False where the C library is not glibc."""
    import ctypes
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return False


def _host_peak_and_reset() -> float:
    """This process's peak resident memory (VmHWM) since the last reset, in GiB, then a fresh count (Linux:
    writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS). Elsewhere: ru_maxrss, never reset."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return kib / 2 ** 20
    except (OSError, StopIteration, ValueError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def peak_memory(distributed: bool, device) -> dict:
    """Peak memory of every rank over the phase that just ended, then a fresh count: {"host": [GiB per rank],
    "cuda": [GiB per rank] (on CUDA)}. A collective under torchrun: every rank calls it at the same point."""
    mine = [_host_peak_and_reset()]
    if device.type == "cuda":
        mine.append(torch.cuda.max_memory_allocated(device) / 2 ** 30)
        torch.cuda.reset_peak_memory_stats(device)
    every = [mine]
    if distributed:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    out = {"host": [round(m[0], 3) for m in every]}
    if device.type == "cuda":
        out["cuda"] = [round(m[1], 3) for m in every]
    return out
