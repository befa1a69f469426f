"""Tests of components: configuration, data, training, factory, registry and gate, validation, export."""
