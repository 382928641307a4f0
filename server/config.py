"""Service settings: defaults < YAML file < ``KVFUSE_*`` environment variables < CLI flags.

- YAML: the file given by ``--config`` or ``$KVFUSE_CONFIG``; keys are the field names below
  (``limits:`` is a nested mapping, ``api_keys:`` a mapping of API key to tenant).
- Environment: ``KVFUSE_<FIELD>`` (e.g. ``KVFUSE_PORT=9000``); nested fields with ``__``
  (``KVFUSE_LIMITS__MAX_DOCUMENTS=8``); mappings as JSON (``KVFUSE_API_KEYS='{"sk-a": "team-a"}'``).
- CLI flags (``kvfuse serve --port 9000``) override everything.

Byte sizes accept integers or strings such as ``"512MiB"`` / ``"2GB"``.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

ModeName = Literal["auto", "dense", "naive", "blend", "anchor", "hybrid"]
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}
_yaml_path: ContextVar[Path | None] = ContextVar("kvfuse_yaml_path", default=None)


def parse_bytes(value: Any) -> int:
    """``1048576``, ``"1MiB"``, ``"1.5 GB"`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError("a byte size must be a number or a string like '512MiB'")
    if isinstance(value, int | float):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte size: {value!r} (e.g. 1048576, '512MiB', '2GB')")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_data_dir() -> Path:
    """``./.kvfuse`` when it exists, else ``$XDG_DATA_HOME/kvfuse`` (``~/.local/share/kvfuse``)."""
    local = Path(".kvfuse")
    if local.is_dir():
        return local.resolve()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "kvfuse"


class Limits(BaseModel):
    """Per-request limits; violations are answered with a 4xx JSON error."""

    model_config = ConfigDict(extra="forbid")
    max_body_bytes: int = 64 << 20
    max_documents: int = 64
    max_prompt_tokens: int = 8192
    max_completion_tokens: int = 1024

    @field_validator("max_body_bytes", mode="before")
    @classmethod
    def _bytes(cls, v: Any) -> int:
        return parse_bytes(v)

    @field_validator("max_body_bytes", "max_documents", "max_prompt_tokens", "max_completion_tokens")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("limits must be positive")
        return v


class Settings(BaseSettings):
    """Everything ``kvfuse serve`` needs. See the module docstring for precedence."""

    model_config = SettingsConfigDict(env_prefix="KVFUSE_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model: str = "smollm2-135m-instruct"  # the embedded default, a HF directory, or a folder with a GGUF
    gguf_file: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    data_dir: Path = Field(default_factory=default_data_dir)
    cpu_bytes: int = 2 << 30
    ssd_bytes: int = 32 << 30  # 0 disables the SSD tier
    redis_url: str | None = None
    redis_cluster: bool = False
    api_keys: dict[str, str] = Field(default_factory=dict)  # API key -> tenant; empty: one tenant
    admin_keys: list[str] = Field(default_factory=list)  # keys that see service-wide /v1/stats
    key_secret: str | None = None  # chunk-API key mapping secret; default: <data_dir>/secret
    limits: Limits = Field(default_factory=Limits)
    mode: ModeName = "auto"
    recompute_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    fidelity_target: float = Field(default=0.95, gt=0.0, le=1.0, allow_inf_nan=False)  # auto: share of answers kept
    auto_calibrate: bool = True  # measure the model's calibration curve in the background on first use
    guard_sample_rate: float = Field(default=0.02, ge=0.0, le=1.0, allow_inf_nan=False)  # re-run dense
    request_deadline_s: float = Field(default=60.0, gt=0.0, allow_inf_nan=False)  # max wait for a first turn
    prefill_chunk_tokens: int = Field(default=64, ge=1)  # tokens between two turns offered to other tenants
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("cpu_bytes", "ssd_bytes", mode="before")
    @classmethod
    def _bytes(cls, v: Any) -> int:
        return parse_bytes(v)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _yaml_path.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


class SettingsError(ValueError):
    """Settings that cannot be used; the message is one line, meant for the operator."""


def describe(exc: ValidationError) -> str:
    """A settings validation error as one line: ``port: Input should be ...; colour: unknown setting``."""
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"])
        msg = "unknown setting" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or type(exc).__name__
    return f"{path}: invalid YAML{where}: {problem}"


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Build :class:`Settings` from the YAML file (``config`` or ``$KVFUSE_CONFIG``), the environment and
    ``overrides`` (CLI flags; ``None`` values are ignored). Every problem (a missing file, invalid YAML, a
    file that is not a mapping, an unknown or invalid setting) is a :class:`SettingsError` in one line."""
    path = config or os.environ.get("KVFUSE_CONFIG")
    if path is not None and not Path(path).is_file():
        raise SettingsError(f"config file not found: {path}")
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise SettingsError(_yaml_problem(Path(path), exc)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"cannot read {path}: {exc}") from None
        if data is not None and not isinstance(data, dict):
            raise SettingsError(f"{path}: the settings file must be a mapping of setting: value")
    token = _yaml_path.set(Path(path) if path else None)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise SettingsError(describe(exc)) from None
    finally:
        _yaml_path.reset(token)
