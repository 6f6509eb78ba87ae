"""Fixtures every test module shares: the tiny model, and no test reaching the model hub."""

from __future__ import annotations

import huggingface_hub.constants
import pytest

from engine.models.bundle import ModelBundle
from engine.models.loader import ModelRequest, load_models


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the hub, even by mistake."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    """``builtin:tiny`` on the CPU in float32, built once per test module."""
    return load_models(ModelRequest(id="builtin:tiny", device="cpu", dtype="float32"))
