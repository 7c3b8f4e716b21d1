"""MM1's findings as experiments: the arms that test each one, the metric it is judged on, and why.

An arm is the tiny recipe with a few overrides, trained from its own CLIP encoder (arms whose
vision tower differs get their own) for the same number of steps and samples as every other arm
(MM1 compares at equal steps). A finding names the arms it compares and its primary metric, fixed
here before anything runs, so that a verdict cannot be chosen after the scores are seen:

1. resolution > encoder size: `res128` (128 px, patch 16: same 8×8 grid) against `vit_big` (a ViT
   twice as deep and 1.5× as wide at 64 px), on VQA 0-shot (the task with fine details).
2. more image tokens help: `base` (16) against `tok4` (4); `tok64` in the full mode.
3. the connector barely matters: C-Abstractor (`base`), `avg_pool`, `attn_pool` at 16 tokens, on
   captioning 0-shot: reproduced when every pair's difference is within ±20% of `base`.
4. caption data drives zero-shot: `cap100` (100% captions) against `cap0` (0%), captioning 0-shot.
5. interleaved data drives few-shot: `cap0` (90% interleaved) against `cap100` (0%), VQA 8-shot.
6. text-only data preserves text ability: `text0` (no text) against `base` (10%), held-out text
   perplexity (lower is better: judged on log perplexity).
7. MoE beats dense at equal active parameters: `moe` (4 experts of half the FFN, top-2, every 2nd
   layer) against `base`, captioning 0-shot.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Arm:
    """One configuration: overrides of the tiny recipe (the vision ones also shape its CLIP stage)."""

    name: str
    overrides: tuple[str, ...] = ()

    @property
    def vision_overrides(self) -> tuple[str, ...]:
        return tuple(o for o in self.overrides if o.startswith("model.vision."))

    @property
    def vision_key(self) -> str:
        return "vit-" + hashlib.sha256(json.dumps(self.vision_overrides).encode()).hexdigest()[:8]


class Claim(str, enum.Enum):
    """What a finding claims of its arms: an order, or equivalence within a margin."""
    ORDERED = "ordered"  # the arms score in the order listed, best first
    EQUIVALENT = "equivalent"  # every other arm within ±margin of the first (the reference) arm


@dataclass(frozen=True)
class Metric:
    """The score a finding is judged on, and which way (and on which scale) is better."""
    key: str  # a key of an arm's scores (see runner.ARM_METRICS)
    lower_is_better: bool = False
    log: bool = False  # judge on the logarithm (perplexity)


@dataclass(frozen=True)
class Finding:
    """One of MM1's findings: its arms, its metric and its claim, fixed before any arm runs."""
    name: str
    statement: str
    arms: tuple[str, ...]  # ORDERED: best first; EQUIVALENT: the reference first
    metric: Metric
    claim: Claim = Claim.ORDERED
    margin: float = 0.2  # EQUIVALENT: a fraction of the reference arm's mean

    def to_dict(self) -> dict:
        return asdict(self)


ARMS = {
    "base": Arm("base"),
    "res128": Arm("res128", ("model.vision.image_size=128", "model.vision.patch_size=16")),
    "vit_big": Arm("vit_big", ("model.vision.width=192", "model.vision.depth=6", "model.vision.heads=6")),
    "tok4": Arm("tok4", ("model.connector.num_tokens=4",)),
    "tok64": Arm("tok64", ("model.connector.num_tokens=64",)),
    "avg_pool": Arm("avg_pool", ("model.connector.kind=avg_pool",)),
    "attn_pool": Arm("attn_pool", ("model.connector.kind=attention_pool",)),
    "cap100": Arm("cap100", ("data.sources.caption.weight=100", "data.sources.interleaved.weight=0",
                             "data.sources.text.weight=0")),
    "cap0": Arm("cap0", ("data.sources.caption.weight=0", "data.sources.interleaved.weight=90",
                         "data.sources.text.weight=10")),
    "text0": Arm("text0", ("data.sources.text.weight=0",)),
    "moe": Arm("moe", ("model.moe.num_experts=4", "model.moe.every=2", "model.moe.top_k=2")),
}
# the MoE arm's experts have half the dense FFN's hidden width: top-2 of them cost what the FFN does
MOE_EXPERT_HIDDEN = "model.decoder.ffn_hidden=256"

CAPTION_0 = Metric("synth_caption@0")
FINDINGS = (
    Finding("resolution", "image resolution matters more than encoder size", ("res128", "vit_big"),
            Metric("synth_vqa@0")),
    Finding("image_tokens", "more image tokens help", ("base", "tok4"), CAPTION_0),
    Finding("connector", "the connector type barely matters", ("base", "avg_pool", "attn_pool"), CAPTION_0,
            Claim.EQUIVALENT),
    Finding("caption_zero_shot", "caption data drives zero-shot", ("cap100", "cap0"), CAPTION_0),
    Finding("interleaved_few_shot", "interleaved data drives few-shot", ("cap0", "cap100"), Metric("synth_vqa@8")),
    Finding("text_only", "text-only data preserves text ability", ("base", "text0"),
            Metric("text_ppl", lower_is_better=True, log=True)),
    Finding("moe", "MoE beats dense at equal active parameters", ("moe", "base"), CAPTION_0),
)
def arm_overrides(arm: Arm) -> tuple[str, ...]:
    """The arm's overrides, with what its kind of change needs besides (the MoE experts' width)."""
    return (*arm.overrides, MOE_EXPERT_HIDDEN) if arm.name == "moe" else arm.overrides


def select(only: list[str] | None, *, quick: bool) -> tuple[list[Finding], list[Arm]]:
    """The findings asked for (all by default) and the arms they need, in a fixed order."""
    names = {f.name for f in FINDINGS}
    unknown = sorted(set(only or []) - names)
    if unknown:
        raise ValueError(f"unknown finding(s) {', '.join(unknown)}; choose from {', '.join(sorted(names))}")
    findings = [f for f in FINDINGS if not only or f.name in only]
    if not quick:  # the full mode also runs 64 image tokens beside 16 and 4
        findings = [Finding(f.name, f.statement, ("tok64", *f.arms), f.metric, f.claim) if f.name == "image_tokens"
                    else f for f in findings]
    wanted = {a for f in findings for a in f.arms}
    return findings, [arm for name, arm in ARMS.items() if name in wanted]
