"""ChatTemplate: equal to transformers' apply_chat_template (openai mode), AutoGLM string mode, sandboxing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from autoglm.errors import ConfigError, InvalidRequest
from autoglm.tokenizer.chat_template import ChatTemplate
from tests.fixtures.tokenizer import TEMPLATE_PATH, write_glm_tokenizer

IMG = "<|begin_of_image|><|image|><|end_of_image|>"

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "user": [{"role": "user", "content": "Hello"}],
    "system_user": [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Open Chrome"}],
    "multi_turn": [
        {"role": "system", "content": "You are a phone agent."},
        {"role": "user", "content": "Open Chrome"},
        {"role": "assistant", "content": "<think>tap it</think><answer>do(action=\"Launch\", app=\"Chrome\")</answer>"},
        {"role": "user", "content": "Now search 你好 😀"},
    ],
    "image": [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Open Chrome"}]},
    ],
    "two_images_history": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "first"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]},
    ],
    "video": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what happens?"}]}],
    "assistant_metadata": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "metadata": "meta"},
        {"role": "user", "content": "q2"},
    ],
    "reasoning_field": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": "thought"},
    ],
}


@pytest.fixture(scope="module")
def hf_tok(glm_tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(glm_tokenizer_dir))


@pytest.fixture(scope="module")
def template(glm_tokenizer_dir: Path) -> ChatTemplate:
    return ChatTemplate.from_hf_dir(glm_tokenizer_dir)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_openai_mode_equals_transformers(
    template: ChatTemplate, hf_tok: Any, name: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[name]
    ours = template.render(messages, add_generation_prompt=add_generation_prompt, content_format="openai")
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs


def test_string_mode_matches_api_notes_example(template: ChatTemplate) -> None:
    # API_NOTES §1: vLLM's --chat-template-content-format string puts the placeholder + "\n" before the text.
    messages = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                                     {"type": "text", "text": "Open Chrome"}]},
    ]
    assert template.render(messages) == (
        f"[gMASK]<sop><|system|>\nSYS<|user|>\n{IMG}\nOpen Chrome<|assistant|>\n"
    )
    # openai mode: the template itself emits the placeholder, with no newline.
    assert template.render(messages, content_format="openai") == (
        f"[gMASK]<sop><|system|>\nSYS<|user|>\n{IMG}Open Chrome<|assistant|>\n"
    )


def test_string_mode_flattening_shape(template: ChatTemplate, hf_tok) -> None:  # type: ignore[no-untyped-def]
    # Placeholders in front (one per image, each + "\n"), then the text parts joined by "\n", in every role.
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "S1"}, {"type": "text", "text": "S2"}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}},
                                     {"type": "text", "text": "b"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "done"}]},
        {"role": "user", "content": [{"type": "image"}]},
    ]
    flat = [
        {"role": "system", "content": "S1\nS2"},
        {"role": "user", "content": f"{IMG}\n{IMG}\na\nb"},
        {"role": "assistant", "content": "done"},
        {"role": "user", "content": f"{IMG}\n"},
    ]
    assert template.render(messages) == hf_tok.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)


def test_openai_mode_normalises_media_parts(template: ChatTemplate, hf_tok) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                             {"type": "text", "text": "hi"}]}]
    as_hf = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert template.render(messages, content_format="openai") == hf_tok.apply_chat_template(
        as_hf, tokenize=False, add_generation_prompt=True
    )


def test_pydantic_like_messages_and_none_keys(template: ChatTemplate) -> None:
    from pydantic import BaseModel

    class Msg(BaseModel):
        role: str
        content: str | None = None
        name: str | None = None

    rendered = template.render([Msg(role="user", content="hi")])
    assert rendered == template.render([{"role": "user", "content": "hi", "name": None}])
    assert rendered.endswith("<|user|>\nhi<|assistant|>\n")


def test_hf_semantics_and_kwargs(hf_tok) -> None:  # type: ignore[no-untyped-def]
    source = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% generation %}{{ m.content | tojson }}{% endgeneration %}\n"
        "{% endfor %}{% if enable_thinking is defined and not enable_thinking %}/nothink{% endif %}"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
        "{{ dict(a=1) | tojson }}{% if add_generation_prompt %}<|assistant|>{% endif %}{{ strftime_now('%Y')[:0] }}"
    )
    tpl = ChatTemplate.from_string(source, bos_token="<s>", eos_token="</s>")
    assert tpl.supports_enable_thinking
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "héllo <b>\"x\"</b>"}]
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        ours = tpl.render(msgs, add_generation_prompt=True, **kwargs)
        theirs = hf_tok.apply_chat_template(
            msgs, chat_template=source, tokenize=False, add_generation_prompt=True, bos_token="<s>", **kwargs
        )
        assert ours == theirs
    assert "/nothink" in tpl.render(msgs, enable_thinking=False)
    assert "/nothink" not in tpl.render(msgs, enable_thinking=None)  # None = not passed


def test_raise_exception_is_invalid_request() -> None:
    tpl = ChatTemplate.from_string("{% if messages[0].role != 'user' %}{{ raise_exception('roles must alternate') }}"
                                   "{% endif %}ok")
    assert tpl.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        tpl.render([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize(
    "attack",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ raise_exception.__globals__['__builtins__'] }}",
        "{% set ns = namespace(__class__=1) %}{{ ns }}",
        "{{ messages.append({'role': 'x'}) }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    ],
)
def test_sandbox_escape_attempts_raise(attack: str) -> None:
    tpl = ChatTemplate.from_string(attack)
    with pytest.raises(InvalidRequest, match="unsafe"):
        tpl.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(("bomb", "cause"), [
    ("{{ 'x' * 10**10 }}", "repetition"),  # would allocate 10 GB while compiling, by constant folding
    ("{{ 'x' * 10000000000 }}", "repetition"),
    ("{{ 2 ** 100000000 }}", r"2 \*\* 100000000"),
    ("{{ '%0999999999d' % 1 }}", "format width"),
    ("{{ 'x'|center(10000000000) }}", "center width"),
    ("{% for a in range(99999) %}{% for b in range(99999) %}{% for c in range(99999) %}{% endfor %}{% endfor %}"
     "{% endfor %}", "loops of one render"),  # 10**15 iterations, each range under the sandbox's own cap
    ("{{ range(10**12) }}", "Range too big"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
])
def test_templates_cannot_exhaust_the_process(bomb: str, cause: str) -> None:
    """A template is a model file's metadata: hostile input. Each of these is a 400 that uses no memory to speak
    of (and the loops stop at a budget instead of running for hours); ordinary uses of the operators still work."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InvalidRequest, match=cause):
        ChatTemplate.from_string(bomb).render([{"role": "user", "content": "x"}])
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 500 * 1024  # KiB: under 500 MiB more
    ok = ("{% for i in range(messages|length - 1, -1, -1) %}{{ i }}{% endfor %}{{ range(3)|list }}{{ range(5)|length }}"
          "{{ 'ab' * 3 }}{{ 2 ** 10 }}{{ '%d-%s' % (1, 'a') }}{{ 'x'|center(5) }}")
    assert ChatTemplate.from_string(ok).render([{"role": "user", "content": "x"}]) == "0[0, 1, 2]5ababab10241-a  x  "


def test_template_sources(tmp_path: Path) -> None:
    source = TEMPLATE_PATH.read_text(encoding="utf-8")
    msgs = [{"role": "user", "content": "hi"}]
    # tokenizer_config.json string
    a = tmp_path / "a"
    write_glm_tokenizer(a, write_template=False)
    cfg = json.loads((a / "tokenizer_config.json").read_text())
    (a / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": source}))
    expected = ChatTemplate(source).render(msgs)
    assert ChatTemplate.from_hf_dir(a).render(msgs) == expected
    # list of named templates -> "default", or by name
    b = tmp_path / "b"
    write_glm_tokenizer(b, write_template=False)
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": source}]
    (b / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": named}))
    assert ChatTemplate.from_hf_dir(b).render(msgs) == expected
    assert ChatTemplate.from_hf_dir(b, template_name="tool_use").render(msgs) == "TOOLS"
    with pytest.raises(ConfigError, match="nope"):
        ChatTemplate.from_hf_dir(b, template_name="nope")
    # chat_template.json (processor style)
    c = tmp_path / "c"
    write_glm_tokenizer(c, write_template=False)
    (c / "chat_template.json").write_text(json.dumps({"chat_template": source}))
    assert ChatTemplate.from_hf_dir(c).render(msgs) == expected
    # none at all
    d = tmp_path / "d"
    write_glm_tokenizer(d, write_template=False)
    with pytest.raises(ConfigError, match="no chat template"):
        ChatTemplate.from_hf_dir(d)


def test_bad_templates_and_inputs(template: ChatTemplate) -> None:
    with pytest.raises(ConfigError, match="syntax error"):
        ChatTemplate.from_string("{% for m in messages %}")
    with pytest.raises(ConfigError):
        ChatTemplate.from_string("  ")
    with pytest.raises(InvalidRequest, match="unsupported type"):
        template.render([{"role": "user", "content": [{"type": "hologram"}]}])
    with pytest.raises(InvalidRequest, match="role"):
        template.render([{"content": "x"}])
    with pytest.raises(InvalidRequest, match="content_format"):
        template.render([{"role": "user", "content": "x"}], content_format="weird")  # type: ignore[arg-type]
    no_media = ChatTemplate.from_string("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert no_media.image_placeholder is None and not no_media.supports_enable_thinking
    with pytest.raises(InvalidRequest, match="no image placeholder"):
        no_media.render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_placeholder_detection_table() -> None:
    assert ChatTemplate(TEMPLATE_PATH.read_text()).image_placeholder == IMG
    assert ChatTemplate(TEMPLATE_PATH.read_text()).video_placeholder == "<|begin_of_video|><|video|><|end_of_video|>"
    qwen = ChatTemplate("{% for m in messages %}<|vision_start|><|image_pad|><|vision_end|>{% endfor %}")
    assert qwen.image_placeholder == "<|vision_start|><|image_pad|><|vision_end|>"
    gemma = ChatTemplate("{{ '<start_of_image>' }}")
    assert gemma.image_placeholder == "<start_of_image>"
    from_vocab = ChatTemplate("{{ messages[0].content }}", vocab={"<|begin_of_image|>": 1, "<|image|>": 2,
                                                               "<|end_of_image|>": 3})
    assert from_vocab.image_placeholder == IMG and from_vocab.video_placeholder is None
    assert from_vocab.render([{"role": "user", "content": [{"type": "image"}, "hi"]}]) == f"{IMG}\nhi"
    override = ChatTemplate("x", image_placeholder="<img>")
    assert override.render([{"role": "user", "content": [{"type": "image"}]}]) == "x"
