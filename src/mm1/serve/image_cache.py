"""Image embeddings computed once per distinct image: an LRU cache keyed by the image tensor's content.

A multi-turn chat resends its images with every turn, and a few-shot evaluation shows the same
demonstration images to many queries; the ViT and connector need not see them again. The key is a
hash of the preprocessed tensor (what the encoder would see), so equal pixels share an entry however
they arrived. The cache is bounded in bytes and evicts the least recently used entries.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch


class ImageCache:
    """An LRU map from an image tensor's content to its embedding [num_image_tokens, D]."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    @staticmethod
    def key(image_CHW: torch.Tensor) -> bytes:
        t = image_CHW.detach().contiguous().cpu()
        h = hashlib.blake2b(repr((tuple(t.shape), str(t.dtype))).encode(), digest_size=16)
        h.update(t.numpy().tobytes())
        return h.digest()

    def encode(self, images_NCHW: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Embeddings [N, tokens, D] of the images: cached ones looked up, the others encoded in one batch."""
        if self.max_bytes <= 0:
            return encode(images_NCHW)
        keys = [self.key(im) for im in images_NCHW]
        with self.lock:
            found = {k: self.entries[k] for k in keys if k in self.entries}
            for k in found:
                self.entries.move_to_end(k)
        missing = [i for i, k in enumerate(keys) if k not in found]
        computed: dict[bytes, torch.Tensor] = {}
        if missing:
            out = encode(images_NCHW[missing])
            for j, i in enumerate(missing):
                computed.setdefault(keys[i], out[j])
        with self.lock:
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
            for k, v in computed.items():
                self._put(k, v)
        return torch.stack([found.get(k, computed.get(k)) for k in keys])

    def _put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if key in self.entries or size > self.max_bytes:
            return
        self.entries[key] = value.detach()
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
