"""SmolLM2 served by shortfin: `halo-mlir export-shortfin` in the IREE 3.9 + shortfin
environment, the printed server command started on 127.0.0.1 at a free port, prompts sent
over HTTP one at a time and batched (lengths spanning 1 to 4 pages), and the generated
token ids compared with `halo-mlir generate`'s greedy ids (this environment, IREE 3.13) and
transformers' greedy ids."""

from __future__ import annotations

import contextlib
import json
import shlex
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import halo_in, shortfin_python
from test_smollm2 import PROMPTS, TEXT, gguf_path, hf, hf_greedy, ours  # noqa: F401 (fixtures)

NEW_TOKENS = 16
LAUNCHER = Path(__file__).with_name("shortfin_launcher.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict, timeout: float = 300):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())

@contextlib.contextmanager
def serve(python: str, args: list[str], port: int, log_path: Path):
    """shortfin's server (`args`: after `python -m shortfin_apps.llm.server`) run by
    `python` through LAUNCHER, up once /health answers (180 s at most; its log in the
    failure), stopped by its pid on exit."""
    log = open(log_path, "w")
    server = subprocess.Popen([python, str(LAUNCHER), *args], stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(f"shortfin exited ({server.returncode}):\n"
                            f"{log_path.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > deadline:
                    pytest.fail("shortfin did not come up within 180 s")
                time.sleep(1)
        yield
    finally:
        server.terminate()  # by its pid
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(port, export stdout): the exported SmolLM2 served by shortfin until the module ends."""
    python = shortfin_python()
    out = tmp_path_factory.mktemp("shortfin") / "smollm2"
    proc = halo_in(python, "export-shortfin", "--gguf", gguf_path(), "--out", out,
                   "--bs", "1,4")
    command = proc.stdout.strip().splitlines()[-1]
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "shortfin_apps.llm.server"], command
    assert args[args.index("--host") + 1] == "127.0.0.1", command
    port = free_port()
    args[args.index("--port") + 1] = str(port)
    # The printed command, run by shortfin's python through a launcher that only makes
    # `return_input_ids` answers encodable (shortfin 3.9.0 bug; see the launcher).
    with serve(python, args[3:], port, out.parent / "server.log"):
        yield port, proc.stdout


def batch_prompts(tok) -> list[str]:
    """Four prompts of 1, 2, 3 and 4 pages (32 tokens a page) of the sample text."""
    ids = tok.encode(TEXT.read_text())
    texts = [PROMPTS[0]]
    for n in (45, 80, 120):
        texts.append(tok.decode(ids[:n]))
    return texts


def until_eos(ids: list[int], eos: int) -> list[int]:
    """shortfin stops after EOS (and includes it); greedy references run on past it."""
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def test_shortfin_serves_the_same_greedy_tokens(served, hf, ours):  # noqa: F811
    port, _ = served
    model, _ = hf
    gen, tok = ours(False)
    try:
        prompts = batch_prompts(tok)
        lengths = [len(tok.encode(p)) for p in prompts]
        assert [-(-n // 32) for n in lengths] == [1, 2, 3, 4], lengths
        want = []
        for p in prompts:
            ids = tok.encode(p)
            halo_ids = list(gen.generate(ids, NEW_TOKENS))
            hf_ids, _ = hf_greedy(model, ids, NEW_TOKENS)
            assert halo_ids == hf_ids, p
            want.append(until_eos(halo_ids, tok.eos_id))
    finally:
        gen.close()
    params = {"max_completion_tokens": NEW_TOKENS}
    # One prompt at a time (bs 1), then all four in one request (bs 4, rows of 1-4 pages).
    for p, w in zip(prompts, want):
        got = post(port, {"text": p, "sampling_params": params, "return_input_ids": True})
        assert got == [w], (p, got, w)
    got = post(port, {"text": prompts, "sampling_params": params, "return_input_ids": True})
    assert got == [[w] for w in want], (got, want)
    # The text form of the answer (what an ordinary client reads): the same tokens decoded.
    text = post(port, {"text": prompts[:2], "sampling_params": params})
    assert [r["responses"][0]["text"] for r in text["responses"]] == \
        [tok.decode(w) for w in want[:2]]
    print(f"shortfin: {len(prompts)} prompts of {lengths} tokens, {NEW_TOKENS} greedy tokens "
          "each, alone and batched: ids equal halo-mlir generate's and transformers'")


def test_export_prints_the_serve_command(served):
    _, stdout = served
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("python -m shortfin_apps.llm.server --device local-task ")
    for flag in ("--tokenizer_json", "--tokenizer_config_json", "--model_config", "--vmfb",
                 "--parameters", "--host 127.0.0.1", "--port"):
        assert flag in line
