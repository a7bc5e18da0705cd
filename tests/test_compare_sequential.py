"""An output comparison holds one ONNX Runtime session at a time and judges exactly as the
sessions side by side do; a layer-wise divergence under a passing output says what it means."""

from __future__ import annotations

import json
import weakref

import onnx
import pytest
from conftest import SAMPLES

import bnsurgery
from bnsurgery.errors import DataError
from bnsurgery.runtime import providers as P

CNN = SAMPLES / "digits_cnn.onnx"
DATA = str(SAMPLES / "digits_test.npz")


def test_one_session_is_alive_at_a_time(monkeypatch, tmp_path):
    monkeypatch.setenv("BNSURGERY_ISOLATION", "0")  # count the sessions in this process
    alive: set[int] = set()
    most = [0]
    real = P.create_session

    def counted(model, config=None):
        session, info = real(model, config)
        alive.add(id(session))
        weakref.finalize(session, alive.discard, id(session))
        most[0] = max(most[0], len(alive))
        return session, info

    monkeypatch.setattr("bnsurgery.runtime.runner.create_session", counted)
    folded = tmp_path / "folded.onnx"
    onnx.save(bnsurgery.fold(str(CNN)).model, folded)
    report = bnsurgery.compare(CNN, folded, providers="cpu", data=DATA, opt_level="all")
    assert report.passed and len(report.pairs) == 2  # candidate, and the reference at "all"
    assert most[0] == 1  # reference, noise copy, then each pair: never two at once


def test_one_at_a_time_judges_exactly_as_side_by_side(tmp_path):
    """The layer-wise run keeps its sessions side by side; its output verdicts are the same."""
    folded = tmp_path / "folded.onnx"
    onnx.save(bnsurgery.fold(str(CNN)).model, folded)
    alone = bnsurgery.compare(CNN, folded, data=DATA, batch_size=100)
    together = bnsurgery.compare(CNN, folded, data=DATA, batch_size=100, layerwise=True)
    assert alone.data["batches"] == together.data["batches"] == 6
    for a, b in zip(alone.pairs, together.pairs, strict=True):
        assert [m.to_dict() for m in a.outputs] == [m.to_dict() for m in b.outputs]
        assert a.seconds > 0


def test_data_that_changes_between_passes_is_refused(tmp_path):
    script = tmp_path / "shrinking.py"
    counter = tmp_path / "calls"
    script.write_text(
        "import numpy as np, pathlib\n"
        f"COUNTER = pathlib.Path({str(counter)!r})\n"
        "def load_data():\n"
        "    calls = int(COUNTER.read_text()) if COUNTER.exists() else 0\n"
        "    COUNTER.write_text(str(calls + 1))\n"
        "    for _ in range(3 if calls < 2 else 2):\n"  # peek + first pass: 3, then 2
        "        yield {'input': np.zeros((4, 1, 8, 8), np.float32)}\n"
    )
    with pytest.raises(DataError, match="different number of batches on another pass"):
        bnsurgery.compare(CNN, CNN, data=str(script))


# -- a divergence under passing outputs --------------------------------------------------------
@pytest.fixture
def renamed_fold(tmp_path):
    """A fold that, like some other tools, gives each folded tensor the Conv's (pre-BN) name:
    matching by name then pairs "before BN" with "after BN"."""
    original = onnx.load(CNN)
    folded = bnsurgery.fold(original).model
    rename = {}
    for bn in (n for n in original.graph.node if n.op_type == "BatchNormalization"):
        producer = next(n for n in original.graph.node if bn.input[0] in n.output)
        rename[bn.output[0]] = producer.output[0]
    for node in folded.graph.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
        node.output[:] = [rename.get(x, x) for x in node.output]
    path = tmp_path / "renamed.onnx"
    onnx.save(folded, path)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({**rename, **dict.fromkeys(rename.values())}))
    return path, mapping


def test_a_divergence_under_passing_outputs_says_what_it_means_and_suggests_map(cli, renamed_fold):
    path, mapping = renamed_fold
    code, out, _ = cli("compare", CNN, path, "--layerwise")
    assert code == 0
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if "first divergence at Conv" in line)
    note = lines[first + 1]
    assert note.startswith("  note: the outputs agree, so this is most likely no error")
    assert "name their tensors differently" in note and "--map MAP.json" in note
    assert lines[-1].startswith("result: PASS")
    code, out, _ = cli("compare", CNN, path, "--layerwise", "--json")
    (layer,) = json.loads(out)["layerwise"]
    assert layer["first_divergence"] and "--map" in layer["note"]

    code, out, _ = cli("compare", CNN, path, "--layerwise", "--map", mapping)
    assert code == 0 and "no divergence" in out and "note:" not in out


def test_no_note_when_the_outputs_fail_too(cli, tmp_path):
    broken = onnx.load(CNN)
    weight = next(i for i in broken.graph.initializer if i.name.endswith("conv2.weight"))
    values = onnx.numpy_helper.to_array(weight) * 1.5
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    path = tmp_path / "broken.onnx"
    onnx.save(broken, path)
    code, out, _ = cli("compare", CNN, path, "--layerwise")
    assert code == 1 and "first divergence at Conv" in out and "note:" not in out


# -- weights left in their files until a session needs them -----------------------------------
def test_the_noise_copy_of_a_lazily_loaded_model_is_the_same_as_of_the_loaded_one():
    from bnsurgery.harness.compare import in_memory
    from bnsurgery.harness.noise import rounding_noise_copy
    from bnsurgery.onnxio import is_lazy, load_model

    path = SAMPLES / "resnet_small.onnx"
    lazy = load_model(path, external_data="lazy")
    assert is_lazy(lazy)  # its large weights are still in the file
    noisy = in_memory(rounding_noise_copy(lazy, 3))
    assert noisy.SerializeToString() == rounding_noise_copy(load_model(path), 3).SerializeToString()


def test_compare_from_paths_judges_as_from_models_in_memory(tmp_path):
    path = SAMPLES / "resnet_small.onnx"
    folded = tmp_path / "folded.onnx"
    onnx.save(bnsurgery.fold(str(path)).model, folded)
    from_paths = bnsurgery.compare(path, folded, providers="cpu")
    from_models = bnsurgery.compare(onnx.load(path), onnx.load(folded), providers="cpu")
    for a, b in zip(from_paths.pairs, from_models.pairs, strict=True):
        assert [m.to_dict() for m in a.outputs] == [m.to_dict() for m in b.outputs]
    stability = bnsurgery.compare(path, folded, providers="cpu", stability=True)
    assert stability.stability is not None and stability.passed
