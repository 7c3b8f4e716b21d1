"""Models on disk: where every weight-reading command finds them, below `train`, `serve` and `eval`.

- `runs`: a run folder's layout and its checkpoints' weights (safetensors: loading runs no code).
- `pretrained`: the folders a config starts from (`model.decoder.init`, `model.vision.init`).
- `hf`: HF decoder folders in, mm1's export format and the decoder as a Llama/Qwen2 folder out.
- `transformers`: the whole model as a transformers folder (`mm1 export --hf`; the files it ships are `remote/`).
- `loading`: any of these as a model, tokenizer and config for inference (`load_model`).

`mm1.model` holds the modules and the weight name maps and imports none of this; training state
(optimizer, RNG, the distributed checkpoint) is `mm1.train.checkpoint`'s.
"""
