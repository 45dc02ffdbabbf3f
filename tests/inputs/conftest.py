"""The bad-input test runs on the real stack: reuse the integration fixtures."""

from tests.integration.conftest import engine, stack  # noqa: F401  (pytest fixtures)
