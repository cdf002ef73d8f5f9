"""Built-in chat templates for checkpoints that ship none: chosen by family, rendered like the real templates.

- GLM-4.1V's built-in renders byte-identically to the released checkpoint's template (tests/data copy) on
  conversations with images, video, a system prompt, tool messages, assistant metadata and enable_thinking;
- GLM-4 / Gemma / Llama 3 / ChatML built-ins render what llama.cpp's built-ins render (llama_chat_apply_template);
- the loader and `autoglm inspect` report the same choice (one function decides).
"""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from autoglm.cli import main
from autoglm.loader import load_model
from autoglm.tokenizer.builtin_templates import BUILTIN_TEMPLATES, builtin_family, choose_chat_template
from autoglm.tokenizer.chat_template import ChatTemplate

DATA = Path(__file__).resolve().parents[1] / "data"
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are a phone agent."}, {"role": "user", "content": "Open WeChat"}],
    [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "What is on screen?"}, IMAGE]},
        {"role": "assistant", "content": "<think>look</think><answer>do(action=\"Tap\")</answer>"},
        {"role": "user", "content": [IMAGE, {"type": "text", "text": "and now?"}, IMAGE]},
    ],
    [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "{\"city\": \"Beijing\"}", "metadata": "get_weather"},
        {"role": "tool", "content": "sunny", "tool_call_id": "1"},
        {"role": "observation", "content": "25C"},
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AA"}},
                                     {"type": "text", "text": "clip"}]},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
     {"role": "assistant", "content": "ok"}],
]


def _real_glm4v() -> ChatTemplate:
    return ChatTemplate.from_string((DATA / "glm4v_chat_template.jinja").read_text(encoding="utf-8"), name="real")


def _builtin(name: str, **kwargs: Any) -> ChatTemplate:
    return ChatTemplate.from_string(BUILTIN_TEMPLATES[name], name=name, **kwargs)


@pytest.mark.parametrize("content_format", ["string", "openai"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("extra", [{}, {"enable_thinking": False}, {"enable_thinking": True}])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_glm4v_builtin_renders_like_the_real_template(
    conv: int, content_format: str, extra: dict[str, Any], add_generation_prompt: bool
) -> None:
    real, ours = _real_glm4v(), _builtin("glm4v")
    args = {"add_generation_prompt": add_generation_prompt, "content_format": content_format, **extra}
    assert ours.render(CONVERSATIONS[conv], **args) == real.render(CONVERSATIONS[conv], **args)


def test_glm4v_builtin_has_the_real_placeholders_and_no_thinking_switch() -> None:
    ours, real = _builtin("glm4v"), _real_glm4v()
    assert ours.image_placeholder == real.image_placeholder == "<|begin_of_image|><|image|><|end_of_image|>"
    assert ours.video_placeholder == real.video_placeholder
    # the real template has no enable_thinking (GLM-4.1V always thinks): the engine's <think></think> prefill applies
    assert ours.supports_enable_thinking is real.supports_enable_thinking is False


def _llama_cpp_render(name: str, messages: list[tuple[str, str]]) -> str:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the oracle for llama.cpp's built-ins")
    arr = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(role=r.encode(), content=c.encode()) for r, c in messages]
    )
    buf = ctypes.create_string_buffer(1 << 14)
    n = llama_cpp.llama_chat_apply_template(name.encode(), arr, len(messages), True, buf, len(buf))
    assert 0 < n < len(buf)
    return buf.raw[:n].decode()


ORACLE_CHATS = [
    [("user", "hi")],
    [("system", "Be brief."), ("user", " hi "), ("assistant", "hello"), ("user", "more\n")],
    [("user", "a"), ("assistant", "b"), ("user", "c")],
]


@pytest.mark.parametrize(("ours", "theirs"), [("glm4", "chatglm4"), ("gemma", "gemma"), ("llama3", "llama3"),
                                              ("chatml", "chatml")])
@pytest.mark.parametrize("chat", range(len(ORACLE_CHATS)))
def test_builtins_match_llama_cpp(ours: str, theirs: str, chat: int) -> None:
    msgs = ORACLE_CHATS[chat]
    text = _builtin(ours).render([{"role": r, "content": c} for r, c in msgs])
    assert text == _llama_cpp_render(theirs, msgs)


def test_bos_token_leads_gemma_and_llama3() -> None:
    # our prompts are tokenized without adding specials, so the template writes bos itself (as HF templates do)
    msgs = [{"role": "user", "content": "x"}]
    assert _builtin("gemma", bos_token="<bos>").render(msgs).startswith("<bos><start_of_turn>user\n")
    assert _builtin("llama3", bos_token="<|begin_of_text|>").render(msgs).startswith("<|begin_of_text|><|start_")


def test_glm4_tool_result_is_an_observation_turn() -> None:
    text = _builtin("glm4").render([{"role": "user", "content": "q"}, {"role": "tool", "content": "42"}])
    assert text == "[gMASK]<sop><|user|>\nq<|observation|>\n42<|assistant|>\n"


GLM_VOCAB = {t: i for i, t in enumerate(["[gMASK]", "<sop>", "<|user|>", "<|begin_of_image|>", "<|image|>"])}


@pytest.mark.parametrize(("arch", "vocab", "vision", "family"), [
    ("Glm4vForConditionalGeneration", GLM_VOCAB, False, "glm4v"),
    ("glm4", GLM_VOCAB, True, "glm4v"),  # a GLM-4.1V GGUF: text arch glm4 + its mmproj
    ("glm4", GLM_VOCAB, False, "glm4"),
    ("Glm4ForCausalLM", {}, False, "glm4"),
    ("glm4", {"<|im_start|>": 1, "<|im_end|>": 2}, False, "glm4"),  # never ChatML for a GLM
    ("gemma3", {}, False, "gemma"),
    ("llama", {"<|start_header_id|>": 1, "<|eot_id|>": 2}, False, "llama3"),
    ("qwen2", {"<|im_start|>": 1, "<|im_end|>": 2}, False, "chatml"),
])
def test_family_choice(arch: str, vocab: dict[str, int], vision: bool, family: str) -> None:
    found = builtin_family(arch, vocab, has_vision=vision)
    assert found is not None and found[0] == family


def test_unknown_family_has_no_builtin() -> None:
    assert builtin_family("mamba", {"<s>": 1}) is None


def _strip_template(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    (dst / "chat_template.json").unlink(missing_ok=True)
    cfg = dst / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data.pop("chat_template", None)
    cfg.write_text(json.dumps(data))
    return dst


@pytest.fixture(scope="module")
def glm4v_without_template(tiny_glm4v_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _strip_template(tiny_glm4v_dir, tmp_path_factory.mktemp("glm4v_no_tpl") / "m")


def _inspect(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_templateless_glm4v_gets_the_builtin_and_images_work(
    glm4v_without_template: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from autoglm.engine.prompt import build_chat_prompt

    with caplog.at_level("INFO", logger="autoglm.tokenizer.builtin_templates"):
        model = load_model(glm4v_without_template)
    assert model.chat_template.origin == "builtin" and model.chat_template.family == "glm4v"
    assert any("built-in glm4v" in r.getMessage() for r in caplog.records)  # the server's log says which and why
    img = Image.new("RGB", (56, 56), (200, 30, 30))
    msgs = [{"role": "user", "content": [{"type": "image_pil", "image_pil": img}, {"type": "text", "text": "hi"}]}]
    inputs = build_chat_prompt(model, msgs)  # was a 400 ("no image placeholder") with the ChatML fallback
    assert len(inputs.media) == 1
    assert inputs.text == _real_glm4v().render(msgs)
    assert _inspect(glm4v_without_template, capsys)["chat_template"].startswith("built-in glm4v (file has none")


def test_inspect_reports_embedded_and_what_the_loader_chose(
    tiny_glm4v_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = load_model(tiny_glm4v_dir)
    line = _inspect(tiny_glm4v_dir, capsys)["chat_template"]
    assert line == f"embedded ({len(model.chat_template.source)} chars)"
    assert line == choose_chat_template(model).describe()


def test_inspect_text_output_names_the_fallback(
    tiny_glm4v_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a model with no family match: make the family lookup find nothing and check both report the fallback
    import autoglm.tokenizer.builtin_templates as bt

    monkeypatch.setattr(bt, "builtin_family", lambda *a, **k: None)
    path = _strip_template(tiny_glm4v_dir, tmp_path / "m")
    model = load_model(path)
    assert model.chat_template.origin == "fallback"
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "chat template: none: ChatML fallback" in out
    assert out.count("chat template:") == 1


def test_ollama_generate_stays_raw_for_a_file_without_template() -> None:
    # Ollama's default template is `{{ .Prompt }}`: a base model (gemma-3-270m ships none) must not get wrapped in
    # the chat built-in on /api/generate; a model with its own template is rendered with it
    from types import SimpleNamespace

    from autoglm.server.ollama_api import _no_template
    from autoglm.tokenizer.builtin_templates import TemplateChoice, _tag

    builtin = _tag(TemplateChoice(_builtin("gemma"), "builtin", "gemma", "test")).template
    served = SimpleNamespace(template=None)
    for template, raw in ((builtin, True), (_real_glm4v(), False), (None, True)):
        state = SimpleNamespace(ready_model=lambda t=template: SimpleNamespace(chat_template=t))
        assert _no_template(state, served) is raw  # type: ignore[arg-type]
