"""Helpers shared by the tests: model factories, the sampling oracle, CLI factories, bound-soundness
helpers (boxes, inputs, the linear-bound zoo), pipeline helpers (configuration, new data, registry) and
the repository root."""
