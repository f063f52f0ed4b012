"""Model directories: the config, file hashes, calibration and where a model comes from."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

from perm_lite.errors import ModelError
from perm_lite.scales import BYSTANDER, EMPATHY, PERSPECTIVES, SCALES, Heads
from perm_lite.text import TEMPLATE_VERSION

CONFIG_NAME = "config.json"
if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from perm_lite.providers import Provider
    from perm_lite.session import OrtProviders

FORMAT = "perm-lite-model/1"
DEFAULT_MODEL = "perm-lite-minilm"
GENERATED_FIELDS = ("files", "format", "template")
RESERVED_NAMES = ("combined", "truncated", "error")  # output names a perspective would collide with
VARIANTS = ("int8", "fp32", "fp16")  # the ONNX variants a model directory may hold
MAX_LENGTH_RANGE = (16, 512)  # tokens per record; the MiniLM encoder has 512 positions
_SHA256 = re.compile(r"[0-9a-f]{64}")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class CatalogueEntry:
    """A model perm-lite knows by name: packaged with the library or pinned on the Hub
    (what it is and its licence: the model's config.json and card)."""

    name: str
    packaged: bool = True
    repo_id: str | None = None
    revision: str | None = None


CATALOGUE: dict[str, CatalogueEntry] = {
    DEFAULT_MODEL: CatalogueEntry(name=DEFAULT_MODEL),
}
ALIASES = {"default": DEFAULT_MODEL}


@dataclass(frozen=True)
class Calibration:
    """Monotone piecewise-linear map from a head's raw output onto its PERM scale."""

    raw: tuple[float, ...]
    score: tuple[float, ...]

    def apply(self, values: np.ndarray, low: float, high: float) -> np.ndarray:
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
    heads: Heads  # perspectives (in output order), their scales and roles in the reward
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
        """The config without what `write_config` regenerates (hashes, format, template)."""
        return {k: v for k, v in self.raw.items() if k not in GENERATED_FIELDS}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _require(data: dict, key: str, kind: type, where: Path):
    if key not in data or not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
        raise ModelError(f"{where}: '{key}' is missing or not a {kind.__name__}")
    return data[key]


def _is_number(value: Any) -> bool:
    """A finite JSON number (booleans are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _allowed_roots(model_dir: Path) -> list[Path]:
    """Where a model's files may live: the directory itself and, for a Hugging Face Hub
    snapshot (`models--owner--name/snapshots/<rev>/`), that repository's blob store, which
    the snapshot's files link to."""
    root = model_dir.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        roots.append(root.parent.parent / "blobs")
    return roots


def _inside(model_dir: Path, name: Any, what: str, cfg_path: Path) -> str:
    """Refuse a file name that is not a plain relative path resolving inside the model directory."""
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"{cfg_path}: {what} must be a file name, not {name!r}")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if "\0" in name or posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        raise ModelError(f"{cfg_path}: {what} {name!r} must be a path relative to the model directory")
    if ".." in posix.parts or ".." in windows.parts:
        raise ModelError(f"{cfg_path}: {what} {name!r} points outside the model directory")
    try:
        target = (model_dir / name).resolve()
    except (OSError, RuntimeError) as exc:  # a link loop
        raise ModelError(f"{cfg_path}: {what} {name!r} cannot be resolved ({exc})") from None
    roots = _allowed_roots(model_dir)
    if target == roots[0] or not any(target == root or root in target.parents for root in roots):
        raise ModelError(f"{cfg_path}: {what} {name!r} resolves outside the model directory (a link to {target}?)")
    return name


def _check_perspectives(data: dict, cfg_path: Path) -> tuple[str, ...]:
    value = data.get("perspectives")
    if not isinstance(value, list) or not value or not all(isinstance(p, str) and p for p in value):
        raise ModelError(f"{cfg_path}: 'perspectives' must be a non-empty list of names")
    if len(set(value)) != len(value):
        raise ModelError(f"{cfg_path}: 'perspectives' lists a name twice ({value})")
    reserved = sorted(set(value) & set(RESERVED_NAMES))
    if reserved:
        raise ModelError(
            f"{cfg_path}: {reserved} cannot name a perspective ('combined' is the reward; Ray writes "
            "perm_<perspective>, perm_combined, perm_truncated and perm_error columns)"
        )
    return tuple(value)


def _check_scales(data: dict, perspectives: tuple[str, ...], cfg_path: Path) -> dict[str, tuple[float, float]]:
    if "scales" not in data and not set(perspectives) <= set(SCALES):
        raise ModelError(f"{cfg_path}: 'scales' is required for perspectives other than PERM's ({list(SCALES)})")
    value = data["scales"] if "scales" in data else {k: list(SCALES[k]) for k in perspectives}
    if not isinstance(value, dict):
        raise ModelError(f"{cfg_path}: 'scales' must map each perspective to [low, high]")
    unknown = sorted(set(value) - set(perspectives))
    missing = [p for p in perspectives if p not in value]
    if unknown or missing:
        raise ModelError(
            f"{cfg_path}: 'scales' must cover exactly {list(perspectives)} (missing {missing}, unknown {unknown})"
        )
    scales = {}
    for name in perspectives:
        pair = value[name]
        if not isinstance(pair, list) or len(pair) != 2 or not all(_is_number(v) for v in pair) or pair[0] >= pair[1]:
            raise ModelError(f"{cfg_path}: scale of {name} must be [low, high], two finite numbers with low < high")
        scales[name] = (float(pair[0]), float(pair[1]))
    return scales


def _check_heads(data: dict, scales: dict[str, tuple[float, float]], cfg_path: Path) -> Heads:
    """The heads' roles in the reward: `reward.empathy` (combined as s/high) and
    `reward.bystander` (the bystander term), by default PERM's names among the perspectives."""
    value = data.get("reward", {})
    if not isinstance(value, dict) or set(value) - {"empathy", "bystander"}:
        raise ModelError(f"{cfg_path}: 'reward' must be an object with 'empathy' (a list) and 'bystander' (a name)")
    default_empathy = [p for p in EMPATHY if p in scales]
    empathy = value.get("empathy", default_empathy)
    bystander = value.get("bystander", BYSTANDER if BYSTANDER in scales else None)
    if not isinstance(empathy, list) or not empathy or not all(isinstance(p, str) for p in empathy):
        raise ModelError(f"{cfg_path}: 'reward.empathy' must list the perspectives the empathy reward combines")
    for name in empathy:
        if name not in scales:
            raise ModelError(f"{cfg_path}: reward.empathy names {name!r}, which is not a perspective of this model")
        if scales[name][0] <= 0:
            raise ModelError(f"{cfg_path}: reward.empathy head {name!r} needs a scale above 0 (it is divided by)")
    if len(set(empathy)) != len(empathy):
        raise ModelError(f"{cfg_path}: 'reward.empathy' lists a name twice")
    if bystander is not None and (not isinstance(bystander, str) or bystander not in scales or bystander in empathy):
        raise ModelError(f"{cfg_path}: reward.bystander {bystander!r} must be a perspective not in reward.empathy")
    if bystander is not None and scales[bystander][1] <= 0:
        raise ModelError(f"{cfg_path}: reward.bystander head {bystander!r} needs a scale whose top is above 0")
    return Heads.from_scales(scales, tuple(empathy), bystander)


def _check_calibration(data: dict, perspectives: tuple[str, ...], cfg_path: Path) -> dict[str, Calibration]:
    value = data.get("calibration", {})
    if not isinstance(value, dict):
        raise ModelError(f"{cfg_path}: 'calibration' must map heads to {{raw, score}} knots")
    out = {}
    for head, cal in value.items():
        where = f"{cfg_path}: calibration of {head!r}"
        if head not in perspectives:
            raise ModelError(f"{where}: not a perspective of this model ({', '.join(perspectives)})")
        if not isinstance(cal, dict):
            raise ModelError(f"{where}: must be an object with 'raw' and 'score' lists")
        raw, score = cal.get("raw"), cal.get("score")
        if not isinstance(raw, list) or not isinstance(score, list) or len(raw) != len(score) or len(raw) < 2:
            raise ModelError(f"{where}: 'raw' and 'score' must be lists of equal length, at least 2 knots")
        if not all(_is_number(v) for v in [*raw, *score]):
            raise ModelError(f"{where}: every knot must be a finite number")
        if any(b <= a for a, b in zip(raw, raw[1:])):
            raise ModelError(f"{where}: 'raw' knots must be strictly increasing")
        if any(b < a for a, b in zip(score, score[1:])):
            raise ModelError(f"{where}: 'score' knots must not decrease (the map is monotone)")
        if "method" in cal and not isinstance(cal["method"], str):
            raise ModelError(f"{where}: 'method' must be a name such as 'anchor'")
        out[head] = Calibration(tuple(float(v) for v in raw), tuple(float(v) for v in score))
    return out


def read_config(model_dir: Path, verify: bool = True) -> ModelConfig:
    """Read and check a model directory; with `verify`, refuse files whose sha256 differs.

    Every field is validated and every file named must resolve inside the directory; any
    problem is one `ModelError` line.
    """
    model_dir = Path(model_dir)
    cfg_path = model_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise ModelError(f"{model_dir} is not a perm-lite model directory: {CONFIG_NAME} is missing")
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8 or integer-size errors
        raise ModelError(f"{cfg_path}: invalid JSON ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{cfg_path}: must hold a JSON object")
    if data.get("format") != FORMAT:
        raise ModelError(f"{cfg_path}: format {data.get('format')!r} is not {FORMAT!r}")
    perspectives = _check_perspectives(data, cfg_path)
    template = _require(data, "template", str, cfg_path)
    if template != TEMPLATE_VERSION:
        raise ModelError(
            f"{cfg_path}: input template {template!r} is not supported by this perm-lite "
            f"(which renders {TEMPLATE_VERSION!r}); upgrade perm-lite or re-export the model"
        )
    name = _require(data, "name", str, cfg_path)
    version = _require(data, "version", str, cfg_path)
    if not name.strip() or not version.strip():
        raise ModelError(f"{cfg_path}: 'name' and 'version' must not be empty")
    max_length = _require(data, "max_length", int, cfg_path)
    low, high = MAX_LENGTH_RANGE
    if not low <= max_length <= high:
        raise ModelError(f"{cfg_path}: max_length {max_length} is outside {low}..{high} tokens")
    files = _require(data, "files", dict, cfg_path)
    for file_name, digest in files.items():
        _inside(model_dir, file_name, "file", cfg_path)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ModelError(f"{cfg_path}: the sha256 of {file_name!r} is not 64 lowercase hex digits")
    variants = _require(data, "variants", dict, cfg_path)
    if not variants:
        raise ModelError(f"{cfg_path}: 'variants' is empty; a model needs at least one ONNX file")
    for variant, file_name in variants.items():
        if variant not in VARIANTS:
            raise ModelError(f"{cfg_path}: unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
        _inside(model_dir, file_name, f"variant {variant}", cfg_path)
    tokenizer = _inside(model_dir, data.get("tokenizer"), "tokenizer", cfg_path)
    for file_name in [tokenizer, *variants.values()]:
        if file_name not in files:
            raise ModelError(f"{cfg_path}: no sha256 recorded for {file_name}")
    scales = _check_scales(data, perspectives, cfg_path)
    heads = _check_heads(data, scales, cfg_path)
    calibration = _check_calibration(data, perspectives, cfg_path)
    if verify:
        for file_name, expected in files.items():
            path = model_dir / file_name
            if not path.is_file():
                raise ModelError(f"{model_dir}: file {file_name} listed in {CONFIG_NAME} is missing")
            try:
                actual = sha256_file(path)
            except OSError as exc:
                raise ModelError(f"{path}: cannot be read ({exc.strerror or exc})") from None
            if actual != expected:
                raise ModelError(
                    f"{path}: sha256 mismatch (expected {expected[:12]}..., found {actual[:12]}...): "
                    "the file is corrupt or was changed; download or export the model again"
                )
    return ModelConfig(
        path=model_dir,
        name=name,
        version=version,
        heads=heads,
        max_length=max_length,
        template=template,
        tokenizer=tokenizer,
        variants=dict(variants),
        files=dict(files),
        calibration=calibration,
        raw=data,
    )


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)


def load_model_tokenizer(config: ModelConfig) -> Tokenizer:
    """The model's tokenizer; a file that is not a usable BERT-style tokenizer is a `ModelError`."""
    from perm_lite.text import SpecialTokens, load_tokenizer

    path = config.path / config.tokenizer
    try:
        tokenizer = load_tokenizer(path)
        SpecialTokens.from_tokenizer(tokenizer)
    except Exception as exc:  # tokenizers raises plain Exception for a file it cannot parse
        raise ModelError(f"{path}: not a usable tokenizer file ({_first_line(exc)})") from None
    return tokenizer


@dataclass(frozen=True)
class LoadedSession:
    """An onnxruntime session on a model file, the provider it runs on and the variant."""

    session: ort.InferenceSession
    provider: Provider
    variant: str


def load_model_session(
    config: ModelConfig,
    variant: str = "auto",
    provider: str = "auto",
    threads: int | None = None,
    ort_providers: OrtProviders | None = None,
) -> LoadedSession:
    """Open the model on a provider (see `session.create_session`). `variant="auto"`
    takes the one the provider prefers (the provider table). A file onnxruntime cannot
    load, or a graph that is not a perm-lite model, is a `ModelError`; a provider that
    cannot run stays a `ProviderError`."""
    from perm_lite.errors import OptionError, ProviderError
    from perm_lite.session import create_session

    if variant != "auto" and variant not in config.variants:
        raise ModelError(f"{config.name} has no variant {variant!r} (it has {', '.join(config.variants)})")
    chosen: list[str] = []

    def path_for(candidate: Provider) -> Path:
        chosen.append(candidate.pick_variant(config.variants) if variant == "auto" else variant)
        return config.variant_path(chosen[-1])

    try:
        session, used = create_session(path_for, provider, threads, ort_providers)
    except (ProviderError, OptionError):
        raise
    except Exception as exc:  # onnxruntime's InvalidProtobuf, Fail, InvalidGraph... derive from Exception
        path = config.variant_path(chosen[-1]) if chosen else config.path
        raise ModelError(f"{path}: onnxruntime cannot load this model file ({_first_line(exc)})") from None
    path = config.variant_path(chosen[-1])
    inputs = {i.name for i in session.get_inputs()}
    outputs = session.get_outputs()
    width = outputs[0].shape[-1] if outputs and outputs[0].shape else None
    if (
        "input_ids" not in inputs
        or not inputs <= set(MODEL_INPUTS)
        or (isinstance(width, int) and width != len(config.heads.names))
    ):
        raise ModelError(
            f"{path}: not a perm-lite model graph (inputs {sorted(inputs)}, expected {list(MODEL_INPUTS)} "
            f"and one output of {len(config.heads.names)} scores, one per perspective in {CONFIG_NAME}; "
            f"the graph gives {width})"
        )
    return LoadedSession(session, used, chosen[-1])


def write_config(model_dir: Path, config: dict[str, Any]) -> Path:
    """Write `config.json`, recording the sha256 of the tokenizer and every variant."""
    model_dir = Path(model_dir)
    names = [config["tokenizer"], *config["variants"].values()]
    perspectives = config.get("perspectives", list(PERSPECTIVES))  # PERM's heads unless it names others
    config = {
        "format": FORMAT,
        "template": TEMPLATE_VERSION,
        "perspectives": perspectives,
        "scales": {k: list(SCALES[k]) for k in perspectives if k in SCALES},
        **config,
        "files": {name: sha256_file(model_dir / name) for name in names},
    }
    path = model_dir / CONFIG_NAME
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def packaged_models_dir() -> Path:
    """The shipped models: the installed `perm_lite.models` (the install maps the top-level
    models/ folder in under that name), or that folder itself when perm_lite is imported from
    a source checkout, as it is from the repository root, where perm_lite/ shadows the
    installed package and has no `models` of its own."""
    try:
        return Path(str(resources.files("perm_lite.models")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "models"


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
