"""Shared pytest fixtures: a real redis-server and the real model (tests/fixtures_redis.py, tests/fixtures_model.py)."""

pytest_plugins = ["tests.fixtures_redis", "tests.fixtures_model"]
