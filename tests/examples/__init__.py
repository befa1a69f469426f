"""Tests of examples/: the example data readers."""
