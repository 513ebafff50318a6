"""Tests for taf.py (docs/method.md section 2: x_v = P_s(P_t(z)), P_t frozen)."""
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from taf import check_shared_vision_encoder, taf_projector  # noqa: E402


def _adapter(d_vision=12, d_teacher=10):
    # the paper's adapter: Linear, GELU, Linear ("mlp2x_gelu"), plus a Dropout to check eval mode
    return nn.Sequential(nn.Linear(d_vision, d_teacher), nn.GELU(), nn.Dropout(0.5), nn.Linear(d_teacher, d_teacher))


def test_frozen_trainable_split_and_names():
    torch.manual_seed(0)
    teacher = _adapter()
    proj = taf_projector(teacher, d_teacher=10, d_student=6)
    trainable = sorted(n for n, p in proj.named_parameters() if p.requires_grad)
    frozen = sorted(n for n, p in proj.named_parameters() if not p.requires_grad)
    assert trainable == ["linear.bias", "linear.weight"]
    assert frozen == ["teacher_adapter.0.bias", "teacher_adapter.0.weight", "teacher_adapter.3.bias",
                      "teacher_adapter.3.weight"]
    # a copy: the teacher's own adapter is untouched and shares no storage
    assert all(p.requires_grad for p in teacher.parameters())
    assert proj.teacher_adapter[0].weight.data_ptr() != teacher[0].weight.data_ptr()
    assert torch.equal(proj.teacher_adapter[0].weight, teacher[0].weight)
    # train() keeps the frozen adapter in eval mode
    proj.train()
    assert proj.training and proj.linear.training and not proj.teacher_adapter.training
    assert not any(m.training for m in proj.teacher_adapter.modules())


def test_output_shape_and_value():
    torch.manual_seed(0)
    teacher = _adapter().eval()
    proj = taf_projector(teacher, d_teacher=10, d_student=6).train()
    z = torch.randn(2, 5, 12)
    x = proj(z)
    assert x.shape == (2, 5, 6)
    # independent recomputation: teacher adapter (eval: no dropout) then the linear map
    ref = teacher(z) @ proj.linear.weight.T + proj.linear.bias
    torch.testing.assert_close(x, ref)


def test_gradient_reaches_only_the_linear():
    torch.manual_seed(0)
    proj = taf_projector(_adapter(), d_teacher=10, d_student=6)
    z = torch.randn(3, 12, requires_grad=True)
    proj(z).pow(2).sum().backward()
    assert proj.linear.weight.grad is not None and proj.linear.weight.grad.abs().sum() > 0
    assert proj.linear.bias.grad is not None
    assert all(p.grad is None for p in proj.teacher_adapter.parameters())
    assert z.grad is not None  # the gradient still flows through the frozen adapter to its input


def test_width_mismatch_is_an_error():
    with pytest.raises(ValueError, match="d_teacher=9"):
        taf_projector(_adapter(), d_teacher=9, d_student=6)


def _siglip(**overrides):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               image_size=28, patch_size=14)
    cfg.update(overrides)
    torch.manual_seed(0)
    return SiglipVisionModel(SiglipVisionConfig(**cfg))


def test_shared_vision_encoder_ok():
    a, b = _siglip(), _siglip()
    check_shared_vision_encoder(a, b)  # same seed, same config -> same weights: no error


def test_shared_vision_encoder_config_mismatch_names_field():
    with pytest.raises(ValueError, match="image_size"):
        check_shared_vision_encoder(_siglip(), _siglip(image_size=42))


def test_shared_vision_encoder_weight_mismatch_names_parameter():
    a, b = _siglip(), _siglip()
    with torch.no_grad():
        b.get_parameter("post_layernorm.weight").add_(1e-3)
    with pytest.raises(ValueError, match="post_layernorm.weight"):
        check_shared_vision_encoder(a, b)


def test_shared_vision_encoder_with_integer_buffers():
    class Enc(nn.Module):
        def __init__(self, shift=0):
            super().__init__()
            torch.manual_seed(0)
            self.proj = nn.Linear(2, 2)
            self.register_buffer("position_ids", torch.arange(4) + shift)
    check_shared_vision_encoder(Enc().to(torch.bfloat16), Enc())  # the bf16 cast leaves integer buffers alone
    with pytest.raises(ValueError, match="position_ids"):
        check_shared_vision_encoder(Enc(), Enc(shift=1))


def test_shared_vision_encoder_name_mismatch():
    a = nn.Sequential(nn.Linear(2, 2))
    b = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="parameter names differ"):
        check_shared_vision_encoder(a, b)


def test_shared_vision_encoder_bf16_teacher_copy_of_the_same_weights():
    """train.py loads the teacher in bf16 on CUDA: its encoder is the student's fp32 checkpoint rounded to
    bf16, which is the same encoder; a bf16 copy of OTHER weights is still refused."""
    a, b = _siglip(), _siglip()
    check_shared_vision_encoder(a.to(torch.bfloat16), b)
    check_shared_vision_encoder(b, a)  # either order
    c = _siglip()
    with torch.no_grad():
        c.get_parameter("post_layernorm.weight").add_(0.05)  # a change bf16 rounding keeps
    with pytest.raises(ValueError, match="post_layernorm.weight"):
        check_shared_vision_encoder(c.to(torch.bfloat16), _siglip())
