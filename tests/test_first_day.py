"""What a researcher hits on the first day with real checkpoints (issue 17, "The first day", items 1-10):
"downloaded" checkpoints are built here with save_pretrained at tiny shapes (random weights)."""
import json
import logging
import os
import shutil
import time

import pytest
import torch
from PIL import Image

import attention
import data
import evaluate as E
import model as M
import shapes
import runs
import train
from conftest import killed_after, llava_args, small_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory, "firstday", seed=3, n_images=16, n_sugarcrepe=1, n_val=1)


def _args(world, out, *extra, init="preset:student"):
    return llava_args(world, out, "--lora-r", "4", "--lora-alpha", "8", *extra, init=init, trainable="adapter+lora",
                      lr="1e-3")


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _tokenizer_without_image(out_dir, vocab_size=600):
    """A hub-like tokenizer: ChatML template, eos <|im_end|>, no <image> token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(shapes.world_vocabulary_corpus()), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                 additional_special_tokens=["<|im_start|>"])
    hf.chat_template = shapes.CHATML_TEMPLATE
    hf.save_pretrained(out_dir)
    return hf


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A SigLIP vision checkpoint with its own preprocessor_config.json (a non-default mean), and a Qwen2 LLM
    in bf16 whose tokenizer has no <image> (as on the hub)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, SiglipImageProcessorPil
    root = tmp_path_factory.mktemp("parts")
    _tokenizer_without_image(str(root / "qwen"))
    tok = data.load_tokenizer(str(root / "qwen"))  # as the hub's loads (it may add a token of its own)
    assert "<image>" not in tok.get_vocab()
    torch.manual_seed(0)
    vcfg = AutoConfig.for_model("siglip_vision_model", image_size=32, patch_size=8, hidden_size=32,
                                intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    AutoModel.from_config(vcfg).save_pretrained(root / "siglip")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3],
                            image_std=[0.5, 0.5, 0.5]).save_pretrained(root / "siglip")
    for _ in range(2):  # the LLM's config.json decides the tokenizer class (Qwen2Tokenizer), hence its length
        tcfg = AutoConfig.for_model("qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        AutoModelForCausalLM.from_config(tcfg).to(torch.bfloat16).save_pretrained(root / "qwen")
        tok = data.load_tokenizer(str(root / "qwen"))
    return str(root / "siglip"), str(root / "qwen"), len(tok)


# --- 1. parts: a hub tokenizer without <image> ------------------------------------------------------------

def test_parts_adds_the_image_token_and_resizes_and_the_run_saves_it(world, parts, tmp_path):
    vision, llm, n_vocab = parts
    model, tok, proc = M.load_any(f"parts:{vision},{llm},{llm}")
    assert len(tok) == n_vocab + 1 and tok.convert_tokens_to_ids("<image>") == n_vocab
    assert "<|im_start|>" in tok.all_special_tokens  # the existing special tokens are kept
    assert model.image_token_id == n_vocab
    assert model.language_model.get_input_embeddings().weight.shape[0] >= len(tok)
    # a tokenizer that has <image> is used as is
    world_tok = os.path.join(world, "tokenizer")
    n_world = len(data.load_tokenizer(world_tok))
    _, tok2, _ = M.load_any(f"parts:{vision},{llm},{world_tok}")
    assert len(tok2) == n_world
    # --- 9. the vision checkpoint's preprocessor_config.json is used, not a processor rebuilt from the size
    assert list(proc.image_mean) == [0.1, 0.2, 0.3]
    # the README's command line, through training; the saved run has <image>, the processor, and the
    # LLM's bf16 (6h: --save-dtype defaults to the dtype the LLM came in)
    out = str(tmp_path / "run")
    train.main(_args(world, out, "--max-steps", "1", init=f"parts:{vision},{llm},{llm}"))
    saved = data.load_tokenizer(out)
    assert saved.convert_tokens_to_ids("<image>") == n_vocab
    from safetensors.torch import load_file
    saved_w = load_file(os.path.join(out, "model.safetensors"))
    # the LLM in bf16; the projector (trained) in fp32 always (issue 38 item 8); the frozen tower in the dtype it
    # came in (fp32 SigLIP), so TAF finds it unchanged (issue 41 item 1)
    assert {v.dtype for k, v in saved_w.items() if not k.startswith(("projector.", "vision_tower."))} == {torch.bfloat16}
    assert {v.dtype for k, v in saved_w.items() if k.startswith(("projector.", "vision_tower."))} == {torch.float32}
    again, _, proc2 = M.load_pretrained(out)
    assert list(proc2.image_mean) == [0.1, 0.2, 0.3]
    assert {p.dtype for p in again.parameters()} == {torch.float32}  # loaded as fp32 master weights
    out32 = str(tmp_path / "run32")
    train.main(_args(world, out32, "--max-steps", "1", "--save-dtype", "float32", init=f"parts:{vision},{llm},{llm}"))
    assert {v.dtype for v in load_file(os.path.join(out32, "model.safetensors")).values()} == {torch.float32}


# --- 2. one spelling of a model source everywhere -----------------------------------------------------------

@pytest.fixture(scope="module")
def llava_dir(world, tmp_path_factory):
    """An HF LLaVA checkpoint on the world's tokenizer, with the tiny presets' vision shape (16 visual tokens,
    64 px) so that it can teach the student preset."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig
    tok = data.load_tokenizer(os.path.join(world, "tokenizer"))
    torch.manual_seed(0)
    vcfg = SiglipVisionConfig(**{k: v for k, v in M.TINY_VISION.items() if k != "model_type"})
    tcfg = Qwen2Config(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu")
    path = str(tmp_path_factory.mktemp("llava") / "llava-hf")
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_an_hf_llava_checkpoint_is_read_everywhere_a_model_is(world, llava_dir, tmp_path):
    a, _, _ = M.load_any(llava_dir)  # recognised by its config (model_type llava), no prefix needed
    b, _, _ = M.load_any("llava:" + llava_dir)
    ids = torch.tensor([[5] + [a.image_token_id] * 16 + [6, 7]])
    pv = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a.eval()(ids, None, pv)["logits"], b.eval()(ids, None, pv)["logits"])
    # evaluate.py --model
    res = E.main(["cr", "--model", llava_dir, "--sugarcrepe", os.path.join(world, "sugarcrepe"), "--limit", "1",
                  "--out", str(tmp_path / "eval")])
    assert res["benchmarks"]["sugarcrepe"]["complete"]
    # attention.py distance --teacher / --student
    rep = attention.main(["distance", "--teacher", "llava:" + llava_dir, "--student", llava_dir, "--sugarcrepe",
                          os.path.join(world, "sugarcrepe"), "--limit", "1", "--out", str(tmp_path / "att")])
    assert abs(next(iter(rep["students"].values()))["attn_dist"]) < 1e-5  # the same model twice
    # --teacher (stage 2, no TAF: another vision encoder) and --init
    out = str(tmp_path / "s2")
    train.main([*_args(world, out, "--max-steps", "1", "--no-taf")[2:], "--stage", "2", "--teacher", llava_dir])
    assert all(r["kd"] > 0 for r in _log(out) if "kd" in r)
    train.main(_args(world, str(tmp_path / "ft"), "--max-steps", "1", init=llava_dir))


# --- 3. grayscale / RGBA images are converted by default, and counted --------------------------------------

def test_grayscale_and_rgba_images_are_converted_by_default_and_counted(world, tmp_path, monkeypatch):
    w = str(tmp_path / "w")
    shutil.copytree(world, w)
    monkeypatch.setenv("COMPODISTILL_CACHE", str(tmp_path / "cache"))
    samples = data.load_llava_json(os.path.join(w, "instruct.json"))
    files = sorted({s["image"] for s in samples if s.get("image")})[:2]
    Image.open(os.path.join(w, files[0])).convert("L").save(os.path.join(w, files[0]))
    Image.open(os.path.join(w, files[1])).convert("RGBA").save(os.path.join(w, files[1]))
    n = sum(s.get("image") in files for s in samples)
    out = str(tmp_path / "run")
    train.main(_args(w, out, "--max-steps", "1"))
    assert json.load(open(os.path.join(out, "trainer_summary.json")))["converted_non_rgb"] == n
    assert _log(out)[0]["converted_non_rgb"] == n
    train.main(_args(w, str(tmp_path / "old"), "--max-steps", "1", "--allow-non-rgb"))  # old command lines work
    with pytest.raises(ValueError, match="not RGB"):
        train.main(_args(w, str(tmp_path / "strict"), "--max-steps", "1", "--strict-rgb"))


# --- 4. TAF checks the feature layer and the select strategy -----------------------------------------------

def test_taf_refuses_a_student_reading_other_vision_features(tokenizer, parts):
    teacher = M.from_preset("teacher", tokenizer)
    other_layer = M.from_preset("student", tokenizer)
    other_layer.vision_feature_layer = 1
    with pytest.raises(ValueError, match="vision_feature_layer: teacher 0 vs student 1"):
        train.apply_taf(other_layer, teacher)
    other_strategy = M.from_preset("student", tokenizer)
    other_strategy.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        train.apply_taf(other_strategy, teacher)
    train.apply_taf(M.from_preset("student", tokenizer), teacher)  # the same: fine
    # the options reach a model built from parts
    vision, llm, _ = parts
    args = train.get_parser().parse_args(["--init", f"parts:{vision},{llm},{llm}", "--vision-feature-layer", "-1",
                                          "--vision-feature-select-strategy", "default"])
    m, _, _ = train.build_student(args)
    assert m.vision_feature_layer == -1 and m.vision_feature_select_strategy == "default"
    assert m.num_visual_tokens == 15  # 4x4 patches, the first dropped
    args = train.get_parser().parse_args(["--init", f"parts:{vision},{llm},{llm}", "--vision-feature-layer=-1,-2"])
    assert train.build_student(args)[0].d_vision == 64


# --- 5 and 8. --stage all: per-stage values, finished stages skipped on --resume ---------------------------

def _stage_all(world, teacher, out, *extra):
    return ["--stage", "all", "--init", "preset:student", "--tokenizer", os.path.join(world, "tokenizer"),
            "--teacher", teacher, "--data-pretrain", os.path.join(world, "pretrain.json"),
            "--data-instruct", os.path.join(world, "instruct.json"), "--image-folder", world, "--out", out,
            "--global-batch", "8", "--micro-batch", "4", "--max-len", "256", "--lora-r", "4", "--lora-alpha", "8",
            "--quiet", *extra]


@pytest.fixture(scope="module")
def teacher_dir(world, tmp_path_factory):
    tok = data.load_tokenizer(os.path.join(world, "tokenizer"))
    path = str(tmp_path_factory.mktemp("teacher") / "teacher")
    M.save_pretrained(M.from_preset("teacher", tok), path, tok)
    return path


def test_stage_all_takes_per_stage_values(world, teacher_dir, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(train, "run_stage", lambda a: seen.append((a.max_steps, a.lr, a.global_batch, a.epochs)))
    train.main(_stage_all(world, teacher_dir, str(tmp_path / "x"), "--max-steps", "100,50,200", "--lr",
                          "2e-4,2e-4,1e-4", "--global-batch", "8,16,8", "--epochs", "1,2,3"))
    assert seen == [(100, 2e-4, 8, 1.0), (50, 2e-4, 16, 2.0), (200, 1e-4, 8, 3.0)]
    seen.clear()
    train.main(_stage_all(world, teacher_dir, str(tmp_path / "x"), "--max-steps", "7", "--lr", "3e-4"))
    assert seen == [(7, 3e-4, 8, 1.0)] * 3
    with pytest.raises(SystemExit):  # three values without --stage all: an argparse error naming the flag
        train.main(_args(world, str(tmp_path / "y"), "--max-steps", "1,2,3"))


def test_stage_all_resume_skips_the_finished_stages(world, teacher_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "cd")
    train.main(_stage_all(world, teacher_dir, out, "--max-steps", "1,2,1", "--lr", "1e-3,2e-3,3e-3"))
    logs = [[r for r in _log(os.path.join(out, f"stage{k}")) if "lm" in r] for k in (1, 2, 3)]
    assert [len(x) for x in logs] == [1, 2, 1]
    assert [x[0]["lr"] for x in logs] == [1e-3, 2e-3, 3e-3]  # warmup of 1 step: the first step's lr is --lr
    ran = []
    real = train.run_stage
    monkeypatch.setattr(train, "run_stage", lambda a: (ran.append(a.stage), real(a)))
    train.main(_stage_all(world, teacher_dir, out, "--max-steps", "1,2,1", "--lr", "1e-3,2e-3,3e-3", "--resume"))
    assert ran == []  # every stage had finished
    # options that do not change the trained weights (runs.NOT_TRAINING) keep a finished stage finished
    train.main(_stage_all(world, teacher_dir, out, "--max-steps", "1,2,1", "--lr", "1e-3,2e-3,3e-3", "--resume",
                          "--num-workers", "0", "--run-name", "again", "--report-to", "none", "--grad-checkpointing"))
    assert ran == []
    # a stage that left files but neither a summary nor a checkpoint (it died before its first --save-every):
    # that stage alone starts again; the finished stages 1 and 2 are kept (--overwrite would retrain them too)
    run_ids = [json.load(open(os.path.join(out, f"stage{k}", "args.json")))["run_id"] for k in (1, 2, 3)]
    os.remove(os.path.join(out, "stage3", "trainer_summary.json"))
    train.main(_stage_all(world, teacher_dir, out, "--max-steps", "1,2,1", "--lr", "1e-3,2e-3,3e-3", "--resume"))
    assert ran == ["3"] and runs.is_finished(os.path.join(out, "stage3"))
    now = [json.load(open(os.path.join(out, f"stage{k}", "args.json")))["run_id"] for k in (1, 2, 3)]
    assert now[:2] == run_ids[:2] and now[2] != run_ids[2] and len(_log(os.path.join(out, "stage3"))) == 1 + 1
    # a checkpoint that cannot be used (only checkpoint.tmp/): an error whose advice keeps the finished stages
    os.remove(os.path.join(out, "stage3", "trainer_summary.json"))
    os.makedirs(os.path.join(out, "stage3", "checkpoint.tmp"))
    with pytest.raises(ValueError, match=r"nothing to resume in .*stage3.*To train stage 3 again \(the finished "
                                         r"stages before it are kept\): remove .*stage3, then --resume"):
        train.main(_stage_all(world, teacher_dir, out, "--max-steps", "1,2,1", "--lr", "1e-3,2e-3,3e-3", "--resume"))
    assert ran == ["3"]
    with pytest.raises(ValueError, match=r"stage 1 .* finished with other arguments: --lr 0.001 then vs 0.005"):
        train.main(_stage_all(world, teacher_dir, out, "--max-steps", "1,2,1", "--lr", "5e-3", "--resume"))


# --- 6. in-loop validation, throughput, resumed logs, messages, llava-hf templates, silent loads ----------

def test_in_loop_validation_takes_the_coco_images_folder(world, tmp_path):
    sc = str(tmp_path / "sugarcrepe")
    os.makedirs(os.path.join(sc, "data"))
    for f in os.listdir(os.path.join(world, "sugarcrepe")):
        if f.endswith(".json"):
            shutil.copy(os.path.join(world, "sugarcrepe", f), os.path.join(sc, "data", f))
    out = str(tmp_path / "run")
    train.main(_args(world, out, "--max-steps", "1", "--eval-sugarcrepe", sc, "--eval-every", "1",
                     "--eval-coco-images", os.path.join(world, "sugarcrepe", "images")))
    assert [r["step"] for r in _log(out) if "val_cr" in r] == [1]


def test_tokens_per_s_is_not_charged_with_validation_or_checkpoints(world, tmp_path, monkeypatch):
    monkeypatch.setattr(E, "validate_cr", lambda *a, **k: (time.sleep(1.0), {"val_cr": 0.0, "val_cr_subsets": {}})[1])
    save = runs.save_checkpoint
    monkeypatch.setattr(runs, "save_checkpoint", lambda *a, **k: (time.sleep(1.0), save(*a, **k)))
    out = str(tmp_path / "run")
    train.main(_args(world, out, "--max-steps", "6", "--eval-sugarcrepe", os.path.join(world, "sugarcrepe"),
                     "--eval-every", "2", "--save-every", "3"))
    tps = [r["tokens_per_s"] for r in _log(out) if "tokens_per_s" in r]
    assert len(tps) == 6
    median = sorted(tps)[3]
    assert min(tps) > 0.3 * median, tps  # a 1 s pause would cut the rate after steps 2, 3, 4 to a few %


def test_drop_overlong_names_the_flag_and_prints_what_it_dropped(world, tmp_path, capsys):
    tok = data.load_tokenizer(os.path.join(world, "tokenizer"))
    samples = data.load_llava_json(os.path.join(world, "instruct.json"))
    img = tok.convert_tokens_to_ids("<image>")
    with pytest.raises(ValueError, match="--drop-overlong") as e:
        data.SupervisedDataset(samples, tok, None, world, 16, img, max_len=20)
    assert "drop_overlong=True`" not in str(e.value) and "--max-len" in str(e.value)
    # a max_len that drops some samples but leaves a global batch of 8
    for max_len in range(20, 256, 4):
        ds = data.SupervisedDataset(samples, tok, None, world, 16, img, max_len=max_len, drop_overlong=True)
        if ds.dropped and len(ds) >= 8:
            break
    out = str(tmp_path / "run")
    capsys.readouterr()
    train.main(_args(world, out, "--max-steps", "1", "--max-len", str(max_len), "--drop-overlong"))
    printed = capsys.readouterr().out
    assert f"--drop-overlong: dropped {len(ds.dropped)} of {len(samples)} samples" in printed
    assert _log(out)[0]["dropped_overlong"] == len(ds.dropped)


def test_a_llava_hf_chat_template_in_chat_template_json_is_used(llava_dir, tmp_path):
    path = str(tmp_path / "llava-hf")
    shutil.copytree(llava_dir, path)
    os.remove(os.path.join(path, "chat_template.jinja"))  # the tokenizer itself has no template
    cfg = json.load(open(os.path.join(path, "tokenizer_config.json")))
    cfg.pop("chat_template", None)
    json.dump(cfg, open(os.path.join(path, "tokenizer_config.json"), "w"))
    with open(os.path.join(path, "chat_template.json"), "w") as f:  # the processor's, as llava-hf ships it
        json.dump({"chat_template": shapes.CHATML_TEMPLATE}, f)
    model, tok, _ = M.load_any(path)
    assert tok.chat_template == shapes.CHATML_TEMPLATE
    ids = data.render_prompt(tok, [{"role": "user", "content": "<image>\nWhat is it?"}], model.num_visual_tokens,
                             model.image_token_id)
    assert "What is it?" in tok.decode(ids)


def test_loading_a_saved_run_with_a_large_vocabulary_is_silent(tmp_path, tokenizer):
    """transformers warns of an "incorrect regex pattern" when a > 100k-token tokenizer is loaded from a
    directory whose config.json has neither transformers_version nor model_type (it takes it for an old
    Mistral checkpoint); the saved config records transformers_version."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(100_050)}
    vocab["<unk>"] = len(vocab)
    big = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    big_tok = PreTrainedTokenizerFast(tokenizer_object=big, unk_token="<unk>", eos_token="t1", pad_token="t0")
    M.save_pretrained(M.from_preset("student", tokenizer), str(tmp_path / "m"), big_tok)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        M.load_pretrained(str(tmp_path / "m"))
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "regex" in r.getMessage()], [r.getMessage() for r in records]


# --- 7. a stage checkpoint can be evaluated ------------------------------------------------------------------

def test_a_stage_checkpoint_is_evaluated_as_the_run_would_save_it(world, teacher_dir, tmp_path):
    """Stage 2 (TAF + LoRA) killed after its step-2 checkpoint: RUN/checkpoint loads as the run's init + the
    teacher's adapter + the checkpoint's trainable weights, LoRA merged; evaluate.py --model takes it."""
    out = str(tmp_path / "s2")
    args = [*_args(world, out, "--max-steps", "4", "--save-every", "2")[2:], "--stage", "2",
            "--teacher", teacher_dir]
    with killed_after(3):
        train.main(args)
    with pytest.raises(ValueError, match="has not finished"):
        M.load_any(out)
    got, tok, _ = M.load_any(os.path.join(out, "checkpoint"))
    # reference: the training code's own path (build, TAF, set_trainable = LoRA) + the saved trainable weights
    from safetensors.torch import load_file
    a = train.get_parser().parse_args(args)
    ref, _, _ = train.build_student(a)
    train.apply_taf(ref, M.load_pretrained(teacher_dir)[0])
    train.set_trainable(ref, a)
    weights = load_file(os.path.join(out, "checkpoint", "trainable.safetensors"))
    assert set(weights) == {k for k, p in ref.named_parameters() if p.requires_grad}
    ref.load_state_dict(weights, strict=False)
    train.merge_lora(ref)
    ids = torch.tensor([[5] + [got.image_token_id] * 16 + [6, 7]])
    pv = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(got.eval()(ids, None, pv)["logits"], ref.eval()(ids, None, pv)["logits"], atol=1e-6)
    res = E.main(["cr", "--model", os.path.join(out, "checkpoint"), "--sugarcrepe", os.path.join(world, "sugarcrepe"),
                  "--limit", "1"])
    assert res["benchmarks"]["sugarcrepe"]["complete"]
    assert os.path.exists(os.path.join(out, "eval_step2", "cr_results.json"))  # beside, not inside, checkpoint/


# --- 9. LLaVA-1.5's pad-to-square ------------------------------------------------------------------------------

def test_pad_to_square_uses_the_processors_mean_colour():
    from transformers import SiglipImageProcessorPil
    base = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    padded = M.image_processor_for(_Cfg(), base, "pad")
    x = padded(images=[wide], return_tensors="pt")["pixel_values"][0]
    squashed = base(images=[wide], return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(squashed[0], torch.ones(32, 32), atol=1e-2)  # squashed: red everywhere
    assert abs(x[:, 0, 16]).max() < 0.01 and abs(x[:, 31, 16]).max() < 0.01  # top / bottom: mean colour = 0
    assert torch.allclose(x[:, 16, 16], torch.tensor([1.0, -1.0, -1.0]), atol=1e-2)  # centre: the image


class _Cfg:
    extra_config = {}


# --- 10. --system-prompt ----------------------------------------------------------------------------------------

QWEN25_LIKE = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
               "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You "
               "are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for m in messages %}{%- if not (m.role == "
               "'system' and loop.first) %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
               "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_system_prompt_replaces_the_templates_default_in_training_and_evaluation(world, tmp_path, tokenizer_dir):
    tok = data.load_tokenizer(tokenizer_dir)
    tok.chat_template = QWEN25_LIKE
    conv = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "red"}]
    img = tok.convert_tokens_to_ids("<image>")
    plain = tok.decode(data.render_conversation(tok, conv, 16, img)[0])
    assert "You are Qwen" in plain
    mine = tok.decode(data.render_conversation(tok, data.with_system_prompt(tok, conv, "Be brief."), 16, img)[0])
    assert "Be brief." in mine and "You are Qwen" not in mine
    with pytest.raises(ValueError, match="adds its own system turn"):
        data.with_system_prompt(tok, conv, "none")
    chatml = data.load_tokenizer(tokenizer_dir)
    assert data.with_system_prompt(chatml, conv, "none") == conv  # a template without a default: no system turn
    # training renders with it, records it, and evaluation prompts the same way
    out = str(tmp_path / "run")
    train.main(_args(world, out, "--max-steps", "1", "--system-prompt", "Be brief.", "--image-aspect-ratio", "pad"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["system_prompt"] == "Be brief." and cfg["image_aspect_ratio"] == "pad"
    model, tok2, proc = M.load_any(out)
    assert isinstance(proc, M.SquarePadProcessor)  # 9: the recorded aspect ratio comes back with the model
    ids = attention._prompt_ids(tok2, model, "<image>\nWhat is it?")
    assert tok2.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    ds = data.SupervisedDataset(data.load_llava_json(os.path.join(world, "instruct.json"))[:2], tok2, None, world,
                                16, img, 256, system_prompt="Be brief.")
    assert "Be brief." in tok2.decode(ds.tokens(0)[0])


def test_malformed_samples_stop_naming_the_file_or_are_skipped_and_counted(world, tmp_path, monkeypatch):
    """A conversation starting with a gpt turn (rendered silently once a system prompt is prepended, before),
    an empty answer, <image> in a text-only sample, a multi-image sample: without --skip-bad-samples the first
    one stops the run with its id, the data file and the flag; with it they are skipped and counted in the start
    line and trainer_summary.json, and the run trains on the rest."""
    monkeypatch.setenv("COMPODISTILL_CACHE", str(tmp_path / "cache"))
    samples = data.load_llava_json(os.path.join(world, "instruct.json"))
    text = next(s for s in samples if not s.get("image"))
    bad = [{"id": "gpt_first", "conversations": [{"from": "gpt", "value": "red"}, {"from": "human", "value": "q?"},
                                                 {"from": "gpt", "value": "blue"}]},
           {"id": "empty", "conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "  "}]},
           {"id": "image_in_text", "conversations": [{"from": "human", "value": "<image>\nq?"},
                                                     {"from": "gpt", "value": "red"}]},
           {"id": "two_images", "image": ["a.png", "b.png"], "conversations": text["conversations"]}]
    path = str(tmp_path / "mixed.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(samples[:5] + bad[:1] + samples[5:] + bad[1:], f)
    args = _args(world, str(tmp_path / "run"), "--max-steps", "1", "--system-prompt", "be brief")
    args[args.index("--data") + 1] = path
    with pytest.raises(ValueError, match=r"mixed\.json: sample two_images: 'image' must be one file name.*--skip-bad-samples"):
        train.main(args)
    no_list = str(tmp_path / "no_list.json")
    with open(no_list, "w", encoding="utf-8") as f:
        json.dump(samples[:5] + bad[:1] + samples[5:] + bad[1:3], f)
    args[args.index("--data") + 1] = no_list
    with pytest.raises(ValueError, match=r"no_list\.json: sample gpt_first: the conversation starts with a gpt turn.*"
                                         r"--skip-bad-samples"):
        train.main(args)
    args[args.index("--data") + 1] = path
    out = str(tmp_path / "skip")
    args[args.index("--out") + 1] = out
    train.main([*args, "--skip-bad-samples"])
    summary = json.load(open(os.path.join(out, "trainer_summary.json")))
    assert summary["skipped_bad_samples"] == 4 and _log(out)[0]["skipped_bad_samples"] == 4
    assert _log(out)[0]["samples"] == len(samples)
