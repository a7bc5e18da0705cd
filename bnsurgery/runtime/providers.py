"""Execution-provider aliases, availability, and sessions whose placement is verified.

ONNX Runtime silently falls back to CPU when a requested provider fails to load (a missing CUDA
or cuDNN library, for instance). A session made here checks `get_providers()` afterwards and
raises EnvironmentProblem (exit 3) unless fallback was explicitly allowed, in which case the
fallback is recorded in the SessionInfo for the report.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import dataclass, field
from typing import Any

import onnx

from bnsurgery.errors import BadInputError, EnvironmentProblem, first_line, is_onnxruntime_error
from bnsurgery.onnxio import is_lazy, materialize
from bnsurgery.runtime import placement as P
from bnsurgery.runtime.installation import (
    ep_devices,
    onnxruntime,
    parse_library_specs,
    plugin_ep_names,
    register_library,
    register_package_for,
    registered_libraries,
)
from bnsurgery.runtime.placement import Placement

CPU_EP = "CPUExecutionProvider"

# The session option that makes a session allocate from the environment's shared CPU arena
# (registered by bnsurgery.runtime.arena, which builds on this module).
USE_ENV_ALLOCATORS = "session.use_env_allocators"

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


def alias_of(name: str) -> str:
    """The short name of a provider: `cuda` for CUDAExecutionProvider, `xnnpack` for
    XnnpackExecutionProvider; a plugin EP's name (`ggml`) is its own short name."""
    for alias, full in ALIASES.items():
        if full == name:
            return alias
    return name.removesuffix("ExecutionProvider").lower() or name


def known_providers() -> list[str]:
    """Every provider name this process can ask for: ONNX Runtime's built-in EPs (available
    in this build or not) and the EPs of registered plugin libraries."""
    ort = onnxruntime()
    names = list(dict.fromkeys([*ort.get_all_providers(), *ort.get_available_providers()]))
    return names + [n for n in plugin_ep_names() if n not in names]


def resolve_alias(alias: str) -> str:
    """The ONNX Runtime provider name of an alias, a full name, or a plugin EP's name
    (case-insensitive). An installed plugin package whose EP has that name is registered on
    the way. Unknown: bad input (exit 2) listing what is known."""
    key = alias.strip()
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    for _ in range(2):  # the second time after registering an installed plugin package
        names = known_providers()
        for name in names:
            if key.lower() in (name.lower(), alias_of(name)):
                return name
        for library in registered_libraries():  # a registration name stands for its EP
            if key.lower() == library.name.lower() and len(library.ep_names) == 1:
                return library.ep_names[0]
        if register_package_for(key) is None:
            break
    known = ", ".join(dict.fromkeys([*ALIASES, *(alias_of(n) for n in names)]))
    raise BadInputError(
        f"unknown execution provider '{alias}' (known: {known}; a plugin EP is known once "
        "its library is registered, as NAME=PATH)",
        option="providers",
    )


INSTALL_HINTS = {
    "CUDAExecutionProvider": "install onnxruntime-gpu (pip install 'bnsurgery[gpu]', without "
    "the CPU onnxruntime) on a machine with an NVIDIA GPU, CUDA and cuDNN",
    "TensorrtExecutionProvider": "install onnxruntime-gpu built with TensorRT, and TensorRT",
    "OpenVINOExecutionProvider": "install onnxruntime-openvino (pip install "
    "'bnsurgery[openvino]', without the CPU onnxruntime)",
    "DmlExecutionProvider": "install onnxruntime-directml (Windows)",
    "CoreMLExecutionProvider": "use the onnxruntime wheel for macOS",
}

CUDNN_CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
EXECUTION_ORDERS = {"default": "DEFAULT", "priority_based": "PRIORITY_BASED"}


def parse_providers(spec: str | list[str] | tuple[str, ...], ep_libraries: Any = None) -> list[str]:
    """`cpu,cuda` (or a sequence) -> validated short names in the given order, after
    registering the plugin EP libraries `ep_libraries` (`NAME=PATH` strings or a mapping).

    An unknown provider or a repeated one is bad input (exit 2).
    """
    for name, path in parse_library_specs(ep_libraries).items():
        register_library(name, path)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    aliases: list[str] = []
    seen: dict[str, str] = {}
    for item in items:
        item = item.strip()
        if not item:
            continue
        name = resolve_alias(item)
        if name in seen:
            raise BadInputError(f"execution provider '{item}' is given twice", option="providers")
        seen[name] = alias_of(name)
        aliases.append(alias_of(name))
    if not aliases:
        raise BadInputError(
            "no execution provider given in {option} (for example cpu,cuda)", option="providers"
        )
    return aliases


def parse_provider_options(specs: Any) -> dict[str, dict[str, str]]:
    """`EP:KEY=VALUE` strings (or {ep: {key: value}}) -> {provider name: {key: value}}.
    Malformed or for an unknown provider: bad input (exit 2)."""
    if not specs:
        return {}
    pairs: list[tuple[str, str, str]] = []
    if isinstance(specs, dict):
        for ep, options in specs.items():
            if not isinstance(options, dict):
                raise BadInputError(
                    f"{{option}} for '{ep}' must be a table of KEY = VALUE",
                    option="provider_options",
                )
            pairs += [(str(ep), str(k), _option_text(v)) for k, v in options.items()]
    else:
        for spec in specs:
            text = str(spec)
            ep, sep, rest = text.partition(":")
            key, eq, value = rest.partition("=")
            if not (sep and eq and ep.strip() and key.strip()):
                raise BadInputError(
                    f"{{option}} '{text}': expected EP:KEY=VALUE "
                    "(e.g. openvino:precision=FP32, ggml:weights=f32)",
                    option="provider_options",
                )
            pairs.append((ep, key, value))
    options: dict[str, dict[str, str]] = {}
    for ep, key, value in pairs:
        options.setdefault(resolve_alias(ep), {})[key.strip()] = value.strip()
    return options


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def available_providers() -> list[str]:
    return list(onnxruntime().get_available_providers())


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
    # allocate from the process-wide arena of bnsurgery.runtime.arena (registered by its user)
    shared_cpu_arena: bool = False
    # ORT's memory pattern plans one block for a whole run after the first; the first run's
    # chunks stay in the arena beside it, so the activations are held twice
    memory_pattern: bool = True
    # the provider's own options (--provider-option EP:KEY=VALUE); they override the defaults
    options: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise BadInputError on an unknown provider, level or CUDA option value."""
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
        """The options the provider is created with: the harness's defaults (CUDA: TF32 off,
        EXHAUSTIVE conv search), then the user's own."""
        name = resolve_alias(self.alias)
        defaults: dict[str, str] = {}
        if name == "CUDAExecutionProvider":
            defaults = {
                "device_id": str(self.device_id),
                "use_tf32": "1" if self.cuda_tf32 else "0",
                "cudnn_conv_algo_search": self.cudnn_conv_algo_search,
            }
        elif name == "TensorrtExecutionProvider":
            defaults = {"device_id": str(self.device_id)}
        return {**defaults, **self.options}


@dataclass
class SessionInfo:
    """What actually ran: requested vs active providers, options, level, threads, and where
    every node ran (placement)."""

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
    placement: Placement | None = None
    plugin_library: str | None = None

    @property
    def ran_on(self) -> str:
        """The provider that ran the graph: the requested one when it took any node (and
        was loaded), else the first active one."""
        if self.placement is not None and self.placement.kind == "full":
            return self.placement.elsewhere[0][2]
        if self.requested in self.active:
            return self.requested
        return self.active[0] if self.active else "none"

    @property
    def partial(self) -> bool:
        return self.placement is not None and self.placement.kind == "partial"

    def describe(self) -> str:
        """`cuda -> CPUExecutionProvider (FALLBACK)`, `openvino (OpenVINOExecutionProvider,
        PARTIAL FALLBACK)` or `cpu (CPUExecutionProvider)`."""
        name = self.alias or self.requested
        if self.partial:
            return f"{name} ({self.ran_on}, PARTIAL FALLBACK)"
        if self.fallback:
            return f"{name} -> {self.ran_on} (FALLBACK)"
        return f"{name} ({self.ran_on})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "requested": self.requested,
            "active": self.active,
            "ran_on": self.ran_on,
            "fallback": self.fallback,
            "placement": self.placement.to_dict() if self.placement else None,
            "plugin_library": self.plugin_library,
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
    ort = onnxruntime()
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
        options.add_session_config_entry(USE_ENV_ALLOCATORS, "1")
    return options


def create_session(model: onnx.ModelProto | bytes | str | os.PathLike[str],
                   config: ProviderConfig | None = None):  # fmt: skip
    """An InferenceSession on the configured provider, with its placement verified.

    Returns (session, SessionInfo). Raises EnvironmentProblem (exit 3) when the provider is
    not available, did not load, or left any node of the model to another provider (partial
    fallback) or took none (full fallback), unless config.allow_fallback, in which case the
    fallback is recorded in SessionInfo.notes and `fallback`.
    """
    ort = onnxruntime()
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
        alias=alias_of(wanted),
        onnxruntime_version=ort.__version__,
        shared_cpu_arena=config.shared_cpu_arena,
    )
    options = session_options(config)
    recording = P.enable_recording(options)
    available = available_providers()
    providers: list[Any] | None = []
    attach: Any = None
    library = next((lib for lib in registered_libraries() if wanted in lib.ep_names), None)
    if library is not None:  # a plugin EP: attach its devices (the documented way)
        devices = ep_devices(wanted)
        if not devices:
            raise EnvironmentProblem(f"{library.name}: registered, but it reported no device here")
        options.add_provider_for_devices(devices, info.provider_options)
        attach = lambda o: o.add_provider_for_devices(devices, info.provider_options)  # noqa: E731
        info.plugin_library = library.path
        providers = None
    elif wanted not in available:
        reason = (
            f"execution provider {wanted} ({info.alias}) is not available in this "
            f"onnxruntime build (available: {', '.join(available)})"
        )
        if wanted in INSTALL_HINTS:
            reason += f"; {INSTALL_HINTS[wanted]}"
        if not config.allow_fallback:
            raise EnvironmentProblem(reason)
        info.notes.append(f"FALLBACK: {reason}; running on CPUExecutionProvider")
        providers = ["CPUExecutionProvider"]
    else:
        providers = [(wanted, info.provider_options)]
        if wanted != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")
    if isinstance(model, onnx.ModelProto):
        # weights left in their files (io's lazy loading) are read now, into a copy that is
        # gone once serialized
        payload = (materialize(model) if is_lazy(model) else model).SerializeToString()
    else:
        payload = model
    if isinstance(payload, os.PathLike):
        payload = os.fspath(payload)
    session = _new_session(ort, payload, options, providers, wanted, info, config)
    drop_serialized_model(session)
    info.active = list(session.get_providers())
    try:
        info.effective_options = {
            k: {ok: str(ov) for ok, ov in v.items()}
            for k, v in session.get_provider_options().items()
        }
    except Exception:  # older builds: the requested options are all we know
        info.effective_options = {}
    if recording and not info.notes:
        info.placement = P.read(session, wanted)
        if not info.placement.recorded and wanted != CPU_EP:  # ORT < 1.24: its verbose log
            logged = session_options(config)
            logged.log_severity_level = 0
            if attach is not None:
                attach(logged)
            with P.captured_stderr() as log:
                ort.InferenceSession(payload, sess_options=logged, providers=providers)
                text = log()
            info.placement = P.from_log(text, wanted, _model_nodes(model))
    if wanted not in info.active and not info.notes:
        reason = f"execution provider {wanted} did not load (active: {', '.join(info.active)}); " \
            "check the CUDA/cuDNN libraries and the onnxruntime-gpu install"  # fmt: skip
        if not config.allow_fallback:
            raise EnvironmentProblem(reason)
        info.notes.append(f"FALLBACK: {reason}")
    problem = info.placement.problem() if info.placement is not None else None
    if problem is not None:
        kind = "PARTIAL FALLBACK" if info.placement.kind == "partial" else "FALLBACK"  # type: ignore[union-attr]
        if not config.allow_fallback:
            raise EnvironmentProblem(
                f"{problem}; {{option}} runs it anyway (and says so)", option="allow_fallback"
            )  # fmt: skip
        info.notes.append(f"{kind}: {problem}")
    info.fallback = bool(info.notes)
    return session, info


def _new_session(ort: Any, payload: Any, options: Any, providers: list[Any] | None,
                 wanted: str, info: SessionInfo, config: ProviderConfig) -> Any:  # fmt: skip
    """InferenceSession without ONNX Runtime's own silent retry on CPU (it prints `EP Error`
    on stdout and carries on). When the provider cannot be created but the CPU provider runs
    the model, the provider is at fault: exit 3, or the CPU session with a FALLBACK note."""
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet):  # ORT builds without enable_fallback print
            return ort.InferenceSession(
                payload, sess_options=options, providers=providers, enable_fallback=0
            )
    except Exception as exc:  # pybind raises RuntimeError for an EP that cannot be created
        if wanted == CPU_EP or not (is_onnxruntime_error(exc) or type(exc) is RuntimeError):
            raise
        try:  # does the CPU provider run it? If not, the model is at fault, not the provider
            cpu = ort.InferenceSession(
                payload, sess_options=session_options(config), providers=[CPU_EP]
            )
        except Exception:
            raise exc from None
        given = ", ".join(f"{k}={v}" for k, v in info.provider_options.items())
        reason = f"execution provider {wanted} could not be created" + (
            f" with options {given}" if given else ""
        ) + f": {_ort_message(exc)}"  # fmt: skip
        if not config.allow_fallback:
            raise EnvironmentProblem(reason) from None
        info.notes.append(f"FALLBACK: {reason}; running on {CPU_EP}")
        return cpu


def drop_serialized_model(session: Any) -> None:
    """Let go of the serialized model ONNX Runtime's Python session keeps.

    `InferenceSession` holds the bytes it was made from (the private `_model_bytes`) only to
    build itself again when its own fallback retries on CPU; that retry is off here
    (`enable_fallback=0`, see _new_session), so the copy, as large as the weights, would only
    double the memory a large model costs. This is the one place that touches ORT's private
    attribute: if a release renames it, nothing breaks, the memory is merely held."""
    if isinstance(getattr(session, "_model_bytes", None), bytes):
        session._model_bytes = None


def _ort_message(exc: BaseException) -> str:
    """The first line of an ONNX Runtime error without its C++ source location and signature
    (`/onnxruntime/...cc:1053 std::shared_ptr<...> f(...) Invalid OpenVINO EP option: x`)."""
    return re.sub(r"^\S+\.(?:cc|cpp|h):\d+ .*?\) ", "", first_line(exc))


def _model_nodes(model: Any) -> list[tuple[str, str]]:
    """(name, op_type) of the main graph's nodes, weights left on disk."""
    if not isinstance(model, onnx.ModelProto):
        model = (
            onnx.load_from_string(bytes(model))
            if isinstance(model, bytes | bytearray)
            else onnx.load(os.fspath(model), load_external_data=False)
        )
    return [(node.name, node.op_type) for node in model.graph.node]
