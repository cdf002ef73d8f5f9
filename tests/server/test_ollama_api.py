"""Ollama's API on the live server, through the official `ollama` client and langchain-ollama's ChatOllama.

The server runs the tiny GLM-4.1V text model as a llama.cpp-style GGUF saved as the article's
`./models/AutoGLM-Phone-9B-Q4_K_M.gguf`; the article's Modelfile makes `autoglm-phone-9b` from it with
`autoglm create` (the store lives under a temporary XDG_DATA_HOME shared by the CLI and the server). The GGUF CPU
kernels are off here (AUTOGLM_GGUF_KERNELS=0; their tests are elsewhere): this file is about the protocol.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from tests.fixtures.server import REPO_ROOT, ServerProcess, free_port, server_env, wait_ready
from tests.unit.test_modelfile import ARTICLE

SERVED = "tiny-glm"
GREEDY = {"temperature": 0, "num_predict": 6}
# The article's TEMPLATE for one user turn, rendered by Go's rules: no .System, so the `if` drops out, and Ollama
# appends {{ .Response }} (empty for the turn being generated)
ARTICLE_PROMPT = "<|user|> Open Chrome<|end|> <|assistant|> "


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


class Env:
    def __init__(self, root: Path, server: ServerProcess) -> None:
        self.root = root
        self.server = server
        self.env = {**server_env(), "XDG_DATA_HOME": str(root / "xdg"), "AUTOGLM_GGUF_KERNELS": "0"}

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "autoglm.cli", *args], env=self.env, cwd=self.root,
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def env(tiny_glm4v_text_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("ollama")
    (root / "models").mkdir()
    shutil.copy(tiny_glm4v_text_gguf, root / "models" / "AutoGLM-Phone-9B-Q4_K_M.gguf")
    (root / "Modelfile").write_text(ARTICLE, encoding="utf-8")
    environ = {**server_env(), "XDG_DATA_HOME": str(root / "xdg"), "AUTOGLM_GGUF_KERNELS": "0"}
    port = free_port()
    (root / "logs").mkdir()
    log_path = root / "logs" / f"server-{port}.log"
    args = [sys.executable, "-m", "autoglm.commands.serve", str(root / "models" / "AutoGLM-Phone-9B-Q4_K_M.gguf"),
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED, "--max-model-len", "256"]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=environ, cwd=REPO_ROOT)
    server = ServerProcess(f"http://127.0.0.1:{port}", port, process, log_path, args)
    try:
        wait_ready(server.base_url, process, log_path)
    except BaseException:
        server.stop()
        raise
    e = Env(root, server)
    made = e.cli("create", "autoglm-phone-9b", "-f", "Modelfile")  # the article's `ollama create ... -f Modelfile`
    assert made.returncode == 0, made.stderr
    yield e
    server.stop()


@pytest.fixture(scope="module")
def client(env: Env) -> ollama.Client:
    return ollama.Client(host=env.server.base_url)


@pytest.fixture(scope="module")
def tokenizer(tiny_glm4v_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_glm4v_dir)


def test_version_tags_ps(client: ollama.Client, env: Env) -> None:
    assert httpx.get(f"{env.server.base_url}/api/version").json()["version"]
    names = [m.model for m in client.list().models]
    assert f"{SERVED}:latest" in names and "autoglm-phone-9b:latest" in names
    (running,) = client.ps().models
    assert running.model == f"{SERVED}:latest" and running.details.format == "gguf"


def test_article_modelfile_chat(client: ollama.Client, tokenizer) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": "Open Chrome"}]
    r = client.chat(model="autoglm-phone-9b", messages=messages, options=GREEDY, stream=False)
    # the prompt is the article's template rendered for this turn, tokenized as text
    assert r.prompt_eval_count == len(tokenizer(ARTICLE_PROMPT, add_special_tokens=False)["input_ids"])
    assert r.done and r.done_reason == "length" and r.eval_count == GREEDY["num_predict"]
    assert r.message.role == "assistant" and r.message.content
    for field in ("total_duration", "prompt_eval_duration", "eval_duration", "load_duration"):
        assert isinstance(getattr(r, field), int) and getattr(r, field) >= 0
    raw = client.generate(model="autoglm-phone-9b", prompt=ARTICLE_PROMPT, raw=True, options=GREEDY)
    assert raw.response == r.message.content  # same tokens in, same greedy tokens out

    chunks = list(client.chat(model="autoglm-phone-9b", messages=messages, options=GREEDY, stream=True))
    assert all(c.message is not None for c in chunks) and [c.done for c in chunks].count(True) == 1
    assert chunks[-1].done and chunks[-1].done_reason == "length" and chunks[-1].eval_count == 6
    assert "".join(c.message.content for c in chunks) == r.message.content


def test_article_modelfile_broken_template(env: Env, client: ollama.Client) -> None:
    broken = ARTICLE.replace("{{ end }}", "")
    (env.root / "Broken").write_text(broken, encoding="utf-8")
    made = env.cli("create", "broken", "-f", "Broken")
    assert made.returncode == 1
    assert "Modelfile line 2: TEMPLATE: template error: template: :1: unexpected EOF" in made.stderr
    assert "Traceback" not in made.stderr
    with pytest.raises(ollama.ResponseError) as info:
        client.create("broken", from_="autoglm-phone-9b", template="{{ if .System }}x")
    assert info.value.status_code == 400
    assert info.value.error == "template error: template: :1: unexpected EOF"  # Ollama's wording
    r = httpx.post(f"{env.server.base_url}/api/create", json={"model": "broken", "modelfile": broken})
    assert r.status_code == 400 and "template error: template: :1: unexpected EOF" in r.json()["error"]
    assert "broken:latest" not in [m.model for m in client.list().models]


def test_create_show_copy_delete(client: ollama.Client, env: Env, tokenizer) -> None:  # type: ignore[no-untyped-def]
    digest = client.create_blob(env.root / "models" / "AutoGLM-Phone-9B-Q4_K_M.gguf")  # what `ollama create` does
    client.create("agent", files={"model.gguf": digest}, system="You operate a phone.",
                  parameters={"temperature": 0, "num_predict": 4, "stop": ["<|user|>"]},
                  template="{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}<|assistant|>")
    shown = client.show("agent")
    assert "TEMPLATE" in shown.modelfile and "PARAMETER num_predict 4" in shown.modelfile
    assert "num_predict" in shown.parameters and '"<|user|>"' in shown.parameters
    assert shown.template.startswith("{{ if .System }}")
    assert "completion" in shown.capabilities
    assert shown.modelinfo["general.architecture"] == "glm4"
    assert shown.details.format == "gguf"
    r = client.generate(model="agent", prompt="hi")  # the Modelfile's PARAMETERs apply: 4 tokens, greedy
    assert r.eval_count == 4 and r.done_reason == "length"
    # generate: the Modelfile's SYSTEM goes into .System, the prompt into .Prompt
    text = "<|system|>You operate a phone.<|user|>hi<|assistant|>"
    assert r.prompt_eval_count == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    again = client.generate(model="agent", prompt="hi", stream=True)
    assert "".join(c.response for c in again) == r.response

    client.create("alias", from_=SERVED, system="Be brief.")  # FROM the server's own model name
    assert client.chat(model="alias", messages=[{"role": "user", "content": "hi"}], options=GREEDY).done
    client.delete("alias")

    client.copy("agent", "agent:v2")
    names = [m.model for m in client.list().models]
    assert "agent:latest" in names and "agent:v2" in names
    client.delete("agent:v2")
    client.delete("agent")
    assert not {"agent:latest", "agent:v2"} & {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as info:
        client.delete("agent")
    assert info.value.status_code == 404 and info.value.error == "model 'agent:latest' not found"


def test_errors(client: ollama.Client, env: Env) -> None:
    def error(call) -> tuple[int, str]:  # type: ignore[no-untyped-def]
        with pytest.raises(ollama.ResponseError) as info:
            call()
        return info.value.status_code, info.value.error

    assert error(lambda: client.chat(model="nope", messages=[{"role": "user", "content": "x"}])) == (
        404, "model 'nope' not found")
    assert error(lambda: client.show("nope")) == (404, "model 'nope' not found")
    status, message = error(lambda: client.pull("llama3"))
    assert status == 501 and message.startswith("offline: no registry")
    assert error(lambda: client.push("autoglm-phone-9b"))[0] == 501
    status, message = error(lambda: client.embed(model="autoglm-phone-9b", input="x"))
    assert status == 501 and "no embedding path" in message
    status, message = error(lambda: client.chat(model="autoglm-phone-9b", messages=[{"role": "user", "content": "x"}],
                                                options={"num_ctx": "big"}))
    assert status == 400 and message == "invalid value for parameter 'num_ctx': 'big' is not an integer"
    r = httpx.post(f"{env.server.base_url}/api/generate", json={"model": "autoglm-phone-9b", "prompt": "x",
                                                               "format": "yaml", "stream": False})
    assert r.status_code == 400 and r.json() == {"error": 'format must be "json" or a JSON schema object'}
    status, message = error(lambda: client.generate(model="autoglm-phone-9b", prompt="x", format={"type": "frob"}))
    assert status == 400 and "format" in message
    r = httpx.post(f"{env.server.base_url}/api/chat", json={"messages": []})
    assert r.status_code == 400 and r.json() == {"error": "model is required"}
    png = base64.b64encode(_png()).decode()
    status, message = error(lambda: client.chat(model=SERVED, messages=[{"role": "user", "content": "x",
                                                                          "images": [png]}]))
    assert status == 400 and "mmproj" in message  # a GGUF loaded without its projector says how to add one
    status, message = error(lambda: client.chat(model="autoglm-phone-9b", messages=[{"role": "user", "content": "x",
                                                                                     "images": [png]}]))
    assert status == 400 and "TEMPLATE has no image placeholder" in message
    # a store model over another file: one model per server process
    (env.root / "other.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    client.create("elsewhere", from_=str(env.root / "other.gguf"))
    status, message = error(lambda: client.chat(model="elsewhere", messages=[{"role": "user", "content": "x"}]))
    assert status == 400 and "one model per server process" in message and "autoglm serve" in message
    client.delete("elsewhere")


@pytest.mark.parametrize(("path", "body", "cause"), [
    ("/api/chat", {"options": "x"}, "options must be an object"),
    ("/api/chat", {"options": [1, 2]}, "options must be an object"),
    ("/api/chat", {"options": {"stop": 5}}, "option stop must be a string or a list of strings"),
    ("/api/chat", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "lone UTF-16 surrogate"),
    ("/api/generate", {"prompt": "a\ud800b"}, "lone UTF-16 surrogate"),
    ("/api/generate", {"prompt": 5}, "prompt must be a string"),
    ("/api/chat", {"model": "a\ud800b"}, "lone UTF-16 surrogate"),
    ("/api/chat", {"model": 5}, "model must be a string"),
    ("/api/chat", {"messages": "hi"}, "messages must be a list"),
    ("/api/show", {"model": None, "name": 5}, "name must be a string"),
    ("/api/copy", {"source": 5, "destination": 6}, "source must be a string"),
    ("/api/chat", {"model": SERVED, "messages": [{"role": "user", "content": "x", "images": "AAAA"}]},
     "messages[0].images must be a list of base64 strings"),
    ("/api/chat", {"model": SERVED, "messages": [{"role": "user", "content": "x", "images": [5]}]},
     "images must be a list"),
    ("/api/generate", {"images": {"a": 1}}, "images must be a list of base64 strings"),
])
def test_wrong_types_and_bad_text_are_400s_in_ollamas_shape(env: Env, path: str, body: dict, cause: str) -> None:
    base = {"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": "x"}], "prompt": "x",
            "stream": False}
    payload = json.dumps({**base, **body}).encode()  # json.dumps writes a lone surrogate as its \ud800 escape
    r = httpx.post(env.server.base_url + path, content=payload, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 400, r.text
    assert list(r.json()) == ["error"] and cause in r.json()["error"]


def test_context_window_and_options(client: ollama.Client) -> None:
    long = "word " * 400  # past the 256-token window
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="autoglm-phone-9b", messages=[{"role": "user", "content": long}])
    assert info.value.status_code == 400 and "context window is 256 tokens" in info.value.error
    r = client.generate(model=SERVED, prompt="hello", options={"num_predict": 3, "temperature": 0.7, "top_k": 5,
                                                               "top_p": 0.9, "min_p": 0.05, "repeat_penalty": 1.1,
                                                               "repeat_last_n": 64, "seed": 7, "stop": ["zz"]},
                        keep_alive="5m")
    assert r.eval_count <= 3 and r.done
    same = client.generate(model=SERVED, prompt="hello", options={"num_predict": 3, "temperature": 0.7, "top_k": 5,
                                                                  "top_p": 0.9, "min_p": 0.05, "repeat_penalty": 1.1,
                                                                  "seed": 7, "stop": ["zz"]})
    assert same.response == r.response  # same seed, same tokens
    loaded = client.generate(model=SERVED, prompt="")
    assert loaded.done and loaded.done_reason == "load"


def test_think_field(client: ollama.Client) -> None:
    r = client.chat(model=SERVED, messages=[{"role": "user", "content": "hi"}], think=False, options=GREEDY)
    assert r.message.thinking is None and r.done
    r = client.chat(model=SERVED, messages=[{"role": "user", "content": "hi"}], think=True, options=GREEDY)
    assert r.done  # thinking (if the random model wrote any) arrives in message.thinking, not in content
    assert "<think>" not in r.message.content


def test_v1_serves_store_names(env: Env) -> None:
    import openai

    sdk = openai.OpenAI(base_url=env.server.v1, api_key="x")
    r = sdk.chat.completions.create(model="autoglm-phone-9b", messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=3, temperature=0)
    assert r.model == "autoglm-phone-9b" and r.usage.completion_tokens == 3
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=1)


def test_langchain_chat_ollama(env: Env) -> None:
    from langchain_ollama import ChatOllama

    llm = ChatOllama(model="autoglm-phone-9b", base_url=env.server.base_url, temperature=0, num_predict=5)
    reply = llm.invoke("Open Chrome")
    assert isinstance(reply.content, str) and reply.content
    assert reply.response_metadata["done_reason"] == "length"
    streamed = "".join(str(c.content) for c in llm.stream("Open Chrome"))
    assert streamed == reply.content


def test_cli_list_show_ps_run(env: Env) -> None:
    listed = env.cli("list")
    assert listed.returncode == 0 and "autoglm-phone-9b:latest" in listed.stdout
    shown = env.cli("show", "autoglm-phone-9b", "--modelfile")
    assert shown.returncode == 0 and "PARAMETER num_ctx 2048" in shown.stdout
    assert shown.stdout.startswith("FROM " + str(env.root / "models" / "AutoGLM-Phone-9B-Q4_K_M.gguf"))
    ps = subprocess.run([sys.executable, "-m", "autoglm.cli", "ps"], capture_output=True, text=True, timeout=60,
                        env={**env.env, "AUTOGLM_PORT": str(env.server.port)}, cwd=REPO_ROOT)
    assert ps.returncode == 0 and f"{SERVED}:latest" in ps.stdout
    assert env.cli("cp", "autoglm-phone-9b", "copy").returncode == 0
    assert env.cli("rm", "copy").returncode == 0
    gone = env.cli("rm", "copy")
    assert gone.returncode == 1 and "model 'copy:latest' not found" in gone.stderr
    ran = env.cli("run", "autoglm-phone-9b", "Open", "Chrome", "--max-tokens", "3", timeout=600)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.endswith("\n")
    chat = subprocess.run([sys.executable, "-m", "autoglm.cli", "run", "autoglm-phone-9b", "--max-tokens", "2"],
                          input="hi\nand again\n/bye\nnot read\n", env=env.env, cwd=env.root, capture_output=True,
                          text=True, timeout=600)  # the chat loop: one reply line per input line, /bye ends it
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("\n") >= 2


def test_format_schema_constrains_the_reply(env: Env) -> None:
    """`format` (a JSON schema) goes through the same grammar engine as /v1's response_format."""
    import json

    import jsonschema

    client = ollama.Client(host=env.server.base_url)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    for seed in (1, 2):
        reply = client.generate(model="autoglm-phone-9b", prompt="Answer in JSON.", format=schema,
                                options={"num_predict": 64, "temperature": 1.0, "seed": seed})
        assert reply.done_reason == "stop", reply
        jsonschema.validate(json.loads(reply.response), schema)
