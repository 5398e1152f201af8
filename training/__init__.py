"""Training, validation and experiments for the bundle's network (not needed to score)."""
