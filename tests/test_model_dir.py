import json
import shutil

import pytest

from perm_lite import Scorer
from perm_lite.errors import ModelError
from perm_lite.model_dir import read_config, resolve_model


def test_hash_mismatch_is_refused(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "m")
    with open(copy / "model.fp32.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match="model.fp32.onnx: sha256 mismatch"):
        Scorer(copy)


def test_missing_file_and_config(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="tokenizer.json listed in config.json is missing"):
        read_config(copy)
    with pytest.raises(ModelError, match="config.json is missing"):
        read_config(tmp_path)


def test_unsupported_template_is_refused(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((copy / "config.json").read_text())
    cfg["template"] = "perm-input-v9"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="input template 'perm-input-v9' is not supported"):
        read_config(copy)


def test_unknown_model_name():
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        resolve_model("nope")


def test_hub_needs_pinned_revision():
    with pytest.raises(ModelError, match="pin a revision"):
        resolve_model("someone/perm-model")


def test_hub_download_at_network_boundary(monkeypatch, tiny_model_dir, tmp_path):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = resolve_model("someone/perm-model@abc123", cache_dir=str(tmp_path))
    assert path == tiny_model_dir
    assert calls == [
        {"repo_id": "someone/perm-model", "revision": "abc123", "cache_dir": str(tmp_path), "local_files_only": True}
    ]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    resolve_model("someone/perm-model", revision="v1")
    assert calls[-1]["local_files_only"] is False and calls[-1]["revision"] == "v1"


def test_hub_failure_is_a_model_error(monkeypatch):
    import huggingface_hub

    def boom(**kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set.*connection refused"):
        resolve_model("someone/perm-model@abc123")


def test_missing_packaged_model_fails_clearly(monkeypatch, tmp_path):
    from perm_lite import model_dir

    monkeypatch.setattr(model_dir, "packaged_models_dir", lambda: tmp_path)
    with pytest.raises(ModelError, match="packaged model 'perm-lite-minilm' is not in this installation"):
        resolve_model("default")


def test_auto_provider_falls_back_to_cpu_once_with_a_warning(monkeypatch, tiny_model_dir):
    import onnxruntime as ort

    from perm_lite import session

    real_session = ort.InferenceSession

    def cuda_that_fails(path, options, providers):  # what onnxruntime-gpu does without a GPU
        return real_session(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(
        session.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(session.ort, "InferenceSession", cuda_that_fails)
    monkeypatch.setattr(session, "_warned_cpu_fallback", False)
    with pytest.warns(RuntimeWarning, match="CUDA not usable, running on CPU"):
        s = Scorer(tiny_model_dir, provider="auto")
    assert s.provider == "cpu"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Scorer(tiny_model_dir, provider="auto")  # only once per process
    from perm_lite.errors import ProviderError

    with pytest.raises(ProviderError, match="lists CUDA but could not start it"):
        Scorer(tiny_model_dir, provider="cuda")
