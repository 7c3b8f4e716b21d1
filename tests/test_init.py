"""A model built on the meta device and given memory gets the starting values the constructor draws."""

import pytest
import torch

from mm1.config import apply_overrides
from mm1.model.clip import CLIP
from mm1.model.init import owns_tensors, reset_all
from mm1.model.mllm import MLLM
from mm1.recipes import get_recipe

VARIANTS = {
    "avg_pool": (),
    "c_abstractor": ("model.connector.kind=c_abstractor",),
    "attention_pool_moe_cls": ("model.connector.kind=attention_pool", "model.moe.num_experts=4",
                               "model.vision.cls_token=true"),
}


def _cfg(overrides):
    cfg = apply_overrides(get_recipe("tiny"), list(overrides))
    cfg.model.image_token_id = 5
    return cfg


def _tensors(model):
    return dict(model.named_parameters()) | dict(model.named_buffers())


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_module_that_owns_a_tensor_can_reset_it(variant):
    model = MLLM(_cfg(VARIANTS[variant]).model)
    missing = {type(m).__name__ for m in model.modules() if owns_tensors(m) and not hasattr(m, "reset_parameters")}
    assert not missing


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_meta_build_given_memory_draws_what_the_constructor_draws(variant):
    cfg = _cfg(VARIANTS[variant])
    torch.manual_seed(0)
    ref = _tensors(MLLM(cfg.model))
    with torch.device("meta"):
        model = MLLM(cfg.model)
    model.to_empty(device="cpu")
    for t in _tensors(model).values():  # what to_empty leaves: whatever the memory held
        t.data.fill_(float("nan"))
    model.decoder.lm_head.weight = model.decoder.embed.weight  # to_empty unties (mm1.train.build re-ties)
    with torch.no_grad():
        reset_all(model)
    got = _tensors(model)
    assert got.keys() == ref.keys()
    for name, want in ref.items():
        have = got[name]
        assert torch.isfinite(have).all(), name
        if want.unique().numel() == 1:  # constants (norm weights, zero biases): exactly
            torch.testing.assert_close(have, want, msg=name)
        elif want.numel() >= 64:  # random draws: the same distribution (a few small biases: finite only)
            assert have.std().item() == pytest.approx(want.std().item(), rel=0.2), name
            assert abs(have.mean().item()) < 0.2 * want.std().item() + abs(want.mean().item()) + 1e-3, name
    torch.testing.assert_close(model.decoder.inv_freq, ref["decoder.inv_freq"])


def test_the_clip_stage_model_resets_too():
    cfg = _cfg(())
    with torch.device("meta"):
        clip = CLIP(cfg.model.vision, vocab=64)
    clip.to_empty(device="cpu")
    for t in _tensors(clip).values():
        t.data.fill_(float("nan"))
    with torch.no_grad():
        reset_all(clip)
    assert all(torch.isfinite(t).all() for t in _tensors(clip).values())
    assert clip.logit_scale.item() == pytest.approx(2.6593, abs=1e-4)


def test_a_module_with_tensors_and_no_reset_is_refused():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

    with pytest.raises(TypeError, match="Bare owns parameters or buffers but has no reset_parameters"):
        reset_all(torch.nn.Sequential(Bare()))
