"""Execution-provider aliases, availability, and sessions whose placement is verified.

ONNX Runtime silently falls back to CPU when a requested provider fails to load (a missing CUDA
or cuDNN library, for instance). A session made here checks `get_providers()` afterwards and
raises EnvironmentProblem (exit 3) unless fallback was explicitly allowed, in which case the
fallback is recorded in the SessionInfo for the report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import onnx

from bnsurgery.errors import BadInputError, EnvironmentProblem

ALIASES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}

OPT_LEVELS = {
    "disable_all": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def resolve_alias(alias: str) -> str:
    """The ORT provider name of an alias (or of a full provider name)."""
    key = alias.strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    if alias in ALIASES.values():
        return alias
    known = ", ".join(ALIASES)
    raise BadInputError(f"unknown execution provider '{alias}' (known: {known})")


INSTALL_HINTS = {
    "CUDAExecutionProvider": "install onnxruntime-gpu (pip install 'bnsurgery[gpu]') on a "
    "machine with an NVIDIA GPU, CUDA and cuDNN",
    "TensorrtExecutionProvider": "install onnxruntime-gpu built with TensorRT, and TensorRT",
    "OpenVINOExecutionProvider": "install onnxruntime-openvino",
    "DmlExecutionProvider": "install onnxruntime-directml (Windows)",
    "CoreMLExecutionProvider": "use the onnxruntime wheel for macOS",
}

CUDNN_CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
EXECUTION_ORDERS = {"default": "DEFAULT", "priority_based": "PRIORITY_BASED"}


def parse_providers(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """`cpu,cuda` (or a sequence) -> validated, lower-case aliases in the given order.

    An unknown alias or a repeated provider is bad input (exit 2).
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    aliases: list[str] = []
    seen: dict[str, str] = {}
    for item in items:
        item = item.strip()
        if not item:
            continue
        name = resolve_alias(item)
        alias = next((a for a, n in ALIASES.items() if n == name), item)
        if name in seen:
            raise BadInputError(f"execution provider '{item}' is given twice")
        seen[name] = alias
        aliases.append(alias)
    if not aliases:
        raise BadInputError("no execution provider given (for example --providers cpu,cuda)")
    return aliases


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def availability() -> dict[str, bool]:
    """Every known alias and whether this onnxruntime build offers its provider."""
    available = set(available_providers())
    return {alias: name in available for alias, name in ALIASES.items()}


@dataclass
class ProviderConfig:
    """What to ask ONNX Runtime for: one provider, its options, the optimisation level."""

    alias: str = "cpu"
    opt_level: str = "disable_all"
    allow_fallback: bool = False
    cuda_tf32: bool = False
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    device_id: int = 0
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    execution_order: str = "default"
    # allocate from the process-wide arena of bnsurgery.harness.arena (registered by its user)
    shared_cpu_arena: bool = False
    # ORT's memory pattern plans one block for a whole run after the first; the first run's
    # chunks stay in the arena beside it, so the activations are held twice
    memory_pattern: bool = True

    def validate(self) -> None:
        """Raise BadInputError on an unknown alias, level or CUDA option value."""
        resolve_alias(self.alias)
        if self.opt_level not in OPT_LEVELS:
            raise BadInputError(
                f"unknown graph optimization level '{self.opt_level}' "
                f"(known: {', '.join(OPT_LEVELS)})"
            )
        if self.cudnn_conv_algo_search not in CUDNN_CONV_ALGO_SEARCH:
            raise BadInputError(
                f"unknown cudnn_conv_algo_search '{self.cudnn_conv_algo_search}' "
                f"(known: {', '.join(CUDNN_CONV_ALGO_SEARCH)})"
            )
        if self.execution_order not in EXECUTION_ORDERS:
            raise BadInputError(
                f"unknown execution order '{self.execution_order}' "
                f"(known: {', '.join(EXECUTION_ORDERS)})"
            )
        if self.device_id < 0 or self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise BadInputError("device id and thread counts must be >= 0")

    def provider_options(self) -> dict[str, str]:
        name = resolve_alias(self.alias)
        if name == "CUDAExecutionProvider":
            return {
                "device_id": str(self.device_id),
                "use_tf32": "1" if self.cuda_tf32 else "0",
                "cudnn_conv_algo_search": self.cudnn_conv_algo_search,
            }
        if name == "TensorrtExecutionProvider":
            return {"device_id": str(self.device_id)}
        return {}


@dataclass
class SessionInfo:
    """What actually ran: requested vs active providers, options, level and threads."""

    requested: str
    active: list[str]
    provider_options: dict[str, str]
    opt_level: str
    intra_op_threads: int
    inter_op_threads: int
    fallback: bool = False
    execution_order: str = "DEFAULT"
    notes: list[str] = field(default_factory=list)
    alias: str = ""
    effective_options: dict[str, dict[str, str]] = field(default_factory=dict)
    onnxruntime_version: str = ""
    shared_cpu_arena: bool = False

    @property
    def ran_on(self) -> str:
        """The provider that actually ran the graph (the first active one)."""
        return self.active[0] if self.active else "none"

    def describe(self) -> str:
        """`cuda -> CPUExecutionProvider (FALLBACK)` or `cpu (CPUExecutionProvider)`."""
        if self.fallback:
            return f"{self.alias or self.requested} -> {self.ran_on} (FALLBACK)"
        return f"{self.alias or self.requested} ({self.ran_on})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "requested": self.requested,
            "active": self.active,
            "ran_on": self.ran_on,
            "fallback": self.fallback,
            "provider_options": self.provider_options,
            "effective_provider_options": self.effective_options,
            "graph_optimization_level": self.opt_level,
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "execution_order": self.execution_order,
            "onnxruntime_version": self.onnxruntime_version,
            "shared_cpu_arena": self.shared_cpu_arena,
            "notes": self.notes,
        }


def session_options(config: ProviderConfig):  # -> ort.SessionOptions
    import onnxruntime as ort

    if config.opt_level not in OPT_LEVELS:
        raise BadInputError(
            f"unknown graph optimization level '{config.opt_level}' "
            f"(known: {', '.join(OPT_LEVELS)})"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, OPT_LEVELS[config.opt_level]
    )
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.execution_order = getattr(ort.ExecutionOrder, EXECUTION_ORDERS[config.execution_order])
    # FATAL only: ORT logs a failing kernel to stderr before raising, and the raised error is
    # what the one-line message reports (a second, multi-line copy would break that contract).
    options.log_severity_level = 4
    options.enable_mem_pattern = config.memory_pattern
    if config.shared_cpu_arena:
        from bnsurgery.harness.arena import USE_ENV_ALLOCATORS

        options.add_session_config_entry(USE_ENV_ALLOCATORS, "1")
    return options


def create_session(model: onnx.ModelProto | bytes | str | os.PathLike[str],
                   config: ProviderConfig | None = None):  # fmt: skip
    """An InferenceSession on the configured provider, with its placement verified.

    Returns (session, SessionInfo). Raises EnvironmentProblem when the provider is not
    available or did not load, unless config.allow_fallback.
    """
    import onnxruntime as ort

    config = config or ProviderConfig()
    config.validate()
    wanted = resolve_alias(config.alias)
    info = SessionInfo(
        requested=wanted,
        active=[],
        provider_options=config.provider_options(),
        opt_level=OPT_LEVELS.get(config.opt_level, config.opt_level),
        intra_op_threads=config.intra_op_threads,
        inter_op_threads=config.inter_op_threads,
        execution_order=EXECUTION_ORDERS.get(config.execution_order, config.execution_order),
        alias=config.alias,
        onnxruntime_version=ort.__version__,
        shared_cpu_arena=config.shared_cpu_arena,
    )
    available = available_providers()
    providers: list[Any] = []
    if wanted not in available:
        reason = (
            f"execution provider {wanted} ({config.alias}) is not available in this "
            f"onnxruntime build (available: {', '.join(available)})"
        )
        if wanted in INSTALL_HINTS:
            reason += f"; {INSTALL_HINTS[wanted]}"
        if not config.allow_fallback:
            raise EnvironmentProblem(reason)
        info.notes.append(f"FALLBACK: {reason}; running on CPUExecutionProvider")
    else:
        providers.append((wanted, info.provider_options))
    if wanted != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    if isinstance(payload, os.PathLike):
        payload = os.fspath(payload)
    session = ort.InferenceSession(
        payload, sess_options=session_options(config), providers=providers or None
    )
    info.active = list(session.get_providers())
    try:
        info.effective_options = {
            k: {ok: str(ov) for ok, ov in v.items()}
            for k, v in session.get_provider_options().items()
        }
    except Exception:  # older builds: the requested options are all we know
        info.effective_options = {}
    if wanted not in info.active:
        reason = f"execution provider {wanted} did not load (active: {', '.join(info.active)}); " \
            "check the CUDA/cuDNN libraries and the onnxruntime-gpu install"  # fmt: skip
        if not config.allow_fallback:
            raise EnvironmentProblem(reason)
        if not info.notes:
            info.notes.append(f"FALLBACK: {reason}")
        info.fallback = True
    elif info.notes:
        info.fallback = True
    return session, info
