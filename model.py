"""The multimodal LLM: vision encoder -> adapter -> causal LM (the LLaVA layout, docs/method.md section 1).

Every part is a real Hugging Face module:
- `vision_tower`: any HF vision encoder (SigLIP, CLIP). Which hidden layer feeds the LLM and whether
  its first token (CLIP's CLS) is dropped come from the config (`vision_feature_layer`,
  `vision_feature_select_strategy` as in HF LLaVA), never from a fixed count.
- `projector`: LLaVA's `mlp2x_gelu` adapter, Linear(d_vision -> d_llm) -> GELU -> Linear(d_llm -> d_llm),
  or the TAF projector of taf.py (docs/method.md section 2) for a distilled student.
- `language_model`: any HF causal LM (Qwen2 / Qwen2.5 / Llama families, ...).

Image features replace the embeddings of the `<image>` tokens (the placeholder is expanded to
`num_visual_tokens` ids by data.py), exactly like HF's `modeling_llava.py`. The forward returns the
logits and `visual_mask = input_ids == image_token_id`, the one source of truth for where the image is
(VAT in vat.py reads it; nothing re-derives positions).

Three ways to get a model:
  (a) `from_parts(vision_path, llm_path, tokenizer_path)`: a vision checkpoint + an LLM checkpoint
      (the paper's SigLIP + Qwen setting); the adapter starts from scratch; `<image>` is added to a
      tokenizer that lacks it and the LM's embeddings resized, as LLaVA does.
  (b) `from_llava(path)`: an HF `LlavaForConditionalGeneration` checkpoint directory.
  (c) `from_preset(name, tokenizer)`: the tiny `teacher` / `student` presets for tests and the demo.
A model directory holds `model.safetensors`, `config.json`, the tokenizer files and the image processor's
`preprocessor_config.json`; `load_pretrained` reads it back without unpickling anything and never runs
remote code. `load_any(source)` is the one opener every command uses (--init, --teacher, evaluate.py, attention.py):
a model directory, a run's `checkpoint/`, `llava:DIR` or an HF LLaVA directory, the authors' release layout
(`from_release`), `parts:V,L,T`, `preset:NAME`. `python model.py export` writes a model as HF LLaVA or in the
authors' release layout (export_llava_hf, export_release).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

FORMAT = "compodistill-mllm-1"
IMAGE_TOKEN = "<image>"

# -----------------------------------------------------------------------------
# Tiny presets (c). Teacher and student share ONE vision encoder config (TAF needs the same encoder).
# A fresh tiny encoder is random and frozen, so the presets read its patch embeddings (hidden layer 0),
# which keep each 16-px patch's content; the demo pre-trains it (train.pretrain_vision_encoder) and then
# reads its last layer; real checkpoints use LLaVA's default, the penultimate layer.
# Both presets use initializer_range 0.125, not Qwen2's 0.02: at these widths the default leaves every
# attention row near uniform, and a lookup as simple as "What color is the circle?" then stays at the
# bag-of-colours plateau (measured on ideal one-hot cell features, batch 32: 0.02 -> 53% after 1,500
# steps, 0.125 -> 99.6% at step 1,000).

TINY_VISION = dict(model_type="siglip_vision_model", image_size=64, patch_size=16, num_channels=3,
                   hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4)
PRESETS = {
    "teacher": dict(model_type="qwen2", hidden_size=64, intermediate_size=192, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=2, initializer_range=0.125),
    "student": dict(model_type="qwen2", hidden_size=32, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=2, num_key_value_heads=1, initializer_range=0.125),
}
TINY_FEATURE_LAYER = 0


def mlp2x_gelu(d_vision: int, d_llm: int, bias: bool = True) -> nn.Sequential:
    """LLaVA-1.5's adapter (docs/method.md section 1): Linear(d_vision -> d_llm), GELU, Linear(d_llm -> d_llm).
    `bias=False` for HF LLaVA checkpoints saved with `multimodal_projector_bias=False`."""
    return nn.Sequential(nn.Linear(d_vision, d_llm, bias=bias), nn.GELU(), nn.Linear(d_llm, d_llm, bias=bias))


def projector_from_config(cfg: dict, d_vision: int, d_llm: int) -> nn.Module:
    """Rebuild the projector named in a model config: `mlp2x_gelu`, or `taf` (frozen teacher adapter
    + trainable linear, taf.py) whose teacher width is stored in the config."""
    bias = cfg.get("projector_bias", True)
    if cfg["projector"] == "mlp2x_gelu":
        return mlp2x_gelu(d_vision, d_llm, bias)
    if cfg["projector"] == "taf":
        from taf import taf_projector  # taf.py is standalone (torch only), no cycle
        d_teacher = cfg["taf_teacher_hidden"]
        return taf_projector(mlp2x_gelu(d_vision, d_teacher, bias), d_teacher, d_llm)
    raise ValueError(f"unknown projector type {cfg['projector']!r} in the model config")


# -----------------------------------------------------------------------------
# The model

class MultimodalLM(nn.Module):
    """vision_tower -> projector -> language_model, with image features scattered at `<image>` tokens."""

    def __init__(self, vision_tower: nn.Module, projector: nn.Module, language_model: nn.Module,
                 image_token_id: int, vision_feature_layer=-2, vision_feature_select_strategy="full",
                 extra_config: dict | None = None):
        super().__init__()
        if vision_feature_select_strategy not in ("full", "default"):
            raise ValueError("vision_feature_select_strategy must be 'full' (keep every token) or "
                             f"'default' (drop the first, CLS, token), got {vision_feature_select_strategy!r}")
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.image_token_id = int(image_token_id)
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.extra_config = dict(extra_config or {})  # e.g. projector type, TAF teacher width
        # True once the vision tower is sharded (distributed.fsdp_shard): its units all-gather in every forward,
        # so every rank must run it, whether or not its micro-batch has an image (embed)
        self.encode_on_every_rank = False
        emb = vision_tower.embeddings
        n_positions = getattr(emb, "num_positions", None) or emb.position_embedding.weight.shape[0]
        self.num_visual_tokens = n_positions - (1 if vision_feature_select_strategy == "default" else 0)

    # --- config ---------------------------------------------------------------
    def config_dict(self) -> dict:
        import transformers
        # transformers_version: when a tokenizer of > 100k tokens is loaded from a directory whose config.json
        # has neither it nor a model_type, transformers takes it for an old Mistral tokenizer and warns of an
        # "incorrect regex pattern" (tokenization_utils_tokenizers._patch_mistral_regex) on every load
        return {"format": FORMAT, "transformers_version": transformers.__version__,
                "vision_config": self.vision_tower.config.to_dict(),
                "text_config": self.language_model.config.to_dict(),
                "image_token_id": self.image_token_id,
                "vision_feature_layer": self.vision_feature_layer,
                "vision_feature_select_strategy": self.vision_feature_select_strategy,
                "num_visual_tokens": self.num_visual_tokens,
                "projector": self.extra_config.get("projector", "mlp2x_gelu"),
                **{k: v for k, v in self.extra_config.items() if k != "projector"}}

    @property
    def d_vision(self) -> int:
        layers = self.vision_feature_layer
        n = 1 if isinstance(layers, int) else len(layers)
        return self.vision_tower.config.hidden_size * n

    @property
    def d_llm(self) -> int:
        return self.language_model.config.hidden_size

    # --- image features -------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N_img, 3, H, W) -> (N_img, num_visual_tokens, d_llm): the chosen vision hidden layer(s),
        CLS dropped if the strategy says so, through the projector (LLaVA's get_image_features)."""
        dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
        layers = self.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        feats = [out.hidden_states[i] for i in layers]
        if self.vision_feature_select_strategy == "default":
            feats = [f[:, 1:] for f in feats]
        feats = torch.cat(feats, dim=-1)
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(feats.to(proj_dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None):
        """Token embeddings with image features scattered where input_ids == image_token_id.
        Returns (inputs_embeds, visual_mask). Raises if tokens and features disagree."""
        visual_mask = input_ids == self.image_token_id
        embeds = self.language_model.get_input_embeddings()(input_ids)
        n_tokens = int(visual_mask.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_tokens != n_images * self.num_visual_tokens:
            per_sample = visual_mask.sum(1).tolist()
            raise ValueError(
                f"image tokens and image features disagree: the batch has {n_tokens} `<image>` token ids "
                f"(per sample {per_sample}) but {n_images} images x {self.num_visual_tokens} visual tokens = "
                f"{n_images * self.num_visual_tokens} features. Each image must expand to exactly "
                f"{self.num_visual_tokens} image-token ids (data.render_conversation does this).")
        if n_images:
            feats = self.encode_images(pixel_values).to(embeds.dtype)
            embeds = embeds.masked_scatter(visual_mask.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
        elif self.encode_on_every_rank:
            # --fsdp: the tower's and the projector's units all-gather as they run, and a rank whose micro-batch
            # has no image would leave the others waiting in a collective it never joins (gloo aborts, NCCL
            # hangs). One blank image through both, times 0: the same collectives on every rank, no effect on
            # the loss, and the trainable projector stays in the graph (as the DDP branch below)
            cfg = self.vision_tower.config
            blank = embeds.new_zeros(1, cfg.num_channels, cfg.image_size, cfg.image_size)
            embeds = embeds + 0.0 * self.encode_images(blank).sum().to(embeds.dtype)
        elif torch.is_grad_enabled() and any(p.requires_grad for p in self.projector.parameters()):
            # A text-only batch leaves the trainable projector unused, and DDP then waits forever for
            # its gradients. A zero-valued use keeps every trainable parameter in the graph.
            dummy = self.projector(embeds.new_zeros(1, 1, self.d_vision, dtype=next(self.projector.parameters()).dtype))
            embeds = embeds + 0.0 * dummy.sum().to(embeds.dtype)
        return embeds, visual_mask

    # --- forward --------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, pixel_values=None, position_ids=None,
                return_hidden: bool = False) -> dict:
        """-> {"logits" (B,T,V) | "hidden" (B,T,D) (final normed hidden states, if return_hidden),
               "visual_mask" (B,T) bool}. With return_hidden the LM head is not applied, so the caller
        (the chunked L_KL in train.py) can apply it chunk by chunk."""
        embeds, visual_mask = self.embed(input_ids, pixel_values)
        decoder = self.language_model.get_decoder()
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, return_dict=True).last_hidden_state
        if return_hidden:
            return {"hidden": hidden, "visual_mask": visual_mask}
        logits = self.language_model.get_output_embeddings()(hidden)
        return {"logits": logits, "visual_mask": visual_mask}

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, max_new_tokens: int = 16,
                 eos_token_id=None) -> list[list[int]]:
        """Greedy decoding with the LM's KV cache. Rows may be left- or right-padded: they are
        re-packed to the left so every row's next token is at the end. Returns the new token ids of
        each row, stopping at (and excluding) eos. The prompt's forward applies the LM head to the last
        position only (transformers' `logits_to_keep=1`): (B, V) logits per step, never (B, T, V)."""
        B, T = input_ids.shape
        lengths = attention_mask.sum(1)
        ids = torch.zeros_like(input_ids)
        mask = torch.zeros_like(attention_mask)
        for b in range(B):  # left-pad: keep each row's real tokens, in order, at the right end
            real = input_ids[b][attention_mask[b].bool()]
            ids[b, T - len(real):] = real
            mask[b, T - len(real):] = 1
        embeds, _ = self.embed(ids, pixel_values)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                  use_cache=True, return_dict=True, logits_to_keep=1)
        new = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        positions = lengths.unsqueeze(1) - 1
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            for b in range(B):
                if not done[b]:
                    if int(nxt[b]) in eos:
                        done[b] = True
                    else:
                        new[b].append(int(nxt[b]))
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions + 1
            out = self.language_model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=positions,
                                      cache=out.cache, use_cache=True, return_dict=True)
        return new

    # --- which parameters train ------------------------------------------------
    def freeze_vision(self):
        """The vision encoder is frozen in every stage of the paper (docs/method.md sections 1, 5)."""
        self.vision_tower.requires_grad_(False)
        self.vision_tower.eval()
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_tower.eval()  # frozen: no dropout, whatever the mode
        return self


# -----------------------------------------------------------------------------
# Building: (c) presets, (a) parts, (b) an HF LLaVA checkpoint

def _image_token_id(tokenizer) -> int:
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != IMAGE_TOKEN:
        raise ValueError(f"the tokenizer has no single `{IMAGE_TOKEN}` token; add it first: "
                         f"tokenizer.add_special_tokens({{'additional_special_tokens': ['{IMAGE_TOKEN}']}}) "
                         "and resize the LM's embeddings")
    return tid


def ensure_image_token(tokenizer) -> bool:
    """Add `<image>` to a tokenizer that lacks it, as an additional special token (LLaVA does the same to a
    hub tokenizer); the existing special tokens are kept. Returns True if it was added (the LM's
    embeddings must then cover the new id: from_parts resizes them). A tokenizer that has it is left as is."""
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tid is not None and tid != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(tid) == IMAGE_TOKEN:
        return False
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    return True


def _checkpoint_dtype(path: str) -> str:
    """The dtype a HF checkpoint was saved in (its config.json's `dtype` / `torch_dtype`, else the text
    config's), as a name ("bfloat16"); "float32" when the config says nothing."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return "float32"
    for c in (cfg, cfg.get("text_config") or {}):
        d = c.get("dtype") or c.get("torch_dtype")
        if d:
            return str(d).replace("torch.", "")
    return "float32"


def from_preset(name: str, tokenizer, seed: int = 0, **text_overrides) -> MultimodalLM:
    """(c) A tiny random model from a named preset (`teacher`, `student`), vocabulary from the tokenizer.
    Both presets share the same vision config and, for a given seed, the same vision weights."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    torch.manual_seed(seed)  # the vision tower is built first, so it is the same for every preset
    vcfg = AutoConfig.for_model(**TINY_VISION)
    vision = AutoModel.from_config(vcfg)
    spec = {**PRESETS[name], **text_overrides}
    tcfg = AutoConfig.for_model(**spec, vocab_size=len(tokenizer), max_position_embeddings=4096,
                                tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed + 1 + sorted(PRESETS).index(name))
    lm = AutoModelForCausalLM.from_config(tcfg, attn_implementation="sdpa")
    proj = mlp2x_gelu(vcfg.hidden_size, tcfg.hidden_size)
    return MultimodalLM(vision, proj, lm, _image_token_id(tokenizer), TINY_FEATURE_LAYER, "full").freeze_vision()


def from_parts(vision_path: str, llm_path: str, tokenizer, vision_feature_layer=-2,
               vision_feature_select_strategy=None, dtype=torch.float32, trust_remote_code=False,
               attn_implementation="sdpa") -> MultimodalLM:
    """(a) The paper's setting: a vision checkpoint (e.g. SigLIP) + an LLM checkpoint (e.g. Qwen) + a
    tokenizer that has `<image>`; a fresh mlp2x_gelu adapter. The strategy defaults to the encoder's
    kind: CLIP has a CLS token, dropped ('default', as LLaVA does); SigLIP has none, every token kept
    ('full'; the authors drop one token anyway, a quirk, docs/method.md section 1).
    Weights load in fp32 by default (the trained parts' master weights; transformers would otherwise
    keep a checkpoint's bf16); the training loop's autocast gives bf16 compute on CUDA."""
    vcfg = AutoConfig.from_pretrained(vision_path, trust_remote_code=trust_remote_code)
    vcfg = getattr(vcfg, "vision_config", vcfg)  # a full SigLIP/CLIP checkpoint: keep its vision half
    vision = AutoModel.from_pretrained(vision_path, config=vcfg, dtype=dtype, trust_remote_code=trust_remote_code)
    if hasattr(vision, "vision_model") and not hasattr(vision, "embeddings"):
        vision = vision.vision_model  # some checkpoints load as a wrapper
    if vision_feature_select_strategy is None:
        vision_feature_select_strategy = "default" if hasattr(vision.embeddings, "class_embedding") else "full"
    lm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype, attn_implementation=attn_implementation,
                                              trust_remote_code=trust_remote_code)
    ensure_image_token(tokenizer)  # a hub tokenizer has no <image>: added, as LLaVA does
    image_id = _image_token_id(tokenizer)
    if lm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer))  # new rows at the mean of the old ones (transformers' default)
    proj = mlp2x_gelu(vision.config.hidden_size * (1 if isinstance(vision_feature_layer, int) else len(vision_feature_layer)),
                      lm.config.hidden_size)
    return MultimodalLM(vision, proj, lm, image_id, vision_feature_layer, vision_feature_select_strategy,
                        extra_config={"llm_dtype": _checkpoint_dtype(llm_path),
                                      "vision_dtype": _checkpoint_dtype(vision_path)}).freeze_vision()


def from_llava(path: str, dtype=torch.float32, attn_implementation="sdpa") -> MultimodalLM:
    """(b) An HF `LlavaForConditionalGeneration` checkpoint directory (any public LLaVA model). The
    parts are moved over unchanged; HF's projector (linear_1, act, linear_2) becomes mlp2x_gelu (with
    or without biases, `multimodal_projector_bias`). fp32 by default, as from_parts."""
    from transformers import LlavaForConditionalGeneration
    hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    cfg = hf.config
    if cfg.projector_hidden_act != "gelu":
        raise ValueError(f"{path}: projector_hidden_act={cfg.projector_hidden_act!r}; mlp2x_gelu needs 'gelu'")
    hp = hf.model.multi_modal_projector
    bias = hp.linear_1.bias is not None
    with empty_weights():  # no random init: HF's tensors are moved in (assign), not copied
        lm = AutoModelForCausalLM.from_config(cfg.text_config, attn_implementation=attn_implementation)
        proj = mlp2x_gelu(hp.linear_1.in_features, hp.linear_1.out_features, bias)
    lm.to(hf.dtype)
    lm.model.load_state_dict(hf.model.language_model.state_dict(), assign=True)
    lm.lm_head.load_state_dict(hf.lm_head.state_dict(), assign=True)
    lm.tie_weights()
    proj[0].load_state_dict(hp.linear_1.state_dict(), assign=True)
    proj[2].load_state_dict(hp.linear_2.state_dict(), assign=True)
    layer = cfg.vision_feature_layer
    layer = layer if isinstance(layer, int) else list(layer)
    extra = {"llm_dtype": _checkpoint_dtype(path), "vision_dtype": _checkpoint_dtype(path),
             **({} if bias else {"projector_bias": False})}
    return MultimodalLM(hf.model.vision_tower, proj, lm, cfg.image_token_id, layer,
                        cfg.vision_feature_select_strategy, extra_config=extra).freeze_vision()


# -----------------------------------------------------------------------------
# Save / load: safetensors + JSON config + tokenizer files in one directory

def _fsync_replace(tmp: str, final: str):
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def save_pretrained(model: MultimodalLM, path: str, tokenizer=None, image_processor=None):
    """Write model.safetensors + config.json (+ tokenizer files, + preprocessor_config.json) into `path`,
    each file atomically (temporary file, fsync, rename). Tied weights are stored once (the LM re-ties
    them on load). Tensors are stored in the dtype they have (train.py casts them first: cast_for_save)."""
    os.makedirs(path, exist_ok=True)
    state = model.state_dict()
    seen, tensors = {}, {}
    for k, v in state.items():  # drop aliases of already-stored tensors (tied embeddings)
        key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else None
        if key is not None and key in seen:
            continue
        seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    save_file(tensors, os.path.join(path, "model.safetensors.tmp"), metadata={"format": FORMAT})
    _fsync_replace(os.path.join(path, "model.safetensors.tmp"), os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(model.config_dict(), f, indent=2, default=str)
    _fsync_replace(os.path.join(path, "config.json.tmp"), os.path.join(path, "config.json"))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if image_processor is not None:
        getattr(image_processor, "processor", image_processor).save_pretrained(path)  # unwrapped (SquarePad)


SAVE_DTYPES = ("float32", "bfloat16", "float16")


def cast_for_save(model: MultimodalLM, save_dtype: str | None = None) -> str:
    """Cast a model, in place, to the dtypes its saved file should hold; returns the LLM's. The LLM: `save_dtype`
    (train.py's --save-dtype), by default the dtype the LLM checkpoint came in (`llm_dtype`, recorded by
    from_parts / from_llava), else float32. The projector (TAF's trained linear, or the adapter): float32, so a
    stage hands the next one its exact weights. The frozen vision tower: the
    dtype it came in (`vision_dtype`; float32 when not recorded, which holds any stored dtype exactly), never
    `save_dtype`: the encoder is the same in every model of a run, and TAF compares the teacher's with the
    student's exactly (taf.check_shared_vision_encoder), so a save must not round it. A Qwen LLM ships in bf16,
    SigLIP in fp32: a teacher built from them is saved with a bf16 LLM and an fp32 tower."""
    def known(name, default="float32"):
        return name if name in SAVE_DTYPES else default  # a config naming another dtype: the master weights' fp32
    llm = known(save_dtype or model.extra_config.get("llm_dtype") or "float32")
    model.language_model.to(getattr(torch, llm))
    model.projector.to(torch.float32)  # trained in every stage (TAF's linear): kept exact, a few MB
    model.vision_tower.to(getattr(torch, known(model.extra_config.get("vision_dtype") or "float32")))
    return llm


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (not a compodistill model directory)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON, the file is truncated or corrupt ({e})") from None
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {cfg.get('format')!r}, expected {FORMAT!r}. For an HF LLaVA "
                         "checkpoint use model.from_llava(path).")
    return cfg


def empty_weights():
    """A context in which modules are built with their parameters on the meta device (no storage, no random
    initialisation) and their buffers real: accelerate's `init_empty_weights(include_buffers=False)`. Buffers
    that no checkpoint holds (rotary `inv_freq`, SigLIP's `position_ids`) are so computed by the modules'
    own constructors, exactly as in a normally built model."""
    from accelerate import init_empty_weights
    return init_empty_weights(include_buffers=False)


def model_from_config(cfg: dict, attn_implementation: str = "sdpa") -> MultimodalLM:
    """A model with the architecture a config describes, randomly initialised; inside `empty_weights()`, with
    its parameters on the meta device instead (what load_pretrained fills)."""
    vcfg = AutoConfig.for_model(**cfg["vision_config"])
    tcfg = AutoConfig.for_model(**cfg["text_config"])
    vision = AutoModel.from_config(vcfg)
    lm = AutoModelForCausalLM.from_config(tcfg, attn_implementation=attn_implementation)
    layer = cfg["vision_feature_layer"]
    n = 1 if isinstance(layer, int) else len(layer)
    proj = projector_from_config(cfg, vcfg.hidden_size * n, tcfg.hidden_size)
    extra = {k: v for k, v in cfg.items() if k not in ("format", "transformers_version", "vision_config", "text_config", "image_token_id",
                                                       "vision_feature_layer", "vision_feature_select_strategy",
                                                       "num_visual_tokens")}
    return MultimodalLM(vision, proj, lm, cfg["image_token_id"], layer,
                        cfg["vision_feature_select_strategy"], extra).freeze_vision()


def check_state_keys(model: nn.Module, shapes: dict, source: str):
    """Raise one clear error naming every missing / unexpected / mis-shaped key of a state (`shapes`: key ->
    shape) against `model`. A tied weight stored once (under either name) may be missing."""
    own = model.state_dict(keep_vars=True)  # the parameters themselves: a tied pair is one object
    stored = {id(own[k]) for k in shapes if k in own}
    missing = sorted(k for k in set(own) - set(shapes) if id(own[k]) not in stored)
    unexpected = sorted(set(shapes) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(shapes[k])} vs model {tuple(own[k].shape)}"
                  for k in shapes if k in own and tuple(shapes[k]) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise ValueError(f"{source} does not match this model:\n"
                         f"  missing keys ({len(missing)}): {missing[:8]}\n"
                         f"  unexpected keys ({len(unexpected)}): {unexpected[:8]}\n"
                         f"  shape mismatches ({len(mismatched)}): {mismatched[:8]}")


def load_state_strict(model: nn.Module, state: dict, source: str):
    """load_state_dict that names every missing / unexpected / mis-shaped key in one clear error.
    Keys of tied weights that were stored once are allowed to be missing."""
    check_state_keys(model, {k: v.shape for k, v in state.items()}, source)
    model.load_state_dict(state, strict=False)


def read_weights(model: nn.Module, weights: str, dtype: torch.dtype, device="cpu", parts=None):
    """Fill a model built in `empty_weights()` from a safetensors file, tensor by tensor, straight in `dtype`
    (floating-point tensors) on `device`: each tensor is read with pread (safetensors' `safe_open(...,
    backend="pread")`: no mapping of the file stays in this process), converted, and the model's meta
    parameter replaced by it (`load_state_dict(assign=True)`; requires_grad is kept). Host memory: the
    weights once, plus one tensor. A parameter that FSDP2 has already sharded (a DTensor: `fully_shard` ran
    on the empty model) keeps only this rank's shard of it (`distribute_tensor(..., src_data_rank=None)`:
    no communication, every rank reads the file). `parts`: top-level module names (e.g. ("vision_tower",
    "projector")) whose weights alone are read; the rest stays on the meta device."""
    from safetensors import safe_open
    try:
        f = safe_open(weights, framework="pt", backend="pread")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type, without the path
        raise ValueError(f"{weights}: cannot be read, the file is truncated or corrupt ({e})") from None
    with f:
        keys = list(f.keys())
        check_state_keys(model, {k: f.get_slice(k).get_shape() for k in keys}, weights)
        if parts is not None:
            keys = [k for k in keys if k.split(".", 1)[0] in parts]
        own = dict(model.state_dict(keep_vars=True))
        for k in keys:
            try:
                t = f.get_tensor(k)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{weights}: cannot read {k!r}, the file is truncated or corrupt ({e})") from None
            like = own[k]
            t = t.to(dtype) if t.is_floating_point() else t
            if hasattr(like, "device_mesh"):  # FSDP2-sharded: keep this rank's shard only
                from torch.distributed.tensor import distribute_tensor
                t = distribute_tensor(t.to(like.device_mesh.device_type), like.device_mesh, like.placements,
                                      src_data_rank=None)
            else:
                t = t.to(device)
            model.load_state_dict({k: t}, strict=False, assign=True)
            del t


def load_pretrained(path: str, device="cpu", dtype=None, attn_implementation: str = "sdpa",
                    trust_remote_code: bool = False, prepare=None, parts=None):
    """Read a model directory -> (model, tokenizer, image_processor). Weights come from safetensors
    only (no pickle); remote code never runs unless the caller passes trust_remote_code=True.
    The model is built with its parameters on the meta device (`empty_weights`), then each weight is read
    once, in `dtype` (default float32, the trained parts' master weights) on `device` (`read_weights`): no
    random initialisation, and host memory peaks at about the weights in `dtype`, not a random model plus a
    second copy. `prepare`: a function applied to the empty model before the weights are read (train.py
    --fsdp: FSDP2's fully_shard, so each rank holds only its shards); `parts`: read only these top-level
    parts (see read_weights)."""
    cfg = read_config(path)
    weights = os.path.join(path, "model.safetensors")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{path}: no model.safetensors")
    with empty_weights():
        model = model_from_config(cfg, attn_implementation)
    model.language_model.tie_weights()  # inside empty_weights the tie made a second meta tensor: one again
    if dtype is not None:  # buffers (inv_freq, ...) in the weights' dtype, as model.to(dtype) leaves them
        model.to(dtype)
    if prepare is not None:
        model = prepare(model) or model
    read_weights(model, weights, dtype or torch.float32, device, parts)
    model.language_model.tie_weights()  # the tied head was stored once: point it at the loaded embeddings
    left = [k for k, p in model.named_parameters() if p.is_meta and (parts is None or k.split(".", 1)[0] in parts)]
    if left:
        raise ValueError(f"{weights}: {len(left)} parameters were not filled: {left[:8]}")
    if prepare is None:  # the buffers (fully_shard has placed a prepared model's)
        for part in [model] if parts is None else [getattr(model, p) for p in parts]:
            part.to(device)
    if model.num_visual_tokens != cfg["num_visual_tokens"]:
        raise ValueError(f"{path}: config says {cfg['num_visual_tokens']} visual tokens, the rebuilt encoder "
                         f"gives {model.num_visual_tokens}")
    if not any(os.path.exists(os.path.join(path, n)) for n in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                                "save_pretrained(model, path, tokenizer) writes them")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tokenizer, image_processor_for(model, load_image_processor(path, model.vision_tower.config))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


def make_image_processor(vision_config):
    """The vision encoder's HF image processor: SigLIP or CLIP, the PIL variants (they need no torchvision),
    sized from vision_config.image_size (a config object or its dict)."""
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil
    get = (lambda k: vision_config.get(k)) if isinstance(vision_config, dict) else (lambda k: getattr(vision_config, k, None))
    size, kind = get("image_size"), str(get("model_type") or "")
    if not size:
        raise ValueError(f"vision config has no image_size: {vision_config}")
    if "siglip" in kind:
        return SiglipImageProcessorPil(size={"height": size, "width": size})
    if "clip" in kind:
        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    raise ValueError(f"unsupported vision model_type {kind!r} (expected siglip or clip)")



def load_image_processor(path, vision_config):
    """The checkpoint's own image processor when `path` holds a preprocessor_config.json (a SigLIP / CLIP /
    LLaVA checkpoint, a saved run), else one rebuilt from the vision config (make_image_processor)."""
    if path and os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        from transformers import AutoImageProcessor
        return AutoImageProcessor.from_pretrained(path)
    return make_image_processor(vision_config)


# -----------------------------------------------------------------------------
# Aspect ratio: "squash" (resize to the encoder's square, the processors' default) or LLaVA-1.5's "pad"

ASPECT_RATIOS = ("squash", "pad")


def expand2square(pil, background):
    """LLaVA's expand2square: paste the image centred on a square canvas of `background` colour."""
    from PIL import Image
    w, h = pil.size
    if w == h:
        return pil
    side = max(w, h)
    canvas = Image.new(pil.mode, (side, side), background)
    canvas.paste(pil, ((side - w) // 2, (side - h) // 2))
    return canvas


class SquarePadProcessor:
    """An image processor that first pads every image to a square with the processor's mean colour
    (LLaVA-1.5's `image_aspect_ratio pad`), then runs the wrapped processor. Everything else
    (image_mean, size, save_pretrained, ...) is the wrapped processor's."""

    def __init__(self, processor):
        self.processor = processor
        mean = getattr(processor, "image_mean", None) or [0.5, 0.5, 0.5]
        self.background = tuple(int(round(x * 255)) for x in mean)

    def __call__(self, images=None, **kwargs):
        many = isinstance(images, (list, tuple))
        padded = [expand2square(im.convert("RGB"), self.background) for im in (images if many else [images])]
        return self.processor(images=padded if many else padded[0], **kwargs)

    def __getattr__(self, name):  # only for names the wrapper lacks; "processor" itself while unpickling
        if name == "processor":
            raise AttributeError(name)
        return getattr(self.processor, name)


def image_processor_for(model: MultimodalLM, processor, aspect_ratio: str | None = None):
    """`processor` set to the aspect-ratio handling `aspect_ratio` names (default: the one the model
    records in its config, `image_aspect_ratio`, else "squash"). Returns the processor to use."""
    aspect_ratio = aspect_ratio or model.extra_config.get("image_aspect_ratio") or "squash"
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image aspect ratio must be one of {ASPECT_RATIOS}, got {aspect_ratio!r}")
    base = getattr(processor, "processor", processor) if isinstance(processor, SquarePadProcessor) else processor
    return SquarePadProcessor(base) if aspect_ratio == "pad" else base


# -----------------------------------------------------------------------------
# The authors' release layout (ptkjw1997/CompoDistill: scripts/upload/prepare_hf_model.py, hf_release/), read and
# written without their code (docs/method.md section 1). config.json: `model_type: compodistill`, `text_config` /
# `vision_config` dicts, `connector_type` mlp2x_gelu, `post_connector_use` + `connector_hidden_size` (a distilled
# student: the teacher-width MLP, then Linear(d_teacher -> d_student), i.e. TAF), `vision_feature_layer`,
# `vision_feature_select_strategy` ('patch' = the first token dropped whatever the encoder, 'cls_patch' = all
# kept), `image_aspect_ratio` ('square' / 'pad'). Weights: language_model.*, vision_tower._vision_tower.*,
# connector._connector.{0,2}.*, connector.post_connector.*. Their image placeholder is the id -200, spliced
# where the prompt says `<image>`; here `<image>` is added to the tokenizer (an id past Qwen1.5's 151,646 tokens
# and inside its 151,936 embedding rows, so no row is added) and expanded like every other model's.

RELEASE_TYPE = "compodistill"
# their conversation format ("qwen2_base", the one every released checkpoint was trained and is prompted with):
# system + " ", then per turn "USER: " + ("<image>\n" + question, when it has an image) + " " and
# "ASSISTANT: " + answer + "<|endoftext|>"; the generation prompt is "ASSISTANT:".
RELEASE_SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                         "gives helpful, detailed, and polite answers to the user's questions.")
RELEASE_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + ' ' }}"
    "{%- set turns = messages[1:] -%}{%- else -%}{{ '" + RELEASE_SYSTEM_PROMPT.replace("'", "\\'") + " ' }}"
    "{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}{%- if m['role'] == 'user' -%}"
    "{%- if '<image>' in m['content'] -%}{{ 'USER: ' + ('<image>\\n' + m['content'].replace('<image>', '').strip()) + ' ' }}"
    "{%- else -%}{{ 'USER: ' + m['content'] + ' ' }}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + m['content'] + '<|endoftext|>' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}")
_RELEASE_STRATEGY = {"patch": "default", "cls_patch": "full"}  # theirs -> ours (HF LLaVA's names)
_RELEASE_ASPECT = {"square": "squash", "pad": "pad"}


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_release_dir(path: str) -> bool:
    """A directory in the authors' release layout: its config.json says model_type compodistill."""
    cfg = _read_json(os.path.join(path, "config.json")) if os.path.isdir(path) else None
    return isinstance(cfg, dict) and cfg.get("model_type") == RELEASE_TYPE


def _safetensors_files(path: str) -> list:
    """The weight files of a HF checkpoint directory: model.safetensors, or the shards its index names."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        return sorted({os.path.join(path, f) for f in (_read_json(index) or {}).get("weight_map", {}).values()})
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors nor model.safetensors.index.json (only safetensors "
                            "weights are read)")


def release_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer of a release directory, with `<image>` added (ensure_image_token) and the conversation format
    the checkpoint reads: the authors' (RELEASE_CHAT_TEMPLATE) unless its config.json says `chat_format:
    tokenizer` (written by export_release for a model trained with another template: its own is kept)."""
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    ensure_image_token(tok)
    if (_read_json(os.path.join(path, "config.json")) or {}).get("chat_format") != "tokenizer":
        tok.chat_template = RELEASE_CHAT_TEMPLATE
    if tok.pad_token is None:  # their Qwen1.5 loader sets pad = unk; Qwen2's tokenizer has <|endoftext|> for both
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def from_release(path: str, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code: bool = False):
    """(d) A checkpoint in the authors' release layout -> (model, tokenizer, image_processor). Their remote code is
    never run: the parts are rebuilt from config.json with HF classes and the weights read by name. fp32 by
    default, as from_parts (their releases are fp16). The quirks are kept: the first vision token dropped
    ('patch'), their conversation format, their image processor (preprocessor_config.json) and aspect ratio."""
    from safetensors import safe_open
    cfg = _read_json(os.path.join(path, "config.json"))
    where = os.path.join(path, "config.json")
    if not isinstance(cfg, dict) or cfg.get("model_type") != RELEASE_TYPE:
        raise ValueError(f"{where}: not a CompoDistill release config (model_type {RELEASE_TYPE!r})")
    kind = cfg.get("connector_type")
    if kind != "mlp2x_gelu":
        raise ValueError(f"{where}: connector_type {kind!r}; only 'mlp2x_gelu' (every released checkpoint's) is read")
    strategy = cfg.get("vision_feature_select_strategy", "patch")
    if strategy not in _RELEASE_STRATEGY:
        raise ValueError(f"{where}: vision_feature_select_strategy {strategy!r}, expected 'patch' or 'cls_patch'")
    layer = cfg.get("vision_feature_layer", -2)
    aspect = cfg.get("image_aspect_ratio", "square")
    if aspect not in _RELEASE_ASPECT:
        raise ValueError(f"{where}: image_aspect_ratio {aspect!r}; 'square' and 'pad' are supported")
    vdict = dict(cfg["vision_config"])
    vdict = dict(vdict.get("vision_config") or vdict)  # a full SigLIP/CLIP config: its vision half, as theirs does
    tdict = dict(cfg["text_config"])
    vcfg, tcfg = AutoConfig.for_model(**vdict), AutoConfig.for_model(**tdict)
    post = bool(cfg.get("post_connector_use") and cfg.get("connector_hidden_size"))
    d_conn = cfg["connector_hidden_size"] if post else tcfg.hidden_size
    from transformers.initialization import no_init_weights
    with no_init_weights():  # every parameter is read below (load_state_strict names any that is not)
        vision = AutoModel.from_config(vcfg)
        lm = AutoModelForCausalLM.from_config(tcfg, attn_implementation=attn_implementation)
        adapter = mlp2x_gelu(vcfg.hidden_size, d_conn)
        if post:
            from taf import taf_projector
            projector = taf_projector(adapter, d_conn, tcfg.hidden_size)
    if post:
        parts = {"connector._connector.": projector.teacher_adapter, "connector.post_connector.": projector.linear}
    else:
        projector = adapter
        parts = {"connector._connector.": adapter}
    parts.update({"language_model.": lm, "vision_tower._vision_tower.": vision})
    states = {prefix: {} for prefix in parts}
    unknown = []
    for file in _safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                prefix = next((p for p in parts if key.startswith(p)), None)
                if prefix is None:
                    unknown.append(key)
                else:
                    states[prefix][key[len(prefix):]] = f.get_tensor(key)
    if unknown:
        raise ValueError(f"{path}: weights outside the release layout (language_model.*, vision_tower._vision_tower.*, "
                         f"connector._connector.*, connector.post_connector.*): {unknown[:6]}")
    lm.tie_weights()  # before reading: a tied head is stored once (no_init_weights skipped post_init's tying)
    for prefix, module in parts.items():
        load_state_strict(module, states[prefix], f"{path} ({prefix}*)")
    lm.tie_weights()
    tok = release_tokenizer(path, trust_remote_code)
    image_id = _image_token_id(tok)
    if lm.get_input_embeddings().weight.shape[0] < len(tok):  # Qwen1.5 has spare rows; a smaller table gets one
        lm.resize_token_embeddings(len(tok))
    extra = {"llm_dtype": _checkpoint_dtype(path), "image_aspect_ratio": _RELEASE_ASPECT[aspect]}
    if post:
        extra.update(projector="taf", taf_teacher_hidden=d_conn)
    if cfg.get("system_prompt") is not None:
        extra["system_prompt"] = cfg["system_prompt"]
    model = MultimodalLM(vision, projector, lm, image_id, layer, _RELEASE_STRATEGY[strategy], extra).freeze_vision()
    if dtype is not None:
        model.to(dtype)
    proc = load_image_processor(path, vcfg)
    return model, tok, proc


# -----------------------------------------------------------------------------
# One opener for every place a model is read (--init, --teacher, evaluate.py --model, attention.py --model /
# --teacher / --student)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SOURCES = ("a compodistill model directory", "a run's checkpoint/ directory", "llava:DIR or an HF LLaVA "
           "directory (config model_type llava)", "a directory in the authors' release layout (model_type "
           "compodistill)", "parts:VISION,LLM,TOKENIZER", "preset:NAME (with a tokenizer)")


def _tokenizer_with_chat_template(path, trust_remote_code=False):
    """AutoTokenizer of `path`; when the tokenizer has no chat template, the processor's (llava-hf ships
    it as chat_template.json {"chat_template": ...} or chat_template.jinja beside the processor)."""
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not getattr(tok, "chat_template", None):
        for name in ("chat_template.jinja", "chat_template.json"):
            f = os.path.join(path, name)
            if os.path.isfile(f):
                with open(f, encoding="utf-8") as fh:
                    text = fh.read()
                tok.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
    return tok


def _is_hf_llava(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("model_type") == "llava"
    except (OSError, ValueError):
        return False


def is_checkpoint_dir(path: str) -> bool:
    """A run's checkpoint/: a DDP run's trainable.safetensors, or an --fsdp run's sharded/ (runs.py)."""
    return (os.path.isfile(os.path.join(path, "trainable.safetensors"))
            or os.path.isfile(os.path.join(path, "sharded", ".metadata")))


def load_any(source: str, device="cpu", dtype=None, trust_remote_code: bool = False,
             attn_implementation: str = "sdpa", tokenizer: str | None = None, seed: int = 0,
             vision_feature_layer=None, vision_feature_select_strategy=None, prepare=None, parts=None):
    """Any model source -> (model, tokenizer, image_processor), the one spelling used everywhere:
      DIR                        a compodistill model directory (a stage's --out)
      RUN/checkpoint             a run's stage checkpoint: the run's init + the checkpoint's trainable
                                 weights, LoRA merged (mid-run evaluation; load_checkpoint_model)
      llava:DIR, or a DIR whose config.json says model_type llava   an HF LLaVA checkpoint
      DIR whose config.json says model_type compodistill   the authors' release layout (from_release)
      parts:VISION,LLM,TOKENIZER a vision + an LLM checkpoint and a tokenizer, fresh adapter
                                 (vision_feature_layer default -2; the strategy defaults to the encoder's kind);
                                 a release directory as TOKENIZER gives its tokenizer and conversation format
      preset:NAME                a tiny preset; `tokenizer` is the tokenizer directory, `seed` its seed
    The image processor is the checkpoint's own (preprocessor_config.json) where there is one.
    `prepare` (train.py --fsdp: FSDP2 sharding) and `parts` (only these top-level parts' weights): a model
    directory applies them to the empty model before reading (load_pretrained), so a sharded rank reads only
    its shards; any other source is loaded whole, then prepared (`parts` does not apply)."""
    if source.startswith("preset:"):
        if not tokenizer:
            raise ValueError(f"{source}: a preset needs a tokenizer directory (--tokenizer)")
        tok = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)
        model = from_preset(source.split(":", 1)[1], tok, seed=seed)
        proc = make_image_processor(model.vision_tower.config)
    elif source.startswith("parts:"):
        pieces = source.split(":", 1)[1].split(",")
        if len(pieces) != 3:
            raise ValueError(f"{source}: expected parts:VISION_DIR,LLM_DIR,TOKENIZER_DIR")
        vision, llm, tokp = pieces
        tok = (release_tokenizer(tokp, trust_remote_code) if is_release_dir(tokp)
               else _tokenizer_with_chat_template(tokp, trust_remote_code))
        model = from_parts(vision, llm, tok, -2 if vision_feature_layer is None else vision_feature_layer,
                           vision_feature_select_strategy, trust_remote_code=trust_remote_code,
                           attn_implementation=attn_implementation)
        proc = load_image_processor(vision, model.vision_tower.config)
    elif source.startswith("llava:") or _is_hf_llava(source):
        path = source.split(":", 1)[1] if source.startswith("llava:") else source
        model = from_llava(path, attn_implementation=attn_implementation)
        tok = _tokenizer_with_chat_template(path, trust_remote_code)
        proc = load_image_processor(path, model.vision_tower.config)
    elif is_release_dir(source):
        model, tok, proc = from_release(source, dtype=dtype or torch.float32, attn_implementation=attn_implementation,
                                        trust_remote_code=trust_remote_code)
    elif is_checkpoint_dir(source):
        model, tok, proc = load_checkpoint_model(source, device=device, dtype=dtype,
                                                 trust_remote_code=trust_remote_code,
                                                 attn_implementation=attn_implementation)
        return (prepare(model) or model) if prepare else model, tok, proc
    elif os.path.isdir(source) and not os.path.exists(os.path.join(source, "config.json")) and \
            is_checkpoint_dir(os.path.join(source, "checkpoint")):
        raise ValueError(f"{source}: a run without its final model (the stage has not finished); evaluate its "
                         f"last checkpoint with {os.path.join(source, 'checkpoint')}")
    elif os.path.isdir(source):
        return load_pretrained(source, device=device, dtype=dtype, attn_implementation=attn_implementation,
                               trust_remote_code=trust_remote_code, prepare=prepare, parts=parts)
    else:
        raise ValueError(f"model source {source!r} is none of: " + "; ".join(SOURCES))
    if dtype is not None:
        model.to(dtype)
    model.to(device)
    if prepare is not None:
        model = prepare(model) or model
    return model, tok, image_processor_for(model, proc)


def _from_run(source, run_args: dict, run_dir: str):
    """A model source (--init, --teacher, --tokenizer) as a run's args.json recorded it, as it opens from the
    current directory: a relative path is taken against the directory the run was started in (args.json `cwd`,
    runs.write_run_files) and, for runs saved before it was recorded (or moved since), against the current
    directory, then the run directory and each of its parents, the first where it exists. llava:DIR and each
    piece of parts:V,L,T likewise; preset:NAME as it is."""
    if not source or source.startswith("preset:"):
        return source
    prefix = next((p for p in ("llava:", "parts:") if source.startswith(p)), "")
    pieces = source[len(prefix):].split(",") if prefix == "parts:" else [source[len(prefix):]]

    def resolve(piece):
        if os.path.isabs(piece):
            return piece
        bases = ([run_args["cwd"]] if run_args.get("cwd") else []) + [os.getcwd()]
        d = run_dir
        while True:
            bases.append(d)
            if os.path.dirname(d) == d:
                break
            d = os.path.dirname(d)
        found = [os.path.join(b, piece) for b in bases if os.path.exists(os.path.join(b, piece))]
        return found[0] if found else os.path.join(bases[0], piece)
    return prefix + ",".join(resolve(p) for p in pieces)


def load_checkpoint_model(path: str, device="cpu", dtype=None, trust_remote_code: bool = False,
                          attn_implementation: str = "sdpa"):
    """A stage checkpoint (RUN/checkpoint: trainable weights + optimizer state only) as a model: the run's
    args.json says what it started from (--init, --teacher for TAF, the LoRA shape); that model is rebuilt
    (load_any), given a TAF projector from the teacher's adapter and LoRA where the checkpoint has them, the
    checkpoint's trainable weights are copied in and LoRA is merged. -> (model, tokenizer, image_processor)."""
    from runs import check_fingerprint, checkpoint_meta, checkpoint_weights
    run = os.path.dirname(os.path.abspath(path.rstrip("/")))
    args_path = os.path.join(run, "args.json")
    if not os.path.isfile(args_path):
        raise FileNotFoundError(f"{path}: a checkpoint needs its run's args.json beside it ({args_path}) to know "
                                "the model it trains")
    with open(args_path, encoding="utf-8") as f:
        args = json.load(f)
    for key in ("init", "teacher", "tokenizer"):  # relative paths: from where the run was started (_from_run)
        args[key] = _from_run(args.get(key), args, run)
    meta = checkpoint_meta(path)  # what the checkpoint was trained on: refuse sources re-made since
    check_fingerprint(meta.get("init_fingerprint"), args["init"], "--init", path)
    weights = checkpoint_weights(path)  # whole tensors, also from an --fsdp run's shards (read in this process)
    model, tok, proc = load_any(args["init"], trust_remote_code=trust_remote_code,
                                attn_implementation=attn_implementation, tokenizer=args.get("tokenizer"),
                                seed=args.get("model_seed", 0), vision_feature_layer=args.get("vision_feature_layer"),
                                vision_feature_select_strategy=args.get("vision_feature_select_strategy"))
    if any(k.startswith("projector.linear.") for k in weights) and model.extra_config.get("projector") != "taf":
        if not args.get("teacher"):
            raise ValueError(f"{path}: a TAF checkpoint, but {args_path} names no --teacher to fetch the adapter from")
        check_fingerprint(meta.get("teacher_fingerprint"), args["teacher"], "--teacher", path)
        teacher = load_any(args["teacher"], trust_remote_code=trust_remote_code)[0]
        taf_student(model, teacher)
        del teacher
    if any(".lora_" in k for k in weights):
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=args["lora_r"], lora_alpha=args["lora_alpha"], lora_dropout=0.0,
                         target_modules=LORA_TARGETS, bias="none")
        model.language_model = get_peft_model(model.language_model, cfg)
    own = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(own))
    if unknown:
        raise ValueError(f"{path}: checkpoint keys the rebuilt model (from {args['init']!r}) lacks: {unknown[:6]}")
    with torch.no_grad():
        for k, v in weights.items():
            if own[k].shape != v.shape:
                raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the rebuilt model {tuple(own[k].shape)}")
            own[k].copy_(v)
    if hasattr(model.language_model, "merge_and_unload"):
        model.language_model = model.language_model.merge_and_unload()
    for key in ("system_prompt", "image_aspect_ratio"):  # what the run trained with (train.py records them)
        if args.get(key) is not None:
            model.extra_config[key] = args[key]
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval(), tok, image_processor_for(model, proc)


def checkpoint_step(path: str) -> int:
    """The step a stage checkpoint was written at (its trainer_state.pt, memory-mapped: the optimizer
    state it also holds is not read)."""
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True, map_location="cpu", mmap=True)
    return int(state["step"])


def taf_student(student: MultimodalLM, teacher: MultimodalLM) -> MultimodalLM:
    """The student's projector becomes TAF's: the teacher's adapter (deep-copied, frozen) + a fresh trainable
    Linear(d_teacher -> d_student) (docs/method.md section 2). No checks here: train.apply_taf checks first."""
    from taf import taf_projector
    student.projector = taf_projector(teacher.projector, teacher.d_llm, student.d_llm).float()
    student.extra_config.update(projector="taf", taf_teacher_hidden=teacher.d_llm,
                                projector_bias=teacher.extra_config.get("projector_bias", True))
    return student


# -----------------------------------------------------------------------------
# Export: `python model.py export SOURCE OUT --to llava-hf|compodistill-release` (README, "Exporting").
# llava-hf: models whose projector is LLaVA's mlp2x_gelu (--stage llava, SFT baselines, KD students without TAF),
#   as an HF LlavaForConditionalGeneration checkpoint + its processor (image processor, tokenizer, the chat template
#   the model was trained with, <image> expanded to the visual tokens): transformers / vLLM / lmms-eval's llava_hf
#   load it as it is.
# compodistill-release: TAF students. TAF's projector is the teacher's MLP (hidden width d_teacher) and a
#   Linear(d_teacher -> d_student); HF's LLaVA projector has no place for a hidden width other than d_student
#   (folding the two trailing linears into one Linear(d_teacher -> d_student) leaves an MLP that is still
#   d_teacher wide inside). The authors' release layout holds it as it is (connector._connector = the teacher's MLP,
#   connector.post_connector = TAF's linear): the layout of their own CompoDistill-2B.

EXPORT_KINDS = ("llava-hf", "compodistill-release")
PAPER = "https://arxiv.org/abs/2510.12184"


def _hf_vision_state(vision_tower, vcfg) -> dict:
    """The vision tower's weights under the names AutoModel.from_config(vision_config) gives them (a tower
    unwrapped from its `vision_model` by from_parts gets the prefix back)."""
    state = {k: v for k, v in vision_tower.state_dict().items()}
    with torch.device("meta"):
        ref = set(AutoModel.from_config(vcfg).state_dict())
    if set(state) <= ref:
        return state
    prefixed = {f"vision_model.{k}": v for k, v in state.items()}
    if set(prefixed) <= ref:
        return prefixed
    raise ValueError(f"the vision tower's weights ({sorted(state)[:3]}...) do not match "
                     f"{type(vision_tower).__name__}'s HF layout ({sorted(ref)[:3]}...)")


def _unique_tensors(state: dict, dtype) -> dict:
    """Contiguous CPU copies in `dtype` (floating tensors), each shared tensor stored once (tied embeddings)."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.data_ptr(), tuple(v.shape), v.stride()) if v.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[k] = (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu()
    return out


def processor_chat_template(tokenizer, system_prompt=None) -> str:
    """The tokenizer's chat template as HF processors are called (content as a list of parts, {"type": "image"} /
    {"type": "text"}): each part list becomes the string training rendered ("<image>\\n" + text), and the
    system prompt the model was trained with (--system-prompt, recorded in its config) is put first."""
    import data
    template = tokenizer.chat_template
    if data._content_style(tokenizer) == "parts":
        return template
    head = ("{%- set ns = namespace(msgs=[]) -%}{%- for m in messages -%}"
            "{%- if m['content'] is string -%}{%- set ns.msgs = ns.msgs + [m] -%}{%- else -%}"
            "{%- set c = namespace(s='') -%}{%- for p in m['content'] -%}"
            "{%- if p['type'] == 'image' -%}{%- set c.s = c.s + '<image>\\n' -%}"
            "{%- elif p['type'] == 'text' -%}{%- set c.s = c.s + p['text'] -%}{%- endif -%}{%- endfor -%}"
            "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': c.s}] -%}{%- endif -%}{%- endfor -%}")
    if system_prompt is not None and system_prompt != "none":
        head += ("{%- if not ns.msgs or ns.msgs[0]['role'] != 'system' -%}{%- set ns.msgs = [{'role': 'system', "
                 "'content': " + json.dumps(system_prompt) + "}] + ns.msgs -%}{%- endif -%}")
    return head + "{%- set messages = ns.msgs -%}" + template


def export_llava_hf(model: MultimodalLM, tokenizer, image_processor, out: str, dtype=torch.float32):
    """Write `model` as an HF LlavaForConditionalGeneration checkpoint + LlavaProcessor into `out`."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.initialization import no_init_weights
    if model.extra_config.get("projector", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError("a TAF student's projector (the teacher's MLP + a linear) does not fit HF LLaVA's projector; "
                         "export it with --to compodistill-release")
    if model.extra_config.get("image_aspect_ratio", "squash") != "squash":
        raise ValueError("the model was trained with --image-aspect-ratio pad, which HF's SigLIP/CLIP processors do "
                         "not do; export it with --to compodistill-release (its image_aspect_ratio: pad)")
    vcfg, tcfg = model.vision_tower.config, model.language_model.config
    bias = model.extra_config.get("projector_bias", True)
    # the same layer counted from the end: transformers 5 asks the tower for hidden states only when the layer index
    # is truthy (select_hidden_states), so layer 0 (the tiny presets' patch embeddings) would come back empty
    n_states = vcfg.num_hidden_layers + 1
    layer = model.vision_feature_layer
    layer = layer - n_states if isinstance(layer, int) and layer >= 0 else \
        layer if isinstance(layer, int) else [x - n_states if x >= 0 else x for x in layer]
    cfg = LlavaConfig(vision_config=vcfg.to_dict(), text_config=tcfg.to_dict(), image_token_id=model.image_token_id,
                      projector_hidden_act="gelu", vision_feature_layer=layer,
                      vision_feature_select_strategy=model.vision_feature_select_strategy,
                      multimodal_projector_bias=bias, image_seq_length=model.num_visual_tokens,
                      tie_word_embeddings=bool(getattr(tcfg, "tie_word_embeddings", False)))
    with no_init_weights():
        hf = LlavaForConditionalGeneration(cfg)
    lm_state = model.language_model.state_dict()
    state = {**{f"model.language_model.{k[len('model.'):]}": v for k, v in lm_state.items() if k.startswith("model.")},
             "lm_head.weight": lm_state["lm_head.weight"],
             **{f"model.vision_tower.{k}": v for k, v in _hf_vision_state(model.vision_tower, vcfg).items()},
             **{f"model.multi_modal_projector.linear_{1 if i == 0 else 2}.{k}": v
                for i in (0, 2) for k, v in model.projector[i].state_dict().items()}}
    load_state_strict(hf, state, "the exported LLaVA")
    hf.tie_weights()
    hf.to(dtype).save_pretrained(out)
    processor = LlavaProcessor(image_processor=getattr(image_processor, "processor", image_processor),
                               tokenizer=tokenizer, patch_size=vcfg.patch_size,
                               vision_feature_select_strategy=model.vision_feature_select_strategy,
                               num_additional_image_tokens=1 if hasattr(model.vision_tower.embeddings, "class_embedding")
                               else 0, image_token=IMAGE_TOKEN,
                               chat_template=processor_chat_template(tokenizer, model.extra_config.get("system_prompt")))
    processor.save_pretrained(out)


def export_release(model: MultimodalLM, tokenizer, image_processor, out: str, dtype=torch.float32):
    """Write `model` in the authors' release layout into `out` (the layout from_release reads)."""
    import data
    layer, strategy = model.vision_feature_layer, model.vision_feature_select_strategy
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r}: the release layout reads one hidden layer")
    vcfg, tcfg = model.vision_tower.config, model.language_model.config
    taf = model.extra_config.get("projector") == "taf"
    mlp = model.projector.teacher_adapter if taf else model.projector
    if not (isinstance(mlp, nn.Sequential) and len(mlp) == 3 and mlp[0].bias is not None):
        raise ValueError("the release layout's connector is mlp2x_gelu with biases")
    state = {**{f"language_model.{k}": v for k, v in model.language_model.state_dict().items()},
             **{f"vision_tower._vision_tower.{k}": v for k, v in _hf_vision_state(model.vision_tower, vcfg).items()},
             **{f"connector._connector.{k}": v for k, v in mlp.state_dict().items()}}
    if taf:
        state.update({f"connector.post_connector.{k}": v for k, v in model.projector.linear.state_dict().items()})
    save_file(_unique_tensors(state, dtype), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    # the prompt format their code uses (their chat()) is theirs; a model trained with another template says so
    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "<image>\nq"},
             {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]
    render = lambda t: t.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)  # noqa: E731
    theirs = _copy_with_template(tokenizer, RELEASE_CHAT_TEMPLATE)
    own_format = data._content_style(tokenizer) != "str" or render(tokenizer) != render(theirs)
    cfg = {"model_type": RELEASE_TYPE, "architectures": ["CompoDistillForConditionalGeneration"],
           "auto_map": {"AutoConfig": "configuration_compodistill.CompoDistillConfig",
                        "AutoModelForCausalLM": "modeling_compodistill.CompoDistillForConditionalGeneration"},
           "text_config": tcfg.to_dict(), "vision_config": vcfg.to_dict(), "connector_type": "mlp2x_gelu",
           "hidden_size": tcfg.hidden_size, "vocab_size": tcfg.vocab_size, "vision_hidden_size": vcfg.hidden_size,
           "vision_feature_layer": layer, "vision_feature_select_strategy": "patch" if strategy == "default" else "cls_patch",
           "image_aspect_ratio": "pad" if model.extra_config.get("image_aspect_ratio") == "pad" else "square",
           "image_token_index": -200, "ignore_index": -100, "pad_token_id": tokenizer.pad_token_id,
           # their forward cuts every sequence at tokenizer_model_max_length: the LM's own limit cuts nothing it can read
           "tokenizer_model_max_length": getattr(tcfg, "max_position_embeddings", 2048),
           "tokenizer_padding_side": "right", "use_cache": True, "post_connector_use": taf,
           "connector_hidden_size": model.extra_config["taf_teacher_hidden"] if taf else None,
           "torch_dtype": str(dtype).replace("torch.", "")}
    if own_format:
        cfg["chat_format"] = "tokenizer"
    if model.extra_config.get("system_prompt") is not None:
        cfg["system_prompt"] = model.extra_config["system_prompt"]
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, default=str)
    tokenizer.save_pretrained(out)
    getattr(image_processor, "processor", image_processor).save_pretrained(out)
    return own_format


def _copy_with_template(tokenizer, template):
    import copy
    t = copy.copy(tokenizer)
    t.chat_template = template
    return t


def training_command(args: dict) -> str:
    """`python train.py ...` rebuilt from a run's args.json (every option it records that is set)."""
    parts = ["python train.py"]
    for k, v in args.items():
        if k in ("run_id",) or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        parts.append(flag if v is True else f"{flag} {','.join(map(str, v)) if isinstance(v, list) else v}")
    return " \\\n    ".join(parts)


def model_card(kind: str, source: str, model: MultimodalLM, args: dict | None, own_format: bool = False) -> str:
    taf = model.extra_config.get("projector") == "taf"
    why = ("HF LLaVA (`LlavaForConditionalGeneration`): its projector is LLaVA's mlp2x_gelu, so transformers, vLLM "
           "and lmms-eval's `llava_hf` load it as it is; `AutoProcessor` prompts it in the format it was trained with."
           if kind == "llava-hf" else
           "the CompoDistill authors' release layout (`model_type: compodistill`): "
           + ("a TAF student's projector is the teacher's MLP (hidden width d_teacher) and a Linear(d_teacher -> "
              "d_student), which HF LLaVA's projector cannot hold; this layout holds it as the authors' CompoDistill-2B "
              "does (`connector._connector`, `connector.post_connector`)." if taf else
              "the layout of the authors' released checkpoints.")
           + " Their loader needs their `configuration_compodistill.py` and `modeling_compodistill.py` "
           "(github.com/ptkjw1997/CompoDistill, `hf_release/`) copied beside these files, with "
           "`trust_remote_code=True`; the compodistill repository reads it without them (`model.load_any`).")
    if kind == "compodistill-release" and own_format:
        why += (" This model was trained with its tokenizer's chat template, not the authors' `USER: ... ASSISTANT:` "
                "format (config `chat_format: tokenizer`): prompt it with `tokenizer.apply_chat_template`, not their "
                "`chat()`.")
    lines = ["---", "pipeline_tag: image-text-to-text", "library_name: transformers" if kind == "llava-hf" else
             "library_name: compodistill", "tags:", "  - knowledge-distillation", "  - compodistill", "  - llava",
             "---", "", f"# {os.path.basename(os.path.abspath(source).rstrip('/'))}", "",
             f"A multimodal LLM ({type(model.vision_tower).__name__} -> "
             f"{'TAF projector' if taf else 'mlp2x_gelu'} -> {type(model.language_model).__name__}, "
             f"{model.num_visual_tokens} visual tokens per image) trained with the compodistill reference "
             f"implementation of CompoDistill ([arXiv 2510.12184]({PAPER})).", "", f"Layout: {why}", ""]
    if args:
        lines += ["## Training command (from the run's args.json)", "", "```", training_command(args), "```", ""]
    return "\n".join(lines)


def export(source: str, out: str, to: str, overwrite: bool = False, dtype=None) -> str:
    """`python model.py export`: load `source` (any load_any source; a run directory is its final model) and write it
    to `out` as `to` (EXPORT_KINDS) with a model card; `out` is written beside and renamed into place, and an
    existing `out` is refused unless `overwrite`."""
    import shutil
    if to not in EXPORT_KINDS:
        raise ValueError(f"--to must be one of {EXPORT_KINDS}, got {to!r}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    model, tok, proc = load_any(source)
    model.eval()
    if dtype is None:
        dtype = getattr(torch, model.extra_config.get("llm_dtype") or "float32")
    tmp = out.rstrip("/") + ".export-tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    own_format = False
    if to == "llava-hf":
        export_llava_hf(model, tok, proc, tmp, dtype)
    else:
        own_format = export_release(model, tok, proc, tmp, dtype)
    args = _read_json(os.path.join(source, "args.json")) if os.path.isdir(source) else None
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(to, source, model, args, own_format))
    if os.path.exists(out):
        shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
    os.replace(tmp, out)
    return out


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="model.py", description="Model tools (docs/method.md section 1).")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a model as HF LLaVA or in the authors' release layout, with a model card")
    e.add_argument("source", help="a run's output directory or any model source (model.load_any)")
    e.add_argument("out", help="the directory to write (refused if it exists, unless --overwrite)")
    e.add_argument("--to", required=True, choices=EXPORT_KINDS, help="llava-hf (LLaVA projector) or "
                   "compodistill-release (TAF students; the authors' layout)")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the LLM's own dtype")
    e.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    a = p.parse_args(argv)
    out = export(a.source, a.out, a.to, a.overwrite, getattr(torch, a.dtype) if a.dtype else None)
    print(f"wrote {out} ({a.to})")


if __name__ == "__main__":
    main()
