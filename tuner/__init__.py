"""certtune search service: adapters around Ray Tune, Optuna and W&B, and the CLI."""
