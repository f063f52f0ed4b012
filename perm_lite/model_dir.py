"""Model directories: the config, file hashes, calibration and where a model comes from."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from perm_lite.errors import ModelError
from perm_lite.scales import PERSPECTIVES, SCALES
from perm_lite.text import TEMPLATE_VERSION

CONFIG_NAME = "config.json"
FORMAT = "perm-lite-model/1"
DEFAULT_MODEL = "perm-lite-minilm"
GENERATED_FIELDS = ("files", "format", "template", "perspectives", "scales")


@dataclass(frozen=True)
class CatalogueEntry:
    """A model perm-lite knows by name: packaged with the library or pinned on the Hub."""

    name: str
    description: str
    licence: str
    packaged: bool = True
    repo_id: str | None = None
    revision: str | None = None


CATALOGUE: dict[str, CatalogueEntry] = {
    DEFAULT_MODEL: CatalogueEntry(
        name=DEFAULT_MODEL,
        description="all-MiniLM-L6-v2 cross-encoder, 4 PERM heads, static int8 (the embedded default)",
        licence="non-commercial research use (inherits EPITOME and ESConv terms)",
    ),
}
ALIASES = {"default": DEFAULT_MODEL}


@dataclass(frozen=True)
class Calibration:
    """Monotone piecewise-linear map from a head's raw output onto its PERM scale."""

    raw: tuple[float, ...]
    score: tuple[float, ...]

    def apply(self, values, low: float, high: float):
        import numpy as np

        raw, score = np.asarray(self.raw), np.asarray(self.score)
        out = np.interp(values, raw, score)
        # Beyond the knots, continue the end slopes instead of flattening (keeps order).
        left = (score[1] - score[0]) / (raw[1] - raw[0])
        right = (score[-1] - score[-2]) / (raw[-1] - raw[-2])
        out = np.where(values < raw[0], score[0] + (values - raw[0]) * left, out)
        out = np.where(values > raw[-1], score[-1] + (values - raw[-1]) * right, out)
        return np.clip(out, low, high)


@dataclass(frozen=True)
class ModelConfig:
    """The parsed `config.json` of a model directory."""

    path: Path
    name: str
    version: str
    perspectives: tuple[str, ...]
    scales: dict[str, tuple[float, float]]
    max_length: int
    template: str
    tokenizer: str
    variants: dict[str, str]  # variant name -> onnx file
    files: dict[str, str]  # file -> sha256
    calibration: dict[str, Calibration]
    raw: dict[str, Any]

    def variant_path(self, variant: str) -> Path:
        return self.path / self.variants[variant]

    def editable_fields(self) -> dict[str, Any]:
        """The config without what `write_config` regenerates (hashes, format, scales...)."""
        return {k: v for k, v in self.raw.items() if k not in GENERATED_FIELDS}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _require(data: dict, key: str, kind: type, where: Path):
    if key not in data or not isinstance(data[key], kind):
        raise ModelError(f"{where}: '{key}' is missing or not a {kind.__name__}")
    return data[key]


def read_config(model_dir: Path, verify: bool = True) -> ModelConfig:
    """Read and check a model directory; with `verify`, refuse files whose sha256 differs."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise ModelError(f"{model_dir} is not a perm-lite model directory: {CONFIG_NAME} is missing")
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{cfg_path}: invalid JSON ({exc})") from exc
    if data.get("format") != FORMAT:
        raise ModelError(f"{cfg_path}: format {data.get('format')!r} is not {FORMAT!r}")
    perspectives = tuple(_require(data, "perspectives", list, cfg_path))
    if perspectives != PERSPECTIVES:
        raise ModelError(f"{cfg_path}: perspectives {list(perspectives)} differ from {list(PERSPECTIVES)}")
    template = _require(data, "template", str, cfg_path)
    if template != TEMPLATE_VERSION:
        raise ModelError(
            f"{cfg_path}: input template {template!r} is not supported by this perm-lite "
            f"(which renders {TEMPLATE_VERSION!r}); upgrade perm-lite or re-export the model"
        )
    files = _require(data, "files", dict, cfg_path)
    variants = _require(data, "variants", dict, cfg_path)
    tokenizer = _require(data, "tokenizer", str, cfg_path)
    for name in [tokenizer, *variants.values()]:
        if name not in files:
            raise ModelError(f"{cfg_path}: no sha256 recorded for {name}")
    if verify:
        for name, expected in files.items():
            path = model_dir / name
            if not path.is_file():
                raise ModelError(f"{model_dir}: file {name} listed in {CONFIG_NAME} is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise ModelError(
                    f"{path}: sha256 mismatch (expected {expected[:12]}..., found {actual[:12]}...): "
                    "the file is corrupt or was changed; download or export the model again"
                )
    calibration = {
        head: Calibration(tuple(c["raw"]), tuple(c["score"])) for head, c in data.get("calibration", {}).items()
    }
    scales = {k: tuple(v) for k, v in data.get("scales", SCALES).items()}
    return ModelConfig(
        path=model_dir,
        name=_require(data, "name", str, cfg_path),
        version=_require(data, "version", str, cfg_path),
        perspectives=perspectives,
        scales=scales,
        max_length=int(_require(data, "max_length", int, cfg_path)),
        template=template,
        tokenizer=tokenizer,
        variants=dict(variants),
        files=dict(files),
        calibration=calibration,
        raw=data,
    )


def write_config(model_dir: Path, config: dict[str, Any]) -> Path:
    """Write `config.json`, recording the sha256 of the tokenizer and every variant."""
    model_dir = Path(model_dir)
    names = [config["tokenizer"], *config["variants"].values()]
    config = {
        "format": FORMAT,
        "template": TEMPLATE_VERSION,
        "perspectives": list(PERSPECTIVES),
        "scales": {k: list(v) for k, v in SCALES.items()},
        **config,
        "files": {name: sha256_file(model_dir / name) for name in names},
    }
    path = model_dir / CONFIG_NAME
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def packaged_models_dir() -> Path:
    return Path(str(resources.files("perm_lite.models")))


def resolve_model(model: str | os.PathLike, cache_dir: str | None = None, revision: str | None = None) -> Path:
    """Find a model directory by catalogue name, local path, or `owner/repo@revision` on the Hub."""
    text = str(model)
    name = ALIASES.get(text, text)
    if name in CATALOGUE:
        entry = CATALOGUE[name]
        if entry.packaged:
            path = packaged_models_dir() / name
            if not (path / CONFIG_NAME).is_file():
                raise ModelError(
                    f"the packaged model {name!r} is not in this installation ({path}); "
                    "reinstall perm-lite or pass --model PATH to a model directory"
                )
            return path
        return download_from_hub(entry.repo_id or "", entry.revision, cache_dir)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path} is a file; --model expects a model directory containing {CONFIG_NAME}")
        return path
    if "/" in text and not text.startswith((".", "/", "~")):
        repo_id, _, pinned = text.partition("@")
        return download_from_hub(repo_id, pinned or revision, cache_dir)
    known = ", ".join(sorted([*CATALOGUE, *ALIASES]))
    raise ModelError(
        f"unknown model {text!r}: not a directory, not in the catalogue ({known}), not owner/repo@revision"
    )


def download_from_hub(repo_id: str, revision: str | None, cache_dir: str | None = None) -> Path:
    """Fetch a model directory from the Hugging Face Hub at a pinned revision.

    Respects HF_HUB_OFFLINE (then only the local cache is used) and `cache_dir`
    (default: huggingface-hub's own cache, or PERM_LITE_CACHE when set).
    """
    if not revision:
        raise ModelError(f"{repo_id}: pin a revision (owner/repo@<commit or tag>) so the model cannot change under you")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        path = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            cache_dir=cache_dir or os.environ.get("PERM_LITE_CACHE") or None,
            local_files_only=offline,
        )
    except Exception as exc:  # huggingface-hub raises many types; all mean "not available"
        hint = " (HF_HUB_OFFLINE is set: only the local cache was searched)" if offline else ""
        raise ModelError(f"could not get {repo_id}@{revision} from the Hugging Face Hub{hint}: {exc}") from exc
    return Path(path)
