"""Models x providers against one reference, and the first layer where they part ways.

The reference is the REFERENCE model on the first provider (graph optimizations off unless
asked). Every other (model, provider) pair runs on the same batches and is judged output by
output; the comparison fails when any output is beyond tolerance.

`layerwise` adds every mapped intermediate tensor (harness.matching) as an output of a copy of
each model and finds, in the reference's topological order, the first tensor beyond tolerance:
the node that produced it is where the divergence starts.

This module decides what runs and puts the report together; the work is done apart, as
Polygraphy splits `Comparator.run` from `compare_accuracy`: harness.runner runs the reference,
its rounding-noise copy (harness.noise) and each pair over DATA and hands their outputs on
batch by batch, harness.judge turns them into verdicts, and harness.report's CompareReport
renders them (JSON, text, HTML). The engine that runs the models is a seam: ONNX Runtime, or
onnx.reference (runtime.reference) for the judge's fallback where ONNX Runtime lacks a kernel.

Data streams: one batch is held at a time, and metrics accumulate across batches.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from bnsurgery.data import input_specs, load_data
from bnsurgery.errors import BadInputError
from bnsurgery.harness.judge import Judge, declared_dtypes, log_verdicts, needs_noise_run
from bnsurgery.harness.matching import TensorMatch, identity_matches, match_tensors
from bnsurgery.harness.noise import rounding_noise_copy
from bnsurgery.harness.report import CompareReport
from bnsurgery.harness.results import LayerRecord, LayerwiseResult, PairResult
from bnsurgery.harness.runner import Lineup, release_memory, run_one_at_a_time, run_side_by_side
from bnsurgery.harness.stability import run_stability
from bnsurgery.harness.tolerances import ToleranceSpec
from bnsurgery.onnxio import is_lazy, load_model, materialize, save_model
from bnsurgery.runtime.isolation import run_isolated
from bnsurgery.runtime.providers import (
    ProviderConfig,
    alias_of,
    parse_provider_options,
    parse_providers,
    resolve_alias,
)
from bnsurgery.runtime.reference import ReferenceRunner
from bnsurgery.runtime.runner import Runner

__all__ = ["ENGINES", "CompareReport", "check_interfaces", "compare", "compare_models"]

logger = logging.getLogger(__name__)

# The engines a comparison can run on: each makes an Executor (runtime.runner) of a model.
ENGINES: dict[str, Any] = {"onnxruntime": Runner, "reference": ReferenceRunner}


def _label(source: Any) -> str:
    if isinstance(source, str | os.PathLike):
        return str(source)
    if isinstance(source, onnx.ModelProto):
        return f"<ModelProto '{source.graph.name}'>" if source.graph.name else "<ModelProto>"
    return "<bytes>"


def check_interfaces(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    """Same runtime inputs (names and element types) and the same output names, or exit 2."""
    ref_in = {s.name: s for s in input_specs(reference)}
    cand_in = {s.name: s for s in input_specs(candidate)}
    _require_same_names(ref_in, cand_in, "inputs")
    for name, spec in ref_in.items():
        other = cand_in[name]
        same_dtype = spec.dtype is None or other.dtype is None or spec.dtype == other.dtype
        same_rank = spec.dims is None or other.dims is None or len(spec.dims) == len(other.dims)
        same_dims = same_rank and all(
            a is None or b is None or a == b
            for a, b in zip(spec.dims or (), other.dims or (), strict=False)
        )
        if not (same_dtype and same_dims):
            raise BadInputError(
                f"input '{name}' is {spec.describe()} in the reference and "
                f"{other.describe()} in the candidate"
            )
    ref_out = [o.name for o in reference.graph.output]
    cand_out = [o.name for o in candidate.graph.output]
    _require_same_names(ref_out, cand_out, "outputs")


def _require_same_names(reference: Iterable[str], candidate: Iterable[str], what: str) -> None:
    """Exit 2 naming what only one model has, unless both have the same set of names."""
    ref, cand = set(reference), set(candidate)
    if ref == cand:
        return
    only_ref, only_cand = sorted(ref - cand), sorted(cand - ref)
    raise BadInputError(
        f"the models have different {what}: "
        + _only(only_ref, "only the reference has")
        + ("; " if only_ref and only_cand else "")
        + _only(only_cand, "only the candidate has")
    )


def _only(names: list[str], what: str) -> str:
    return f"{what} {', '.join(repr(n) for n in names)}" if names else ""


def compare(
    reference: Any,
    candidate: Any = None,
    providers: Sequence[str] | str = ("cpu",),
    data: Any = None,
    **options: Any,
) -> CompareReport:
    """Compare `candidate` (and `reference` itself on the other providers) with `reference`
    on the first provider, each output judged by the rounding-noise rule
    (docs/verification.md). Options are compare_models's (labels_key, atol, rtol, layerwise,
    tensor_map, stability, allow_fallback, opt_level, ..., shapes, seed, show_progress); see
    docs/compare.md; `atol`/`rtol` take a number, or CLI-style strings (`"1e-4"`,
    `"logits:1e-3"`). The sessions run in a child process, so an ONNX Runtime crash is one line
    (EngineCrashed, exit 2). Raises BadInputError (exit 2) on bad input and EnvironmentProblem
    (exit 3) when a provider is unavailable, or left nodes to another provider, without
    `allow_fallback`. `provider_options` ({provider: {key: value}} or `EP:KEY=VALUE` strings)
    and `ep_libraries` ({name: path} or `NAME=PATH` strings of plugin EP libraries) are
    options too."""
    # weights stay in their files until a session needs them (io's lazy loading): the models'
    # structure is all the checks read, and the child would otherwise hold both in memory
    ref_model = load_model(reference, external_data="lazy")
    cand_model = load_model(candidate, external_data="lazy") if candidate is not None else None
    what = _label(reference) + (f" and {_label(candidate)}" if candidate is not None else "")
    files = {
        role: Path(source)
        for role, source in (("reference", reference), ("candidate", candidate))
        if isinstance(source, str | os.PathLike)
    }
    return run_isolated(
        compare_models, ref_model, cand_model, what=what, reference_label=_label(reference),
        candidate_label=_label(candidate) if candidate is not None else None,
        providers=providers, data=data, model_files=files, **options,
    )  # fmt: skip


def compare_models(
    ref_model: onnx.ModelProto,
    cand_model: onnx.ModelProto | None,
    *,
    reference_label: str = "reference",
    candidate_label: str | None = "candidate",
    providers: Sequence[str] | str = ("cpu",),
    data: Any = None,
    labels_key: str | None = None,
    atol: Any = None,
    rtol: Any = None,
    layerwise: bool = False,
    tensor_map: Mapping[str, str | None] | None = None,
    stability: bool = False,
    allow_fallback: bool = False,
    provider_options: Any = None,
    ep_libraries: Any = None,
    opt_level: str = "disable_all",
    reference_opt_level: str = "disable_all",
    cuda_tf32: bool = False,
    cudnn_conv_algo_search: str = "EXHAUSTIVE",
    device_id: int = 0,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    batch_size: int | None = None,
    shapes: Mapping[str, list[int]] | None = None,
    seed: int = 0,
    show_progress: bool | None = None,
    engine: str = "onnxruntime",
    model_files: Mapping[str, Path] | None = None,
) -> CompareReport:
    """compare() on models already loaded, in this process (what fold's verification runs).

    engine: "onnxruntime", or "reference" (onnx.reference, the judge's fallback for kernels
    ONNX Runtime lacks: one provider, no stability; its session says `onnx.reference`).
    model_files: {"reference" | "candidate": the file the model was loaded from}. An output
    comparison on ONNX Runtime then makes that model's sessions from the file: ONNX Runtime
    reads it itself, and no serialized copy of its weights is made in this process (on
    ResNet-50 that copy was the peak of the comparison's memory). Loading only ever normalises
    what ONNX Runtime accepts as it is (onnxio.compat), so the file computes the same."""
    if engine not in ENGINES:
        raise BadInputError(
            f"unknown engine '{engine}' (known: {', '.join(ENGINES)})", option="engine"
        )
    aliases = parse_providers(providers, ep_libraries)
    options_by_provider = parse_provider_options(provider_options)
    unused = [n for n in options_by_provider if alias_of(n) not in aliases]
    if unused:
        raise BadInputError(
            f"provider options for {', '.join(alias_of(n) for n in unused)}, which is not "
            f"among the providers ({', '.join(aliases)})",
            option="provider_options",
        )
    if engine != "onnxruntime" and (len(aliases) > 1 or stability):
        raise BadInputError(
            f"{{option}} '{engine}' runs one model on one engine: no second provider, no "
            "stability checks",
            option="engine",
        )
    if cand_model is not None:
        check_interfaces(ref_model, cand_model)
    output_names = [o.name for o in ref_model.graph.output]
    tolerances = ToleranceSpec.parse(atol, rtol)
    tolerances.check_names(output_names)

    def config(alias: str, level: str) -> ProviderConfig:
        cfg = ProviderConfig(
            alias=alias,
            opt_level=level,
            allow_fallback=allow_fallback,
            cuda_tf32=cuda_tf32,
            cudnn_conv_algo_search=cudnn_conv_algo_search,
            device_id=device_id,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            options=dict(options_by_provider.get(resolve_alias(alias), {})),
        )
        cfg.validate()
        return cfg

    ref_config = config(aliases[0], reference_opt_level)
    pair_specs: list[tuple[str, onnx.ModelProto, ProviderConfig]] = []
    for alias in aliases:
        cfg = config(alias, opt_level)
        if alias != aliases[0] or opt_level != reference_opt_level:
            pair_specs.append(("reference", ref_model, cfg))
        if cand_model is not None:
            pair_specs.append(("candidate", cand_model, cfg))
    pair_specs.sort(key=lambda spec: spec[0] != "candidate")  # candidates first
    if not pair_specs and not stability:
        raise BadInputError(
            "nothing to compare: give a CANDIDATE model, a second provider "
            "({option} cpu,cuda), or the stability checks",
            option="providers",
        )

    source = load_data(
        data, ref_model, batch_size=batch_size, labels_key=labels_key, shapes=shapes, seed=seed
    )
    layer_matches: list[tuple[list[TensorMatch], list[TensorMatch]]] = []
    if layerwise and pair_specs:
        matches_by_role = {"reference": identity_matches(ref_model)}
        if cand_model is not None:
            matches_by_role["candidate"] = match_tensors(ref_model, cand_model, tensor_map)
        for role, _, _ in pair_specs:
            matches = matches_by_role[role]
            layer_matches.append(
                ([m for m in matches if m.candidate is not None],
                 [m for m in matches if m.candidate is None])
            )  # fmt: skip
    judge = Judge(
        output_names, tolerances, declared_dtypes(ref_model), len(pair_specs),
        [matched for matched, _ in layer_matches],
    )  # fmt: skip
    make = ENGINES[engine]
    # a layer-wise run adds outputs to the model, which needs it in memory
    files = dict(model_files or {}) if engine == "onnxruntime" and not layer_matches else {}

    def runnable(role: str, model: onnx.ModelProto) -> Any:
        return str(files[role]) if role in files else model

    lineup = Lineup(
        reference=make(runnable("reference", ref_model), ref_config, label="reference"),
        pairs=[make(runnable(role, m), cfg, label=f"{role}@{cfg.alias}")
               for role, m, cfg in pair_specs],
        output_names=output_names,
    )  # fmt: skip
    record = None
    if pair_specs:
        noise = needs_noise_run(tolerances, output_names, bool(layer_matches))
        started = time.perf_counter()
        if layer_matches:  # side by side: every intermediate tensor would be kept otherwise
            _add_layers(lineup, make, ref_model, ref_config, pair_specs, layer_matches, noise, seed)
            record = run_side_by_side(source, lineup, judge.observe, show_progress=show_progress)
        else:  # outputs alone: one session at a time

            def make_noise() -> Any:  # made when its turn comes
                noisy = rounding_noise_copy(ref_model, seed)
                if engine != "onnxruntime":
                    serialized = in_memory(noisy).SerializeToString()
                    release_memory()
                    return make(serialized, ref_config, label="rounding noise")
                # Streamed to a file with external data, tensor by tensor, for ONNX Runtime to
                # read: the copy's weights are never held twice (a serialized copy beside the
                # proto was the peak of the comparison's memory).
                with tempfile.TemporaryDirectory(prefix="bnsurgery-noise-") as folder:
                    path = Path(folder) / "noise.onnx"
                    save_model(noisy, path, external_data=True, stream=True)
                    del noisy
                    release_memory()
                    runner = make(str(path), ref_config, label="rounding noise")
                    runner.activate()
                return runner

            lineup.noise = make_noise if noise else None
            record = run_one_at_a_time(source, lineup, judge.observe, show_progress=show_progress)
        logger.info("compared on %s in %.2f s", engine, time.perf_counter() - started)

    data_info = source.to_dict()
    if record is not None:
        data_info.update(
            {
                "samples": record.samples or data_info["samples"],
                "batches": record.batches,
                "input_shapes": record.input_shapes,
            }
        )
    else:
        data_info.update({"batches": 0, "input_shapes": {}})
    report = CompareReport(
        reference=reference_label,
        candidate=candidate_label if cand_model is not None else None,
        providers=aliases,
        # stability alone: the reference's session is made (its placement checked) all the same
        reference_session=record.reference if record is not None else lineup.reference.activate(),
        data=data_info,
        tolerances=tolerances,
        notes=list(source.notes),
    )
    for index, (role, _, cfg) in enumerate(pair_specs):
        assert record is not None
        outputs = judge.verdicts(index)
        log_verdicts(f"{role} on {cfg.alias}", outputs)
        report.pairs.append(PairResult(role, cfg.alias, record.pairs[index], outputs,
                                       record.seconds[index]))  # fmt: skip
    for index, ((role, _, cfg), (matched, unmatched)) in enumerate(
        zip(pair_specs if layer_matches else [], layer_matches, strict=True)
    ):
        verdicts = judge.layer_verdicts(index)
        layers = [LayerRecord(m, verdicts[m.reference]) for m in matched if m.reference in verdicts]
        report.layerwise.append(LayerwiseResult(role, cfg.alias, layers, unmatched))
    if report.fallbacks:
        report.notes.extend(report.fallbacks)
    if stability:
        models = [("reference", in_memory(ref_model))]
        if cand_model is not None:
            models.append(("candidate", in_memory(cand_model)))
        configs = [ref_config] + [config(a, opt_level) for a in aliases[1:]]
        report.stability = run_stability(
            models, source, configs, seed=seed, show_progress=show_progress
        )
    return report


def _add_layers(
    lineup: Lineup,
    make: Any,
    ref_model: onnx.ModelProto,
    ref_config: ProviderConfig,
    pair_specs: list[tuple[str, onnx.ModelProto, ProviderConfig]],
    layer_matches: list[tuple[list[TensorMatch], list[TensorMatch]]],
    noise: bool,
    seed: int,
) -> None:
    """The layer-wise copies (each model with its matched tensors as outputs) and, when a rule
    needs it, the noise run of the reference and its layer-wise copy."""
    ref_tensors = [m.reference for m in identity_matches(ref_model)]
    lineup.reference_layers = make(ref_model, ref_config, extra_outputs=ref_tensors)
    for (role, model, cfg), (matched, _) in zip(pair_specs, layer_matches, strict=True):
        extra = [m.candidate for m in matched if m.candidate]
        lineup.pair_layers.append(
            make(model, cfg, extra_outputs=extra, label=f"{role}@{cfg.alias} layers")
        )
    if noise:
        # the reference with its weights rounded once more, on the same provider and batches
        noise_model = rounding_noise_copy(in_memory(ref_model), seed)
        lineup.noise = lambda: make(noise_model, ref_config, label="rounding noise")
        lineup.noise_layers = lambda: make(
            noise_model, ref_config, extra_outputs=ref_tensors, label="rounding noise layers"
        )


def in_memory(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every weight in memory (a copy, where some were left in their files)."""
    return materialize(model) if is_lazy(model) else model
