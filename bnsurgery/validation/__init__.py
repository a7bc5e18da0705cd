"""The pre-export gate: `validate(model)` runs every check and returns its findings."""
