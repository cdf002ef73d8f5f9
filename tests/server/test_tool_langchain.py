"""LangChain's ChatOpenAI against the live server on the built-in Qwen model: `bind_tools` gets a parsed tool call,
`with_structured_output` a validated pydantic object (both enforced by the grammar, so any sample passes)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from tests.fixtures.server import ServerProcess
from tests.server.test_tool_calls import NAME, server  # noqa: F401  (the module-scoped live server)

langchain_openai = pytest.importorskip("langchain_openai")


class Weather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(description="the city name", max_length=30)


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)


def _llm(server: ServerProcess) -> object:  # noqa: F811
    return langchain_openai.ChatOpenAI(base_url=server.v1, api_key="EMPTY", model=NAME, temperature=0,
                                       max_tokens=48, max_retries=0, timeout=300)


def test_bind_tools(server: ServerProcess) -> None:  # noqa: F811
    llm = _llm(server).bind_tools([Weather], tool_choice="Weather", parallel_tool_calls=False)  # type: ignore[attr-defined]
    reply = llm.invoke("What is the weather in Paris?")
    (call,) = reply.tool_calls
    assert call["name"] == "Weather"
    assert isinstance(Weather(**call["args"]).city, str)


def test_with_structured_output(server: ServerProcess) -> None:  # noqa: F811
    llm = _llm(server).with_structured_output(Person, method="json_schema")  # type: ignore[attr-defined]
    person = llm.invoke("Describe a person.")
    assert isinstance(person, Person)
