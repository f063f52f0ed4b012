"""What `perm info` and `perm env` print: model summaries and the runtime environment."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from perm_lite.model_dir import ModelConfig
from perm_lite.session import available_cores


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _card_summary(config: ModelConfig) -> str:
    card = config.path / "README.md"
    if not card.is_file():
        return "(no model card)"
    for line in card.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text and not text.startswith(("#", "---", "|", "<!--")):
            return text
    return ""


def model_info(config: ModelConfig) -> dict[str, Any]:
    import onnxruntime as ort

    return {
        "name": config.name,
        "version": config.version,
        "path": str(config.path),
        "summary": _card_summary(config),
        "licence": config.raw.get("licence", "unknown"),
        "base_model": config.raw.get("base_model", "unknown"),
        "max_length": config.max_length,
        "template": config.template,
        "perspectives": {
            name: f"{low:g}-{high:g}"
            + (" (empathy reward)" if name in config.heads.empathy else "")
            + (" (bystander term)" if name == config.heads.bystander else "")
            for name, (low, high) in config.heads.scales.items()
        },
        "variants": dict(config.variants),
        "calibrated_heads": sorted(config.calibration),
        "files": {
            name: f"{(config.path / name).stat().st_size / 1e6:.1f} MB sha256 {digest}"
            for name, digest in config.files.items()
        },
        "providers": ", ".join(ort.get_available_providers()),
    }


def environment() -> dict[str, Any]:
    import onnxruntime as ort

    from perm_lite import __version__

    cpu, gpu = _version("onnxruntime"), _version("onnxruntime-gpu")
    warnings = []
    if cpu and gpu:
        warnings.append(
            f"onnxruntime {cpu} and onnxruntime-gpu {gpu} are both installed; they share one module "
            "and whichever was installed last wins. Uninstall both, then install only one."
        )
    return {
        "perm_lite": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cores_available": available_cores(),
        "onnxruntime": cpu,
        "onnxruntime_gpu": gpu,
        "onnxruntime_module": ort.__version__,
        "providers": ", ".join(ort.get_available_providers()),
        "tokenizers": _version("tokenizers"),
        "numpy": _version("numpy"),
        "huggingface_hub": _version("huggingface-hub"),
        "warnings": warnings,
    }
