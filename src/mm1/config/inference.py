"""What a run says about how its model is used at inference, so that no caller passes it by hand.

A model answers best in the form it was trained on: a fine-tuned (SFT) model in the chat template it
was tuned with and at the sub-image grid of its tuning (MM1's high-resolution views), a pre-trained one
in MM1's pre-training prompt format with one view per image. `InferenceSettings.of(cfg)` reads that
from a run's config; `mm1 eval`, `mm1 generate`, `mm1 chat`, `mm1 serve`, the quickstart and the HF
export all take it from there.
"""

from __future__ import annotations

from dataclasses import dataclass

from mm1.config.schema import Config, PromptFormat, Stage


@dataclass(frozen=True)
class InferenceSettings:
    """How a model is prompted (pre-training format or chat) and how many views each image gets."""

    prompt_format: PromptFormat = PromptFormat.PRETRAIN
    sub_image_grid: int = 0  # 0: one view per image; k: an overview plus k×k sub-images

    def __post_init__(self) -> None:
        if self.prompt_format == PromptFormat.AUTO:
            raise ValueError("resolve eval.prompt=auto to chat or pretrain first (InferenceSettings.of)")

    @classmethod
    def of(cls, cfg: Config) -> InferenceSettings:
        """A run's own settings: eval.prompt (AUTO: chat for an SFT run, else pre-training), and the SFT
        stage's sub-image grid (the views the model was tuned on; none for any other stage)."""
        fmt = cfg.eval.prompt
        if fmt == PromptFormat.AUTO:
            fmt = PromptFormat.CHAT if cfg.train.stage == Stage.SFT else PromptFormat.PRETRAIN
        return cls(fmt, cfg.data.sub_image_grid if cfg.train.stage == Stage.SFT else 0)
