"""One view of a model's graph: scopes, the GraphIndex, BatchNormalization sites and their
parameters, cached shape inference, and edit helpers."""
