"""The article's LangChain snippet (seed §4.2) verbatim, only `base_url` changed, against the default server
(no model argument: the built-in Qwen2.5-Coder-0.5B-Instruct + Whisper base).

The answer must be a sensible Chinese reply: non-empty, with CJK characters, finished before the default
`max_tokens` bound (EOS, not the cap), and free of chat-template control tokens.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.fixtures.server import ServerProcess

CONTROL = re.compile(r"<\|[a-z_]+\|>|<think>|</think>")
CJK = re.compile(r"[\u4e00-\u9fff]")


def test_article_langchain_snippet(default_server: ServerProcess) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    ChatOpenAI = langchain_openai.ChatOpenAI

    # --- the article's code, with only base_url changed ---
    chat_model = ChatOpenAI(
        model="autoglm-phone-9b",
        temperature=0.5,
        base_url=default_server.v1,  # 替换为实际服务地址
        api_key="EMPTY",  # 不需要认证密钥
        extra_body={
            "enable_thinking": True,  # 开启思维链推理
            "return_reasoning": True,  # 返回中间推理步骤
        },
        streaming=True,  # 启用流式输出
    )
    # 发起询问
    started = time.monotonic()
    response = chat_model.invoke("你是谁?")
    elapsed = time.monotonic() - started
    print(response)
    print(f"answered in {elapsed:.1f} s")
    # --- end of the article's code ---

    text = response.content
    assert isinstance(text, str) and text.strip(), response
    assert CJK.search(text), text
    assert not CONTROL.search(text), text
    meta = response.response_metadata
    assert meta.get("finish_reason") == "stop", (meta, elapsed)
    # The answer comes from the model actually served, named as such (the alias does not pretend).
    assert "qwen" in str(meta.get("model_name", "")).lower(), meta
