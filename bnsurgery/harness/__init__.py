"""The ONNX Runtime harness: run models on execution providers (providers, runner), judge the
results (metrics, compare, stability) and show them (report)."""
