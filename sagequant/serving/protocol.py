"""OpenAI-compatible request bodies (the subset this server honours) and the error shape.

Fields a client commonly sends but this server cannot honour (n > 1, logprobs, echo, best_of)
are refused by name rather than ignored; unknown fields are ignored as OpenAI's own API does.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import ServingError


class APIError(ServingError):
    """An error returned to the client as {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers


def error_body(status: int, message: str, type_: str) -> dict:
    return {"error": {"message": message, "type": type_, "code": status}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    n: int = 1
    logprobs: int | bool | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.n != 1:
            raise ValueError(f"n={self.n} is not supported: this server returns one choice (n=1)")
        if self.logprobs not in (None, False):
            raise ValueError("logprobs are not supported by this server")
        if self.best_of not in (None, 1):
            raise ValueError(f"best_of={self.best_of} is not supported (only 1)")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(s == "" for s in stops) or len(stops) > 4:
            raise ValueError("stop must be up to 4 non-empty strings")
        return self

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)
    echo: bool = False

    @model_validator(mode="after")
    def _prompt(self):
        if self.echo:
            raise ValueError("echo=true is not supported by this server")
        if len(self.prompt) == 0:
            raise ValueError("prompt is empty")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
