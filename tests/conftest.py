"""Fixtures shared by every test. The builders of tiny models and inputs are in helpers.py (test
modules import them from there, never from this file)."""

from __future__ import annotations

import importlib

import pytest
import torch

# Plain `assert`s in the shared helper modules report their operands, as in test modules.
pytest.register_assert_rewrite("helpers", "fp8_checkpoints")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    importlib.import_module("megamoe_compile.backend")._WARNED.clear()  # one-time warnings, once per test
    yield
    torch._dynamo.reset()
