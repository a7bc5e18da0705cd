"""The runners: one model batch by batch (runtime.runner), intermediate tensors, the comparing
runner's two ways (harness.runner), and progress only on a TTY."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from conftest import SAMPLES

from bnsurgery.data import load_data
from bnsurgery.errors import BadInputError
from bnsurgery.harness.runner import Lineup, run_one_at_a_time, run_side_by_side
from bnsurgery.runtime import runner as R
from bnsurgery.runtime.providers import ProviderConfig
from bnsurgery.runtime.reference import ReferenceRunner
from bnsurgery.runtime.runner import Runner, with_outputs

DIGITS = SAMPLES / "digits_test.npz"
CONV1 = "/conv1/Conv_output_0"


def test_intermediate_tensors_come_back_as_extra_outputs_of_a_copy():
    model = onnx.load(SAMPLES / "digits_cnn.onnx")
    before = model.SerializeToString()
    feeds = next(iter(load_data("random:4", model).batches())).feeds
    out = Runner(model, ProviderConfig("cpu"), extra_outputs=[CONV1]).infer(feeds)
    assert out[CONV1].shape == (4, 16, 8, 8) and out["logits"].shape == (4, 10)
    assert model.SerializeToString() == before  # the caller's model is untouched


def test_the_reference_engine_runs_the_same_model_to_the_same_values():
    model = onnx.load(SAMPLES / "digits_cnn.onnx")
    feeds = next(iter(load_data("random:2", model).batches())).feeds
    ort = Runner(model, extra_outputs=[CONV1]).infer(feeds)
    reference = ReferenceRunner(model, extra_outputs=[CONV1])
    assert reference.activate().describe() == "reference (onnx.reference)"
    ref = reference.infer(feeds)
    for name in (CONV1, "logits"):
        np.testing.assert_allclose(ref[name], ort[name], rtol=1e-4, atol=1e-5)


def _lineup(model, pairs=1):
    return Lineup(
        reference=Runner(model, label="reference"),
        pairs=[Runner(model, ProviderConfig("cpu", opt_level="all"), label=f"p{i}")
               for i in range(pairs)],
        output_names=[o.name for o in model.graph.output],
        noise=lambda: Runner(model, label="noise"),
    )  # fmt: skip


def test_both_ways_of_running_hand_on_the_same_observations_in_the_same_order():
    model = onnx.load(SAMPLES / "digits_cnn.onnx")
    source = load_data(str(DIGITS), model, batch_size=128)
    runs = {}
    for how in (run_one_at_a_time, run_side_by_side):
        seen = []
        record = how(source, _lineup(model, pairs=2), seen.append, show_progress=False)
        assert (record.samples, record.batches, record.with_labels) == (540, 5, 5)
        assert [info.ran_on for info in record.pairs] == ["CPUExecutionProvider"] * 2
        runs[how] = seen
    one, side = runs.values()
    by_pair = [[o for o in seen if o.pair == p] for seen in (one, side) for p in (0, 1)]
    assert [len(obs) for obs in by_pair] == [5, 5, 5, 5]
    for a, b in zip(by_pair[:2], by_pair[2:], strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.labels, y.labels)
            for part in ("reference", "candidate", "noise"):
                np.testing.assert_array_equal(
                    getattr(x, part)["logits"], getattr(y, part)["logits"]
                )


def test_outputs_are_typed_from_shape_inference_or_left_untyped():
    model = onnx.load(SAMPLES / "digits_cnn.onnx")
    typed = with_outputs(model, [CONV1])
    assert typed.graph.output[-1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_untyped_outputs_still_run(monkeypatch):
    monkeypatch.setattr(R, "_inferred_types", lambda model: {})
    model = onnx.load(SAMPLES / "digits_cnn.onnx")
    assert not with_outputs(model, [CONV1]).graph.output[-1].HasField("type")
    feeds = next(iter(load_data("random:2", model).batches())).feeds
    assert Runner(model, extra_outputs=[CONV1]).infer(feeds)[CONV1].shape == (2, 16, 8, 8)


def test_unknown_intermediate_is_bad_input():
    with pytest.raises(BadInputError, match="no tensor named 'nope'"):
        with_outputs(onnx.load(SAMPLES / "digits_mlp.onnx"), ["nope"])


def test_progress_bar_only_when_stderr_is_a_terminal(monkeypatch, capsys):
    model = onnx.load(SAMPLES / "digits_mlp.onnx")
    source = load_data("random:8", model)
    run_one_at_a_time(source, _lineup(model), lambda observation: None)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    run_one_at_a_time(source, _lineup(model), lambda observation: None)
    assert "reference" in capsys.readouterr().err


def test_cli_compare_prints_nothing_on_stderr_when_all_is_well(cli, tmp_path):
    np.savez(tmp_path / "d.npz", input=np.load(DIGITS)["input"][:32])
    code, out, err = cli(
        "compare", SAMPLES / "digits_cnn.onnx", "--opt-level", "all", "--data", tmp_path / "d.npz"
    )
    assert code == 0 and err == "" and "result: PASS" in out
