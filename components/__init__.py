"""MLOps building blocks of lidgate: one real library each."""
