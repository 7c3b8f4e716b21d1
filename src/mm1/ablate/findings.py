"""MM1's findings as experiments: the arms that test each one, the metric it is judged on, and why.

Every arm follows MM1's ablation set-up (`docs/paper.md`): its decoder starts from a text-only LM stage
(a pre-trained LLM, one per decoder shape and seed) and its image encoder from a CLIP stage (one per
vision tower and seed); it is then pre-trained on the multimodal mixture for the same number of
steps and tokens as every other arm (MM1 compares at equal steps) and scored in MM1's pre-training
prompt format. A finding names the arms it compares, its judged metric and its claim, fixed here
before anything runs, so that a verdict cannot be chosen after the scores are seen:

1. resolution > encoder size: `res128` (128 px, patch 16: the same 8×8 grid) against `vit_big` (a ViT
   twice as deep at 64 px: twice the parameters, as MM1's ViT-L to ViT-H), on `synth_stripes` (mean of
   0- and 8-shot: "What color is the striped shape?"), detail that only resolution shows, as TextVQA's
   small text is: the stripes are plain at 128 px and averaged away at 64 px. (VQA on colours and
   shapes, used first, is answered as well at 64 px; `synth_words`, used next, was read by no arm at
   either resolution in 200 steps.)
2. more image tokens help: 64 > 16 tokens (MM1 compares 64 with 144), on captioning 0-shot, in arms
   whose packed sequences and context are 1024 long (3 sequences a step: the tokens of 8 of 384), so
   that every 8-shot prompt fits the context (at 384, nine 64-token images do not). The quick mode
   runs no 64-token arm, so it needs no longer context: 16 (`base`) > 4 (`tok4`) at the base arm's
   384, where every 8-shot prompt of either fits (the 1024-position arms cost about 1.4× more per token
   on a CPU).
3. the connector barely matters: average pooling (`base`), `c_abstractor`, `attn_pool` at 16 tokens,
   on captioning 0-shot: reproduced when every difference's interval lies within ±15% of `base`'s
   mean, a margin fixed before running (MM1's connectors differ by about a point on scores near 50).
   The tiny recipe pools by average, not with MM1's C-Abstractor, which at this scale learned to
   answer questions without looking at the image (a probe: docs/results/ablate/README.md at commit 2826ab7).
4. caption data drives zero-shot: `cap100` (100% captions) over `cap0` (0%), captioning 0-shot.
5. interleaved data drives few-shot: `cap0` (90% interleaved) over `cap100` (0%), VQA 8-shot; the
   gain of 8 shots over 0 is reported beside it (MM1's Figure 5 shows both).
6. text-only data preserves text ability: `base` (10% text) against `text0` (none), on held-out text
   perplexity relative to the LM stage the arm started from (lower is better, on the log scale):
   what multimodal pre-training keeps of the LLM's text ability, as MM1 measures it.
7. MoE beats dense at equal active parameters and equal steps: `moe` (4 experts of half the FFN,
   top-2, every 2nd layer, upcycled from its dense LM stage) over `base`, captioning 0-shot; beside it,
   at equal step time (the argument of `../shared/reference/related-abstracts.txt`, abstract 3),
   `moe` against `dense_eqtime`, a dense decoder widened until its step costs what the MoE's does.
8. quality-filtered web data beat unfiltered at equal compute (issue 29; the method of
   `../shared/reference/related-abstracts.txt`, as MM1's data were filtered hard): the arms' interleaved
   source is a crawl of the world's 2,000 good pages and 1,000 junk ones (`data/synth/junk.py`);
   `crawl_raw` trains on all of it, `crawl_filtered` on what `mm1 data grade` (an instruct LLM, `--grader`)
   and `mm1 data filter` keep (the top two thirds), for the same steps. Judged on held-out text
   perplexity relative to the LM stage; 8-shot VQA and captioning beside it. Full mode only, and only
   with a grader (none ships offline; the report says so when it is not run).
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Arm:
    """One configuration: overrides of the tiny recipe. Its vision overrides also shape its CLIP stage,
    its decoder overrides its LM stage (arms of the same shapes share those stages)."""

    name: str
    overrides: tuple[str, ...] = ()

    def _of(self, prefix: str) -> tuple[str, ...]:
        return tuple(o for o in self.overrides if o.startswith(prefix))

    @property
    def vision_overrides(self) -> tuple[str, ...]:
        return self._of("model.vision.")

    @property
    def decoder_overrides(self) -> tuple[str, ...]:
        """The overrides that shape the decoder's weights (its position limit does not: RoPE has no table)."""
        return tuple(o for o in self._of("model.decoder.") if not o.startswith("model.decoder.max_seq_len="))

    @property
    def vision_key(self) -> str:
        return "vit-" + hashlib.sha256(json.dumps(self.vision_overrides).encode()).hexdigest()[:8]

    @property
    def decoder_key(self) -> str:
        return "lm-" + hashlib.sha256(json.dumps(self.decoder_overrides).encode()).hexdigest()[:8]


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
    margin: float = 0.15  # EQUIVALENT: a fraction of the reference arm's mean
    why: str = ""  # why this metric at this setting: printed in the report
    beside: tuple[tuple[str, str], ...] = ()  # pairs compared and reported, not judged
    columns: tuple[str, ...] = ()  # metrics shown besides the standard ones

    @property
    def all_arms(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.arms, *(a for pair in self.beside for a in pair)]))

    def to_dict(self) -> dict:
        return asdict(self)


# Arms of the image-token finding: sequences and context of 1024 (every 8-shot prompt of 64-token images
# fits), up to 64 images a sequence, 3 sequences a step (the 3,072 tokens of 8 × 384).
LONG = ("model.decoder.max_seq_len=1024", "data.packing.seq_len=1024", "data.packing.max_images=64",
        "train.batch_size=3")
MOE = ("model.moe.num_experts=4", "model.moe.every=2", "model.moe.top_k=2")
# Measured 2026-12-06 on the 2-core machine (1 thread, 8 × 384 tokens, tokens/s, 3 readings each): dense
# FFN 512: 2.9k; the MoE arm: 2.45k; dense 640: 2.5k; dense 768: 2.37k. 704 costs what the MoE's step does.
EQUAL_TIME_FFN = 704
# The quality finding's crawl: the good pages and the junk ones as one interleaved source.
CRAWL = "data.sources.interleaved.paths={root}/interleaved/*.parquet,{root}/junk/*.parquet"
CRAWL_KEEP = 2 / 3  # the filter keeps this share of the crawl (the world's good pages are two thirds of it)

ARMS = {
    "base": Arm("base"),
    "res128": Arm("res128", ("model.vision.image_size=128", "model.vision.patch_size=16")),
    "vit_big": Arm("vit_big", ("model.vision.depth=6",)),  # the tiny ViT's 3 layers doubled: 2× its parameters
    "tok4": Arm("tok4", ("model.connector.num_tokens=4",)),
    "tok16_long": Arm("tok16_long", LONG),
    "tok64_long": Arm("tok64_long", (*LONG, "model.connector.num_tokens=64")),
    "c_abstractor": Arm("c_abstractor", ("model.connector.kind=c_abstractor",)),
    "attn_pool": Arm("attn_pool", ("model.connector.kind=attention_pool",)),
    "cap100": Arm("cap100", ("data.sources.caption.weight=100", "data.sources.interleaved.weight=0",
                             "data.sources.text.weight=0")),
    "cap0": Arm("cap0", ("data.sources.caption.weight=0", "data.sources.interleaved.weight=90",
                         "data.sources.text.weight=10")),
    "text0": Arm("text0", ("data.sources.text.weight=0",)),
    # the experts have half the dense FFN's hidden width: top-2 of them cost what the FFN does
    "moe": Arm("moe", (*MOE, "model.decoder.ffn_hidden=256")),
    "dense_eqtime": Arm("dense_eqtime", (f"model.decoder.ffn_hidden={EQUAL_TIME_FFN}",)),
    "crawl_raw": Arm("crawl_raw", (CRAWL,)),
    "crawl_filtered": Arm("crawl_filtered", (CRAWL, "data.sources.interleaved.quality=true")),
}

CAPTION_0 = Metric("synth_caption@0")
GAINS = ("synth_caption@gain", "synth_vqa@gain")  # 8-shot minus 0-shot
QUALITY = Finding(
    "quality", "quality-filtered web data beat unfiltered at equal compute", ("crawl_filtered", "crawl_raw"),
    Metric("text_ppl_vs_lm", lower_is_better=True, log=True), columns=("synth_vqa@8", "synth_caption@8"),
    why="the crawl's junk pages (menus, spam, link lists, scrambled text) are graded by an instruct LLM, the "
        "grades distilled into a classifier and its lowest third left out; both arms train the same steps. "
        "Held-out text perplexity over the LM stage's: what the junk teaches the decoder; 8-shot scores beside.")
FINDINGS = (
    Finding("resolution", "image resolution matters more than encoder size", ("res128", "vit_big"),
            Metric("synth_stripes@mean"), columns=("synth_stripes@0", "synth_stripes@8"),
            why="synth_stripes needs resolution, as TextVQA does: its stripes are plain at 128 px and averaged "
                "away at 64 px; judged on the mean of 0- and 8-shot. The larger encoder is the tiny ViT twice "
                "as deep (2× its parameters, as MM1's ViT-L to ViT-H)."),
    Finding("image_tokens", "more image tokens help", ("tok64_long", "tok16_long"), CAPTION_0,
            why="sequences and context of 1024 in every arm of this finding, so that no 8-shot prompt runs "
                "past the positions the arm trained on (quick mode: 16 and 4 tokens at the base arm's 384, "
                "where every 8-shot prompt of both fits)."),
    Finding("connector", "the connector type barely matters", ("base", "c_abstractor", "attn_pool"), CAPTION_0,
            Claim.EQUIVALENT, why="equivalence within ±15% of average pooling's mean, fixed before running."),
    Finding("caption_zero_shot", "caption data drives zero-shot", ("cap100", "cap0"), CAPTION_0, columns=GAINS,
            why="MM1's Figure 5: captions lift zero-shot scores."),
    Finding("interleaved_few_shot", "interleaved data drives few-shot", ("cap0", "cap100"), Metric("synth_vqa@8"),
            columns=GAINS, why="MM1's Figure 5: interleaved documents lift 8-shot scores; the 8-shot gain over "
                               "0-shot is shown beside the absolute scores."),
    Finding("text_only", "text-only data preserves text ability", ("base", "text0"),
            Metric("text_ppl_vs_lm", lower_is_better=True, log=True), columns=("lm_text_ppl",),
            why="held-out text perplexity over that of the LM stage each arm started from: what multimodal "
                "pre-training keeps of the LLM's text ability."),
    Finding("moe", "MoE beats dense at equal active parameters", ("moe", "base"), CAPTION_0,
            beside=(("moe", "dense_eqtime"),),
            why="equal active parameters and equal steps, judged; beside it, a dense decoder whose step costs "
                "what the MoE's does (equal step time), not judged."),
    QUALITY,
)
QUICK_IMAGE_TOKENS = ("base", "tok4")


def select(only: list[str] | None, *, quick: bool) -> tuple[list[Finding], list[Arm]]:
    """The findings asked for (all by default) and the arms they need, in a fixed order."""
    names = {f.name for f in FINDINGS}
    unknown = sorted(set(only or []) - names)
    if unknown:
        raise ValueError(f"unknown finding(s) {', '.join(unknown)}; choose from {', '.join(sorted(names))}")
    findings = [f for f in FINDINGS if not only or f.name in only]
    if quick:  # grading the crawl and two more arms do not fit the quick mode's hour
        findings = [f for f in findings if f.name != QUALITY.name]
    if quick:  # no 64-token arm, so no long context; the arms reported beside a finding are the full mode's
        findings = [replace(f, arms=QUICK_IMAGE_TOKENS) if f.name == "image_tokens" else f for f in findings]
        findings = [replace(f, beside=()) for f in findings]
    wanted = {a for f in findings for a in f.all_arms}
    return findings, [arm for name, arm in ARMS.items() if name in wanted]
