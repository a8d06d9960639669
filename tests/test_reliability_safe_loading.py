"""Safe loading: a checkpoint, weights, label, vocabulary, annotation or config file from outside never
executes code, and no file name from outside reaches a file outside its folder.

The malicious files are real: unpickling them with ``pickle.load`` / ``torch.load(weights_only=False)``
creates a marker file (checked first, so the test proves something). Then every loading path of the
toolkit is given them, and the marker must never appear. A static scan of ``src/ifnet`` keeps new
unsafe loaders (pickle, ``torch.load`` without ``weights_only=True``, ``numpy.load(allow_pickle=True)``,
``yaml.load``/``unsafe_load``, ``eval``/``exec``) out.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from ifnet.cli import main as cli_main
from ifnet.config import load_yaml
from ifnet.data.annotation import load_annotation, load_label_file
from ifnet.data.tokenizer import Tokenizer
from ifnet.errors import DataError, IFNetError, ValidationError
from ifnet.models.checkpoint import CheckpointError, load_checkpoint, load_training_state, read_meta, save_checkpoint
from ifnet.models.visual import create_extractor, load_weights_file

from test_reliability_support import one_cpu_thread, tiny_cnn, tiny_ifnet

SRC = Path(__file__).resolve().parents[1] / "src" / "ifnet"


class _Payload:
    """Unpickling calls ``fn(*args)``: what a malicious checkpoint does."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, object]:
    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.exec": _Payload(exec, f"open({str(marker)!r}, 'w').write('pwned')"),
        "builtins.open": _Payload(open, str(marker), "w"),
    }


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_cpu_thread()


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


@pytest.fixture(params=["os.system", "builtins.exec", "builtins.open"])
def evil_files(request, tmp_path, marker) -> dict[str, Path]:
    """One payload as a torch zip checkpoint (state dict wrapper), a legacy raw pickle, and a pickle
    hiding behind a .safetensors / .json name."""
    payload = _payloads(marker)[request.param]
    files = {}
    files["zip.pth"] = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": payload}}, files["zip.pth"])
    files["raw.pt"] = tmp_path / "evil.pt"
    with open(files["raw.pt"], "wb") as fh:
        pickle.dump({"model": payload}, fh, protocol=2)
    for name, suffix in (("pickle.safetensors", ".safetensors"), ("pickle.json", ".json"), ("pickle.bin", ".bin")):
        files[name] = (tmp_path / "evil").with_suffix(suffix)
        files[name].write_bytes(files["raw.pt"].read_bytes())
    return files


def test_the_malicious_files_really_execute_code_when_unpickled(evil_files, marker):
    """Control: without the safeguards each file runs its payload (so the tests below mean something)."""
    torch.load(evil_files["zip.pth"], weights_only=False)
    assert marker.exists()
    marker.unlink()
    with open(evil_files["raw.pt"], "rb") as fh:
        pickle.load(fh)
    assert marker.exists()
    marker.unlink()


def test_weights_files_never_unpickle_code(evil_files, marker):
    for name, path in evil_files.items():
        with pytest.raises(IFNetError) as err:
            load_weights_file(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value), name
        with pytest.raises(IFNetError):  # the ImageNet weights of an extractor go through the same loader
            create_extractor("resnet18", pretrained=True, weights_path=str(path))
    assert not marker.exists()


def test_checkpoints_never_unpickle_code(evil_files, marker, tmp_path):
    for path in evil_files.values():
        with pytest.raises(CheckpointError, match="pickled .pth/.pt files are never loaded|not an ifnet"):
            load_checkpoint(path)
    # A checkpoint folder whose files were swapped for the pickle, checksums updated to match.
    with tiny_cnn():
        model, config, tok = tiny_ifnet()
        good = save_checkpoint(tmp_path / "good", model, config, tok, training_state={"step": torch.zeros(2)})
        for victim in ("model.safetensors", "training_state.safetensors", "vocab.json", "config.json",
                       "training_state.json"):
            ckpt = tmp_path / f"evil-{victim}"
            shutil.copytree(good, ckpt)
            (ckpt / victim).write_bytes(evil_files["zip.pth"].read_bytes())
            (ckpt / "model.pth").write_bytes(evil_files["zip.pth"].read_bytes())  # never looked at
            with pytest.raises(CheckpointError, match="sha256"):
                load_checkpoint(ckpt)
            meta = json.loads((ckpt / "meta.json").read_text())
            data = (ckpt / victim).read_bytes()
            meta["files"][victim] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            (ckpt / "meta.json").write_text(json.dumps(meta))
            with pytest.raises(IFNetError) as err:
                load_checkpoint(ckpt)
                load_training_state(ckpt)
            assert "\n" not in str(err.value), str(err.value)
    assert not marker.exists()


def test_label_vocabulary_annotation_and_config_files_never_unpickle_code(evil_files, marker, tmp_path):
    for path in evil_files.values():
        with pytest.raises(DataError):
            load_label_file(path)
        with pytest.raises(DataError):
            Tokenizer.load(path)
        with pytest.raises(DataError):
            load_annotation(path, tmp_path, check_images=False)
        with pytest.raises(IFNetError):
            load_yaml(path)
    assert not marker.exists()


def test_yaml_config_cannot_construct_python_objects(tmp_path, marker):
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n"
                    f"optim: !!python/object/new:builtins.exec [\"open('{marker}', 'w')\"]\n")
    with pytest.raises(IFNetError):
        load_yaml(evil)
    assert cli_main(["train", "--config", str(evil), "--out", str(tmp_path / "run")]) != 0
    assert not marker.exists()


def test_chexbert_checkpoint_never_unpickles_code(evil_files, marker, tmp_path):
    pytest.importorskip("transformers")
    from ifnet.labeler.chexbert import CheXbertError, load_chexbert

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text("{}")
    (bert / "vocab.txt").write_text("[PAD]\n")
    for path in evil_files.values():
        with pytest.raises(CheXbertError, match="weights-only"):
            load_chexbert(path, bert)
    assert not marker.exists()


def test_cli_commands_refuse_pickled_checkpoints(evil_files, marker, tmp_path, capsys):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (16, 16)).save(image)
    pth = str(evil_files["zip.pth"])
    assert cli_main(["evaluate", "--checkpoint", pth, "--out", str(tmp_path / "ev")]) == 1
    assert cli_main(["generate", "--checkpoint", pth, str(image)]) == 1
    assert cli_main(["label", "--text", "no effusion", "--labeler", "chexbert", "--chexbert-ckpt", pth,
                     "--bert-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err
    assert not marker.exists()


def test_every_torch_load_in_the_toolkit_is_weights_only(evil_files, monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for path in evil_files.values():
        with pytest.raises(IFNetError):
            load_weights_file(path)
    assert calls and all(flag is True for flag in calls)


# -- static guard: no unsafe loader creeps into the library ----------------------------------------------

def _unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
        kwargs = {k.arg: k.value for k in node.keywords}
        flag = lambda key: isinstance(kwargs.get(key), ast.Constant) and kwargs[key].value  # noqa: E731
        if owner in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve") and name in ("load", "loads", "open"):
            found.append(f"{owner}.{name}")
        elif owner == "torch" and name == "load" and kwargs.get("weights_only") is None:
            found.append("torch.load without weights_only")
        elif owner == "torch" and name == "load" and not flag("weights_only"):
            found.append("torch.load(weights_only=False)")
        elif owner in ("np", "numpy") and name == "load" and flag("allow_pickle"):
            found.append("numpy.load(allow_pickle=True)")
        elif owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all", "unsafe_load_all"):
            found.append(f"yaml.{name}")
        elif isinstance(func, ast.Name) and name in ("eval", "exec"):  # not model.eval()
            found.append(name)
    return found


def test_no_unsafe_deserialisation_in_the_library():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        for call in _unsafe_calls(ast.parse(path.read_text(), filename=str(path))):
            problems.append(f"{path.relative_to(SRC.parent)}: {call}")
    assert problems == []
    # the scanner itself finds what it looks for
    assert _unsafe_calls(ast.parse("pickle.load(f); torch.load(p); yaml.load(s); eval(x); model.eval()")) == [
        "pickle.load", "torch.load without weights_only", "yaml.load", "eval"]


# -- path traversal -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rel", [
    "../secret.png", "a/../../secret.png", "/etc/passwd", "C:\\secret.png", "C:secret.png", "\\secret.png",
    "\\..\\secret.png", "..\\secret.png", "\\\\server\\share\\x.png", "//server/share/x.png", "a/b/../../../x.png",
])
def test_annotated_image_paths_cannot_leave_the_image_folder(tmp_path, rel):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("L", (16, 16)).save(tmp_path / "secret.png")  # what an escaping path would reach
    ann = tmp_path / "annotation.json"
    ann.write_text(json.dumps({"train": [{"id": "s1", "report": "ok.", "image_path": [rel]}]}))
    for check_images in (True, False):
        with pytest.raises(ValidationError) as err:
            load_annotation(ann, tmp_path / "images", check_images=check_images, splits=("train",))
        assert "absolute path" in str(err.value) or "outside the image folder" in str(err.value)


def test_checkpoint_file_list_cannot_name_files_outside_the_checkpoint(tmp_path):
    with tiny_cnn():
        model, config, tok = tiny_ifnet()
        ckpt = save_checkpoint(tmp_path / "ckpt", model, config, tok)
    (tmp_path / "outside.txt").write_text("x")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["../outside.txt"] = {"sha256": hashlib.sha256(b"x").hexdigest(), "bytes": 1}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="bad file name"):
        read_meta(ckpt)
