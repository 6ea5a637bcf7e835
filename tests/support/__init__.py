"""Helpers the tests share (builders, synthetic adapters, CLI runners, on-disk checks); fixtures stay in
tests/conftest.py."""
