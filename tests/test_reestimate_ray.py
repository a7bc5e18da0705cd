"""Re-estimation on Ray: the same statistics as the local engine in both modes whatever the
shards and workers, a worker killed mid-wave, a bad shard, and Ray missing (exit 3).

The Ray tests run a real local cluster (2 CPUs, a small object store), started once for the
module and stopped after it.
"""

from __future__ import annotations

import json
import sys
import time

import bn_reference as ref
import numpy as np
import onnx
import pytest

from bnsurgery.errors import EnvironmentProblem
from bnsurgery.passes.reestimate import reestimate
from bnsurgery.stats import relative_error

TOL = 1e-9  # Ray against the local engine: float64 merges in another order
BATCH = 8


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        object_store_memory=100 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def net() -> onnx.ModelProto:
    return ref.conv_net()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return ref.image_data(48, shift=0.7)


def _shards(folder, images, sizes):
    """Shards of `sizes` samples (each a multiple of the batch size, so that batch mode's
    batches are the local engine's), written as part0.npz, part1.npz, ..."""
    folder.mkdir(exist_ok=True)
    start = 0
    for i, size in enumerate(sizes):
        np.savez(folder / f"part{i}.npz", x=images[start : start + size])
        start += size
    return folder


def _assert_same(result, local) -> None:
    got, want = result.report.stats.entries, local.report.stats.entries
    assert set(got) == set(want)
    for name, moments in want.items():
        assert got[name].count == moments.count, name
        assert relative_error(got[name].mean, moments.mean) < TOL, (name, "mean")
        assert relative_error(got[name].var, moments.var) < TOL, (name, "var")
    assert ref.bn_params(result.model).keys() == ref.bn_params(local.model).keys()


def _ray(net, data, mode, **options):
    from bnsurgery.measure.ray import RayOptions

    lines: list[str] = []
    result = reestimate(
        net,
        data,
        mode=mode,
        batch_size=BATCH,
        engine="ray",
        ray_options=RayOptions(log=lines.append, **options),
    )
    return result, lines


@pytest.mark.parametrize("mode", ["exact", "batch"])
@pytest.mark.parametrize(("sizes", "workers"), [((48,), 1), ((16, 8, 24), 2), ((8,) * 6, 3)])
def test_ray_gives_the_local_engines_statistics(
    ray_cluster, net, images, tmp_path, mode, sizes, workers
):
    folder = _shards(tmp_path / "shards", images, sizes)
    local = reestimate(net, folder, mode=mode, batch_size=BATCH)
    result, lines = _ray(net, folder, mode, workers=workers)
    _assert_same(result, local)
    engine = result.report.extras["engine"]
    assert engine["shards"] == len(sizes) and engine["workers"] == min(workers, len(sizes))
    assert result.report.samples == 48
    if mode == "exact":  # progress per wave, as many waves as the local engine
        assert result.report.waves == local.report.waves == 4
        assert [line.split(":")[0] for line in lines if line.startswith("wave")] == [
            f"wave {w}/4" for w in range(1, 5)
        ]


def test_a_ray_dataset_is_data(ray_cluster, net, images):
    import ray.data

    dataset = ray.data.from_numpy([images[:24], images[24:]])  # one block per array
    local = reestimate(net, {"x": images}, batch_size=BATCH)
    result, _ = _ray(net, dataset, "exact", workers=2)
    _assert_same(result, local)
    assert result.report.extras["engine"]["shards"] == 2


def test_samples_takes_the_first_samples_in_shard_order(ray_cluster, net, images, tmp_path):
    folder = _shards(tmp_path / "shards", images, (16, 16, 16))
    local = reestimate(net, {"x": images[:24]}, batch_size=BATCH)
    from bnsurgery.measure.ray import RayOptions

    result = reestimate(
        net, folder, batch_size=BATCH, samples=24, engine="ray", ray_options=RayOptions(workers=3)
    )
    _assert_same(result, local)
    assert result.report.samples == 24


def _wait_until_dead(ray, actor, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.05)
    raise AssertionError("the killed Ray worker is still alive")


def _kill_worker_in_wave(monkeypatch, ray, wave_number: int) -> None:
    """Kill worker 0 while it computes `wave_number` (the driver has sent the parameters of
    the wave before, and not yet asked for this one's moments)."""
    from bnsurgery.measure import ray as ray_engine

    original = ray_engine.Driver.wave

    def wave(self, number, history):
        if number == wave_number and not self.retried:
            actor = self.actors[0]
            ray.kill(actor, no_restart=True)
            _wait_until_dead(ray, actor)  # ray.kill is asynchronous: die in this very wave
        return original(self, number, history)

    monkeypatch.setattr(ray_engine.Driver, "wave", wave)


def test_a_worker_killed_mid_wave_is_replaced_and_the_answer_is_unchanged(
    ray_cluster, net, images, tmp_path, monkeypatch
):
    folder = _shards(tmp_path / "shards", images, (16, 16, 16))
    local = reestimate(net, folder, batch_size=BATCH)
    _kill_worker_in_wave(monkeypatch, ray_cluster, 3)
    result, lines = _ray(net, folder, "exact", workers=2)
    _assert_same(result, local)
    assert result.report.extras["engine"]["retried"] == [
        f"worker 0 (2 shard(s): {folder / 'part0.npz'} .. {folder / 'part1.npz'}), wave 3"
    ]
    assert any("died in wave 3" in line for line in lines)


def test_a_worker_that_stays_dead_fails_the_run_with_one_line(
    ray_cluster, net, images, tmp_path, monkeypatch, cli, write_model
):
    folder = _shards(tmp_path / "shards", images, (24, 24))
    model = write_model(net)
    from bnsurgery.measure import ray as ray_engine

    _kill_worker_in_wave(monkeypatch, ray_cluster, 2)
    with pytest.raises(EnvironmentProblem, match=r"died in wave 2 .*no statistics were written"):
        _ray(net, folder, "exact", workers=2, retries=0)
    # the CLI retries once: the replacement dies too
    replay = ray_engine.Driver.replay

    def replay_and_die(self, i, history):
        ray_cluster.kill(self.actors[i], no_restart=True)
        return replay(self, i, history)

    monkeypatch.setattr(ray_engine.Driver, "replay", replay_and_die)
    out = tmp_path / "out.onnx"
    code, _, err = cli(
        "reestimate", model, "--data", folder, "--engine", "ray", "--workers", "2",
        "--batch-size", str(BATCH), "-o", out,
    )  # fmt: skip
    assert code == 3
    message = [line for line in err.splitlines() if not line.startswith(("ray:", "wave", "pass"))]
    assert len(message) == 1 and "died in wave 2" in message[0], err
    assert not out.exists()


def test_a_shard_of_the_wrong_shape_is_one_line_naming_it(
    ray_cluster, net, images, tmp_path, cli, write_model
):
    folder = _shards(tmp_path / "shards", images, (16, 16))
    np.savez(folder / "part2.npz", x=np.zeros((8, 3, 5, 5), np.float32))
    model = write_model(net)
    out = tmp_path / "out.onnx"
    code, _, err = cli(
        "reestimate", model, "--data", folder, "--engine", "ray", "--workers", "2", "-o", out
    )
    assert code == 2
    message = [line for line in err.splitlines() if not line.startswith(("ray:", "wave", "pass"))]
    assert len(message) == 1 and "part2.npz" in message[0] and "[8x3x5x5]" in message[0], err
    assert not out.exists()


def test_cli_on_ray_writes_the_local_engines_model(ray_cluster, net, images, tmp_path, cli):
    folder = _shards(tmp_path / "shards", images, (16, 16, 16))
    model = tmp_path / "net.onnx"
    onnx.save(net, model)
    code, out, err = cli(
        "reestimate", model, "--data", str(folder / "part*.npz"), "--engine", "ray",
        "--workers", "2", "--batch-size", str(BATCH), "-o", tmp_path / "ray.onnx", "--json",
    )  # fmt: skip
    assert code == 0, err
    payload = json.loads(out)
    assert payload["engine"]["workers"] == 2 and payload["samples"] == 48
    assert "wave 4/4" in err
    code, _, err = cli(
        "reestimate", model, "--data", folder, "--batch-size", str(BATCH),
        "-o", tmp_path / "local.onnx",
    )  # fmt: skip
    assert code == 0, err
    on_ray = ref.bn_params(onnx.load(tmp_path / "ray.onnx"))
    local = ref.bn_params(onnx.load(tmp_path / "local.onnx"))
    for name, params in local.items():
        for got, want in zip(on_ray[name], params, strict=True):
            assert relative_error(got, want) < TOL, name


def test_engine_ray_without_ray_installed_is_exit_3_with_the_install_line(
    net, images, tmp_path, cli, write_model, monkeypatch
):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    folder = _shards(tmp_path / "shards", images, (48,))
    model = write_model(net)
    code, _, err = cli("reestimate", model, "--data", folder, "--engine", "ray")
    assert code == 3
    assert err.strip().endswith('pip install "bnsurgery[ray]"')
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(EnvironmentProblem, match="bnsurgery"):
        reestimate(net, folder, engine="ray")


def test_address_and_workers_need_engine_ray(net, images, tmp_path, cli, write_model):
    folder = _shards(tmp_path / "shards", images, (48,))
    code, _, err = cli("reestimate", write_model(net), "--data", folder, "--workers", "2")
    assert code == 2 and "--engine ray" in err


def test_source_relative_adaptation_runs_on_ray_with_the_local_answer(
    ray_cluster, net, images, tmp_path
):
    folder = _shards(tmp_path / "shards", images, (24, 24))
    source = {"x": ref.image_data(32, seed=9)}
    local = reestimate(net, folder, source=source, batch_size=BATCH)
    from bnsurgery.measure.ray import RayOptions

    result = reestimate(
        net, folder, source=source, batch_size=BATCH, engine="ray",
        ray_options=RayOptions(workers=2),
    )  # fmt: skip
    _assert_same(result, local)
    written = ref.bn_params(result.model)
    for name, params in ref.bn_params(local.model).items():
        for got, want in zip(written[name], params, strict=True):
            assert relative_error(got, want) < TOL, name
    assert "source_relative" in result.report.to_dict()
