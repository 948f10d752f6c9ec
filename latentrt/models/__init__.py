"""Reference PyTorch models of both families."""
