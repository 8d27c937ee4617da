"""A converted net on disk: definition, state_dict, standalone model.py and a manifest; written and read safely.

A folder is only ever replaced when it is exactly what we wrote before (every file listed in
meta.json's manifest, with the same sha256, nothing else) and the caller asked for it; loading
never unpickles objects or runs code from the folder: the net is rebuilt from net.prototxt by the
converters and gets the weights from a `weights_only` state_dict.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from google.protobuf import text_format
from torch import fx

from caffe2torch.codegen import WEIGHTS_FILE, check_standalone, generate_source
from caffe2torch.errors import CaffeError, term
from caffe2torch.freeze import apply_batchnorm_record, batchnorm_record
from caffe2torch.outputs import VIEW_KEY
from caffe2torch.model import from_net_parameter, layer_modules, legacy_python_names, net_info
from caffe2torch.protect import ReadFiles
from caffe2torch.read import parse_prototxt
from caffe2torch.write import current_umask

FORMAT = "caffe2torch-folder/3"
# Format 2 named modules first come, first served (model.legacy_python_names); its folders are still read.
LEGACY_FORMAT = "caffe2torch-folder/2"
DEFINITION = "net.prototxt"
WEIGHTS = WEIGHTS_FILE
SOURCE = "model.py"
META = "meta.json"


def _version() -> str:
    try:
        return metadata.version("caffe2torch")
    except metadata.PackageNotFoundError:
        return "unknown"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_contents(net: fx.GraphModule, meta: dict[str, Any] | None = None,
                    extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """The files of a converted folder, by name (meta.json last, with the manifest of the others).

    `extra` files (e.g. fold-bn's Caffe files) are written and listed in the manifest too.
    """
    if getattr(net, "meta", {}).get(VIEW_KEY):
        raise CaffeError("this net returns blobs chosen by caffe2torch.with_outputs; save the net it was made from "
                         "(they share their parameters)")
    check_standalone(net)
    info = net_info(net)
    meta = dict(meta or {})
    buffer = io.BytesIO()
    torch.save({name: value.detach().cpu() for name, value in net.state_dict().items()}, buffer)
    files = {
        DEFINITION: text_format.MessageToString(info.definition).encode(),
        WEIGHTS: buffer.getvalue(),
        SOURCE: generate_source(net, meta.get("source", info.source)).encode(),
    }
    for name, data in (extra or {}).items():
        if name in files or name == META or "/" in name:
            raise ValueError(f"extra file name {name!r} is taken or not a plain name")
        files[name] = data
    meta.update(format=FORMAT, caffe2torch=_version(), torch=torch.__version__, name=info.name,
                inputs={name: list(shape) for name, shape in info.inputs.items()}, outputs=list(info.outputs),
                modules=[list(pair) for pair in layer_modules(net)], batchnorm=batchnorm_record(net),
                files={name: _sha256(data) for name, data in files.items()})
    files[META] = (json.dumps(meta, indent=2, ensure_ascii=True) + "\n").encode()
    return files


def _not_ours(folder: Path) -> str | None:
    """Why `folder` is not exactly a converted folder we wrote (None when it is)."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no {META}"
    except (OSError, ValueError) as error:
        return f"its {META} cannot be read ({error})"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        return f"its {META} has no manifest of the files caffe2torch wrote (an older output?)"
    present = {entry.name for entry in folder.iterdir()}
    extra = sorted(present - set(files) - {META})
    if extra:
        return f"it holds files caffe2torch did not write: {', '.join(extra[:5])}"
    for name, digest in files.items():
        path = folder / name
        if name not in present or path.is_symlink() or not path.is_file():
            return f"{name} is missing or not a plain file"
        if _sha256(path.read_bytes()) != digest:
            return f"{name} was changed since caffe2torch wrote it"
    return None


def check_target(folder: Path, force: bool, read: ReadFiles | None = None) -> None:
    """Refuse to write where it could destroy anything caffe2torch did not write itself, or anything this run reads
    (`read`: the model, the definition, wherever they lie)."""
    if folder.is_symlink():
        raise CaffeError(f"{folder}: is a symbolic link; give the folder itself or another output path")
    if read is not None:
        read.check_folder(folder, term("-o", "folder"))
    if folder.exists() and not folder.is_dir():
        raise CaffeError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        reason = _not_ours(folder)
        if reason is not None:
            raise CaffeError(f"{folder}: is not empty and not a caffe2torch output ({reason}); choose another output folder")
        if not force:
            raise CaffeError(f"{folder}: holds an earlier caffe2torch output; pass {term('--force', 'force=True')} to "
                             f"replace it")


def _staged(parent: Path, name: str, files: dict[str, bytes]) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent))
    try:
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the result is an ordinary folder
        for file_name, data in files.items():
            (staging / file_name).write_bytes(data)
            (staging / file_name).chmod(0o666 & ~current_umask())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _swap_in(staging: Path, folder: Path, force: bool) -> None:
    """Rename the staged folder into place; an earlier output of ours is moved aside first and put back on failure."""
    if folder.is_dir() and any(folder.iterdir()):
        check_target(folder, force)  # still ours, right before it goes
        backup = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
        backup.rmdir()
        folder.rename(backup)
        try:
            staging.rename(folder)
        except BaseException:
            backup.rename(folder)  # the earlier output stays where it was
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, folder)  # an empty folder in the way is replaced, as rename(2) allows


def _write_inside(folder: Path, files: dict[str, bytes], force: bool) -> None:
    """Where the parent cannot take a staging folder (read-only) but the target folder can be written: each file
    written under a temporary name inside it and renamed, meta.json (the manifest that makes the folder ours)
    removed first and written last, so an interrupted write never passes for a finished one."""
    check_target(folder, force)
    old = set()
    if any(folder.iterdir()):
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        old = set(meta["files"]) | {META}
        (folder / META).unlink()
    for name in [n for n in files if n != META] + [META]:
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=folder)
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(files[name])
            os.chmod(temporary, 0o666 & ~current_umask())
            os.replace(temporary, folder / name)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    for name in old - set(files):
        (folder / name).unlink(missing_ok=True)


def write_folder(folder: str | os.PathLike, files: dict[str, bytes], force: bool = False,
                 read: ReadFiles | None = None) -> Path:
    """Write the files as one new folder: built beside the target, then renamed into place (or, where only the
    target folder is writable, written inside it)."""
    folder = Path(folder).absolute()
    check_target(folder, force, read)
    parent = folder.parent
    staging = None
    where = parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if folder.is_dir() and not os.access(parent, os.W_OK | os.X_OK) and os.access(folder, os.W_OK | os.X_OK):
            where = folder
            _write_inside(folder, files, force)
            return folder
        staging = _staged(parent, folder.name, files)
        where = folder
        _swap_in(staging, folder, force)
    except OSError as error:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise CaffeError(f"{where}: cannot write the converted folder ({error.strerror or error})") from None
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def save_net(net: fx.GraphModule, folder: str | os.PathLike, meta: dict[str, Any] | None = None,
             force: bool = False, extra: dict[str, bytes] | None = None, read: ReadFiles | None = None) -> Path:
    """Write a converted (possibly fine-tuned) net; `caffe2torch.load(folder)` gives it back."""
    return write_folder(folder, folder_contents(net, meta, extra), force, read)


def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaffeError(f"{folder}: not a caffe2torch folder (missing {META})") from None
    except (OSError, ValueError) as error:
        raise CaffeError(f"{path}: cannot be read ({error})") from None
    if not isinstance(meta, dict):
        raise CaffeError(f"{path}: not a caffe2torch meta file (expected a JSON object)")
    if meta.get("format") not in (FORMAT, LEGACY_FORMAT):
        found = meta.get("format", "none, an older caffe2torch")
        raise CaffeError(f"{folder}: written in folder format {found!s}, this caffe2torch reads {FORMAT}; "
                         f"convert the caffemodel again")
    return meta


def _input_shapes(meta: dict[str, Any], folder: Path) -> dict[str, tuple[int, ...]]:
    inputs = meta.get("inputs")
    if not isinstance(inputs, dict) or not all(
            isinstance(shape, list) and all(type(d) is int and d > 0 for d in shape) for shape in inputs.values()):
        raise CaffeError(f"{folder / META}: 'inputs' must map input names to lists of positive sizes")
    return {str(name): tuple(shape) for name, shape in inputs.items()}


def _module_renames(meta: dict[str, Any], net: fx.GraphModule, folder: Path) -> dict[str, str]:
    """The module name weights.pt uses -> the one the rebuilt net uses, for each layer.

    Format 3 records which module is which layer and must agree with the net net.prototxt builds
    here (it would not if, e.g., a plugin that turns a Python data layer into a layer is missing);
    format 2 named modules by the older rule, which is worked out again for the same layers.
    """
    pairs = layer_modules(net)
    if meta.get("format") == LEGACY_FORMAT:
        legacy = legacy_python_names([layer for layer, _ in pairs])
        return {old: new for old, (_, new) in zip(legacy, pairs) if old != new}
    recorded = meta.get("modules")
    if not isinstance(recorded, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair) for pair in recorded):
        raise CaffeError(f"{folder / META}: 'modules' must list [Caffe layer, module name] pairs")
    recorded = [tuple(pair) for pair in recorded]
    if recorded != pairs:
        hint = "(a plugin converter the folder needs is not registered?)"
        if len(recorded) != len(pairs):
            raise CaffeError(f"{folder / META}: weights.pt was saved for {len(recorded)} layer modules, {DEFINITION} "
                             f"builds {len(pairs)} here {hint}")
        (layer, saved), (built_layer, built) = next((a, b) for a, b in zip(recorded, pairs) if a != b)
        raise CaffeError(f"{folder / META}: weights.pt holds layer {layer!r} as module {saved!r}, {DEFINITION} builds "
                         f"layer {built_layer!r} as {built!r} there {hint}")
    return {}


def _fitted(name: str, value: torch.Tensor, wanted: torch.Tensor, path: Path) -> torch.Tensor:
    """A stored tensor as the rebuilt net holds it: dense, in the net's dtype.

    Floating tensors of another precision (a net saved after .half() or .double()) are converted to
    the net's (float32: exact from float16 and bfloat16, float64 rounds to nearest as Caffe's
    double_data does); a value float32 cannot hold is refused. A tensor of another kind (integer,
    bool, complex) where the net has a float, or any change to an integer buffer, is refused.
    """
    if value.layout != torch.strided or value.is_meta or value.is_quantized:
        raise CaffeError(f"{path}: {name} is not a plain tensor ({value.layout}, device {value.device.type})")
    if value.dtype == wanted.dtype:
        return value.detach().contiguous()
    if not (value.is_floating_point() and wanted.is_floating_point()):
        raise CaffeError(f"{path}: {name} is {str(value.dtype).replace('torch.', '')}, the net needs "
                         f"{str(wanted.dtype).replace('torch.', '')}")
    converted = value.detach().to(wanted.dtype).contiguous()
    if int(torch.isinf(converted).sum()) != int(torch.isinf(value).sum()):  # float64 past float32's range
        raise CaffeError(f"{path}: {name} holds values beyond the range of {str(wanted.dtype).replace('torch.', '')}")
    return converted


def load(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> fx.GraphModule:
    """Rebuild a converted folder: converters from net.prototxt, weights from a weights_only state_dict.

    The net computes in float32 whatever precision the folder's tensors were saved in (see `_fitted`);
    `.half()` it again to run in half precision.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CaffeError(f"{folder}: no such folder" if not folder.exists() else f"{folder}: is not a folder")
    meta = read_meta(folder)
    try:
        text = (folder / DEFINITION).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CaffeError(f"{folder / DEFINITION}: cannot be read ({error})") from None
    definition = parse_prototxt(text, str(folder / DEFINITION))
    net = from_net_parameter(definition, {}, str(folder / DEFINITION), _input_shapes(meta, folder),
                             on_warning=lambda _: None, fill_missing=True)
    renames = _module_renames(meta, net, folder)
    try:
        state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a damaged or foreign file fails in many ways
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        raise CaffeError(f"{folder / WEIGHTS}: cannot be read as a state_dict of tensors "
                         f"({type(error).__name__}: {reason[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CaffeError(f"{folder / WEIGHTS}: not a state_dict of tensors")
    if renames:
        state = {".".join([renames.get(key.split(".", 1)[0], key.split(".", 1)[0]), *key.split(".")[1:]]): value
                 for key, value in state.items()}
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CaffeError(f"{folder / WEIGHTS}: does not fit {DEFINITION} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    wrong = [name for name, value in state.items() if tuple(value.shape) != tuple(expected[name].shape)]
    if wrong:
        raise CaffeError(f"{folder / WEIGHTS}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
                         f"{DEFINITION} needs {tuple(expected[wrong[0]].shape)}")
    fitted, storages = {}, set()
    for name, value in state.items():
        tensor = _fitted(name, value, expected[name], folder / WEIGHTS)
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in storages:  # views of one storage in the file: each layer its own copy
            tensor = tensor.clone()
        storages.add(storage)
        fitted[name] = tensor
    net.load_state_dict(fitted, assign=True)
    apply_batchnorm_record(net, meta, str(folder / META))  # state_dicts do not keep which norms learn
    net_info(net).source = str(meta.get("source", folder))
    return net.to(map_location).eval()
