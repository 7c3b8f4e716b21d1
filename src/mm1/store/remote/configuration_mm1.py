"""The configuration of an MM1 model exported by `mm1 export --hf`.

One flat config, as transformers' Llama has it, for the decoder (what generation, caches and other
engines read: `hidden_size`, `num_hidden_layers`, ...), and one dict for each part before it: the
image encoder (`vision_config`), the connector (`connector_config`) and the experts (`moe_config`).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MM1Config(PretrainedConfig):
    """An MM1 model: a ViT, a vision-language connector and a Llama-style (optionally MoE) decoder."""

    model_type = "mm1"

    def __init__(
        self,
        vision_config: dict | None = None,
        connector_config: dict | None = None,
        moe_config: dict | None = None,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        intermediate_size: int = 5632,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 16,
        head_dim: int = 128,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        rope_frequency_scaling: dict | None = None,
        attention_bias: bool = False,
        max_position_embeddings: int = 4096,
        image_token_id: int = 2,
        image_size: int = 336,
        sub_image_grid: int = 0,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ) -> None:
        self.vision_config = vision_config or {}
        self.connector_config = connector_config or {}
        self.moe_config = moe_config or {"num_experts": 0}
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_frequency_scaling = rope_frequency_scaling  # Llama 3.1 style `linear` or `llama3`, or None
        self.attention_bias = attention_bias
        self.max_position_embeddings = max_position_embeddings
        self.image_token_id = image_token_id
        self.image_size = image_size
        self.sub_image_grid = sub_image_grid  # views per image: 1 + grid² when > 0 (SFT models)
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
