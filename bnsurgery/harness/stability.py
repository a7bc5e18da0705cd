"""How a model reacts to shifted inputs, to repeated runs, and to float16 (`compare --stability`).

Perturbation suite (covariate shift): each perturbation is applied to every floating-point input
of a clean batch, with scales taken from that batch (std = the std of all its values, per
input), and the same perturbed batch goes to every model:

| name            | what it does                                        |
|-----------------|-----------------------------------------------------|
| noise-0.05/0.1/0.25 | adds gaussian noise of 0.05 / 0.1 / 0.25 x std  |
| scale-0.5 / scale-2 | multiplies the input by 0.5 / 2                 |
| brightness      | adds 0.5 x std                                      |
| contrast        | halves each sample's deviation from its own mean    |
| blur            | 3x3 gaussian blur over H, W (4-D inputs [N,C,H,W]) |

For each, on the first model output: the mean and max absolute change from the clean output,
the change relative to the clean output's mean magnitude, the top-1 flip rate against the clean
prediction ([N, C] outputs), and the accuracy when labels exist.

Determinism: each batch runs twice in the same session; the runs are bitwise equal or not.

float16: the model converted by `harness.fp16` runs against the float32 model; the error is
judged at the float16 tolerances, weights that overflow to inf are counted, and so is every
tensor that holds an inf where the float32 run is finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from bnsurgery.errors import first_line
from bnsurgery.harness.fp16 import convert_to_float16
from bnsurgery.harness.metrics import (
    DEFAULT_TOLERANCES,
    ErrorAccumulator,
    ErrorMetrics,
    is_classification,
)
from bnsurgery.runtime.providers import ProviderConfig
from bnsurgery.runtime.runner import Runner, node_outputs, progress

NOISE_LEVELS = (0.05, 0.1, 0.25)
BLUR_KERNEL = np.array([1.0, 2.0, 1.0]) / 4.0


@dataclass(frozen=True)
class Perturbation:
    name: str
    description: str
    apply: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    images_only: bool = False


def _std(x: np.ndarray) -> float:
    std = float(np.std(x, dtype=np.float64))
    return std if std > 0 else 1.0


def _noise(level: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    def apply(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return x + rng.standard_normal(x.shape) * (level * _std(x))

    return apply


def _contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    axes = tuple(range(1, x.ndim))
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64) if axes else x.mean()
    return mean + 0.5 * (x - mean)


def blur(x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """A 3x3 gaussian ([1,2,1]/4 on each axis) over the last two axes, edges replicated."""
    padded = np.pad(x.astype(np.float64), [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], "edge")
    h, w = x.shape[-2:]
    rows = sum(BLUR_KERNEL[i] * padded[..., i : i + h, :] for i in range(3))
    return sum(BLUR_KERNEL[j] * rows[..., :, j : j + w] for j in range(3))


def perturbations() -> list[Perturbation]:
    suite = [
        Perturbation(
            f"noise-{level:g}", f"gaussian noise, sigma = {level:g} x input std", _noise(level)
        )
        for level in NOISE_LEVELS
    ]
    suite += [
        Perturbation("scale-0.5", "input x 0.5", lambda x, rng: x * 0.5),
        Perturbation("scale-2", "input x 2", lambda x, rng: x * 2.0),
        Perturbation("brightness", "input + 0.5 x input std", lambda x, rng: x + 0.5 * _std(x)),
        Perturbation("contrast", "deviation from each sample's mean x 0.5", _contrast),
        Perturbation("blur", "3x3 gaussian blur over H, W", blur, images_only=True),
    ]
    return suite


def _is_image(x: np.ndarray) -> bool:
    return x.ndim == 4 and x.shape[-1] >= 3 and x.shape[-2] >= 3


def perturb(
    feeds: dict[str, np.ndarray], perturbation: Perturbation, rng: np.random.Generator
) -> dict[str, np.ndarray] | None:
    """The perturbed feeds; None when the perturbation applies to no input (blur, no image)."""
    out: dict[str, np.ndarray] = {}
    applied = False
    for name, x in feeds.items():
        floating = np.issubdtype(x.dtype, np.floating)
        if floating and (not perturbation.images_only or _is_image(x)):
            out[name] = np.asarray(perturbation.apply(x, rng)).astype(x.dtype)
            applied = True
        else:
            out[name] = x
    return out if applied else None


# ---------------------------------------------------------------------------------------------


@dataclass
class PerturbationResult:
    name: str
    description: str
    samples: int = 0
    mean_abs_change: float = 0.0
    max_abs_change: float = 0.0
    relative_change: float = 0.0
    flip_rate: float | None = None
    accuracy: float | None = None
    applied: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "applied": self.applied,
            "samples": self.samples,
            "mean_abs_change": self.mean_abs_change,
            "max_abs_change": self.max_abs_change,
            "relative_change": self.relative_change,
            "flip_rate": self.flip_rate,
            "accuracy": self.accuracy,
        }


@dataclass
class ModelStability:
    model: str
    provider: str
    output: str
    clean_accuracy: float | None
    perturbations: list[PerturbationResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "provider": self.provider,
            "output": self.output,
            "clean_accuracy": self.clean_accuracy,
            "perturbations": [p.to_dict() for p in self.perturbations],
        }


@dataclass
class Determinism:
    model: str
    provider: str
    ran_on: str
    bitwise_equal: bool
    max_abs_difference: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "provider": self.provider,
            "ran_on": self.ran_on,
            "bitwise_equal": self.bitwise_equal,
            "max_abs_difference": self.max_abs_difference,
        }


@dataclass
class Fp16Result:
    model: str
    provider: str
    passed: bool | None
    outputs: list[ErrorMetrics] = field(default_factory=list)
    conversion: dict[str, Any] = field(default_factory=dict)
    output_inf: int = 0
    overflowing_tensors: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""

    @property
    def first_overflow(self) -> str | None:
        return self.overflowing_tensors[0]["tensor"] if self.overflowing_tensors else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "provider": self.provider,
            "passed": self.passed,
            "tolerance": {
                "atol": DEFAULT_TOLERANCES["float16"][0],
                "rtol": DEFAULT_TOLERANCES["float16"][1],
            },
            "outputs": [m.to_dict() for m in self.outputs],
            "conversion": self.conversion,
            "output_inf": self.output_inf,
            "first_overflow": self.first_overflow,
            "overflowing_tensors": self.overflowing_tensors,
            "error": self.error,
        }


@dataclass
class StabilityReport:
    perturbation: list[ModelStability] = field(default_factory=list)
    determinism: list[Determinism] = field(default_factory=list)
    fp16: list[Fp16Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "perturbation": [p.to_dict() for p in self.perturbation],
            "determinism": [d.to_dict() for d in self.determinism],
            "fp16": [f.to_dict() for f in self.fp16],
            "notes": list(self.notes),
        }


class _ChangeAccumulator:
    def __init__(self) -> None:
        self.sum_abs = self.sum_clean = 0.0
        self.count = self.samples = self.flips = self.classified = self.correct = 0
        self.labelled = 0
        self.max_abs = 0.0

    def update(self, clean: np.ndarray, out: np.ndarray, labels: np.ndarray | None) -> None:
        c, o = clean.astype(np.float64), out.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(o - c)
        finite = np.isfinite(diff)
        self.sum_abs += float(diff[finite].sum())
        self.sum_clean += float(np.abs(c[np.isfinite(c)]).sum())
        self.count += int(diff.size)
        self.max_abs = max(self.max_abs, float(diff.max()) if diff.size else 0.0)
        if not finite.all():
            self.max_abs = math.inf
        self.samples += clean.shape[0] if clean.ndim else 1
        if is_classification(clean):
            pred = np.nan_to_num(o, nan=-np.inf).argmax(axis=1)
            self.flips += int((pred != np.nan_to_num(c, nan=-np.inf).argmax(axis=1)).sum())
            self.classified += len(pred)
            if labels is not None and len(labels) == len(pred):
                self.correct += int((pred == labels).sum())
                self.labelled += len(pred)

    def result(self, name: str, description: str) -> PerturbationResult:
        mean_abs = self.sum_abs / self.count if self.count else 0.0
        mean_clean = self.sum_clean / self.count if self.count else 0.0
        return PerturbationResult(
            name=name,
            description=description,
            samples=self.samples,
            mean_abs_change=mean_abs,
            max_abs_change=self.max_abs,
            relative_change=mean_abs / mean_clean if mean_clean else math.inf * bool(mean_abs),
            flip_rate=self.flips / self.classified if self.classified else None,
            accuracy=self.correct / self.labelled if self.labelled else None,
            applied=self.count > 0,
        )


def run_stability(
    models: Sequence[tuple[str, onnx.ModelProto]],
    source: Any,
    configs: Sequence[ProviderConfig],
    *,
    seed: int = 0,
    show_progress: bool | None = None,
) -> StabilityReport:
    """The perturbation suite and fp16 check on configs[0], determinism on every config."""
    report = StabilityReport()
    first = configs[0]
    suite = perturbations()
    runners = {label: Runner(model, first, label=label) for label, model in models}
    repeat = {
        (label, cfg.alias): Runner(model, cfg, label=f"{label}@{cfg.alias}")
        for label, model in models
        for cfg in configs
    }
    conversions = {}
    fp16_runners: dict[str, Runner] = {}
    fp16_ref_runners: dict[str, Runner] = {}
    fp16_results: dict[str, Fp16Result] = {}
    for label, model in models:
        result = Fp16Result(label, first.alias, None)
        fp16_results[label] = result
        try:
            conversion = convert_to_float16(model)
            conversions[label] = conversion
            result.conversion = conversion.to_dict()
            tensors = [n for n in node_outputs(conversion.model) if n in set(node_outputs(model))]
            fp16_runners[label] = Runner(conversion.model, first, extra_outputs=tensors)
            fp16_runners[label].activate()
            fp16_ref_runners[label] = Runner(model, first, extra_outputs=tensors)
        except Exception as exc:  # the report says why fp16 could not run, the rest goes on
            result.error = f"{type(exc).__name__}: {first_line(exc)}"
            fp16_runners.pop(label, None)

    output_name = {label: model.graph.output[0].name for label, model in models}
    change = {(label, p.name): _ChangeAccumulator() for label, _ in models for p in suite}
    clean_correct = {label: [0, 0] for label, _ in models}
    determinism = {key: [True, 0.0] for key in repeat}
    fp16_acc: dict[str, dict[str, ErrorAccumulator]] = {label: {} for label in fp16_runners}
    fp16_inf: dict[str, dict[str, int]] = {label: {} for label in fp16_runners}
    atol16, rtol16 = DEFAULT_TOLERANCES["float16"]

    with progress(
        enumerate(source.batches()),
        length=source.num_batches,
        label="stability",
        enabled=show_progress,
    ) as stream:
        for index, batch in stream:
            rngs = {p.name: np.random.default_rng([seed, index, i]) for i, p in enumerate(suite)}
            perturbed = {p.name: perturb(batch.feeds, p, rngs[p.name]) for p in suite}
            for label, _ in models:
                runner = runners[label]
                clean = runner.infer(batch.feeds)[output_name[label]]
                if batch.labels is not None and is_classification(clean):
                    clean_correct[label][0] += int((clean.argmax(axis=1) == batch.labels).sum())
                    clean_correct[label][1] += len(batch.labels)
                for p in suite:
                    feeds = perturbed[p.name]
                    if feeds is None:
                        continue
                    out = runner.infer(feeds)[output_name[label]]
                    change[(label, p.name)].update(clean, out, batch.labels)
            for key, runner in repeat.items():
                a = runner.infer(batch.feeds)
                b = runner.infer(batch.feeds)
                for name, value in a.items():
                    same = value.tobytes() == b[name].tobytes()
                    determinism[key][0] = determinism[key][0] and same
                    if not same:
                        diff = np.abs(value.astype(np.float64) - b[name].astype(np.float64))
                        worst = float(np.nanmax(diff)) if diff.size else 0.0
                        determinism[key][1] = max(determinism[key][1], worst)
            for label, runner16 in fp16_runners.items():
                ref = fp16_ref_runners[label].infer(batch.feeds)
                out = runner16.infer(batch.feeds)
                graph_outputs = [o.name for o in dict(models)[label].graph.output]
                for name in graph_outputs:
                    acc = fp16_acc[label].setdefault(name, ErrorAccumulator(name, atol16, rtol16))
                    acc.update(ref[name], out[name], batch.labels)
                for name, value in out.items():
                    if name in ref and np.issubdtype(value.dtype, np.floating):
                        new_inf = int((np.isinf(value) & np.isfinite(ref[name])).sum())
                        if new_inf:
                            fp16_inf[label][name] = fp16_inf[label].get(name, 0) + new_inf

    for label, _ in models:
        correct, total = clean_correct[label]
        report.perturbation.append(
            ModelStability(
                model=label,
                provider=runners[label].activate().describe(),
                output=output_name[label],
                clean_accuracy=correct / total if total else None,
                perturbations=[
                    change[(label, p.name)].result(p.name, p.description) for p in suite
                ],
            )
        )
    for (label, alias), runner in repeat.items():
        equal, worst = determinism[(label, alias)]
        info = runner.activate()
        report.determinism.append(Determinism(label, alias, info.ran_on, equal, worst))
    for label, result in fp16_results.items():
        if label in fp16_runners:
            result.outputs = [acc.result() for acc in fp16_acc[label].values()]
            result.passed = all(m.passed for m in result.outputs)
            graph_outputs = {o.name for o in dict(models)[label].graph.output}
            result.output_inf = sum(n for t, n in fp16_inf[label].items() if t in graph_outputs)
            order = {n: i for i, n in enumerate(node_outputs(dict(models)[label]))}
            result.overflowing_tensors = [
                {"tensor": t, "inf_values": n}
                for t, n in sorted(fp16_inf[label].items(), key=lambda kv: order.get(kv[0], 0))
            ]
        report.fp16.append(result)
    if any(not p.applied for m in report.perturbation for p in m.perturbations):
        report.notes.append("blur applies only to 4-D image inputs [N, C, H, W]; skipped here")
    report.notes.append(
        "fp16 on the CPU provider: nodes without a float16 kernel run in float32 inside ONNX "
        "Runtime, so this measures float16 storage and can understate GPU float16 error"
    )
    return report
