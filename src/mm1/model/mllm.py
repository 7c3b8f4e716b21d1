"""The MM1 multimodal LLM: image encoder → connector → image tokens scattered into the decoder input.

A text sequence holds `num_tokens` `<image>` placeholder ids for each image (nanoVLM style); the
connector's outputs replace the placeholder embeddings in order, so any number of images can sit
anywhere in a packed sequence. The loss is summed over predicted tokens and returned with their
count, so the trainer can normalise over a whole accumulated batch rather than per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mm1.config import AttentionImpl, ModelConfig
from mm1.model.connector import build_connector
from mm1.model.decoder import Decoder, KVCache
from mm1.model.moe import MoEFFN, MoEStats
from mm1.model.vision import VisionEncoder

IGNORE = -100  # label of positions that carry no loss (images, prompts, padding)


@dataclass
class MLLMOutput:
    """The MLLM's forward result: the loss and its parts, logits when asked for, MoE statistics."""
    loss: torch.Tensor | None = None  # mean over predicted tokens of this call
    loss_sum: torch.Tensor | None = None
    num_predicted: int = 0
    logits_BTV: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # MoE load-balance + z-loss, already weighted
    moe_stats: list[MoEStats] = field(default_factory=list)
    source_loss_sum_S: torch.Tensor | None = None  # per data source, when `source_BT` is given
    source_count_S: torch.Tensor | None = None


def document_causal_mask(doc_ids_BT: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, T]: a token sees earlier tokens of its own document only."""
    T = doc_ids_BT.shape[1]
    same_doc = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids_BT.device).tril()
    return (same_doc & causal)[:, None]


def document_block_mask(doc_ids_BT: torch.Tensor):
    """The same rule as `document_causal_mask`, as a flex-attention BlockMask: blocks of the T×T
    square that no query may see (other documents, the future) are skipped, not computed and masked."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q, kv):
        return (doc_ids_BT[b, q] == doc_ids_BT[b, kv]) & (q >= kv)

    B, T = doc_ids_BT.shape
    build = create_block_mask
    if doc_ids_BT.is_cuda:  # compiled once, as torchtitan does: eager, it materialises the T×T mask each call
        global _COMPILED_BLOCK_MASK
        if _COMPILED_BLOCK_MASK is None:
            _COMPILED_BLOCK_MASK = torch.compile(create_block_mask)
        build = _COMPILED_BLOCK_MASK
    return build(same_document_causal, B, None, T, T, device=doc_ids_BT.device)


_COMPILED_BLOCK_MASK = None


def uses_flex(impl: AttentionImpl, device: torch.device) -> bool:
    return impl == AttentionImpl.FLEX or (impl == AttentionImpl.AUTO and device.type == "cuda")


class MLLM(nn.Module):
    """MM1's model: image encoder, vision-language connector and decoder, images placed at `<image>` tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.connector = build_connector(
            cfg.connector, vision_width=cfg.vision.width, width=cfg.decoder.width,
            num_patches=(cfg.vision.image_size // cfg.vision.patch_size) ** 2,
        )
        self.decoder = Decoder(cfg.decoder, cfg.moe)
        self.apply(self._init_weights)

    def reset_parameters(self) -> None:
        """The constructor's last word on its parts' weights (GPT-2's small initial values); `reset_all`
        calls it after every part has reset its own, as the constructor does."""
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # Small initial weights (std 0.02, as in GPT-2): with larger ones little is learned in minutes.
        std = self.cfg.decoder.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, MoEFFN):
            for w in (module.w_gate_up, module.w_down):
                nn.init.normal_(w, std=std)

    @property
    def num_image_tokens(self) -> int:
        return self.cfg.connector.num_tokens

    def encode_images(self, images_NCHW: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] → [N, num_image_tokens, D]."""
        return self.connector(self.vision(images_NCHW))

    def embed(self, tokens_BT: torch.Tensor, images_NCHW: torch.Tensor | None, *,
              encode_images: Callable[[torch.Tensor], torch.Tensor] | None = None,
              vision_always: bool = False) -> torch.Tensor:
        """Token embeddings with the image tokens scattered into the <image> slots. `encode_images`
        replaces `self.encode_images` (the inference engine passes a compiled one).

        `vision_always`: with no image in the batch, encode one blank image and add its output times
        zero, so the image encoder and connector still take part in forward and backward. Data-parallel
        training needs this: every rank must run the same collectives (FSDP's all-gathers, DDP's
        gradient reduction) even when its micro-batch is text only. The loss is unchanged.
        """
        x_BTD = self.decoder.embed(tokens_BT)
        slots = tokens_BT == self.cfg.image_token_id
        n_images = 0 if images_NCHW is None else images_NCHW.shape[0]
        want = n_images * self.num_image_tokens
        if slots.is_cuda:  # checked on the device: reading the count back would stall every micro-batch
            torch._assert_async(slots.sum() == want, "the batch's <image> slots are not its images × image tokens")
        elif (n_slots := int(slots.sum())) != want:
            raise ValueError(f"the batch has {n_slots} <image> slots but {n_images} images × "
                             f"{self.num_image_tokens} tokens = {want}")
        if n_images:
            img_ND = (encode_images or self.encode_images)(images_NCHW).reshape(-1, x_BTD.shape[-1]).to(x_BTD.dtype)
            x_BTD = x_BTD.masked_scatter(slots[..., None], img_ND)
        elif vision_always:
            size = self.cfg.vision.image_size
            blank = torch.zeros(1, 3, size, size, device=x_BTD.device, dtype=self.vision.patch_embed.weight.dtype)
            x_BTD = x_BTD + 0.0 * self.encode_images(blank).sum().to(x_BTD.dtype)
        return x_BTD

    def forward(
        self,
        *,
        tokens_BT: torch.Tensor,
        images_NCHW: torch.Tensor | None = None,
        labels_BT: torch.Tensor | None = None,
        positions_BT: torch.Tensor | None = None,
        doc_ids_BT: torch.Tensor | None = None,
        source_BT: torch.Tensor | None = None,
        num_sources: int = 4,
        return_logits: bool = False,
        vision_always: bool = False,
        num_labelled: int | None = None,
    ) -> MLLMOutput:
        """`num_labelled`: how many labels are not IGNORE, if the caller knows (the training batch counts
        them on the CPU): the loss then gathers its rows without reading a count back from the device."""
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = torch.arange(T, device=tokens_BT.device).expand(B, T)
        mask = None
        if doc_ids_BT is not None:
            flex = uses_flex(self.cfg.decoder.attention, doc_ids_BT.device)
            mask = (document_block_mask if flex else document_causal_mask)(doc_ids_BT)
        x_BTD = self.embed(tokens_BT, images_NCHW, vision_always=vision_always)
        dec = self.decoder(x_BTD, positions_BT, mask)
        out = MLLMOutput(moe_stats=dec.moe_stats)
        if dec.moe_stats:
            out.aux_loss = torch.stack([s.aux_loss for s in dec.moe_stats]).sum()
        if labels_BT is None or return_logits:
            out.logits_BTV = self.decoder.lm_head(dec.hidden_BTD).float()
        if labels_BT is not None:
            self._add_loss(out, dec.hidden_BTD, labels_BT, source_BT, num_sources, num_labelled)
        return out

    def _add_loss(self, out: MLLMOutput, h_BTD, labels_BT, source_BT, num_sources: int,
                  num_labelled: int | None) -> None:
        # Labels are already shifted by the packer: labels_BT[t] is the token that follows t. Only labelled
        # positions go through the LM head; with their count known, finding them needs no host sync.
        keep_M = (labels_BT != IGNORE).flatten()
        idx_N = (keep_M.nonzero() if num_labelled is None else torch.nonzero_static(keep_M, size=num_labelled))[:, 0]
        h_ND, y_N = h_BTD.flatten(0, 1).index_select(0, idx_N), labels_BT.flatten().index_select(0, idx_N)
        logits_NV = self.decoder.lm_head(h_ND).float()
        losses_N = F.cross_entropy(logits_NV, y_N, reduction="none")
        out.loss_sum = losses_N.sum()
        out.num_predicted = int(y_N.numel())
        out.loss = out.loss_sum / max(1, out.num_predicted)
        if source_BT is not None:
            src_N = source_BT.flatten().index_select(0, idx_N)
            zeros = torch.zeros(num_sources, device=losses_N.device)
            out.source_loss_sum_S = zeros.index_add(0, src_N, losses_N.detach())
            out.source_count_S = zeros.index_add(0, src_N, torch.ones_like(losses_N))

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = next(self.parameters())
        return KVCache.empty(self.cfg.decoder, batch, max_len, device=p.device, dtype=p.dtype)


@torch.no_grad()
def upcycle_from_dense(moe_model: MLLM, dense_state: dict[str, torch.Tensor]) -> None:
    """Sparse upcycling: copy a dense model's weights into an MoE one, every expert starting as its
    layer's FFN. All non-FFN weights must match by name and shape; routers keep their initialisation.
    """
    for name, tensor in moe_model.state_dict().items():
        if ".ffn.w_" in name or ".ffn.router." in name:
            continue
        if name not in dense_state or dense_state[name].shape != tensor.shape:
            raise ValueError(f"cannot upcycle: dense checkpoint has no tensor {name} of shape {tuple(tensor.shape)}")
        tensor.copy_(dense_state[name])
    for i, layer in enumerate(moe_model.decoder.layers):
        if isinstance(layer.ffn, MoEFFN):
            w = {k: dense_state[f"decoder.layers.{i}.ffn.{k}.weight"] for k in ("gate", "up", "down")}
            layer.ffn.upcycle_from(w["gate"], w["up"], w["down"])


def count_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts, built on the meta device: no memory is used."""
    with torch.device("meta"):
        model = MLLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, MoEFFN):
            per_expert = module.w_gate_up[0].numel() + module.w_down[0].numel()
            inactive += per_expert * (module.cfg.num_experts - module.cfg.top_k)
    return total, total - inactive


def lr_rule_parameters(cfg: ModelConfig) -> int:
    """N of MM1's learning-rate rule: the decoder's parameters (embeddings included, tied ones once),
    with each mixture-of-experts layer counted as its dense backbone's FFN.

    The paper fit the rule on LLM sizes (9M to 1.2B), so the image encoder and the connector are
    not counted, and the MoE models reuse their dense backbones' hyper-parameters.
    """
    from mm1.config import MoEConfig
    from mm1.model.decoder import Decoder

    with torch.device("meta"):
        dense = Decoder(cfg.decoder, MoEConfig())
    return sum(p.numel() for p in dense.parameters())
