"""The shipped sample models: every BN folds, and the folded models compute the same thing
(on the real held-out digits for the trained models, on random inputs for the ResNet)."""

from __future__ import annotations

from pathlib import Path

import models as m
import numpy as np
import onnx
import pytest
from conftest import SAMPLES, sha256

import bnsurgery

WITH_BN = ["digits_cnn.onnx", "digits_mlp.onnx", "resnet_small.onnx"]


def sample(name: str) -> Path:
    path = SAMPLES / name
    if not path.is_file():
        pytest.skip(f"{path} is not built")
    return path


def digits(flat: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
    data = np.load(sample("digits_test.npz"))
    x = data["input"].reshape(-1, 64) if flat else data["input"]
    return {"input": x}, data["label"]


@pytest.fixture(scope="module")
def folds() -> dict[str, tuple[onnx.ModelProto, object]]:
    return {}


def folded(name: str, cache: dict) -> tuple[onnx.ModelProto, object]:
    if name not in cache:
        model = onnx.load(str(sample(name)))
        cache[name] = (model, bnsurgery.fold(model))
    return cache[name]


@pytest.mark.parametrize("name", WITH_BN)
def test_sample_has_no_bn_left(name: str, folds: dict) -> None:
    assert m.count_op(folded(name, folds)[1].model) == 0


@pytest.mark.parametrize("name", WITH_BN)
def test_every_sample_bn_is_folded(name: str, folds: dict) -> None:
    entries = folded(name, folds)[1].report.entries
    assert [e.node for e in entries if not e.reason.startswith("folded")] == []


@pytest.mark.parametrize("name", WITH_BN)
def test_sample_report_names_every_bn(name: str, folds: dict) -> None:
    model, result = folded(name, folds)
    assert len(result.report.entries) == m.count_op(model)


@pytest.mark.parametrize(("name", "flat"), [("digits_cnn.onnx", False), ("digits_mlp.onnx", True)])
def test_folded_digits_model_matches_on_held_out_digits(name: str, flat: bool, folds) -> None:
    model, result = folded(name, folds)
    feeds, _ = digits(flat)
    m.assert_equivalent(model, result.model, feeds)


@pytest.mark.parametrize(("name", "flat"), [("digits_cnn.onnx", False), ("digits_mlp.onnx", True)])
def test_folded_digits_model_predicts_the_same_classes(name: str, flat: bool, folds) -> None:
    model, result = folded(name, folds)
    feeds, _ = digits(flat)
    before, after = m.run_ort(model, feeds)[0], m.run_ort(result.model, feeds)[0]
    assert np.array_equal(before.argmax(1), after.argmax(1))


def test_folded_digits_cnn_keeps_its_accuracy(folds) -> None:
    _, result = folded("digits_cnn.onnx", folds)
    feeds, labels = digits()
    accuracy = float((m.run_ort(result.model, feeds)[0].argmax(1) == labels).mean())
    assert accuracy > 0.97


def test_folded_resnet_matches_on_random_inputs(folds) -> None:
    model, result = folded("resnet_small.onnx", folds)
    x = m.rng(5).standard_normal((2, 3, 64, 64)).astype(np.float32)
    m.assert_equivalent(model, result.model, {"input": x})


def test_model_without_bn_is_left_alone(folds) -> None:
    model, result = folded("digits_cnn_nobn.onnx", folds)
    assert len(result.model.graph.node) == len(model.graph.node)


def test_model_without_bn_has_an_empty_report(folds) -> None:
    assert folded("digits_cnn_nobn.onnx", folds)[1].report.entries == []


@pytest.mark.parametrize("name", [*WITH_BN, "digits_cnn_nobn.onnx"])
def test_cli_fold_of_sample_verifies(name: str, cli, tmp_path) -> None:
    path = sample(name)
    code, _, err = cli("fold", path, "-o", tmp_path / "out.onnx")
    assert code == 0, err


def test_cli_fold_leaves_the_sample_untouched(cli, tmp_path) -> None:
    path = sample("resnet_small.onnx")
    before = sha256(path)
    cli("fold", path, "-o", tmp_path / "out.onnx")
    assert sha256(path) == before


def test_folded_resnet_is_smaller_by_the_bn_nodes(folds) -> None:
    model, result = folded("resnet_small.onnx", folds)
    assert len(result.model.graph.node) == len(model.graph.node) - m.count_op(model)
