"""Write a converted net as a folder (definition, weights, readable source) and load it back without pickled code."""

from __future__ import annotations

import json
import keyword
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format

from caffe2torch.errors import CaffeError
from caffe2torch.model import CaffeNet, from_net_parameter, module_key
from caffe2torch.read import read_prototxt
from caffe2torch.write import current_umask

DEFINITION = "net.prototxt"
WEIGHTS = "weights.pt"
SOURCE = "model.py"
META = "meta.json"


def python_names(blob_names) -> dict[str, str]:
    """A distinct Python identifier for each Caffe blob name (e.g. 'conv5_3/relu' -> conv5_3_relu)."""
    names: dict[str, str] = {}
    taken: set[str] = {"self", "torch", "blobs"}
    for blob in blob_names:
        if blob in names:
            continue
        base = re.sub(r"\W", "_", blob) or "blob"
        if base[0].isdigit() or keyword.iskeyword(base):
            base = "b_" + base
        candidate, suffix = base, 1
        while candidate in taken:
            suffix += 1
            candidate = f"{base}_{suffix}"
        taken.add(candidate)
        names[blob] = candidate
    return names


def generate_source(net: CaffeNet, origin: str) -> str:
    """Readable Python of the forward pass: one line per Caffe layer, variables named after Caffe blobs."""
    order = list(net.input_names) + [top for step in net.steps for top in step.tops]
    names = python_names(order)
    arguments = ", ".join(names[n] for n in net.input_names)
    lines = [
        f'"""{net.name or "Caffe net"}, converted by caffe2torch from {origin}.',
        "",
        "Load it with `caffe2torch.load(folder)`, or with this file: `Net.load(folder)`.",
        'Every variable below holds the Caffe blob of the same name (names sanitised for Python)."""',
        "",
        "from pathlib import Path",
        "",
        "import caffe2torch",
        "from caffe2torch.model import CaffeNet",
        "",
        "",
        "class Net(CaffeNet):",
        "    @classmethod",
        "    def load(cls, folder=None):",
        "        net = caffe2torch.load(Path(__file__).parent if folder is None else folder)",
        "        net.__class__ = cls",
        "        return net",
        "",
        f"    def forward(self, {arguments}):",
        "        layer = self.layers",
    ]
    for step in net.steps:
        bottoms = ", ".join(names[b] for b in step.bottoms)
        tops = ", ".join(names[t] for t in step.tops)
        if len(step.tops) > 1:
            tops = f"({tops})"
        call = f"layer[{module_key(step.name)!r}]({bottoms})  # {step.type}"
        lines.append(f"        {tops} = {call}" if step.tops else f"        {call}")
    outputs = ", ".join(names[o] for o in net.outputs)
    lines.append(f"        return {outputs or 'None'}")
    return "\n".join(lines) + "\n"


def save(net: CaffeNet, definition, blobs, folder: str | os.PathLike, meta: dict) -> Path:
    """Write the folder atomically: build it under a temporary name beside the target, then rename.

    The weights are Caffe's parameter blobs by layer name, as tensors (loadable with
    `torch.load(..., weights_only=True)`); loading runs the same converters on them.
    """
    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise CaffeError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / META).is_file():
        # Only a folder we wrote ourselves is replaced; anything else may be the user's data.
        raise CaffeError(f"{folder}: exists and is not a caffe2torch output folder; choose another -o")
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the result is an ordinary folder
    try:
        (staging / DEFINITION).write_text(text_format.MessageToString(definition))
        used = {step.name for step in net.steps}
        tensors = {name: [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
                   for name, arrays in blobs.items() if name in used}
        torch.save(tensors, staging / WEIGHTS)
        (staging / SOURCE).write_text(generate_source(net, meta.get("source", "Caffe")))
        full_meta = dict(meta, inputs={k: list(v) for k, v in net.input_shapes.items()}, outputs=net.outputs)
        (staging / META).write_text(json.dumps(full_meta, indent=2) + "\n")
        if folder.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=parent))
            backup.rmdir()
            folder.rename(backup)
            staging.rename(folder)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> CaffeNet:
    """Rebuild a saved net: converters from net.prototxt, on blobs read with torch.load(weights_only=True)."""
    folder = Path(folder)
    for required in (DEFINITION, WEIGHTS, META):
        if not (folder / required).is_file():
            raise CaffeError(f"{folder}: not a caffe2torch folder (missing {required})")
    definition = read_prototxt(folder / DEFINITION)
    try:
        meta = json.loads((folder / META).read_text())
    except (ValueError, OSError) as error:
        raise CaffeError(f"{folder / META}: cannot be read ({error})") from None
    inputs = {name: tuple(shape) for name, shape in meta.get("inputs", {}).items()} or None
    try:
        tensors = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a damaged file may fail in many ways
        raise CaffeError(f"{folder / WEIGHTS}: cannot be read ({error})") from None
    blobs = {name: [t.numpy() for t in arrays] for name, arrays in tensors.items()}
    net = from_net_parameter(definition, blobs, str(folder / DEFINITION), inputs, on_warning=lambda _: None)
    return net.to(map_location).eval()
