"""The configuration of an MM1 model exported by `mm1 export --hf`.

Laid out as transformers' image-text models are (Llava, Idefics3): the decoder LLM's settings in a nested
`text_config` (what generation, caches and other engines read: `hidden_size`, `num_hidden_layers`, ...),
and beside it one dict for each part before the decoder: the image encoder (`vision_config`) and the
connector (`connector_config`). The nesting is what tells vLLM's transformers backend that the model takes
images.
"""

from __future__ import annotations

from typing import ClassVar

from transformers import PretrainedConfig


class MM1TextConfig(PretrainedConfig):
    """MM1's decoder LLM: Llama-style (RMSNorm, RoPE, grouped-query attention, SwiGLU), and optionally a
    top-k mixture of experts in every `moe_config["every"]`-th layer."""

    model_type = "mm1_text"
    base_config_key = "text_config"

    def __init__(
        self,
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
        moe_config: dict | None = None,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ) -> None:
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
        self.moe_config = moe_config or {"num_experts": 0}  # {num_experts, every, top_k}
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class MM1Config(PretrainedConfig):
    """An MM1 model: a ViT, a vision-language connector and the decoder of `text_config`."""

    model_type = "mm1"
    sub_configs: ClassVar[dict] = {"text_config": MM1TextConfig}

    def __init__(
        self,
        text_config: dict | MM1TextConfig | None = None,
        vision_config: dict | None = None,
        connector_config: dict | None = None,
        image_token_id: int = 2,
        image_size: int = 336,
        sub_image_grid: int = 0,
        tie_word_embeddings: bool = False,
        **kwargs,
    ) -> None:
        if isinstance(text_config, dict):
            text_config = MM1TextConfig(**text_config)
        self.text_config = text_config if text_config is not None else MM1TextConfig()
        self.vision_config = vision_config or {}
        self.connector_config = connector_config or {}
        self.image_token_id = image_token_id
        self.image_size = image_size
        self.sub_image_grid = sub_image_grid  # views per image: 1 + grid² when > 0 (SFT models)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
