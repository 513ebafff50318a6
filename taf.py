"""
TAF: Teacher Adapter Fetch (CompoDistill, arXiv 2510.12184, docs/method.md section 2).

    x_v = P_s( P_t( z ) )

z   = features of the (frozen) vision encoder, which teacher and student SHARE,
P_t = the teacher's trained adapter (Linear, GELU, Linear), copied and FROZEN,
P_s = a trainable nn.Linear(d_teacher -> d_student) with PyTorch's default init
      (this is what the authors use).

Why: the student's visual tokens then live in the teacher's feature space (up to one
linear map), which is what makes aligning the two models' attention maps (VAT, vat.py)
a solvable problem.

This file is self-contained (torch only) so it can be copied into another code base.

    projector = taf_projector(teacher.projector, d_teacher=2560, d_student=2048)
    check_shared_vision_encoder(teacher.vision_tower, student.vision_tower)
    check_same_vision_features(teacher, student)   # the same hidden layer(s) and select strategy
"""

import copy
from collections import OrderedDict

import torch
from torch import nn


class TAFProjector(nn.Sequential):
    """P_s(P_t(z)) as an nn.Sequential with two named parts:

        .teacher_adapter   frozen deepcopy of the teacher's adapter (always in eval mode)
        .linear            trainable nn.Linear(d_teacher, d_student)

    so that state dict keys read "teacher_adapter.0.weight", "linear.weight", ...
    """

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_adapter.eval()  # frozen part: dropout etc. stay off, even during training
        return self


def taf_projector(teacher_adapter: nn.Module, d_teacher: int, d_student: int) -> TAFProjector:
    """Build the student's projector for TAF, x_v = P_s(P_t(z)) (docs/method.md section 2).

    teacher_adapter: the teacher's trained adapter, mapping vision features (.., d_vision)
        to the teacher's hidden size (.., d_teacher). It is deep-copied (the teacher is not
        touched), frozen (requires_grad=False) and kept in eval mode.
    Returns a module mapping (.., d_vision) -> (.., d_student); only `.linear` is trainable.
    """
    adapter = copy.deepcopy(teacher_adapter)
    adapter.requires_grad_(False)
    adapter.eval()
    # Check the stated width against the adapter's real output width when we can see it.
    last_linear = [m for m in adapter.modules() if isinstance(m, nn.Linear)]
    if last_linear and last_linear[-1].out_features != d_teacher:
        raise ValueError(
            f"taf_projector: the teacher adapter's last Linear outputs {last_linear[-1].out_features} "
            f"features but d_teacher={d_teacher} was given"
        )
    return TAFProjector(OrderedDict(teacher_adapter=adapter, linear=nn.Linear(d_teacher, d_student)))


def _flat_config(module: nn.Module) -> dict | None:
    """The module's HF config as a flat dict (None when the module has no config)."""
    config = getattr(module, "config", None)
    if config is None:
        return None
    d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    # Bookkeeping fields that say nothing about the network itself.
    for key in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype",
                "_attn_implementation_autoset", "_commit_hash", "_attn_implementation",
                "_experts_implementation"):
        d.pop(key, None)
    return d


@torch.no_grad()
def check_shared_vision_encoder(teacher_vision: nn.Module, student_vision: nn.Module) -> None:
    """TAF requires teacher and student to use the SAME vision encoder (docs/method.md sections 1-2):
    P_t was trained on that encoder's features. Raises ValueError naming what differs:
    the config fields, the parameter/buffer names, or the first parameter whose values differ.
    Values are compared exactly at the coarser of the two dtypes, where a tensor's dtype is the coarsest that
    holds its values (`_holds`): a teacher loaded in bf16 (train.py does on CUDA), or whose tower was saved in
    bf16 and read back into fp32, matches a student holding the same fp32 checkpoint, since rounding the
    student's copy to bf16 gives the teacher's weights bit for bit; any other difference is an error that
    says the towers come from different weights. Returns the names of the parameters that matched only after
    such a rounding (empty when the two towers are identical).
    """
    cfg_t, cfg_s = _flat_config(teacher_vision), _flat_config(student_vision)
    if (cfg_t is None) != (cfg_s is None):
        raise ValueError("check_shared_vision_encoder: only one of the two vision encoders has a config")
    if cfg_t is not None:
        differing = sorted(k for k in cfg_t.keys() | cfg_s.keys() if cfg_t.get(k, "<missing>") != cfg_s.get(k, "<missing>"))
        if differing:
            details = ", ".join(f"{k}: teacher={cfg_t.get(k, '<missing>')!r} student={cfg_s.get(k, '<missing>')!r}"
                                for k in differing)
            raise ValueError(f"check_shared_vision_encoder: vision encoder configs differ in {differing} ({details}); "
                             "TAF needs the teacher's vision encoder for the student")

    sd_t, sd_s = teacher_vision.state_dict(), student_vision.state_dict()
    if sd_t.keys() != sd_s.keys():
        only_t, only_s = sorted(sd_t.keys() - sd_s.keys()), sorted(sd_s.keys() - sd_t.keys())
        raise ValueError(f"check_shared_vision_encoder: parameter names differ; only in teacher: {only_t[:5]}"
                         f"{' ...' if len(only_t) > 5 else ''}, only in student: {only_s[:5]}"
                         f"{' ...' if len(only_s) > 5 else ''}")
    rounded, held_t, held_s = [], _holds(sd_t.values()), _holds(sd_s.values())
    for name in sd_t:
        a, b = sd_t[name], sd_s[name]
        if a.shape != b.shape:
            raise ValueError(f"check_shared_vision_encoder: parameter {name!r} has shape {tuple(a.shape)} in the "
                             f"teacher and {tuple(b.shape)} in the student")
        if a.is_floating_point() and b.is_floating_point():
            coarse = max((a.dtype, b.dtype, held_t, held_s), key=lambda d: torch.finfo(d).eps)
            a_, b_ = a.detach().cpu().to(coarse), b.detach().cpu().to(coarse)
            if coarse not in (a.dtype, b.dtype) and not torch.equal(a.detach().cpu().double(), b.detach().cpu().double()):
                rounded.append(name)  # one side holds a rounded copy in a finer dtype
        else:  # integer buffers (e.g. position ids) compare as they are
            a_, b_ = a.detach().cpu(), b.detach().cpu()
        if not torch.equal(a_, b_):
            diff = (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()
            raise ValueError(
                f"check_shared_vision_encoder: parameter {name!r} differs between teacher and student (max abs "
                f"difference {diff:.3g}; teacher {a.dtype}, student {b.dtype}), and not by rounding one to the "
                f"other's dtype: the two vision towers come from different weights. TAF needs the vision encoder "
                f"the teacher's adapter was trained on: build the student on the teacher's vision checkpoint "
                f"(parts:VISION,... with the teacher's VISION)")
    return rounded


def _holds(tensors) -> torch.dtype:
    """The coarsest 16-bit float dtype that holds every value of every float tensor of a tower exactly:
    bfloat16 or float16 for a tower that was stored in one of them and read back into float32 (the round trip
    changes nothing), else the coarsest dtype the tensors have. Decided for the whole tower, not per tensor: a float32 tower's LayerNorm
    ones or zero biases are exact in bf16 too, its trained weights are not."""
    floats = [t.detach().cpu() for t in tensors if t.is_floating_point()]
    for d in (torch.bfloat16, torch.float16):
        if all(t.dtype == d or torch.equal(t.to(d).to(t.dtype), t) for t in floats):
            return d
    return max((t.dtype for t in floats), key=lambda d: torch.finfo(d).eps, default=torch.float32)


def check_same_vision_features(teacher: nn.Module, student: nn.Module) -> None:
    """The same encoder is not enough for TAF: the teacher's adapter was trained on ONE hidden layer (or set)
    with one select strategy; a student reading another would feed it features it never saw. Raises naming
    both values and the flags that set them."""
    diff = [f"{k}: teacher {getattr(teacher, k)!r} vs student {getattr(student, k)!r}"
            for k in ("vision_feature_layer", "vision_feature_select_strategy")
            if getattr(teacher, k) != getattr(student, k)]
    if diff:
        raise ValueError("TAF: teacher and student read different vision features (" + "; ".join(diff) + "); the "
                         "teacher's frozen adapter was trained on the teacher's. Build the student with the same "
                         "--vision-feature-layer / --vision-feature-select-strategy")
