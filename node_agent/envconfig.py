"""A typed settings object read once from the environment, with errors that name the variable.

Shared by the agent's and the operator's config. It lives apart from the agent's config (which needs the
probe modules, and with them numpy) so that the operator, which only needs this, installs without the
agent's dependencies.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import AliasChoices, ValidationError
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


class ConfigError(ValueError):
    """The environment holds a bad setting; the message names the variable."""


def env_name(cls: type[BaseSettings], field: str) -> str:
    info = cls.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    if isinstance(alias, str):
        return alias
    return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


def from_env(cls: type[S]) -> S:
    """Build `cls` from the environment, turning validation errors into one line per variable."""
    try:
        return cls()
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            name = env_name(cls, field) if field in cls.model_fields else field  # else: an alias, or ""
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{name}: {msg}" if name else msg)  # a rule across fields names its variables
        raise ConfigError("; ".join(problems)) from None
