"""Example: a small fully connected classifier on scikit-learn's bundled 8x8 digits."""
