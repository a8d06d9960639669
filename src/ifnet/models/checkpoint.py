"""Self-describing, pickle-free checkpoints.

A checkpoint is a directory::

    model.safetensors            weights (safetensors: tensors only, no code)
    config.json                  IFNetConfig, nested transformer config included
    vocab.json                   Tokenizer.to_dict()
    meta.json                    format name + version, library versions, sha256 + size of every file
    training_state.safetensors   (optional, for --resume) tensors of optimizer/scheduler/RNG state
    training_state.json          (optional) the rest of that state, tensors replaced by references

Loading needs only the directory: the model is rebuilt from ``config.json`` (no ImageNet file needed,
the weights come from the checkpoint), every file is checked against its sha256, and nothing is ever
unpickled. Writing is atomic: files go to a temporary sibling directory that replaces the old checkpoint
only once complete, so a crash leaves the previous checkpoint intact (a kill between the two renames of
that swap leaves it in a ``.NAME.*.old`` sibling, which :func:`recover_checkpoint` moves back).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from ifnet.data.tokenizer import Tokenizer
from ifnet.errors import DataError, IFNetError
from ifnet.io_utils import PathLike, read_json, share_like_user_files
from ifnet.models.ifnet import IFNet, IFNetConfig

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CheckpointError", "CheckpointWriteError", "save_checkpoint",
    "load_checkpoint", "load_training_state", "read_meta", "recover_checkpoint", "interrupted_save",
]

CHECKPOINT_FORMAT = "ifnet-checkpoint"
CHECKPOINT_VERSION = 1
TRAINING_STATE_FORMAT = "ifnet-training-state"

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
META_FILE = "meta.json"
TRAIN_TENSORS_FILE = "training_state.safetensors"
TRAIN_JSON_FILE = "training_state.json"


class CheckpointError(IFNetError):
    """A checkpoint that is missing, incomplete, corrupt, foreign, from a newer format, or cannot be written."""


class CheckpointWriteError(CheckpointError, OSError):
    """Saving failed (disk full, permission denied...); the previous checkpoint is intact. Also an OSError."""


# -- saving ---------------------------------------------------------------------------------------

def save_checkpoint(path: PathLike, model: IFNet, config: IFNetConfig, tokenizer: Tokenizer, *,
                    training_state: Optional[Mapping[str, Any]] = None,
                    metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a checkpoint directory at ``path`` atomically (replacing an older checkpoint there).

    ``training_state`` is any nest of dicts/lists/tuples of tensors, numpy arrays and JSON scalars (e.g.
    ``{"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": 3, "rng": {...}}``);
    read it back with :func:`load_training_state`. ``metadata`` is free JSON stored in ``meta.json``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file, save_model

    target = Path(path)
    if config.to_dict() != model.config.to_dict():
        raise ValueError("config differs from model.config; a checkpoint must describe the saved model")
    if config.vocab_size != len(tokenizer):
        raise ValueError(f"config.vocab_size {config.vocab_size} != tokenizer size {len(tokenizer)}")
    if target.exists() and not (target.is_dir() and (target / META_FILE).is_file()
                                or target.is_dir() and not any(target.iterdir())):
        raise CheckpointError(f"{target}: exists and is not an ifnet checkpoint; refusing to replace it")
    # Serialise the JSON parts first: a non-serialisable object must fail before anything is written.
    texts = {CONFIG_FILE: _json_text(config.to_dict()), VOCAB_FILE: _json_text(tokenizer.to_dict())}
    train_tensors: dict[str, Tensor] = {}
    if training_state is not None:
        encoded = _encode(training_state, "", train_tensors)
        texts[TRAIN_JSON_FILE] = _json_text({"format": TRAINING_STATE_FORMAT, "version": 1, "state": encoded})
    user_meta = json.loads(_json_text(dict(metadata or {}), what="metadata"))

    tmp: Optional[Path] = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_checkpoint(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": CHECKPOINT_FORMAT})
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if training_state is not None:
            save_file(train_tensors, str(tmp / TRAIN_TENSORS_FILE), metadata={"format": TRAINING_STATE_FORMAT})
        files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "files": files,
                "libraries": _library_versions(), "metadata": user_meta}
        (tmp / META_FILE).write_text(_json_text(meta), encoding="utf-8")
        share_like_user_files(tmp)
        for p in tmp.iterdir():
            _fsync(p)
        _fsync(tmp)
        replace_dir(tmp, target)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):
            # Disk full, permission denied...: one line, and the previous checkpoint is still in place.
            reason = (e.strerror if isinstance(e, OSError) else None) or _first_line(e)
            error = CheckpointWriteError(f"{target}: cannot write checkpoint ({reason}); the previous checkpoint, "
                                         "if any, is unchanged")
            error.errno = e.errno if isinstance(e, OSError) else None
            raise error from None
        raise
    return target


def _leftovers(target: Path) -> list[Path]:
    """Temporary siblings of ``target`` that :func:`save_checkpoint` creates (``.NAME.xxxxxxxx.tmp/.old``)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.(tmp|old)")
    if not target.parent.is_dir():
        return []
    return [p for p in target.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()]


def interrupted_save(path: PathLike) -> bool:
    """True if ``path`` is missing only because a save was killed mid-swap (:func:`recover_checkpoint` fixes it)."""
    target = Path(path)
    return not target.exists() and any(p.suffix == ".old" and (p / META_FILE).is_file() for p in _leftovers(target))


def recover_checkpoint(path: PathLike) -> bool:
    """Repair what a process killed inside :func:`save_checkpoint` left; True if ``path`` was restored.

    Replacing a checkpoint takes two renames (old aside, new into place). A kill between them leaves no
    ``path``, but the previous, complete checkpoint in a ``.NAME.*.old`` sibling: it is moved back.
    Leftover temporary siblings (a save killed while writing) are removed. Call it only from a process
    that owns the checkpoint (the trainer): it renames and deletes.
    """
    target = Path(path)
    leftovers = _leftovers(target)
    restored = False
    if not target.exists():
        olds = sorted((p for p in leftovers if p.suffix == ".old" and (p / META_FILE).is_file()),
                      key=lambda p: (p / META_FILE).stat().st_mtime_ns)
        if olds:
            os.rename(olds[-1], target)
            _fsync(target.parent)
            leftovers.remove(olds[-1])
            restored = True
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return restored


def replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is kept aside until the move succeeded.

    Shared by checkpoints and ONNX exports (one swap mechanism, one recovery rule).
    """
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.rmdir(old)
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    _fsync(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- loading --------------------------------------------------------------------------------------

def read_meta(path: PathLike) -> dict:
    """``meta.json`` of the checkpoint at ``path``, after checking format, version and every file's sha256."""
    root = _checkpoint_dir(path)
    try:
        meta = read_json(root / META_FILE)
    except DataError as e:
        hint = ""
        if (root / "best" / META_FILE).is_file() or (root / "last" / META_FILE).is_file():
            hint = f"; {root} is a training run folder: its checkpoints are {root / 'best'} and {root / 'last'}"
        elif (root / "manifest.json").is_file():  # ifnet.export.onnx_export.MANIFEST_FILE
            hint = (f"; {root} is an `ifnet export` (ONNX) folder, which generate and serve read but this "
                    "command does not")
        raise CheckpointError(f"{root}: not a complete ifnet checkpoint ({META_FILE}: {e.detail}){hint}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{root / META_FILE}: not an ifnet checkpoint (format {meta.get('format')!r})"
                              if isinstance(meta, dict) else f"{root / META_FILE}: not an ifnet checkpoint")
    version = meta.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION or version < 1:
        raise CheckpointError(f"{root}: checkpoint format version {version!r} is not supported by this ifnet "
                              f"(reads up to {CHECKPOINT_VERSION}); upgrade ifnet")
    files = meta.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise CheckpointError(f"{root / META_FILE}: file list missing or without {WEIGHTS_FILE}")
    for name in (WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE):
        if name not in files:
            raise CheckpointError(f"{root / META_FILE}: file list lacks {name}")
    for name, info in files.items():
        p = root / name
        if Path(name).name != name:
            raise CheckpointError(f"{root / META_FILE}: bad file name {name!r}")
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (incomplete checkpoint)")
        if not isinstance(info, dict) or _sha256(p) != info.get("sha256"):
            raise CheckpointError(f"{p}: sha256 checksum mismatch; the file is corrupt or was modified")
    return meta


def load_checkpoint(path: PathLike, *, map_location: str | torch.device = "cpu"
                    ) -> tuple[IFNet, Tokenizer, IFNetConfig, dict]:
    """Rebuild ``(model, tokenizer, config, meta)`` from a checkpoint directory; no other input needed.

    The model is returned in eval mode on ``map_location``. Never unpickles anything.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    root = _checkpoint_dir(path)
    meta = read_meta(root)
    config = IFNetConfig.from_dict(read_json(root / CONFIG_FILE), source=str(root / CONFIG_FILE))
    tokenizer = Tokenizer.from_dict(read_json(root / VOCAB_FILE), source=root / VOCAB_FILE)
    if len(tokenizer) != config.vocab_size:
        raise CheckpointError(f"{root}: vocabulary has {len(tokenizer)} tokens but config.vocab_size is "
                              f"{config.vocab_size}")
    try:
        model = IFNet(config, load_pretrained=False)
    except (ValueError, TypeError, RuntimeError) as e:  # sizes torch refuses (a config.json edited by hand)
        raise CheckpointError(f"{root / CONFIG_FILE}: cannot build the model it describes ({_first_line(e)})") from None
    try:
        missing, unexpected = load_model(model, str(root / WEIGHTS_FILE), strict=False, device=str(map_location))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{root / WEIGHTS_FILE}: weights do not fit config.json ({_first_line(e)})") from None
    if missing or unexpected:
        raise CheckpointError(f"{root / WEIGHTS_FILE}: weights do not fit config.json "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.to(map_location)
    model.eval()
    return model, tokenizer, config, meta


def load_training_state(path: PathLike) -> Optional[dict]:
    """The ``training_state`` given to :func:`save_checkpoint` (tensors on CPU), or None if it had none."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = _checkpoint_dir(path)
    meta = read_meta(root)
    if TRAIN_JSON_FILE not in meta["files"]:
        return None
    doc = read_json(root / TRAIN_JSON_FILE)
    if not isinstance(doc, dict) or doc.get("format") != TRAINING_STATE_FORMAT or doc.get("version") != 1:
        raise CheckpointError(f"{root / TRAIN_JSON_FILE}: not an ifnet training state (version 1)")
    try:
        tensors = load_file(str(root / TRAIN_TENSORS_FILE)) if TRAIN_TENSORS_FILE in meta["files"] else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{root / TRAIN_TENSORS_FILE}: not a readable safetensors file ({_first_line(e)})"
                              ) from None
    try:
        return _decode(doc["state"], tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a tag without its tensor, a bad value...
        raise CheckpointError(f"{root / TRAIN_JSON_FILE}: malformed training state "
                              f"({type(e).__name__}: {_first_line(e)})") from None


def _checkpoint_dir(path: PathLike) -> Path:
    p = Path(path)
    if p.is_file() and p.name in (WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE, META_FILE):
        return p.parent
    if p.is_file():
        raise CheckpointError(f"{p}: not an ifnet checkpoint directory (ifnet checkpoints are folders with "
                              f"{WEIGHTS_FILE} + {META_FILE}; pickled .pth/.pt files are never loaded)")
    if not p.is_dir():
        if interrupted_save(p):
            raise CheckpointError(f"{p}: checkpoint not found: a save was interrupted; its previous version "
                                  f"is in a hidden '.{p.name}.*.old' folder beside it, which "
                                  "`ifnet train --resume` restores")
        raise CheckpointError(f"{p}: checkpoint not found")
    return p


# -- training state: nested Python data <-> JSON + a flat tensor dict ------------------------------
# JSON cannot hold tensors, tuples or non-string dict keys, so those become small tagged objects:
#   {"__tensor__": key}, {"__ndarray__": key}, {"__tuple__": [...]}, {"__items__": [[key, value], ...]}.

_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")


def _encode(obj: Any, where: str, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, Tensor):
        key = f"{len(tensors)}:{where}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"{len(tensors)}:{where}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not any(k in _TAGS or k == "__float__" for k in obj):
            return {k: _encode(v, f"{where}/{k}", tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"training_state{where}: dict key {k!r} of type {type(k).__name__} is not storable")
            items.append([k, _encode(v, f"{where}/{k}", tensors)])
        return {"__items__": items}
    raise TypeError(f"training_state{where}: {type(obj).__name__} is not storable without pickle "
                    "(use tensors, numpy arrays, dicts, lists, tuples and JSON scalars)")


def _decode(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, value), = obj.items()
        if tag == "__tensor__":
            return tensors[value]
        if tag == "__ndarray__":
            return tensors[value].numpy()
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if tag == "__items__":
            return {k: _decode(v, tensors) for k, v in value}
        if tag == "__float__":
            return float(value)
    return {k: _decode(v, tensors) for k, v in obj.items()}


# -- small helpers --------------------------------------------------------------------------------

def _json_text(obj: Any, what: str = "checkpoint data") -> str:
    try:
        return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} is not JSON-serialisable: {e}") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    # Directories can be fsynced on POSIX only; elsewhere the rename is as durable as the OS makes it.
    # A file's fsync error is real (a full disk often shows only when the data are flushed): it propagates.
    is_dir = path.is_dir()
    with contextlib.suppress(*((OSError,) if is_dir else ())):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _library_versions() -> dict[str, str]:
    from importlib import metadata

    import ifnet

    versions = {"python": platform.python_version(), "ifnet": ifnet.__version__}
    for dist in ("torch", "torchvision", "timm", "safetensors", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
