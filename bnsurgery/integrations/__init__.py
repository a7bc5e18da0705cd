"""bnsurgery inside other tools: onnx-ir passes (`onnx_ir`) and test-suite assertions
(`testing`). Their public import paths are `bnsurgery.ir` and `bnsurgery.testing`."""
