"""The one module that owns onnxruntime: sessions, threads and provider fallback.

Which providers exist, and what each prefers, is the provider table (`providers.py`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

from perm_lite import providers as provider_table
from perm_lite.errors import OptionError, ProviderError, require_count
from perm_lite.providers import Provider

log = logging.getLogger("perm_lite")
_warned_cpu_fallback = False
_telemetry_off = False

# An explicit onnxruntime provider list, as onnxruntime takes it: names, or (name, options).
OrtProviders = Sequence[str | tuple[str, dict[str, Any]]]


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


def _ort_name(entry: str | tuple[str, dict[str, Any]]) -> str:
    return entry[0] if isinstance(entry, tuple) else entry


def create_session(
    model_path: Callable[[Provider], Path] | Path,
    provider: str = "auto",
    threads: int | None = None,
    ort_providers: OrtProviders | None = None,
) -> tuple[ort.InferenceSession, Provider]:
    """Open an inference session; returns it with the `Provider` it really runs on.

    `model_path` is a file, or a function choosing the file for a provider (the variant it
    prefers). `provider`: "auto" tries the table's providers that onnxruntime lists, GPU
    ones first, and ends on CPU; a named provider that cannot run raises `ProviderError`
    (onnxruntime itself would silently fall back to CPU, so the provider in use is
    checked). `ort_providers` passes an explicit onnxruntime provider list through as is.
    """
    if threads is not None:
        require_count(threads, "threads")
    path_for = model_path if callable(model_path) else (lambda _provider: model_path)
    disable_telemetry()
    if ort_providers is not None:
        if isinstance(ort_providers, str | bytes) or not isinstance(ort_providers, list | tuple):
            raise OptionError(
                f"providers=[...] takes a list of onnxruntime provider names, not {ort_providers!r}", "providers"
            )
        return _explicit(path_for, provider, threads, list(ort_providers))
    available = ort.get_available_providers()
    if provider != provider_table.AUTO:
        wanted = provider_table.get(provider)
        if wanted.ort_name not in available:
            raise ProviderError(
                f"--provider {wanted.name} cannot run: onnxruntime has no {wanted.ort_name} here "
                f"({wanted.missing_hint})"
            )
        session = _open(path_for(wanted), threads, wanted)
        if session is None:
            raise ProviderError(
                f"--provider {wanted.name} cannot run: onnxruntime lists {wanted.ort_name} but could not start it"
                + _hint(wanted)
            )
        return session, wanted
    skipped: list[tuple[Provider, str]] = []
    for candidate in provider_table.auto_order():
        if candidate.ort_name not in available:
            skipped.append((candidate, f"onnxruntime has no {candidate.ort_name} here ({candidate.missing_hint})"))
            continue
        session = _open(path_for(candidate), threads, candidate)
        if session is not None:
            _note_fallback(candidate, skipped)
            return session, candidate
        skipped.append((candidate, f"onnxruntime lists {candidate.ort_name} but could not start it{_hint(candidate)}"))
    raise ProviderError("no execution provider could start: " + "; ".join(reason for _, reason in skipped))


def _open(path: Path, threads: int | None, provider: Provider) -> ort.InferenceSession | None:
    """A session on `provider` (CPU as onnxruntime's fallback), or None when onnxruntime
    fell back instead of running on it, or when a GPU provider raised while starting (a
    missing driver or library); a model file that cannot load still raises on CPU."""
    cpu = provider_table.CPU.ort_name
    chain = [provider.ort_name] + ([] if provider.ort_name == cpu else [cpu])
    try:
        session = ort.InferenceSession(str(path), _options(threads), providers=chain)
    except Exception:
        if not provider.gpu:
            raise
        log.debug("%s could not start", provider.ort_name, exc_info=True)
        return None
    return session if session.get_providers()[0] == provider.ort_name else None


def _explicit(
    path_for: Callable[[Provider], Path], provider: str, threads: int | None, ort_providers: list
) -> tuple[ort.InferenceSession, Provider]:
    if provider != provider_table.AUTO:
        raise OptionError("give provider= or providers=[...], not both", "providers")
    if not ort_providers:
        raise OptionError("providers=[...] is empty; name at least one onnxruntime execution provider", "providers")
    for entry in ort_providers:
        ok = isinstance(entry, str) or (
            isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], dict)
        )
        if not ok:
            raise OptionError(
                f"providers=[...] takes onnxruntime provider names or (name, options) pairs, not {entry!r}", "providers"
            )
    available = ort.get_available_providers()
    missing = [_ort_name(e) for e in ort_providers if _ort_name(e) not in available]
    if missing:
        raise ProviderError(
            f"onnxruntime has no {', '.join(missing)} here (it has {', '.join(available)}); "
            "remove them from providers=[...] or install the onnxruntime build that has them"
        )
    first = provider_table.for_ort_name(_ort_name(ort_providers[0]))
    session = ort.InferenceSession(str(path_for(first)), _options(threads), providers=list(ort_providers))
    used = session.get_providers()[0]
    if used != first.ort_name:
        raise ProviderError(f"providers=[...]: onnxruntime could not start {first.ort_name} and fell back to {used}")
    return session, first


def _hint(provider: Provider) -> str:
    return " (driver, CUDA or cuDNN libraries missing?)" if provider.gpu else ""


def _note_fallback(used: Provider, skipped: list[tuple[Provider, str]]) -> None:
    """Say once per process that "auto" did not get a GPU provider: a warning when one is
    listed but does not start (a broken install), a log line when none is installed."""
    global _warned_cpu_fallback
    if not skipped or _warned_cpu_fallback:
        return
    _warned_cpu_fallback = True
    names = " and ".join(p.name.upper() for p, _ in skipped)
    reason = "; ".join(r for _, r in skipped)
    if "could not start" in reason:
        warnings.warn(f"{names} not usable, running on {used.name.upper()}: {reason}", RuntimeWarning, stacklevel=5)
    else:
        log.info("running on %s: %s", used.name, reason)
