"""`mm1 export --hf`: the whole model as a folder that transformers loads with `trust_remote_code=True`.

The folder follows the Hub's layout for custom models: `config.json` with an `auto_map` naming the
classes of `configuration_mm1.py`, `modeling_mm1.py` and `processing_mm1.py` (copied from `remote/`),
safetensors weights (sharded with an index above `max_shard_bytes`, as `save_pretrained` writes them),
the tokenizer with its chat template, and the image processor's settings. Weight names are mm1's own, so
mm1 loads the folder back bit for bit (`mm1_config.json` keeps the whole mm1 config beside it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mm1.config import Config, InferenceSettings, to_dict
from mm1.data.images import NORMS
from mm1.data.tokenizer import ASSISTANT, END, EOS, IMAGE, PAD, SYSTEM, USER, Tokenizer

REMOTE = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_mm1.py", "modeling_mm1.py", "processing_mm1.py")
MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size

# mm1's chat template (`mm1.data.template.ChatTemplate`) in Jinja, for transformers' `apply_chat_template`:
# a message's images first, as `<image>` (the processor expands each), then its text; the reply after a space.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}" + ASSISTANT +
    "{%- if m.content is string %} {{ m.content | trim }}{% else %}"
    "{% for p in m.content if p.type == 'text' %} {{ p.text | trim }}{% endfor %}{% endif -%}" + END +
    "{%- else -%}"
    "{{ '" + SYSTEM + "' if m.role == 'system' else '" + USER + "' }}"
    "{%- if m.content is string -%}{{ m.content }}{%- else -%}"
    "{%- for p in m.content if p.type == 'image' -%}" + IMAGE + "{%- endfor -%}"
    "{%- for p in m.content if p.type == 'text' -%}{{ p.text }}{%- endfor -%}{%- endif -%}" + END +
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)


# mm1's weight names → the export's: the model under `model.` with the decoder as its `language_model` (the name
# transformers' image-text models give it, and the one vLLM's transformers backend looks for), the LM head at
# the top, the experts packed as Mixtral's are (same layout, transformers' names).
TO_TRANSFORMERS = [
    (r"decoder\.lm_head\.weight", "lm_head.weight"),
    (r"decoder\.layers\.(\d+)\.ffn\.w_gate_up", r"model.language_model.layers.\1.ffn.experts.gate_up_proj"),
    (r"decoder\.layers\.(\d+)\.ffn\.w_down", r"model.language_model.layers.\1.ffn.experts.down_proj"),
    (r"decoder\.(.+)", r"model.language_model.\1"),
    (r"(.+)", r"model.\1"),
]
FROM_TRANSFORMERS = [
    (r"lm_head\.weight", "decoder.lm_head.weight"),
    (r"model\.language_model\.layers\.(\d+)\.ffn\.experts\.gate_up_proj", r"decoder.layers.\1.ffn.w_gate_up"),
    (r"model\.language_model\.layers\.(\d+)\.ffn\.experts\.down_proj", r"decoder.layers.\1.ffn.w_down"),
    (r"model\.language_model\.(.+)", r"decoder.\1"),
    (r"model\.(.+)", r"\1"),
]


def read_tokenizer(folder: Path) -> Tokenizer:
    """An export's tokenizer as mm1 uses it: the Jinja rendering of mm1's own chat template that an
    `--hf` export ships is mm1's template itself, not an imported Instruct one."""
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    if tok.chat_template is not None and tok.chat_template.template == CHAT_TEMPLATE:
        tok.chat_template = None
    return tok


def model_config(cfg: Config, tok: Tokenizer) -> dict:
    """config.json: MM1Config's fields, the auto_map, and the ids generation stops at."""
    from mm1.data.template import stop_token_ids
    from mm1.store.hf import rope_scaling_to_hf

    m = cfg.model
    dec, vis, con = m.decoder, m.vision, m.connector
    stops = stop_token_ids(tok)
    return {
        "architectures": ["MM1ForConditionalGeneration"],
        "model_type": "mm1",
        "auto_map": {
            "AutoConfig": "configuration_mm1.MM1Config",
            "AutoModel": "modeling_mm1.MM1Model",
            "AutoModelForImageTextToText": "modeling_mm1.MM1ForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_mm1.MM1ForConditionalGeneration",
            "AutoProcessor": "processing_mm1.MM1Processor",
        },
        "text_config": {
            "model_type": "mm1_text", "vocab_size": dec.vocab_size, "hidden_size": dec.width,
            "intermediate_size": dec.ffn_hidden, "num_hidden_layers": dec.depth, "num_attention_heads": dec.heads,
            "num_key_value_heads": dec.kv_heads, "head_dim": dec.head_size, "rms_norm_eps": dec.norm_eps,
            "rope_theta": dec.rope_theta, "rope_frequency_scaling": rope_scaling_to_hf(dec.rope_scaling),
            "attention_bias": dec.qkv_bias, "max_position_embeddings": dec.max_seq_len,
            "moe_config": {"num_experts": m.moe.num_experts, "every": m.moe.every, "top_k": m.moe.top_k},
            "tie_word_embeddings": dec.tie_embeddings},
        "vision_config": {"image_size": vis.image_size, "patch_size": vis.patch_size, "width": vis.width,
                          "depth": vis.depth, "heads": vis.heads, "mlp_ratio": vis.mlp_ratio,
                          "activation": vis.activation.value, "cls_token": vis.cls_token, "pre_norm": vis.pre_norm,
                          "post_norm": vis.post_norm, "norm_eps": vis.norm_eps, "patch_bias": vis.patch_bias},
        "connector_config": {"kind": con.kind.value, "num_tokens": con.num_tokens, "depth": con.depth,
                             "mlp_depth": con.mlp_depth, "hidden": con.hidden, "heads": con.heads},
        "tie_word_embeddings": dec.tie_embeddings,
        "image_token_id": m.image_token_id, "image_size": vis.image_size,
        "sub_image_grid": InferenceSettings.of(cfg).sub_image_grid,
        "mm1_trained_context": dec.trained_context or dec.max_seq_len,
        "bos_token_id": None, "eos_token_id": stops, "pad_token_id": tok.pad_id, "torch_dtype": "float32",
    }


def shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order, cut into groups of at most `max_bytes` (a larger tensor gets a group of its own)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nbytes
    return groups


def write_weights(state: dict[str, torch.Tensor], folder: Path, max_bytes: int) -> list[str]:
    """`model.safetensors`, or `model-0000i-of-0000N.safetensors` and `model.safetensors.index.json`."""
    from mm1.files import write_json

    groups = shards(state, max_bytes)
    if len(groups) == 1:
        save_file(groups[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups, strict=True):
        save_file(group, str(folder / name), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(folder / "model.safetensors.index.json", {
        "metadata": {"total_size": total},
        "weight_map": {k: name for name, group in zip(names, groups, strict=True) for k in group}})
    return names


def export_transformers(model: torch.nn.Module, cfg: Config, tok: Tokenizer, folder: Path, *,
                        max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `folder` (whole or not at all): everything `AutoModelForImageTextToText` and `AutoProcessor`
    need with `trust_remote_code=True`, and the mm1 config that `mm1.store.loading.load_model` reads."""
    from mm1.files import atomic_folder, write_json, write_text
    from mm1.model.weights import map_names

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.model.decoder.tie_embeddings:  # stored once: transformers ties it back from `tie_word_embeddings`
        state.pop("decoder.lm_head.weight", None)
    state = map_names(state, TO_TRANSFORMERS, [])
    mean, std = NORMS[cfg.model.vision.norm]
    config = model_config(cfg, tok)
    with atomic_folder(folder) as tmp:
        for name in REMOTE_FILES:
            shutil.copyfile(REMOTE / name, tmp / name)
        write_weights(state, tmp, max_shard_bytes)
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", {"eos_token_id": config["eos_token_id"], "pad_token_id": tok.pad_id,
                                                    "do_sample": False})
        tok.save(tmp / "tokenizer.json")
        write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": PAD, "eos_token": EOS, "bos_token": None,
            "unk_token": None, "padding_side": "left", "model_max_length": config["mm1_trained_context"],
            "clean_up_tokenization_spaces": False})
        template = tok.chat_template.template if tok.chat_template else CHAT_TEMPLATE
        write_text(tmp / "chat_template.jinja", template)
        write_json(tmp / "preprocessor_config.json", {
            "image_processor_type": "MM1ImageProcessor", "processor_class": "MM1Processor",
            "auto_map": {"AutoImageProcessor": "processing_mm1.MM1ImageProcessor",
                         "AutoProcessor": "processing_mm1.MM1Processor"},
            "image_size": cfg.model.vision.image_size, "sub_image_grid": InferenceSettings.of(cfg).sub_image_grid,
            "image_mean": list(mean), "image_std": list(std)})
        write_json(tmp / "processor_config.json", {
            "processor_class": "MM1Processor", "auto_map": {"AutoProcessor": "processing_mm1.MM1Processor"},
            "num_image_tokens": cfg.model.connector.num_tokens, "image_token": IMAGE})
        write_json(tmp / "mm1_config.json", to_dict(cfg))
    return folder


def pixel_shuffle_weight(proj_weight_DC: torch.Tensor, scale: int) -> torch.Tensor:
    """The projection of Idefics3's pixel-shuffle connector (`Idefics3Connector`: s×s neighbouring patches
    concatenated, then one bias-free linear layer) that computes what mm1's average-pooling connector
    computes over s×s windows: the mean of s² vectors times W is the concatenation times [W/s², …, W/s²].
    Exact when the pooling projection's bias is zero (Idefics3's has none) and s divides the patch grid."""
    return proj_weight_DC.repeat(1, scale * scale) / (scale * scale)
