"""The execution-provider table: everything perm-lite knows about a provider, in one place.

A `Provider` names an onnxruntime execution provider, the ONNX variants it runs best
(best first), its default padded-token budget per batch, whether it needs a GPU (Ray
sizes actors by it) and what to install when it is missing. `Scorer(provider=...)`,
serve and Ray look providers up here (the CLI's `--provider` offers the built-in ones);
`session.py` opens sessions with them. Adding a provider is one `register(Provider(...))`
call.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from perm_lite.errors import OptionError


@dataclass(frozen=True)
class Provider:
    """One execution provider as perm-lite uses it."""

    name: str  # what users pass (`provider="cuda"`) and `Scorer.provider` reports
    ort_name: str  # onnxruntime's name, e.g. "CUDAExecutionProvider"
    variants: tuple[str, ...]  # ONNX variants, best first, for variant="auto"
    batch_tokens: int | None  # default most padded tokens per batch (None: no limit)
    gpu: bool = False  # each session needs a GPU (Ray reserves one per actor)
    missing_hint: str = ""  # what to install when onnxruntime lacks it

    def pick_variant(self, available: Iterable[str]) -> str:
        """The best of a model's variants for this provider."""
        have = list(available)
        for name in self.variants:
            if name in have:
                return name
        return have[0]


# CPU: small batches keep activations in cache and run fastest (benchmarks/RESULTS.md),
# so the budget is 1024 padded tokens; int8 is the fast variant there.
CPU = Provider(
    "cpu", "CPUExecutionProvider", ("int8", "fp32", "fp16"), batch_tokens=1024, missing_hint="pip install onnxruntime"
)
CUDA = Provider(
    "cuda",
    "CUDAExecutionProvider",
    ("fp16", "fp32", "int8"),
    batch_tokens=None,
    gpu=True,
    missing_hint="install the gpu extra (pip install '.[gpu]' in the checkout: onnxruntime-gpu) on a CUDA machine",
)

PROVIDERS: dict[str, Provider] = {p.name: p for p in (CUDA, CPU)}
# "auto" tries the registered providers in this order (GPU ones first) and ends on CPU.
AUTO = "auto"


def register(provider: Provider) -> None:
    """Add (or replace) a provider; "auto" tries GPU providers before CPU ones."""
    if not isinstance(provider, Provider):
        raise OptionError(f"register a perm_lite.providers.Provider, not {type(provider).__name__}", "provider")
    if provider.name == AUTO:
        raise OptionError("'auto' is reserved: it means the best provider that runs here", "provider")
    if not provider.variants:
        raise OptionError(f"provider {provider.name!r} lists no ONNX variants", "provider")
    PROVIDERS[provider.name] = provider


def names() -> tuple[str, ...]:
    """What `provider=` accepts: "auto" and every registered name."""
    return (AUTO, *PROVIDERS)


def get(name: str) -> Provider:
    """The provider called `name`; an unknown name is an `OptionError` listing what
    `provider=` accepts. "auto" is no one provider: it is resolved by `session.create_session`."""
    if name == AUTO:
        raise OptionError("'auto' is not one provider: it picks the best provider that runs here", "provider")
    try:
        return PROVIDERS[name]
    except (KeyError, TypeError):
        raise OptionError(f"unknown provider {name!r}; choose one of {', '.join(names())}", "provider") from None


def auto_order() -> list[Provider]:
    """Providers "auto" tries, best first: GPU providers, then the others, CPU last."""
    return sorted(PROVIDERS.values(), key=lambda p: (not p.gpu, p.name == CPU.name))


def for_ort_name(ort_name: str) -> Provider:
    """The provider behind an onnxruntime name; an unlisted one gets CPU-like defaults
    (variants as CPU's, no token budget) under its onnxruntime name."""
    for provider in PROVIDERS.values():
        if provider.ort_name == ort_name:
            return provider
    return Provider(ort_name, ort_name, CPU.variants, batch_tokens=None)
