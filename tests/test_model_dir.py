import json
import shutil
from pathlib import Path

import pytest

from perm_lite import Scorer
from perm_lite.errors import ModelError
from perm_lite.model_dir import read_config, resolve_model, sha256_file, write_config


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

    with pytest.raises(ProviderError, match="lists CUDAExecutionProvider but could not start it"):
        Scorer(tiny_model_dir, provider="cuda")


# -- hardening (issue 12, item 5): files stay inside, every field validated, corrupt files --


def _copy(tiny_model_dir, tmp_path, name="m"):
    return Path(shutil.copytree(tiny_model_dir, tmp_path / name))


def _edit(model, **changes):
    cfg = json.loads((model / "config.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (model / "config.json").write_text(json.dumps(cfg))
    return cfg


_DROP = object()


def _refused(model, match):
    with pytest.raises(ModelError, match=match) as info:
        read_config(model)
    assert "\n" not in str(info.value)  # one line
    return str(info.value)


def test_file_names_must_stay_inside_the_directory(tiny_model_dir, tmp_path):
    model = _copy(tiny_model_dir, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(model / "tokenizer.json", outside / "tokenizer.json")  # a real tokenizer, hash recorded
    digest = sha256_file(outside / "tokenizer.json")
    cfg = json.loads((model / "config.json").read_text())
    for name in ["../outside/tokenizer.json", str(outside / "tokenizer.json"), "sub/../../outside/tokenizer.json"]:
        _edit(model, tokenizer=name, files={**cfg["files"], name: digest})
        _refused(model, "(file|tokenizer) .* (outside the model directory|relative to the model directory)")
        with pytest.raises(ModelError):
            Scorer(model, provider="cpu")  # never read
    # a link inside the directory that leads out
    (model / "tok-link.json").symlink_to(outside / "tokenizer.json")
    _edit(model, tokenizer="tok-link.json", files={**cfg["files"], "tok-link.json": digest})
    _refused(model, "'tok-link.json' resolves outside")
    # a variant, or any other listed file, that points out
    _edit(model, tokenizer=cfg["tokenizer"], variants={"fp32": "../outside/tokenizer.json"}, files=cfg["files"])
    _refused(model, "variant fp32 '../outside/tokenizer.json' points outside")
    _edit(model, variants={"fp32": "tok-link.json"}, files={**cfg["files"], "tok-link.json": digest})
    _refused(model, "'tok-link.json' resolves outside")
    _edit(model, variants=cfg["variants"], files={**cfg["files"], "../outside/tokenizer.json": digest})
    _refused(model, "file '../outside/tokenizer.json' points outside")
    passwd = Path("/etc/passwd")
    if passwd.is_file():
        _edit(model, files={**cfg["files"], "../../etc/passwd": sha256_file(passwd)})
        _refused(model, "'../../etc/passwd' points outside")
    (model / "loop").symlink_to(model / "loop")
    _edit(model, files={**cfg["files"], "loop": "0" * 64})
    _refused(model, "file 'loop' cannot be resolved")


def test_links_inside_the_directory_and_hub_snapshots_are_accepted(tiny_model_dir, tmp_path):
    model = _copy(tiny_model_dir, tmp_path)
    (model / "sub").mkdir()
    (model / "model.fp32.onnx").rename(model / "sub" / "real.onnx")
    (model / "model.fp32.onnx").symlink_to(Path("sub") / "real.onnx")
    assert read_config(model).variants == {"fp32": "model.fp32.onnx"}
    # the Hub cache layout: snapshot files are links into the repository's blob store
    repo = tmp_path / "hub" / "models--someone--perm"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in tiny_model_dir.iterdir():
        blob = repo / "blobs" / sha256_file(path)
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    Scorer(snapshot, provider="cpu", threads=1).score_one(query="hi", response="sorry to hear that")


BAD_FIELDS = [
    ({"variants": {}}, "'variants' is empty"),
    ({"variants": {"int4": "model.fp32.onnx"}}, "unknown variant 'int4'"),
    ({"variants": {"fp32": 7}}, "variant fp32 must be a file name"),
    ({"variants": ["model.fp32.onnx"]}, "'variants' is missing or not a dict"),
    ({"perspectives": []}, "'perspectives' must be a non-empty list"),
    ({"perspectives": "resonation"}, "'perspectives' must be a non-empty list"),
    ({"perspectives": ["resonation", "resonation", "reception", "bystander"]}, "lists a name twice"),
    ({"perspectives": ["resonation", 1, "reception", "bystander"]}, "'perspectives' must be a non-empty list"),
    ({"scales": {}}, "'scales' must cover exactly"),
    ({"scales": [[1, 5]] * 4}, "'scales' must map each perspective"),
    (
        {"scales": {"resonation": [5, 1], "expression": [1, 5], "reception": [1, 5], "bystander": [0, 100]}},
        "scale of resonation must be \\[low, high\\]",
    ),
    (
        {"scales": {"resonation": [1, "5"], "expression": [1, 5], "reception": [1, 5], "bystander": [0, 100]}},
        "scale of resonation",
    ),
    (
        {"scales": {"resonation": [1, 5], "expression": [1, 5], "reception": [1, 5], "bystander": [0, float("inf")]}},
        "scale of bystander",
    ),
    (
        {"scales": {"resonation": [1, 5], "expression": [1], "reception": [1, 5], "bystander": [0, 100]}},
        "scale of expression",
    ),
    ({"max_length": 100000}, "max_length 100000 is outside 16..512"),
    ({"max_length": 8}, "max_length 8 is outside"),
    ({"max_length": 513}, "max_length 513 is outside"),
    ({"max_length": "256"}, "'max_length' is missing or not a int"),
    ({"max_length": True}, "'max_length' is missing or not a int"),
    ({"max_length": 256.0}, "'max_length' is missing or not a int"),
    ({"calibration": []}, "'calibration' must map heads"),
    ({"calibration": {"resonation": [0, 1]}}, "calibration of 'resonation': must be an object"),
    ({"calibration": {"empathy": {"raw": [0, 1], "score": [1, 5]}}}, "'empathy': not a perspective"),
    ({"calibration": {"resonation": {"raw": [0, 1, 2], "score": [1, 5]}}}, "lists of equal length"),
    ({"calibration": {"resonation": {"raw": [0], "score": [1]}}}, "at least 2 knots"),
    ({"calibration": {"resonation": {"raw": [0, 0], "score": [1, 5]}}}, "strictly increasing"),
    ({"calibration": {"resonation": {"raw": [1, 0], "score": [1, 5]}}}, "strictly increasing"),
    ({"calibration": {"resonation": {"raw": [0, float("nan")], "score": [1, 5]}}}, "finite number"),
    ({"calibration": {"resonation": {"raw": [0, 1], "score": [1, "5"]}}}, "finite number"),
    ({"calibration": {"resonation": {"raw": [0, 1], "score": [5, 1]}}}, "must not decrease"),
    ({"calibration": {"bystander": {"raw": [0, 1], "score": [20, 70], "method": 3}}}, "'method' must be a name"),
    ({"files": {"tokenizer.json": "abc", "model.fp32.onnx": "abc"}}, "not 64 lowercase hex digits"),
    ({"tokenizer": ""}, "tokenizer must be a file name"),
    ({"tokenizer": None}, "tokenizer must be a file name"),
    ({"name": ""}, "must not be empty"),
    ({"version": 2}, "'version' is missing or not a str"),
]


@pytest.mark.parametrize(("changes", "match"), BAD_FIELDS)
def test_every_config_field_is_validated(tiny_model_dir, tmp_path, changes, match):
    model = _copy(tiny_model_dir, tmp_path)
    _edit(model, **changes)
    _refused(model, match)
    with pytest.raises(ModelError):
        Scorer(model, provider="cpu")


def test_config_that_is_not_an_object_or_not_utf8(tiny_model_dir, tmp_path):
    model = _copy(tiny_model_dir, tmp_path)
    (model / "config.json").write_text("[1, 2]")
    _refused(model, "must hold a JSON object")
    (model / "config.json").write_bytes(b'{"format": "\xff"}')
    _refused(model, "invalid JSON")
    (model / "config.json").write_text("[" * 100000 + "]" * 100000)
    _refused(model, "invalid JSON|must hold a JSON object")


def test_valid_fields_still_load(tiny_model_dir, tmp_path):
    model = _copy(tiny_model_dir, tmp_path)
    calibration = {
        "resonation": {"raw": [-0.5, 0.1, 0.9], "score": [1.0, 2.5, 4.5]},
        "bystander": {"raw": [-0.1, 0.9], "score": [20.0, 70.0], "method": "anchor"},
    }
    for max_length in (16, 384, 512):
        _edit(model, max_length=max_length, calibration=calibration)
        config = read_config(model)
        assert config.max_length == max_length and set(config.calibration) == {"resonation", "bystander"}
    _edit(model, scales=_DROP)  # optional: the PERM scales
    assert read_config(model).heads.scale("bystander") == (0.0, 100.0)
    scorer = Scorer(model, provider="cpu", threads=1)
    result = scorer.score_one(query="I lost my job", response="I am so sorry, that sounds hard")
    assert set(result.scores) == {"resonation", "expression", "reception", "bystander"}


def _corrupt_with_matching_hash(tiny_model_dir, tmp_path, file_name, content: bytes):
    model = _copy(tiny_model_dir, tmp_path)
    (model / file_name).write_bytes(content)
    write_config(model, read_config(model, verify=False).editable_fields())  # hashes now match the garbage
    read_config(model)  # verification passes: the file itself is bad
    return model


@pytest.mark.parametrize(
    ("file_name", "content", "match"),
    [
        ("model.fp32.onnx", b"this is not an onnx file" * 10, "model.fp32.onnx: onnxruntime cannot load"),
        ("model.fp32.onnx", b"", "model.fp32.onnx: onnxruntime cannot load"),
        ("tokenizer.json", b'{"not": "a tokenizer"', "tokenizer.json: not a usable tokenizer"),
        ("tokenizer.json", b"\xff\xfe\x00garbage", "tokenizer.json: not a usable tokenizer"),
    ],
)
def test_corrupt_file_with_matching_hash_is_a_model_error(tiny_model_dir, tmp_path, file_name, content, match):
    model = _corrupt_with_matching_hash(tiny_model_dir, tmp_path, file_name, content)
    with pytest.raises(ModelError, match=match) as info:
        Scorer(model, provider="cpu", threads=1)
    assert "\n" not in str(info.value)


def test_tokenizer_without_bert_special_tokens_is_a_model_error(tiny_model_dir, tmp_path):
    from tokenizers import Tokenizer, models

    model = _copy(tiny_model_dir, tmp_path)
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(model / "tokenizer.json"))
    write_config(model, read_config(model, verify=False).editable_fields())
    with pytest.raises(ModelError, match="not a usable tokenizer.*special tokens"):
        Scorer(model, provider="cpu", threads=1)


def test_onnx_that_is_not_a_perm_graph_is_a_model_error(tiny_model_dir, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    other = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    other.ir_version = 8
    model = _copy(tiny_model_dir, tmp_path)
    onnx.save(other, str(model / "model.fp32.onnx"))
    write_config(model, read_config(model, verify=False).editable_fields())
    with pytest.raises(ModelError, match="not a perm-lite model graph"):
        Scorer(model, provider="cpu", threads=1)


def test_cli_reports_a_corrupt_model_in_one_line(tiny_model_dir, tmp_path):
    from perm_lite.cli.main import app
    from typer.testing import CliRunner

    model = _corrupt_with_matching_hash(tiny_model_dir, tmp_path, "model.fp32.onnx", b"garbage" * 20)
    source = tmp_path / "in.jsonl"
    source.write_text('{"query": "hi", "response": "hello"}\n')
    result = CliRunner().invoke(
        app, ["score", str(source), "-o", str(tmp_path / "out.jsonl"), "--model", str(model), "--provider", "cpu"]
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "onnxruntime cannot load" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
