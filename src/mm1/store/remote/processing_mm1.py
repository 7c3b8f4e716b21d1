"""Images and text into an MM1 model's inputs, as mm1 prepares them (written by `mm1 export --hf`).

Each image is padded to a square with the mean colour, resized bicubically and normalised as the image
encoder's CLIP training did; an SFT model's image is also cut into sub-images (MM1 §4: an overview and
grid×grid crops of a grid·size square), each a view of its own. In the text, each `<image>` stands for one
image and becomes `num_image_tokens` `<image>` tokens per view, the slots the model fills with image tokens.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin


class MM1ImageProcessor(BaseImageProcessor):
    """PIL images → `pixel_values` [views, 3, size, size], the views of each image in order."""

    model_input_names: ClassVar[list[str]] = ["pixel_values"]

    def __init__(self, image_size: int = 336, sub_image_grid: int = 0,
                 image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073),
                 image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711), **kwargs) -> None:
        super().__init__(**kwargs)
        self.image_size, self.sub_image_grid = image_size, sub_image_grid
        self.size = {"height": image_size, "width": image_size}  # each view's (other engines read it)
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    def views_per_image(self) -> int:
        return 1 + self.sub_image_grid**2 if self.sub_image_grid else 1

    def _square(self, img: Image.Image, size: int) -> Image.Image:
        """Pad the shorter side with the colour that normalises to zero, then resize to size×size."""
        w, h = img.size
        side = max(w, h)
        if w != h:
            canvas = Image.new("RGB", (side, side), tuple(int(255 * m) for m in self.image_mean))
            canvas.paste(img, ((side - w) // 2, (side - h) // 2))
            img = canvas
        return img.resize((size, size), Image.Resampling.BICUBIC) if side != size else img

    def views(self, img: Image.Image) -> list[Image.Image]:
        """The views the model sees: the image, or its overview and crops in reading order."""
        img, size, grid = img.convert("RGB"), self.image_size, self.sub_image_grid
        if not grid:
            return [self._square(img, size)]
        big = self._square(img, size * grid)
        crops = [big.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
                 for r in range(grid) for c in range(grid)]
        return [big.resize((size, size), Image.Resampling.BICUBIC), *crops]

    def to_tensor(self, view: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(view, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(self.image_mean)[:, None, None]) / torch.tensor(self.image_std)[:, None, None]

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        images = [images] if isinstance(images, Image.Image) else list(images)
        views = [v for img in images for v in self.views(img)]
        return BatchFeature({"pixel_values": torch.stack([self.to_tensor(v) for v in views]) if views else None})


class MM1Processor(ProcessorMixin):
    """The image processor and the tokenizer together: `processor(text=..., images=...)` gives `input_ids`,
    `attention_mask` (rows left-padded) and `pixel_values`, ready for `model.generate(**inputs)`.

    Each `<image>` of the text becomes `image_tokens_per_image()` `<image>` tokens through transformers'
    own placeholder expansion (`replace_image_token`), which also reports where each image's tokens went
    (`return_text_replacement_offsets=True`): what vLLM's transformers backend reads."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens: int = 144, image_token: str = "<image>",
                 chat_template: str | None = None, **kwargs) -> None:
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        tokenizer.padding_side = "left"  # generation appends on the right of every row
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def image_tokens_per_image(self) -> int:
        """Tokens each image takes in the sequence: every view's `num_image_tokens`."""
        return self.num_image_tokens * self.image_processor.views_per_image()

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.image_tokens_per_image()

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        from transformers.processing_utils import MultiModalData

        if image_sizes is None:
            return MultiModalData()
        n = len(image_sizes)
        return MultiModalData(num_image_tokens=[self.image_tokens_per_image()] * n,
                              num_image_patches=[self.image_processor.views_per_image()] * n)

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        flat = [] if images is None else [images] if isinstance(images, Image.Image) else \
            [img for group in images for img in (group if isinstance(group, list | tuple) else [group])]
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != len(flat):  # said before any image is processed
            raise ValueError(f"the text has {placeholders} {self.image_token} placeholder(s) for {len(flat)} image(s)")
        kwargs.setdefault("return_tensors", "pt")
        kwargs.setdefault("padding", True)
        kwargs.setdefault("add_special_tokens", False)  # mm1's prompts carry their own markers
        return super().__call__(images=flat or None, text=texts, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
