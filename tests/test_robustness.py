"""Damaged and hostile inputs: a clean one-line error or a net whose shapes check out, within bounded time.

The fuzz tests are seeded (the same cases on every run) and small enough for the suite; each case
must end in a CaffeError or in a converted net that runs on inputs of its declared shapes and
returns tops of the shapes it recorded.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
import torch

from caffe2torch import guard
from caffe2torch.conversion import convert
from caffe2torch.errors import CaffeError
from caffe2torch.export import check_inputs
from caffe2torch.model import net_info
from caffe2torch.read import parse_caffemodel, read_caffemodel_h5
from caffe2torch.reference import read_reference
from tests.fork_nets import FORK_NETS, fork_net

FUZZ_UNITS = ["unit_conv_basic", "unit_pool_ave", "unit_fork_bn", "unit_interp", "unit_shape_softmax",
              "unit_legacy_v1", "unit_eltwise_concat", "unit_argmax"]


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """Flip a few bytes, cut the file, or duplicate a slice: the damage downloads and disks do."""
    array = bytearray(data)
    kind = rng.integers(3)
    if kind == 0:
        for _ in range(rng.integers(1, 4)):
            array[rng.integers(len(array))] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        array = array[: rng.integers(1, len(array))]
    else:
        start = int(rng.integers(len(array)))
        piece = array[start:start + int(rng.integers(1, 64))]
        at = int(rng.integers(len(array)))
        array[at:at] = piece
    return bytes(array)


def _check_net(net) -> None:
    """A net that converted must run on inputs of its shapes and give tops of the recorded shapes."""
    info = net_info(net)
    with torch.no_grad():
        outputs = net(*check_inputs(net))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert [tuple(o.shape) for o in outputs] == [tuple(info.blob_shapes[b]) for b in info.outputs]


def _outcome(action) -> str:
    try:
        _check_net(action())
        return "net"
    except CaffeError as error:
        assert "\n" not in str(error) and str(error), repr(error)
        return "error"


def test_fuzzed_caffemodels(units_dir, tmp_path):
    rng = np.random.default_rng(20261130)
    outcomes: dict[str, int] = {}
    started = time.monotonic()
    for case in range(240):
        unit = FUZZ_UNITS[case % len(FUZZ_UNITS)]
        path = tmp_path / f"{unit}.caffemodel"
        path.write_bytes(_mutate((units_dir / f"{unit}.caffemodel").read_bytes(), rng))
        # Half with the deploy definition (weights damaged), half with the stored one (definition damaged too).
        prototxt = units_dir / f"{unit}.prototxt" if case % 2 else None
        shapes = {name: tuple(value.shape) for name, value in read_reference(units_dir / f"{unit}.ref.h5").inputs.items()}
        result = _outcome(lambda: convert(path, prototxt, shapes if prototxt is None else None, on_warning=lambda _: None,
                                          find_prototxt=False).net)
        outcomes[result] = outcomes.get(result, 0) + 1
    assert time.monotonic() - started < 240
    assert outcomes.get("error", 0) > 20 and outcomes.get("net", 0) > 20, outcomes  # both kinds were exercised


def test_fuzzed_prototxts(units_dir, tmp_path):
    rng = np.random.default_rng(7)
    alphabet = list('{}:"_ \n0123456789-.abcdefghijklmnopqrstuvwxyz') + ["kernel_size", "num_output", "top", "bottom"]
    outcomes: dict[str, int] = {}
    for case in range(240):
        unit = FUZZ_UNITS[case % len(FUZZ_UNITS)]
        text = (units_dir / f"{unit}.prototxt").read_text()
        digits = [i for i, ch in enumerate(text) if ch.isdigit()]
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.7:  # a changed number: sizes, strides, axes, counts (syntax stays valid)
                at = digits[rng.integers(len(digits))]
                text = text[:at] + str(["0", "1", "7", "99999", "-1", "2"][rng.integers(6)]) + text[at + 1:]
                digits = [i for i, ch in enumerate(text) if ch.isdigit()]
            else:  # anything else, mostly a syntax error
                at = int(rng.integers(len(text)))
                token = alphabet[rng.integers(len(alphabet))]
                text = text[:at] + token + text[at + int(rng.integers(0, 3)):]
                digits = [i for i, ch in enumerate(text) if ch.isdigit()]
        path = tmp_path / "net.prototxt"
        path.write_text(text)
        result = _outcome(lambda: convert(None, path, on_warning=lambda _: None).net)
        outcomes[result] = outcomes.get(result, 0) + 1
    assert outcomes.get("error", 0) > 20 and outcomes.get("net", 0) > 20, outcomes


def test_fuzzed_hdf5_files(units_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(guard, "BASE_SECONDS", 10.0)
    rng = np.random.default_rng(3)
    started = time.monotonic()
    for case in range(40):
        unit = FUZZ_UNITS[case % len(FUZZ_UNITS)]
        for suffix, reader in ((".caffemodel.h5", read_caffemodel_h5), (".ref.h5", read_reference)):
            path = tmp_path / f"{unit}{suffix}"
            data = (units_dir / f"{unit}{suffix}").read_bytes()
            # HDF5 keeps its metadata near the start: damage it there more often.
            array = bytearray(data)
            for _ in range(2):
                position = int(rng.integers(min(len(array), 4096) if rng.random() < 0.7 else len(array)))
                array[position] ^= 1 << int(rng.integers(8))
            path.write_bytes(bytes(array))
            try:
                reader(path)
            except CaffeError as error:
                assert "\n" not in str(error)
    assert time.monotonic() - started < 200


def _sleep_forever(path):
    time.sleep(600)


def _crash(path):
    os._exit(3)


def test_a_reader_that_hangs_or_crashes_is_one_error(units_dir, monkeypatch):
    import caffe2torch.reference as reference_module

    if os.environ.get("CAFFE2TORCH_NO_FORK"):
        pytest.skip("readers run in the calling process here")
    path = units_dir / "unit_argmax.ref.h5"
    monkeypatch.setattr(guard, "BASE_SECONDS", 1.0)
    monkeypatch.setattr(reference_module, "_read", _sleep_forever)
    started = time.monotonic()
    with pytest.raises(CaffeError, match="not read within 1 s"):
        read_reference(path)
    assert time.monotonic() - started < 10
    monkeypatch.setattr(reference_module, "_read", _crash)
    with pytest.raises(CaffeError, match="stopped without an answer"):
        read_reference(path)


def test_a_layer_name_with_invalid_utf8_is_one_error(units_dir):
    data = (units_dir / "unit_conv_basic.caffemodel").read_bytes()
    damaged = data.replace(b"conv_k3_p1", b"conv_k3_\xff1", 1)
    with pytest.raises(CaffeError, match="not a valid caffemodel"):
        parse_caffemodel(damaged, "x.caffemodel")


def test_disk_full_while_saving_leaves_nothing(units_dir, tmp_path, monkeypatch):
    from caffe2torch import folder as folder_module

    net = convert(units_dir / "unit_conv_basic.caffemodel").net
    real_write = folder_module.Path.write_bytes

    def full(self, data):
        if self.name == "weights.pt":
            raise OSError(28, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(folder_module.Path, "write_bytes", full)
    with pytest.raises(CaffeError, match="No space left on device"):
        folder_module.save_net(net, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unusable_reference_records_are_errors(units_dir, tmp_path):
    import h5py

    source = units_dir / "unit_conv_basic.ref.h5"
    for change, message in ((lambda f: f["layers/0000/0/sample_index"].__setitem__(0, 10**9), "outside its"),
                            (lambda f: (f["layers/0000/0"].__delitem__("data"),
                                        f["layers/0000/0"].__delitem__("sample_index"),
                                        f["layers/0000/0"].create_dataset("sample_index", data=np.zeros(0, np.int64)),
                                        f["layers/0000/0"].__delitem__("sample_value"),
                                        f["layers/0000/0"].create_dataset("sample_value", data=np.zeros(0, np.float32))),
                             "neither values nor samples")):
        path = tmp_path / "damaged.ref.h5"
        shutil.copy(source, path)
        with h5py.File(path, "r+") as file:
            change(file)
        with pytest.raises(CaffeError, match=message):
            read_reference(path)


def test_a_caffemodel_cut_between_layers_is_refused_where_it_shows(reference_dir, tmp_path):
    """The file has no layer count; Caffe's inserted Split layers show readers that were cut off."""
    from proto import caffe_pb2

    full = caffe_pb2.NetParameter()
    full.ParseFromString((reference_dir / "icnet_merged_1025x2049.caffemodel").read_bytes())
    cut = caffe_pb2.NetParameter()
    cut.CopyFrom(full)
    del cut.layer[40:]  # between two layers: a valid, smaller NetParameter
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(cut.SerializeToString())
    with pytest.raises(CaffeError, match="the stored net is incomplete: Caffe's split layer"):
        convert(path, input_shape=(1, 3, 1025, 2049), find_prototxt=False)
    path.write_bytes(full.SerializeToString())  # the whole file converts
    assert net_info(convert(path, input_shape=(1, 3, 1025, 2049), find_prototxt=False).net).outputs == ["conv6_interp"]


# ---------------------------------------------------------------- the readers of converted folders and HDF5 files

FOLDER_UNITS = ["unit_conv_basic", "unit_batchnorm_scale_bias", "unit_fork_bn", "unit_eltwise_concat"]
ODD_VALUES = [None, -1, 0, 2**63, True, 1.5, "x", [], {}, [1, "3"], {"data": [1, 3, 13, 17, 2]}]


def _mutated_json(data: bytes, rng: np.random.Generator) -> bytes:
    """meta.json with one value somewhere replaced by a value of another type or size (it stays valid JSON)."""
    import json

    meta = json.loads(data)
    holder, key = meta, str(rng.choice(sorted(meta)))
    while isinstance(holder[key], (dict, list)) and holder[key] and rng.random() < 0.6:
        holder = holder[key]
        key = str(rng.choice(sorted(holder))) if isinstance(holder, dict) else int(rng.integers(len(holder)))
    holder[key] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
    return json.dumps(meta).encode()


def _mutated_state(path, rng: np.random.Generator) -> None:
    """weights.pt as a loadable file of the wrong content: a tensor of another dtype or shape, one missing or
    extra, a value that is no tensor, views sharing one storage."""
    state = torch.load(path, weights_only=True)
    if not state:  # a net without parameters: anything is extra
        torch.save({"extra.weight": torch.zeros(1)}, path)
        return
    name = sorted(state)[rng.integers(len(state))]
    kind = rng.integers(6)
    if kind == 0:
        state[name] = state[name].to([torch.float16, torch.float64, torch.int64, torch.bool, torch.uint8,
                                      torch.complex64][rng.integers(6)])
    elif kind == 1:
        state[name] = torch.zeros(tuple(state[name].shape) + (2,))
    elif kind == 2:
        del state[name]
    elif kind == 3:
        state[name + "x"] = state[name]
    elif kind == 4:
        state[name] = [1, "two"][rng.integers(2)]
    else:
        base = torch.zeros(sum(v.numel() for v in state.values()) + 1)
        offset = 0
        for key, value in state.items():
            if value.is_floating_point():
                state[key] = base[offset:offset + value.numel()].view(value.shape)
                offset += value.numel()
    torch.save(state, path)


def test_fuzzed_converted_folders(tmp_path):
    """meta.json, net.prototxt and weights.pt damaged byte by byte or changed in content: load() gives a net that
    runs or one CaffeError line."""
    from caffe2torch.folder import load, save_net
    from tests.conftest import convert_reference

    sources = {unit: save_net(convert_reference(unit), tmp_path / unit) for unit in FOLDER_UNITS}
    rng = np.random.default_rng(17)
    outcomes: dict[str, int] = {}
    started = time.monotonic()
    for case in range(150):
        folder = tmp_path / f"case{case}"
        shutil.copytree(sources[FOLDER_UNITS[case % len(FOLDER_UNITS)]], folder)
        target = folder / ["meta.json", "net.prototxt", "weights.pt"][case % 3]
        if rng.random() < 0.5:
            target.write_bytes(_mutate(target.read_bytes(), rng))
        elif target.name == "meta.json":
            target.write_bytes(_mutated_json(target.read_bytes(), rng))
        elif target.name == "weights.pt":
            _mutated_state(target, rng)
        else:  # a changed number in the definition
            text = target.read_text()
            digits = [i for i, ch in enumerate(text) if ch.isdigit()]
            at = digits[rng.integers(len(digits))]
            target.write_text(text[:at] + ["0", "7", "99999", "-1", "9223372036854775807"][rng.integers(5)]
                              + text[at + 1:])
        result = _outcome(lambda: load(folder))
        outcomes[result] = outcomes.get(result, 0) + 1
        shutil.rmtree(folder)
    assert time.monotonic() - started < 120  # a bound on a hang, not a timing: generous for a loaded machine
    assert outcomes.get("error", 0) > 20 and outcomes.get("net", 0) > 5, outcomes


def _mutated_hdf5(path, rng: np.random.Generator) -> None:
    """One change in the HDF5 structure: a name that is not UTF-8, an attribute of another type, a dataset of
    another dtype or of a huge claimed shape, a member deleted or added."""
    import h5py

    with h5py.File(path, "r+") as file:
        members: list[str] = []
        file.visit(members.append)
        name = members[rng.integers(len(members))]
        item, parent = file[name], file[name].parent
        base = name.rsplit("/", 1)[-1]
        kind = rng.integers(6)
        if kind == 0:
            parent.move(base, base.encode() + b"\xff")
        elif kind == 1:
            keys = list(item.attrs) or list(file.attrs)
            owner = item if item.attrs else file
            value = [np.bytes_(b"n\xfe"), 42, np.arange(3), "", "/etc/passwd", "../x.prototxt", np.float64(2.5),
                     np.array([b"a\xff"], dtype="S2"), np.array([2**62, 2**62])][rng.integers(9)]
            owner.attrs[keys[rng.integers(len(keys))] if keys else "prototxt"] = value
        elif kind == 2 and isinstance(item, h5py.Dataset):
            data = item[()]
            del parent[base]
            parent.create_dataset(base, data=np.asarray(data).astype(["i4", "S4", "?", "f8"][rng.integers(4)]))
        elif kind == 3 and isinstance(item, h5py.Dataset):
            del parent[base]
            parent.create_dataset(base, shape=(2**28, 2**28), dtype="f4")  # claimed in the header only
        elif kind == 4:
            del parent[base]
        else:
            group = item if isinstance(item, h5py.Group) else parent
            group.create_dataset(["9", "extra", "0000x"][rng.integers(3)], data=np.ones(3, "f4"))


def test_fuzzed_hdf5_weights_and_references_end_in_a_net_a_report_or_one_line(units_dir, tmp_path, monkeypatch):
    """Structurally changed .caffemodel.h5 and .ref.h5 files through the commands that read them."""
    from click.testing import CliRunner

    from caffe2torch.cli import main

    monkeypatch.setattr(guard, "BASE_SECONDS", 10.0)
    rng = np.random.default_rng(29)
    codes: dict[int, int] = {}
    started = time.monotonic()
    for case in range(72):
        unit = FUZZ_UNITS[case % len(FUZZ_UNITS)]
        weights, reference = tmp_path / f"{unit}.caffemodel.h5", tmp_path / f"{unit}.ref.h5"
        shutil.copy(units_dir / f"{unit}.caffemodel.h5", weights)
        shutil.copy(units_dir / f"{unit}.ref.h5", reference)
        shutil.copy(units_dir / f"{unit}.prototxt", tmp_path)  # what the reference names, beside it
        _mutated_hdf5(weights if case % 2 else reference, rng)
        # A third without --prototxt: the definition the (mutated) reference names is looked up beside it.
        prototxt = ["--prototxt", str(units_dir / f"{unit}.prototxt")] if case % 3 else []
        result = CliRunner().invoke(main, ["verify", str(weights), *prototxt, "--reference", str(reference)])
        assert result.exit_code in (0, 1, 2) and not isinstance(result.exception, Exception) or \
            isinstance(result.exception, SystemExit), (case, result.output, result.exception)
        errors = [line for line in result.output.splitlines() if line.startswith("caffe2torch: error:")]
        assert result.exit_code != 2 or len(errors) == 1, result.output
        codes[result.exit_code] = codes.get(result.exit_code, 0) + 1
    assert time.monotonic() - started < 120  # a bound on a hang, not a timing: generous for a loaded machine
    assert codes.get(2, 0) > 5 and codes.get(0, 0) + codes.get(1, 0) > 5, codes


# ---------------------------------------------------------------- fork layers' params, fuzzed (tests/fork_nets.py)


def _check_fork_net(net) -> None:
    """`_check_net`, except that a layer whose output size depends on the data (detections, proposals) gives its
    own count along one axis."""
    info = net_info(net)
    with torch.no_grad():
        outputs = net(*check_inputs(net))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    data_sized = any(getattr(m, "not_exportable", "") == "its output size depends on the data" for m in net.modules())
    for output, blob in zip(outputs, info.outputs):
        expected = info.blob_shapes[blob]
        differ = [axis for axis, (got, wanted) in enumerate(zip(output.shape, expected)) if got != wanted]
        assert output.dim() == len(expected) and (not differ or data_sized and len(differ) == 1), (output.shape, blob)


def _fork_outcome(action) -> str:
    try:
        net = action()
    except CaffeError as error:
        assert "\n" not in str(error) and str(error), repr(error)
        return "error"
    try:
        _check_fork_net(net)
        return "net"
    except CaffeError as error:  # data the fork refuses (a region's batch index, a mask index), when run
        assert "\n" not in str(error) and str(error), repr(error)
        return "refused when run"


def test_every_fork_net_converts_and_runs_before_it_is_fuzzed(tmp_path):
    """The fuzz below starts from nets that work: each with its working params converts and runs."""
    for kind in FORK_NETS:
        path = tmp_path / f"{kind}.prototxt"
        path.write_text(fork_net(kind, np.random.default_rng(0), fuzz=False))
        net = convert(None, path, on_warning=lambda _: None).net
        if kind not in ("ROIPooling", "PSROIPooling", "Proposal"):  # reference inputs are no regions, no im_info
            _check_fork_net(net)


def test_fuzzed_fork_layer_params(tmp_path):
    """NaN, infinities, zeros, negatives, 2^31 - 1, 2^32 - 1 and 2^63 - 1 in the params of every fork layer type:
    each net converts and runs on inputs of its shapes, or ends in a one-line CaffeError (at conversion or, for
    data the fork refuses, when run), never another exception or a hang."""
    rng = np.random.default_rng(1703)
    kinds = list(FORK_NETS)
    outcomes: dict[str, dict[str, int]] = {kind: {} for kind in kinds}
    started = time.monotonic()
    for case in range(40 * len(kinds)):
        kind = kinds[case % len(kinds)]
        path = tmp_path / "fork.prototxt"
        path.write_text(fork_net(kind, rng))
        try:
            result = _fork_outcome(lambda: convert(None, path, on_warning=lambda _: None, memory_limit="64M").net)
        except Exception as error:  # noqa: BLE001 - the failure names the net that raised it
            raise AssertionError(f"{kind}: {type(error).__name__}: {error}\n{path.read_text()}") from error
        outcomes[kind][result] = outcomes[kind].get(result, 0) + 1
    assert time.monotonic() - started < 120, time.monotonic() - started  # a bound on a hang, generous under load
    for result, least in (("net", 200), ("error", 200), ("refused when run", 10)):  # every way out was taken
        assert sum(count.get(result, 0) for count in outcomes.values()) > least, outcomes
    assert [kind for kind, count in outcomes.items() if not count.keys() - {"error"}] == [], outcomes
