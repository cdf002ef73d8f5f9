"""The Go text/template renderer against Ollama's own templates and expected outputs (tests/data/ollama_templates,
written by Go), Ollama's documented legacy examples, Go's semantics, and Go-style error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoglm.tokenizer.go_template import GoTemplate, GoTemplateError
from autoglm.tokenizer.ollama_template import OllamaTemplate

DATA = Path(__file__).resolve().parents[1] / "data" / "ollama_templates"

# Ollama's template_test.go conversations
CASES = {
    "user": [{"role": "user", "content": "Hello, how are you?"}],
    "user-assistant-user": [
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
        {"role": "user", "content": "I'd like to show off how chat templating works!"},
    ],
}
CASES["system-user-assistant-user"] = [{"role": "system", "content": "You are a helpful assistant."},
                                       *CASES["user-assistant-user"]]


@pytest.mark.parametrize("name", ["chatml", "llama3-instruct", "mistral-instruct", "gemma3-instruct"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_real_templates_match_ollama_outputs(name: str, case: str) -> None:
    template = OllamaTemplate((DATA / f"{name}.gotmpl").read_text(encoding="utf-8"))
    expected = (DATA / "expected" / name / case).read_text(encoding="utf-8")
    assert template.uses_messages
    got = template.render(CASES[case])
    if name == "mistral-instruct" and got.endswith(" "):
        got = got[:-1]  # Ollama's own test drops this template's trailing space too
    assert got == expected


def test_chatml_by_hand() -> None:
    # computed from Go's rules: `{{-` eats the text before it; one turn per message; the file's last newline stays
    t = OllamaTemplate("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                       "<|im_start|>assistant\n")
    assert t.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")


# Ollama's TestExecuteWithMessages: legacy (.Prompt/.Response) templates and .Messages templates render alike
MISTRAL_MSGS = [
    {"role": "user", "content": "Hello friend!"},
    {"role": "assistant", "content": "Hello human!"},
    {"role": "user", "content": "What is your name?"},
]
MISTRAL_TEMPLATES = [
    "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST] ",
    "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST] {{ .Response }}",
    "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}\n{{- range .Messages }}\n{{- if eq .Role \"user\" }}"
    "{{ .Content }}[/INST] {{ else if eq .Role \"assistant\" }}{{ .Content }}[INST] {{ end }}\n{{- end }}",
]


@pytest.mark.parametrize("text", MISTRAL_TEMPLATES)
def test_legacy_and_messages_templates_agree(text: str) -> None:
    t = OllamaTemplate(text)
    assert t.render(MISTRAL_MSGS) == "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] "
    system = [{"role": "system", "content": "You are a helpful assistant!"}, *MISTRAL_MSGS]
    assert t.render(system) == ("[INST] You are a helpful assistant!\n\nHello friend![/INST] Hello human![INST] "
                                "What is your name?[/INST] ")


def test_legacy_last_assistant_turn_is_continued() -> None:
    # the last turn is cut right after .Response, so a partial answer is continued
    msgs = [*MISTRAL_MSGS, {"role": "assistant", "content": "My name is Ollama and I"}]
    for text in ("[INST] {{ .Prompt }}[/INST] ", "[INST] {{ .Prompt }}[/INST] {{ .Response }}"):
        assert OllamaTemplate(text).render(msgs) == (
            "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] My name is Ollama and I")


def test_legacy_chatml_cut_after_response() -> None:
    t = OllamaTemplate("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}"
                       "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}"
                       "<|im_end|>\n")
    msgs = [{"role": "system", "content": "You are a helpful assistant!"}, *MISTRAL_MSGS]
    assert t.render(msgs) == (
        "<|im_start|>system\nYou are a helpful assistant!<|im_end|>\n<|im_start|>user\nHello friend!<|im_end|>\n"
        "<|im_start|>assistant\nHello human!<|im_end|>\n<|im_start|>user\nWhat is your name?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_article_glm_template() -> None:
    # the article's TEMPLATE: no .Messages and no .Response, so Ollama appends {{ .Response }} and renders per turn
    t = OllamaTemplate("{{ if .System }}<|system|> {{ .System }}<|end|> {{ end }}<|user|> {{ .Prompt }}<|end|> "
                       "<|assistant|> ")
    assert not t.uses_messages
    assert t.render([{"role": "user", "content": "Open Chrome"}]) == "<|user|> Open Chrome<|end|> <|assistant|> "
    two = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
           {"role": "user", "content": "c"}]
    assert t.render(two) == ("<|system|> S<|end|> <|user|> a<|end|> <|assistant|> b"
                             "<|user|> c<|end|> <|assistant|> ")


def test_collate_merges_same_role_and_joins_system() -> None:
    t = OllamaTemplate("{{ .System }}|{{ range .Messages }}{{ .Role }}={{ .Content }};{{ end }}")
    msgs = [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "x"},
            {"role": "user", "content": "y"}]
    assert t.render(msgs) == "a\n\nb|system=a\n\nb;user=x\n\ny;"


def test_vars_like_ollama() -> None:
    assert OllamaTemplate("{{ .Prompt }}").vars == ["prompt", "response"]
    assert GoTemplate("{{ with .Tools }}{{ . }}{{ end }} {{ .System }}").identifiers() == ["system", "tools"]
    assert GoTemplate("{{ range .Messages }}{{ if eq .Role \"tool\" }}{{ .ToolName }}{{ end }}{{ end }}"
                      ).identifiers() == ["messages", "role", "toolname"]


def test_go_semantics() -> None:
    data = {"L": [1, 2, 3], "S": "héllo", "M": {"k": "v<", "b": 2}, "F": 1e6, "H": 0.5, "E": []}
    cases = {
        "{{ range $i, $m := .L }}{{ $i }}={{ $m }},{{ end }}": "0=1,1=2,2=3,",
        "{{ range .L }}{{ if eq . 2 }}{{ continue }}{{ end }}{{ . }}{{ if gt . 2 }}{{ break }}{{ end }}{{ end }}": "13",
        "{{ range .E }}x{{ else }}empty{{ end }}": "empty",
        "{{ len .S }} {{ len .L }} {{ len .M }}": "6 3 2",  # len of a string counts bytes
        "{{ slice .L 1 2 }} {{ index .L 2 }} {{ index .M \"k\" }}": "[2] 3 v<",
        "{{ json .M }} {{ json .L }} {{ json .S }}": '{"b":2,"k":"v\\u003c"} [1,2,3] "héllo"',
        "{{ .F }} {{ .H }} {{ .M }}": "1e+06 0.5 map[b:2 k:v<]",
        "{{ print 1 2 \"a\" 3 }}|{{ printf \"%q-%d-%5s\" \"a\" 3 \"x\" }}": '1 2a3|"a"-3-    x',
        "{{ .Missing }}": "<no value>",
        "{{ and 1 0 }} {{ or 0 \"\" \"z\" }} {{ not .S }} {{ and .L .S }}": "0 z false héllo",
        "{{ with .M }}{{ .k }}{{ end }}{{ with .E }}no{{ else with .S }}{{ . }}{{ end }}": "v<héllo",
        "{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}": "2",
        "{{ if eq .S \"a\" \"héllo\" }}any{{ end }} {{ ne 1 2 }} {{ lt 1 2 }} {{ ge \"b\" \"a\" }}":
            "any true true true",
        "a  {{- /* gone */ -}}  b {{- \" c\" }}": "ab c",
        "{{ range $i, $_ := .L }}{{ if eq (len (slice $.L $i)) 1 }}last{{ end }}{{ end }}": "last",
        "{{ define \"t\" }}[{{ . }}]{{ end }}{{ template \"t\" .S }}": "[héllo]",
        "{{ .L | len }} {{ \"x\" | printf \"%s-%s\" \"y\" }}": "3 y-x",
        "{{ range 3 }}{{ . }}{{ end }}": "012",
    }
    for src, want in cases.items():
        assert GoTemplate(src).execute(data) == want, src


def test_messages_fields_and_tools() -> None:
    t = OllamaTemplate(
        "{{ range .Tools }}{{ .Function.Name }}:{{ json .Function.Parameters.Required }};{{ json . }}{{ end }}|"
        "{{ range .Messages }}{{ .Role }}:{{ .Content }}{{ if .Thinking }}<t>{{ .Thinking }}</t>{{ end }}"
        "{{ range .ToolCalls }}{{ .Function.Name }}({{ .Function.Arguments }}){{ end }};{{ end }}{{ .Think }}")
    tools = [{"type": "function", "function": {"name": "tap", "description": "Tap", "parameters": {
        "type": "object", "required": ["x"], "properties": {"x": {"type": "integer", "description": "X"}}}}}]
    msgs = [{"role": "user", "content": "go"},
            {"role": "assistant", "content": "", "thinking": "hm",
             "tool_calls": [{"function": {"name": "tap", "arguments": {"x": 1}}}]}]
    out = t.render(msgs, tools=tools, think=True)
    assert out == (
        'tap:["x"];{"type":"function","function":{"name":"tap","description":"Tap","parameters":{"type":"object",'
        '"required":["x"],"properties":{"x":{"type":"integer","description":"X"}}}}}|user:go;assistant:<t>hm</t>'
        'tap({"x":1});true')


@pytest.mark.parametrize(("src", "message"), [
    ("{{ .Prompt ", "template: :1: unclosed action"),
    ("{{ if .System }}\nabc\n", "template: :3: unexpected EOF"),
    ("a\n{{ end }}", "template: :2: unexpected {{end}}"),
    ("{{ else }}", "template: :1: unexpected {{else}}"),
    ("{{ foo .X }}", 'template: :1: function "foo" not defined'),
    ("{{ $x }}", 'template: :1: undefined variable "$x"'),
    ('{{ "abc }}', "template: :1: unterminated quoted string"),
    ("{{ range .X }}{{ break }}{{ end }}{{ break }}", "template: :1: {{break}} outside {{range}}"),
    ("x\n\n  {{ (len .X }}", "template: :3: unclosed left paren"),
    ("{{ if }}{{ end }}", "template: :1: missing value for if"),
])
def test_syntax_errors_like_go(src: str, message: str) -> None:
    with pytest.raises(GoTemplateError) as info:
        GoTemplate(src)
    assert info.value.message == message
    assert info.value.line == int(message.split(":")[2])
    assert info.value.column >= 1
    assert info.value.status == 400


def test_execution_errors_name_the_action() -> None:
    with pytest.raises(GoTemplateError, match=r'template: :1:1: executing "" at <.A.B>: nil pointer'):
        GoTemplate("{{ .A.B }}").execute({"A": None})
    with pytest.raises(GoTemplateError, match="incompatible types for comparison"):
        GoTemplate('{{ eq .A "x" }}').execute({"A": 1})
    with pytest.raises(GoTemplateError, match="can't evaluate field Nope in type"):
        OllamaTemplate("{{ range .Messages }}{{ .Nope }}{{ end }}").render([{"role": "user", "content": "x"}])


def test_work_is_bounded() -> None:
    # a template can only loop over data (or a literal count, which the step budget caps); recursion is capped
    with pytest.raises(GoTemplateError, match="step budget|too expensive"):
        GoTemplate("{{ range 100000000 }}x{{ end }}").execute({})
    with pytest.raises(GoTemplateError, match="maximum template depth"):
        GoTemplate('{{ define "r" }}{{ template "r" . }}{{ end }}{{ template "r" . }}').execute({})
    nested = "{{ range $.L }}" * 4 + "x" + "{{ end }}" * 4
    with pytest.raises(GoTemplateError, match="too expensive"):
        GoTemplate(nested).execute({"L": list(range(60))})  # 60^4 = 13M visits > the budget


def test_templates_are_data_not_code() -> None:
    # nothing in a template reaches Python: attribute-looking fields on a plain string are Go errors
    with pytest.raises(GoTemplateError, match="can't evaluate field __class__"):
        GoTemplate("{{ .S.__class__ }}").execute({"S": "x"})
