"""The one module that owns onnxruntime: providers, threads and session creation."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import onnxruntime as ort

from perm_lite.errors import ProviderError

log = logging.getLogger("perm_lite")
PROVIDERS = ("auto", "cpu", "cuda")
_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"
_warned_cpu_fallback = False
_telemetry_off = False


def disable_telemetry() -> None:
    """Switch off onnxruntime's telemetry events (once, before the first session): perm-lite
    promises that nothing about a run leaves the machine or is logged by a third party."""
    global _telemetry_off
    if _telemetry_off:
        return
    _telemetry_off = True
    off = getattr(ort, "disable_telemetry_events", None)
    if off is not None:
        try:
            off()
        except Exception:  # an onnxruntime build without telemetry support
            log.debug("onnxruntime telemetry could not be switched off", exc_info=True)


def available_cores() -> int:
    """Cores this process may run on (respects affinity masks and cgroup cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def create_session(model_path: Path, provider: str = "auto", threads: int | None = None) -> ort.InferenceSession:
    """Open an inference session. `auto` uses CUDA when it really runs, else CPU.

    An explicit `cuda` that cannot run raises `ProviderError`; onnxruntime itself would
    silently fall back to CPU, so the providers actually in use are checked.
    """
    global _warned_cpu_fallback
    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if threads is not None and threads < 1:
        raise ProviderError("threads must be at least 1")
    disable_telemetry()
    available = ort.get_available_providers()
    path = str(model_path)
    if provider in ("auto", "cuda") and _CUDA in available:
        session = ort.InferenceSession(path, _options(threads), providers=[_CUDA, _CPU])
        if session.get_providers()[0] == _CUDA:
            return session
        reason = "onnxruntime lists CUDA but could not start it (driver, CUDA or cuDNN libraries missing?)"
    else:
        reason = "onnxruntime has no CUDA provider here (install perm-lite[gpu] on a CUDA machine)"
    if provider == "cuda":
        raise ProviderError(f"--provider cuda cannot run: {reason}")
    if provider == "auto" and not _warned_cpu_fallback:
        _warned_cpu_fallback = True
        if _CUDA in available:
            warnings.warn(f"CUDA not usable, running on CPU: {reason}", RuntimeWarning, stacklevel=3)
        else:
            log.info("running on CPU: %s", reason)
    return ort.InferenceSession(path, _options(threads), providers=[_CPU])


def session_provider(session: ort.InferenceSession) -> str:
    """'cuda' or 'cpu': what the session really runs on."""
    return "cuda" if session.get_providers()[0] == _CUDA else "cpu"
