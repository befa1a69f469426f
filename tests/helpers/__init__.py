"""Helpers shared by the tests: model factories, the sampling oracle, CLI factories."""
