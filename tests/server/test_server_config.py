"""ServerConfig: flag > AUTOGLM_* env > default, for every option; bad values name the flag or variable."""

from __future__ import annotations

import argparse

import pytest

from autoglm.commands.serve import register
from autoglm.errors import ConfigError
from autoglm.server.config import ServerConfig, option_table


def _parse(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    values = vars(parser.parse_args(["serve", *argv]))
    if values.get("model") is None:
        values["model"] = values.get("model_pos")
    return values


def test_defaults() -> None:
    config = ServerConfig.from_sources({}, environ={})
    assert (config.host, config.port, config.model, config.api_key) == ("127.0.0.1", 8000, None, None)
    assert config.reasoning_format == "merged" and not config.allow_remote_media


def test_flags_beat_env_beat_defaults() -> None:
    env = {"AUTOGLM_PORT": "9001", "AUTOGLM_HOST": "0.0.0.0", "AUTOGLM_ALLOW_REMOTE_MEDIA": "true",
           "AUTOGLM_SERVED_MODEL_NAME": "autoglm-phone-9b, glm", "AUTOGLM_API_KEY": "k"}
    config = ServerConfig.from_sources(_parse(["--port", "9002"]), environ=env)
    assert config.port == 9002  # flag wins
    assert config.host == "0.0.0.0" and config.allow_remote_media and config.api_key == "k"  # env
    assert config.served_model_name == ("autoglm-phone-9b", "glm")
    config = ServerConfig.from_sources(_parse(["--served-model-name", "a", "--served-model-name", "b"]), environ=env)
    assert config.served_model_name == ("a", "b")


def test_model_positional_and_llama_server_style() -> None:
    assert ServerConfig.from_sources(_parse(["/m/dir"]), environ={}).model == "/m/dir"
    config = ServerConfig.from_sources(_parse(["-m", "x.gguf", "--mmproj", "y.gguf"]), environ={})
    assert (config.model, config.mmproj) == ("x.gguf", "y.gguf")
    assert ServerConfig.from_sources(_parse([]), environ={"AUTOGLM_MODEL": "/env/m"}).model == "/env/m"


def test_limit_mm_accepts_vllm_json() -> None:
    config = ServerConfig.from_sources(_parse(["--limit-mm-per-prompt", '{"image": 3}']), environ={})
    assert config.limit_mm_per_prompt == 3
    assert ServerConfig.from_sources({}, environ={"AUTOGLM_LIMIT_MM_PER_PROMPT": "5"}).limit_mm_per_prompt == 5


def test_every_option_has_an_env_variable() -> None:
    rows = option_table()
    assert {env for _, env, _ in rows} >= {
        "AUTOGLM_HOST", "AUTOGLM_PORT", "AUTOGLM_SERVED_MODEL_NAME", "AUTOGLM_API_KEY", "AUTOGLM_MAX_MODEL_LEN",
        "AUTOGLM_REASONING_FORMAT", "AUTOGLM_ALLOWED_LOCAL_MEDIA_PATH", "AUTOGLM_ALLOW_REMOTE_MEDIA",
        "AUTOGLM_LIMIT_MM_PER_PROMPT", "AUTOGLM_MMPROJ", "AUTOGLM_DTYPE", "AUTOGLM_DEVICE", "AUTOGLM_NO_VISION",
    }


@pytest.mark.parametrize(
    ("env", "match"),
    [({"AUTOGLM_PORT": "eighty"}, "AUTOGLM_PORT"), ({"AUTOGLM_ALLOW_REMOTE_MEDIA": "maybe"}, "ALLOW_REMOTE"),
     ({"AUTOGLM_REASONING_FORMAT": "weird"}, "REASONING_FORMAT.*merged"), ({"AUTOGLM_PORT": "70000"}, "--port")],
)
def test_bad_values_name_their_source(env: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ServerConfig.from_sources({}, environ=env)


def test_bad_flag_values_name_the_flag() -> None:
    with pytest.raises(ConfigError, match="--port='x'"):
        ServerConfig.from_sources(_parse(["--port", "x"]), environ={})
