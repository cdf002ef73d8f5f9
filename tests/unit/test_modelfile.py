"""Modelfile parsing: the instruction set, quoting, typed parameters, and errors that name the line."""

from __future__ import annotations

import pytest

from autoglm.store.modelfile import ModelfileError, parse_modelfile, parse_parameter

# The article's §5.2 Modelfile, each instruction on its own line (the article prints it flattened onto one line)
ARTICLE = '''FROM ./models/AutoGLM-Phone-9B-Q4_K_M.gguf
TEMPLATE """{{ if .System }}<|system|> {{ .System }}<|end|> {{ end }}<|user|> {{ .Prompt }}<|end|> <|assistant|> """
PARAMETER temperature 0.5
PARAMETER num_ctx 2048
'''


def test_article_modelfile() -> None:
    mf = parse_modelfile(ARTICLE)
    assert mf.from_ == "./models/AutoGLM-Phone-9B-Q4_K_M.gguf"
    assert mf.template == ("{{ if .System }}<|system|> {{ .System }}<|end|> {{ end }}<|user|> {{ .Prompt }}<|end|> "
                           "<|assistant|> ")
    assert mf.template_line == 2
    assert mf.parameters == {"temperature": 0.5, "num_ctx": 2048}
    assert isinstance(mf.parameters["num_ctx"], int) and isinstance(mf.parameters["temperature"], float)


def test_full_instruction_set() -> None:
    text = '''# a comment
from glm:latest
Template """line one
  {{ .Prompt }}
"""
SYSTEM You are a phone agent.
parameter stop <|user|>
PARAMETER stop "<|observation|>"
PARAMETER top_k 40
PARAMETER top_p 0.9
PARAMETER seed -1
PARAMETER use_mmap false
PARAMETER mirostat 0
LICENSE """MIT
text"""
MESSAGE user Open Chrome
MESSAGE assistant """do(action="Launch", app="Chrome")"""
REQUIRES 0.6.0
'''
    mf = parse_modelfile(text)
    assert mf.from_ == "glm:latest" and mf.from_line == 2
    assert mf.template == "line one\n  {{ .Prompt }}\n"
    assert mf.system == "You are a phone agent."
    assert mf.parameters == {"stop": ["<|user|>", "<|observation|>"], "top_k": 40, "top_p": 0.9, "seed": -1,
                             "use_mmap": False}  # mirostat: deprecated in Ollama, accepted and dropped
    assert mf.license == ["MIT\ntext"]
    assert mf.messages == [{"role": "user", "content": "Open Chrome"},
                           {"role": "assistant", "content": 'do(action="Launch", app="Chrome")'}]
    again = parse_modelfile(mf.to_text())  # what /api/show writes reads back the same
    assert (again.template, again.system, again.parameters, again.messages, again.license) == (
        mf.template, mf.system, mf.parameters, mf.messages, mf.license)


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ("FROM x\nPARAMETER foo 1\n", 2, "unknown parameter 'foo'"),
    ("FROM x\n\nPARAMETER num_ctx 2k\n", 3, "invalid value for parameter 'num_ctx': '2k' is not an integer"),
    ("FROM x\nPARAMETER temperature hot\n", 2, "'hot' is not a number"),
    ("FROM x\nPARAMETER temperature\n", 2, "PARAMETER needs a parameter name and a value"),
    ("FROM x\nTEMPLATE \"\"\"{{ .Prompt }}\n\nmore\n", 2, 'unterminated """'),
    ("FROM x\nSYSTEM \"unclosed\n", 2, "unterminated quote"),
    ("FROM x\nADAPTER ./lora.gguf\n", 2, "ADAPTER is not supported"),
    ("# c\nFROOM x\n", 2, "unknown instruction 'FROOM'"),
    ("FROM x\nMESSAGE tool hi\n", 2, 'MESSAGE role must be one of "system", "user", or "assistant"'),
    ("FROM x\nFROM y\n", 2, "more than one FROM"),
    ("FROM x\nTEMPLATE \"\"\"a\"\"\" trailing\n", 2, 'text after the closing """'),
    # the article's layout, flattened onto one line, is not a valid Modelfile (Ollama reads it as one FROM value)
    ("FROM ./m.gguf TEMPLATE \"\"\"{{ .Prompt }}\"\"\" PARAMETER temperature 0.5\n", 1,
     "contains a TEMPLATE instruction: put each instruction on its own line"),
])
def test_bad_modelfiles_name_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ModelfileError) as info:
        parse_modelfile(text)
    assert info.value.line == line
    assert info.value.message.startswith(f"Modelfile line {line}: ")
    assert fragment in info.value.message
    assert info.value.status == 400


def test_missing_from() -> None:
    with pytest.raises(ModelfileError, match="no FROM line"):
        parse_modelfile("# only\nPARAMETER temperature 1\n")


def test_parameter_types_as_ollama() -> None:
    assert parse_parameter("NUM_PREDICT", "128") == 128
    assert parse_parameter("repeat_penalty", 1) == 1.0
    assert parse_parameter("num_ctx", 4096.0) == 4096
    assert parse_parameter("stop", "</s>") == "</s>"
    assert parse_parameter("low_vram", "true") is None
    with pytest.raises(ModelfileError, match="'num_ctx'"):
        parse_parameter("num_ctx", True)
