"""Training a ControlNet for the app: `python -m train ...` (see README.md, "Training a ControlNet")."""
