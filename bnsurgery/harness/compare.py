"""Models x providers against one reference, and the first layer where they part ways.

The reference is the REFERENCE model on the first provider (graph optimizations off unless
asked). Every other (model, provider) pair runs on the same batches and is judged output by
output (harness.metrics); the comparison fails when any output is beyond tolerance.

`layerwise` adds every mapped intermediate tensor (harness.matching) as an output of a copy of
each model and finds, in the reference's topological order, the first tensor beyond tolerance:
the node that produced it is where the divergence starts.

Data streams: one batch is held at a time, and metrics accumulate across batches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnsurgery.errors import BadInputError
from bnsurgery.harness.matching import TensorMatch, identity_matches, match_tensors
from bnsurgery.harness.metrics import ErrorAccumulator, ErrorMetrics, ToleranceSpec
from bnsurgery.harness.noise import rounding_noise_copy
from bnsurgery.harness.sequential import release_free_heap, run_one_at_a_time
from bnsurgery.harness.stability import StabilityReport
from bnsurgery.runtime.providers import (
    ProviderConfig,
    SessionInfo,
    alias_of,
    parse_provider_options,
    parse_providers,
    resolve_alias,
)
from bnsurgery.runtime.runner import Runner, progress

SCHEMA = "bnsurgery.compare/2"


@dataclass
class PairResult:
    """One (model, provider) pair judged against the reference, output by output."""

    model: str  # "reference" | "candidate"
    provider: str  # the alias asked for
    session: SessionInfo
    outputs: list[ErrorMetrics]
    seconds: float = 0.0  # time in session.run over every batch

    @property
    def passed(self) -> bool:
        return all(m.passed for m in self.outputs)

    @property
    def label(self) -> str:
        return f"{self.model} on {self.session.describe()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "provider": self.provider,
            "passed": self.passed,
            "session": self.session.to_dict(),
            "inference_seconds": self.seconds,
            "outputs": [m.to_dict() for m in self.outputs],
        }


@dataclass
class LayerRecord:
    match: TensorMatch
    metrics: ErrorMetrics

    def to_dict(self) -> dict[str, Any]:
        m = self.metrics
        numbers = m.to_dict()
        return {
            "tensor": self.match.reference,
            "candidate_tensor": self.match.candidate,
            "matched_by": self.match.how,
            "node": self.match.reference_node,
            "op_type": self.match.reference_op,
            "candidate_node": self.match.candidate_node,
            "candidate_op_type": self.match.candidate_op,
            "passed": m.passed,
            "max_abs": numbers["max_abs"],
            "max_rel": numbers["max_rel"],
            "mean_abs": numbers["mean_abs"],
            "cosine": numbers["cosine"],
            "min_atol": numbers["min_atol"],
            "atol": m.atol,
            "rtol": m.rtol,
            "mismatched": m.mismatched,
        }


@dataclass
class LayerwiseResult:
    """The layer-wise comparison of one pair: every matched tensor and the first divergence."""

    model: str
    provider: str
    layers: list[LayerRecord]
    unmatched: list[TensorMatch]

    @property
    def first_divergence(self) -> LayerRecord | None:
        return next((layer for layer in self.layers if not layer.metrics.passed), None)

    def counts(self) -> dict[str, int]:
        counts = {"matched": len(self.layers), "unmatched": len(self.unmatched)}
        for how in ("map", "structure", "name"):
            counts[f"by_{how}"] = sum(1 for layer in self.layers if layer.match.how == how)
        return counts

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
            "model": self.model,
            "provider": self.provider,
            "mapping": self.counts(),
            "first_divergence": first.to_dict() if first else None,
            "layers": [layer.to_dict() for layer in self.layers],
            "unmatched": [
                {
                    "tensor": u.reference,
                    "node": u.reference_node,
                    "op_type": u.reference_op,
                    "decided_by": u.how,
                }
                for u in self.unmatched
            ],
        }


@dataclass
class CompareReport:
    """Everything `bnsurgery compare` found; `passed` is False when any output is beyond
    tolerance. `to_dict()` is the stable JSON schema (docs/compare.md)."""

    reference: str
    candidate: str | None
    providers: list[str]
    reference_session: SessionInfo
    data: dict[str, Any]
    tolerances: ToleranceSpec
    pairs: list[PairResult] = field(default_factory=list)
    layerwise: list[LayerwiseResult] = field(default_factory=list)
    stability: StabilityReport | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.pairs)

    @property
    def failures(self) -> list[PairResult]:
        return [p for p in self.pairs if not p.passed]

    @property
    def fallbacks(self) -> list[str]:
        sessions = [self.reference_session, *[p.session for p in self.pairs]]
        seen: list[str] = []
        for session in sessions:
            for note in session.notes:
                if session.fallback and note not in seen:
                    seen.append(note)
        return seen

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "passed": self.passed,
            "reference": {
                "model": self.reference,
                "provider": self.providers[0],
                "session": self.reference_session.to_dict(),
            },
            "candidate": {"model": self.candidate} if self.candidate else None,
            "providers": list(self.providers),
            "data": self.data,
            "tolerances": self.tolerances.to_dict(),
            "fallbacks": self.fallbacks,
            "comparisons": [p.to_dict() for p in self.pairs],
            "layerwise": [self._layerwise_dict(lw) for lw in self.layerwise]
            if self.layerwise
            else None,
            "stability": self.stability.to_dict() if self.stability else None,
            "notes": list(self.notes),
        }

    def _layerwise_dict(self, lw: LayerwiseResult) -> dict[str, Any]:
        from bnsurgery.harness.report import divergence_caveat

        return {**lw.to_dict(), "note": divergence_caveat(self, lw)}

    def render_text(self) -> str:
        from bnsurgery.harness.report import render_text

        return render_text(self)

    def write_html(self, path: str | os.PathLike[str]) -> Path:
        from bnsurgery.harness.report import write_html

        return write_html(self, path)


def _label(source: Any) -> str:
    if isinstance(source, str | os.PathLike):
        return str(source)
    if isinstance(source, onnx.ModelProto):
        return f"<ModelProto '{source.graph.name}'>" if source.graph.name else "<ModelProto>"
    return "<bytes>"


def check_interfaces(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    """Same runtime inputs (names and element types) and the same output names, or exit 2."""
    from bnsurgery.data import input_specs

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
    from bnsurgery.onnxio import load_model
    from bnsurgery.runtime.isolation import run_isolated

    # weights stay in their files until a session needs them (io's lazy loading): the models'
    # structure is all the checks read, and the child would otherwise hold both in memory
    ref_model = load_model(reference, external_data="lazy")
    cand_model = load_model(candidate, external_data="lazy") if candidate is not None else None
    what = _label(reference) + (f" and {_label(candidate)}" if candidate is not None else "")
    return run_isolated(
        compare_models, ref_model, cand_model, what=what, reference_label=_label(reference),
        candidate_label=_label(candidate) if candidate is not None else None,
        providers=providers, data=data, **options,
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
) -> CompareReport:
    """compare() on models already loaded and checked (what fold's verification runs)."""
    from bnsurgery.data import load_data

    aliases = parse_providers(providers, ep_libraries)
    options_by_provider = parse_provider_options(provider_options)
    unused = [n for n in options_by_provider if alias_of(n) not in aliases]
    if unused:
        raise BadInputError(
            f"provider options for {', '.join(alias_of(n) for n in unused)}, which is not "
            f"among the providers ({', '.join(aliases)})"
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
            "(--providers cpu,cuda), or --stability"
        )

    source = load_data(
        data, ref_model, batch_size=batch_size, labels_key=labels_key, shapes=shapes, seed=seed
    )
    ref_runner = Runner(ref_model, ref_config, label="reference")
    runners = [Runner(m, cfg, label=f"{role}@{cfg.alias}") for role, m, cfg in pair_specs]
    # Outputs alone: one session at a time (harness.sequential). Layer-wise: side by side,
    # since every intermediate tensor of the reference would have to be kept otherwise.
    sequential = bool(pair_specs) and not layerwise
    if not sequential:
        ref_info = ref_runner.activate()
        infos = [r.activate() for r in runners]

    # layer-wise: which tensors to return from each model
    layer_plans: list[tuple[list[TensorMatch], list[TensorMatch], Runner]] = []
    ref_layer_runner = None
    if layerwise and pair_specs:
        matches_by_role = {"reference": identity_matches(ref_model)}
        if cand_model is not None:
            matches_by_role["candidate"] = match_tensors(ref_model, cand_model, tensor_map)
        ref_tensors = [m.reference for m in matches_by_role["reference"]]
        ref_layer_runner = Runner(ref_model, ref_config, extra_outputs=ref_tensors)
        for role, model, cfg in pair_specs:
            matches = matches_by_role[role]
            matched = [m for m in matches if m.candidate is not None]
            unmatched = [m for m in matches if m.candidate is None]
            extra = [m.candidate for m in matched if m.candidate]
            runner = Runner(model, cfg, extra_outputs=extra, label=f"{role}@{cfg.alias} layers")
            runner.activate()
            layer_plans.append((matched, unmatched, runner))

    # The default rule measures the rounding noise of the reference: the reference with its
    # weights rounded once more, run on the same provider and batches (harness.noise).
    noise_model = None
    noise_wanted = any(not tolerances.explicit_for(n) for n in output_names) or bool(
        layer_plans and tolerances.atol is None and tolerances.rtol is None
    )
    if noise_wanted and not sequential:
        noise_model = rounding_noise_copy(in_memory(ref_model), seed)
    noise_runner = noise_layer_runner = None
    if noise_model is not None and pair_specs and not sequential:
        noise_runner = Runner(noise_model, ref_config, label="rounding noise")
        noise_runner.activate()
        if ref_layer_runner is not None:
            noise_layer_runner = Runner(
                noise_model, ref_config, extra_outputs=ref_layer_runner.extra_outputs,
                label="rounding noise layers",
            )  # fmt: skip
            noise_layer_runner.activate()
    accumulators = [
        {
            name: ErrorAccumulator(
                name, *tolerances.for_output(name, _output_dtype(ref_model, name))
            )
            for name in output_names
        }
        for _ in pair_specs
    ]
    layer_accumulators: list[dict[str, ErrorAccumulator]] = [{} for _ in layer_plans]
    global_tol = ToleranceSpec(tolerances.atol, tolerances.rtol)

    samples = batches = 0
    with_labels = 0
    seconds = [0.0] * len(runners)
    input_shapes: dict[str, list[int]] = {}
    if sequential:

        def make_noise() -> Runner:  # made when its turn comes: only its bytes outlive this
            noisy = in_memory(rounding_noise_copy(ref_model, seed)).SerializeToString()
            release_free_heap()  # the two full copies it took are garbage: give them back
            return Runner(noisy, ref_config, label="rounding noise")  # type: ignore[arg-type]

        done = run_one_at_a_time(
            source,
            ref_runner,
            make_noise if noise_wanted else None,
            runners,
            accumulators,
            show_progress=show_progress,
        )
        ref_info, infos, seconds = done.reference, done.pairs, done.seconds
        samples, batches, with_labels = done.samples, done.batches, done.with_labels
        input_shapes = done.input_shapes
    elif pair_specs:
        with progress(
            source.batches(),
            length=source.num_batches,
            label="comparing",
            enabled=show_progress,
        ) as stream:
            for batch in stream:
                if not input_shapes:
                    input_shapes = {k: list(np.shape(v)) for k, v in batch.feeds.items()}
                ref_out = ref_runner.infer(batch.feeds)
                noise_out = noise_runner.infer(batch.feeds) if noise_runner else {}
                for index, (runner, accs) in enumerate(zip(runners, accumulators, strict=True)):
                    started = time.perf_counter()
                    out = runner.infer(batch.feeds)
                    seconds[index] += time.perf_counter() - started
                    for name, acc in accs.items():
                        acc.update(ref_out[name], out[name], batch.labels, noise_out.get(name))
                if ref_layer_runner is not None:
                    ref_layers = ref_layer_runner.infer(batch.feeds)
                    noise_layers = (
                        noise_layer_runner.infer(batch.feeds) if noise_layer_runner else {}
                    )
                    for (matched, _, runner), accs in zip(
                        layer_plans, layer_accumulators, strict=True
                    ):
                        out = runner.infer(batch.feeds)
                        for match in matched:
                            value = ref_layers[match.reference]
                            other = out[match.candidate]  # type: ignore[index]
                            if not isinstance(value, np.ndarray) or not isinstance(
                                other, np.ndarray
                            ):
                                continue  # sequences and maps are not compared layer-wise
                            acc = accs.get(match.reference)
                            if acc is None:
                                tol = global_tol.for_output(match.reference, value.dtype)
                                acc = accs[match.reference] = ErrorAccumulator(
                                    match.reference, *tol
                                )
                            acc.update(value, other, None, noise_layers.get(match.reference))
                samples += batch.size
                batches += 1
                with_labels += batch.labels is not None

    data_info = source.to_dict()
    data_info.update(
        {
            "samples": samples or data_info["samples"],
            "batches": batches,
            "input_shapes": input_shapes,
        }
    )
    report = CompareReport(
        reference=reference_label,
        candidate=candidate_label if cand_model is not None else None,
        providers=aliases,
        reference_session=ref_info,
        data=data_info,
        tolerances=tolerances,
        notes=list(source.notes),
    )
    for (role, _, cfg), info, accs, spent in zip(
        pair_specs, infos, accumulators, seconds, strict=True
    ):
        outputs = [a.result() for a in accs.values()]
        report.pairs.append(PairResult(role, cfg.alias, info, outputs, spent))
    for (role, _, cfg), (matched, unmatched, _), accs in zip(
        pair_specs if layer_plans else [], layer_plans, layer_accumulators, strict=True
    ):
        layers = [
            LayerRecord(m, accs[m.reference].result()) for m in matched if m.reference in accs
        ]
        report.layerwise.append(LayerwiseResult(role, cfg.alias, layers, unmatched))
    if report.fallbacks:
        report.notes.extend(report.fallbacks)
    if stability:
        from bnsurgery.harness.stability import run_stability

        models = [("reference", in_memory(ref_model))]
        if cand_model is not None:
            models.append(("candidate", in_memory(cand_model)))
        configs = [ref_config] + [config(a, opt_level) for a in aliases[1:]]
        report.stability = run_stability(
            models, source, configs, seed=seed, show_progress=show_progress
        )
    return report


def in_memory(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every weight in memory (a copy, where some were left in their files)."""
    from bnsurgery.onnxio import is_lazy, materialize

    return materialize(model) if is_lazy(model) else model


def _output_dtype(model: onnx.ModelProto, name: str) -> Any:
    for value in model.graph.output:
        if value.name == name and value.type.tensor_type.elem_type:
            try:
                return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            except (KeyError, TypeError, ValueError):
                return None
    return None
