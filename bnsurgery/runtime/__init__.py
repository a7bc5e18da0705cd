"""ONNX Runtime: which build is installed, execution providers, sessions (isolated in a child
process), the shared arena, node placement, and onnx.reference fitted to judge BN rewrites."""
