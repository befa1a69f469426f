"""Example: the paper's Split-MNIST set-up — its 6,179-parameter CNN and a reader for packaged MNIST."""
