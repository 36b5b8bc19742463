"""`export-shortfin`: one directory with everything shortfin's LLM server needs.

    DIR/model.vmfb              compiled by the installed iree-compile
    DIR/model.irpa              parameters (tp > 1: model.rank{i}.irpa)
    DIR/config.json             the shortfin model config (service_config.py)
    DIR/tokenizer.json          the model's own tokenizer
    DIR/tokenizer_config.json   {"eos_token": ...} (shortfin stops on it)

Every check runs before anything is written; the files are made in a temporary directory
beside DIR and renamed into place at the end, so a failure leaves no half-written DIR.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from halo_mlir.errors import HaloError

# --target -> (shortfin --device, default activation dtype)
TARGETS = {"cpu": ("local-task", "f32"), "gfx942": ("hip", "f16")}
# What shortfin's ModelParams parser accepts for paged_kv_cache.kv_cache_dtype.
SHORTFIN_KV_DTYPES = {"float16", "bfloat16", "float32", "float8_e4m3fnuz"}
SHORTFIN_TOP_LEVEL_KEYS = {
    "module_name", "module_abi_version", "max_seq_len", "attn_head_dim",
    "prefill_batch_sizes", "decode_batch_sizes", "transformer_block_count",
    "logits_normalization", "top_k", "paged_kv_cache", "has_prefill_position", "attn_dtype"}


@dataclasses.dataclass
class Exported:
    out: Path
    files: list[Path]
    command: list[str]

    def command_line(self) -> str:
        return " ".join(shlex.quote(a) for a in self.command)


def server_command(out: Path, *, target: str, tp: int, params: Sequence[str],
                   host: str = "127.0.0.1", port: int = 8000, python: str = "python") -> list[str]:
    """The shortfin LLM server command line for an exported directory."""
    device = TARGETS[target][0]
    cmd = [python, "-m", "shortfin_apps.llm.server", "--device", device]
    if tp > 1:
        cmd += ["--device_ids", *map(str, range(tp))]
    cmd += ["--tokenizer_json", str(out / "tokenizer.json"),
            "--tokenizer_config_json", str(out / "tokenizer_config.json"),
            "--model_config", str(out / "config.json"),
            "--vmfb", str(out / "model.vmfb"),
            "--parameters", *(str(out / p) for p in params),
            "--host", host, "--port", str(port)]
    return cmd


def check_servable(config: dict, *, target: str, tp: int) -> None:
    """What shortfin (3.9's ModelParams and batcher) would reject or serve wrongly."""
    unknown = set(config) - SHORTFIN_TOP_LEVEL_KEYS
    if unknown:
        raise HaloError(f"config keys {sorted(unknown)} are unknown to shortfin's parser")
    kv = config["paged_kv_cache"]
    if kv["kv_cache_dtype"] not in SHORTFIN_KV_DTYPES:
        raise HaloError(f"kv_cache_dtype {kv['kv_cache_dtype']} is not one shortfin accepts "
                        f"({', '.join(sorted(SHORTFIN_KV_DTYPES))})")
    for key in ("prefill_batch_sizes", "decode_batch_sizes"):
        sizes = config[key]
        # shortfin calls the first listed size >= the batch and batches up to the last one.
        if not sizes or sizes != sorted(set(sizes)) or sizes[0] <= 0:
            raise HaloError(f"{key} {sizes} must be distinct positive sizes in ascending "
                            "order (shortfin calls the first size >= the batch)")
        if sizes[-1] > kv["device_block_count"]:
            raise HaloError(f"batch size {sizes[-1]} exceeds the {kv['device_block_count']} "
                            "KV-cache pages: every row needs a page of its own")
    if tp > 1 and target == "cpu":
        raise HaloError(f"--tp {tp} with --target cpu cannot be served: shortfin's local-task "
                        "system is one CPU device; use --tp 1 (or --target gfx942)")


def check_release() -> None:
    """The installed iree-compile must be a release some shortfin loads (compat.py)."""
    from halo_mlir.toolchain import compat

    row = compat.current()
    if row.shortfin is None:
        raise HaloError(
            f"the installed IREE {compat.installed_version()} compiles modules that no shortfin "
            f"release loads (shortfin {', '.join(r.shortfin for r in compat.TABLE.values() if r.shortfin)} "
            f"loads IREE {', '.join(r.release for r in compat.TABLE.values() if r.shortfin)}.x "
            "modules only); export in an environment made with "
            "`pip install 'halo-mlir[shortfin]'`")
    installed = compat.installed_shortfin()
    if installed is not None and compat.release_of(installed) != row.release:
        raise HaloError(f"the installed shortfin {installed} does not load modules compiled by "
                        f"IREE {compat.installed_version()}; install shortfin=={row.shortfin}")


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise HaloError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise HaloError(f"{out} is not empty; pass --force to replace its contents")
    if not out.parent.is_dir():
        raise HaloError(f"{out}: directory {out.parent} does not exist")


def _tokenizer_files(gguf, tokenizer: Path | None) -> tuple[Callable[[Path], None], str]:
    """(a writer of tokenizer.json + tokenizer_config.json into a dir, the eos token)."""
    if tokenizer is None and gguf is None:
        raise HaloError("no tokenizer: pass --tokenizer tokenizer.json (with a "
                        "tokenizer_config.json holding eos_token beside it)")
    if tokenizer is not None:
        from halo_mlir.params.tokenizer import JsonTokenizer

        tok = JsonTokenizer(tokenizer)
        eos = None if tok.eos_id is None else tok.tokenizer.id_to_token(tok.eos_id)
        if eos is None:
            raise HaloError(f"{tokenizer}: no eos_token in the tokenizer_config.json beside it "
                            "(shortfin needs it to stop)")

        def write(d: Path):
            shutil.copyfile(tokenizer, d / "tokenizer.json")
            (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}) + "\n")

        return write, eos
    from halo_mlir.params.tokenizer import GgufTokenizer

    tok = GgufTokenizer(gguf)
    if tok.eos_token is None:
        raise HaloError(f"{gguf.path}: the GGUF names no eos token "
                        "(tokenizer.ggml.eos_token_id); shortfin needs one to stop")

    def write(d: Path):
        tok.save(d / "tokenizer.json")
        (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": tok.eos_token}) + "\n")

    return write, tok.eos_token


def _param_files(params: Path, tp: int) -> list[Path]:
    from halo_mlir.params.irpa import rank_paths

    files = rank_paths(params, tp) if tp > 1 else [params]
    for f in files:
        if not f.exists():
            raise HaloError(f"{f}: no such file" + (f" (--tp {tp} needs the rank files of "
                                                    f"`import-params --tp {tp}`)" if tp > 1 else ""))
    return files


def check_params_dtype(files: list[Path], cfg, dtype: str) -> None:
    """`output_norm.weight` (replicated: in every rank file) holds hidden_size values of
    the import's dtype; a mismatch with --dtype would only show when shortfin loads it."""
    import iree.runtime as rt

    from halo_mlir.support.io import check_header

    sizes = {"f32": 4, "f16": 2, "bf16": 2}
    for f in files:
        check_header(f, "an IRPA parameter file", (b"IRPA",))
    idx = rt.ParameterIndex()
    try:
        idx.load(str(files[0]))
    except (RuntimeError, ValueError) as e:
        raise HaloError(f"{files[0]}: not an IRPA file ({e})") from None
    entry = dict(idx.items()).get("output_norm.weight")
    if entry is None:
        raise HaloError(f"{files[0]}: no output_norm.weight; pass the IRPA that "
                        "`halo-mlir import-params` wrote for this model")
    got = entry.length // cfg.hidden_size
    if got != sizes[dtype]:
        named = [d for d, n in sizes.items() if n == got] or [f"{got}-byte"]
        raise HaloError(f"{files[0]} holds {'/'.join(named)} parameters but --dtype is "
                        f"{dtype}; pass --dtype {named[0]} (or import with --dtype {dtype})")


def _place(src: Path, dst: Path) -> None:
    """A hard link when on the same file system (parameters can be huge), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def export_shortfin(out: str | Path, *, gguf: str | None = None, hf_config: str | None = None,
                    params: str | None = None, tokenizer: str | None = None,
                    target: str = "cpu", tp: int = 1, bs: Sequence[int] = (1, 4),
                    dtype: str | None = None, keep_quantized: bool = False,
                    device_block_count: int = 256, force: bool = False,
                    echo: Callable[[str], None] = print) -> Exported:
    from halo_mlir import config as config_mod
    from halo_mlir.api import write_module
    from halo_mlir.toolchain.compile import compile_file
    from halo_mlir.model.decoder import EmitOptions, emit_module
    from halo_mlir.model.service_config import service_config

    out = Path(out)
    if target not in TARGETS:
        raise HaloError(f"unknown --target {target!r} for shortfin: choose one of "
                        f"{', '.join(TARGETS)}")
    if bool(gguf) == bool(hf_config or params):
        raise HaloError("pass --gguf FILE, or --hf-config C with --params P")
    if hf_config and not params:
        raise HaloError("--hf-config needs --params (from `halo-mlir import-params`)")
    if params and not hf_config:
        raise HaloError("--params needs --hf-config (the model's config.json)")
    if keep_quantized and not gguf:
        raise HaloError("--keep-quantized applies to --gguf weights only")
    if tp < 1:
        raise HaloError(f"--tp must be >= 1, got {tp}")
    dtype = dtype or TARGETS[target][1]
    prepare_out(out, force)

    g = None
    try:
        formats = {}
        if gguf:
            from halo_mlir.params.gguf_file import GgufFile
            from halo_mlir.params.gguf_import import weight_formats

            g = GgufFile(gguf)
            cfg = g.config()
            formats = weight_formats(g, cfg, keep_quantized)
            param_sources = []
        else:
            cfg = config_mod.from_hf_config(hf_config)
            param_sources = _param_files(Path(params), tp)
            check_params_dtype(param_sources, cfg, dtype)
            tokenizer = tokenizer or _beside(hf_config, "tokenizer.json")
        write_tokenizer, _ = _tokenizer_files(g, Path(tokenizer) if tokenizer else None)
        if tp > 1:
            from halo_mlir.params.model_source import check_tp

            check_tp(cfg, formats, tp)
        from halo_mlir.model.attention_form import resolve

        opts = EmitOptions(bs_prefill=tuple(bs), bs_decode=tuple(bs), dtype=dtype,
                           weight_formats=tuple(sorted(formats.items())))
        conf = service_config(cfg, opts, device_block_count=device_block_count, tp=tp)
        check_servable(conf, target=target, tp=tp)
        check_release()
        from halo_mlir.toolchain import compat

        iree = compat.current()
        if cfg.is_moe and not iree.moe_grouped_prefill:
            opts = dataclasses.replace(opts, moe_prefill="gather")
            echo(f"note: mixture-of-experts prefill in the gather form (IREE {iree.release} "
                 "computes the grouped form wrongly)")
        # auto: what the installed release (shortfin's) compiles for `target`
        opts, chosen = resolve(cfg, opts, target=target)
        echo(chosen)
        names = [f"model.rank{i}.irpa" for i in range(tp)] if tp > 1 else ["model.irpa"]

        # Everything checked: build in a temporary directory beside `out`.
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
        try:
            module = emit_module(cfg, opts)
            if tp > 1:
                from halo_mlir.sharding_passes.pipeline import shard_module

                shard_module(module, tp)
            with module.context:
                write_module(module, tmp / "model.mlir", locations=False)
            del module
            compile_file(tmp / "model.mlir", tmp / "model.vmfb", target=target, tp=tp,
                         echo=echo)
            (tmp / "model.mlir").unlink()
            if gguf:
                from halo_mlir.params.gguf_import import import_gguf
                from halo_mlir.support.progress import Progress

                echo(f"importing {g.path.name} ({dtype}) ...")
                progress = Progress("importing")
                try:
                    import_gguf(g.path, tmp / "model.irpa", dtype=dtype,
                                keep_quantized=keep_quantized, progress=progress, tp=tp)
                finally:
                    progress.close()
            else:
                for src, name in zip(param_sources, names):
                    _place(src, tmp / name)
            write_tokenizer(tmp)
            (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
            _replace_dir(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    finally:
        if g is not None:
            g.close()
    files = [out / n for n in ("model.vmfb", *names, "config.json", "tokenizer.json",
                               "tokenizer_config.json")]
    return Exported(out, files, server_command(out.resolve(), target=target, tp=tp,
                                               params=names))


def _beside(path: str, name: str) -> str:
    p = Path(path).parent / name
    if not p.exists():
        raise HaloError(f"no tokenizer: {p} does not exist; pass --tokenizer tokenizer.json")
    return str(p)


def _replace_dir(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.rename(out, old / "d")
    os.rename(new, out)
    if old is not None:
        shutil.rmtree(old)
