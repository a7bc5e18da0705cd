"""Passes in sequence: TOML pipelines, and third-party passes and checks found through entry
points."""
