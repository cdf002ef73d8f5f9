"""A GLM without a chat template gets the GLM-4 built-in (never ChatML); --chat-template replaces any template.
(The ChatML fallback for families with no built-in: tests/unit/test_builtin_templates.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from autoglm.errors import ConfigError
from autoglm.loader import load_model


@pytest.fixture(scope="module")
def templateless_dir(tiny_glm4_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("no_template") / "m"
    shutil.copytree(tiny_glm4_dir, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg = out / "tokenizer_config.json"
    import json

    data = json.loads(cfg.read_text())
    data.pop("chat_template", None)
    cfg.write_text(json.dumps(data))
    return out


def test_missing_template_gets_the_glm4_builtin(templateless_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"):
        model = load_model(templateless_dir)
    assert model.chat_template is not None
    text = model.chat_template.render([{"role": "user", "content": "hi"}])
    assert text == "[gMASK]<sop><|user|>\nhi<|assistant|>\n"
    assert any("built-in glm4 (file has none" in r.getMessage() for r in caplog.records)


def test_override_from_text_and_file(tiny_glm4_dir: Path, tmp_path: Path) -> None:
    tpl = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    model = load_model(tiny_glm4_dir, chat_template=tpl)
    assert model.chat_template.render([{"role": "user", "content": "x"}]) == "[user]x"
    f = tmp_path / "t.jinja"
    f.write_text(tpl)
    model = load_model(tiny_glm4_dir, chat_template=str(f))
    assert model.chat_template.render([{"role": "user", "content": "y"}]) == "[user]y"
    with pytest.raises(ConfigError, match="cannot read"):
        load_model(tiny_glm4_dir, chat_template=str(tmp_path / "missing.jinja"))
