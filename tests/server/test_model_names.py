"""The model-name policy and the default completion bound, through the real app, engine and tiny model.

- Without --served-model-name the article's name `autoglm-phone-9b` is an alias: /v1/models lists it with `parent`
  naming the model that answers, and responses carry the real name. Other names stay 404.
- --strict-model-name (AUTOGLM_STRICT_MODEL_NAME) is vLLM's behaviour: only the served names.
- A chat request without max_tokens stops after --default-max-tokens (finish_reason "length"); 0 = the rest of the
  context."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from autoglm.loader import load_model
from autoglm.models.loaded import LoadedModel
from autoglm.server.app import create_app
from autoglm.server.config import ARTICLE_MODEL_NAME, DEFAULT_MAX_TOKENS, ServerConfig

MAX_LEN = 64


@pytest.fixture(scope="module")
def model(tiny_glm4v_dir: Path) -> LoadedModel:
    return load_model(str(tiny_glm4v_dir), no_vision=True)


@contextmanager
def _client(model: LoadedModel, **config: object) -> Iterator[TestClient]:
    app = create_app(ServerConfig(max_model_len=MAX_LEN, max_num_seqs=2, **config), model=model)  # real engine
    with TestClient(app) as client:
        yield client


def _chat(client: TestClient, **body: object) -> tuple[int, dict]:
    reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **body})
    return reply.status_code, reply.json()


def test_article_name_is_an_honest_alias_by_default(model: LoadedModel) -> None:
    with _client(model) as client:
        listed = client.get("/v1/models").json()["data"]
        assert [m["id"] for m in listed] == [model.name, ARTICLE_MODEL_NAME]
        assert listed[1]["parent"] == model.name and listed[1]["root"] == listed[0]["root"] == model.path
        status, body = _chat(client, model=ARTICLE_MODEL_NAME, max_tokens=2)
        assert status == 200 and body["model"] == model.name  # the response names the model that answered
        status, body = _chat(client, model=model.name, max_tokens=2)
        assert status == 200 and body["model"] == model.name
        status, body = _chat(client, model="gpt-4o", max_tokens=2)
        assert status == 404 and body["error"]["message"] == "The model `gpt-4o` does not exist."


def test_strict_model_name_is_vllms_404(model: LoadedModel) -> None:
    config = ServerConfig.from_sources({}, {"AUTOGLM_STRICT_MODEL_NAME": "1"})
    assert config.strict_model_name
    with _client(model, strict_model_name=True) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [model.name]
        status, body = _chat(client, model=ARTICLE_MODEL_NAME, max_tokens=2)
        assert status == 404 and ARTICLE_MODEL_NAME in body["error"]["message"]


def test_explicit_served_names_are_echoed_and_add_no_alias(model: LoadedModel) -> None:
    with _client(model, served_model_name=("mine", "other")) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["mine", "other"]
        status, body = _chat(client, model="other", max_tokens=2)
        assert status == 200 and body["model"] == "other"
        assert _chat(client, model=ARTICLE_MODEL_NAME, max_tokens=2)[0] == 404


def test_requests_without_max_tokens_are_bounded(model: LoadedModel) -> None:
    assert ServerConfig().default_max_tokens == DEFAULT_MAX_TOKENS
    assert ServerConfig.from_sources({"default_max_tokens": "5"}, {}).default_max_tokens == 5
    with _client(model, default_max_tokens=5) as client:
        status, body = _chat(client, ignore_eos=True)  # ignore_eos: only the bound can end it
        assert status == 200 and body["usage"]["completion_tokens"] == 5
        assert body["choices"][0]["finish_reason"] == "length"
        status, body = _chat(client, ignore_eos=True, max_tokens=7)  # an explicit max_tokens wins
        assert status == 200 and body["usage"]["completion_tokens"] == 7
    with _client(model, default_max_tokens=0) as client:  # 0: no bound but the context
        status, body = _chat(client, ignore_eos=True)
        usage = body["usage"]
        assert status == 200 and usage["prompt_tokens"] + usage["completion_tokens"] == MAX_LEN
