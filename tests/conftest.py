"""Shared pytest fixtures: a real redis-server (tests/fixtures_redis.py) and the real model (tests/fixtures_model.py)."""

pytest_plugins = ["tests.fixtures_redis", "tests.fixtures_model"]
