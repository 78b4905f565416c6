"""Training recipes for the shipped QAT checkpoints (scikit-learn digits)."""
