"""Fixtures every end-to-end test shares: a fresh PicoLisp app, and the CLIs wired to it and to Kafka."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.picolisp_fixtures import PicoApp, picolisp  # noqa: F401 - the fixture `app` needs
from tests.pipeline_helpers import Cli, unique_name


@pytest.fixture
def app(tmp_path: Path, picolisp: str) -> PicoApp:
    app = PicoApp(tmp_path / "app", picolisp)
    app.create()
    return app


@pytest.fixture
def cli(app: PicoApp, kafka: Any, request: pytest.FixtureRequest) -> Iterator[Cli]:
    """Its own database name per test, so its own topic and transactional.id."""
    name = request.node.originalname.removeprefix("test_").replace("_", "-")[:30]
    c = Cli(app.root, kafka.bootstrap_servers, unique_name(name))
    yield c
    c.stop_all()
