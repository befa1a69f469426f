"""User code for the example configurations: models, data readers and training functions that a team
would keep next to its own configuration file.

Not part of lidgate and not installed with it (``pyproject.toml`` packages only ``lid_engine``,
``components`` and ``flows``). Configuration files reference it by import path, e.g.
``examples.mnist.model:cnn``, with their ``code:`` root set to the repository root. The benchmarks
import the paper's CNN and the MNIST reader from here, so each has one home.
"""
