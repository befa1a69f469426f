"""Tests of lid_engine: domains, bounds, certificates, search, projection, optimizers."""
