"""Linear probes: batched logistic regression over many hooks, folds and regularisation strengths."""
