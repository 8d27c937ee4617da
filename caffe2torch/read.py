"""Read Caffe files (text prototxt, binary caffemodel, HDF5 weights) into NetParameter and NumPy blobs."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caffe2torch.errors import CaffeError, term
from proto import caffe_pb2

# V1LayerParameter.LayerType -> the type string Caffe's UpgradeV1LayerType gives it.
_V1_TYPE_NAMES = {
    "NONE": "",
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution",
    "DATA": "Data",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
    # DeepLab v1
    "IMAGE_SEG_DATA": "ImageSegData",
    "SEG_ACCURACY": "SegAccuracy",
    "INTERP": "Interp",
    "PADDING": "Padding",
    "MAT_WRITE": "MatWrite",
    "MAT_READ": "MatRead",
    # DeconvNet / DecoupledNet (HyeonwooNoh/caffe): the fork never had string types; these are its class names as
    # Caffe's registry names a layer class. Its CROP is the coord-map crop that HED / RCF call AutoCrop.
    "CROP": "AutoCrop",
    "ELTWISE_ACCURACY": "EltwiseAccuracy",
    "UNPOOLING": "Unpooling",
    "BN": "BN",
    "RED_SOFTMAX_LOSS": "RedSoftmaxWithLoss",
    "RED_ACCURACY": "RedAccuracy",
    "DECONVNET_IMAGE_SEG_DATA": "ImageSegData",
    "WINDOW_SEG_DATA": "WindowSegData",
    "WINDOW_INST_SEG_DATA": "WindowInstSegData",
    "BIN_ACCURACY": "BinaryAccuracy",
    "WINDOW_CLS_DATA": "WindowClsData",
    "WINDOW_SEG_BINARY": "WindowSegBinary",
    "SELECT_SEG_BINARY": "SelectSegBinary",
    "DROPOUT_CHANNEL": "DropoutChannel",
}


# V1LayerParameter list fields -> the ParamSpec field each entry becomes (as Caffe's UpgradeV1LayerParameter).
# No Caffe blob comes near this (a caffemodel's protobuf is limited to 2 GB); larger is a damaged file.
_MAX_BLOB_BYTES = 1 << 34

_V1_PARAM_SPEC_FIELDS = {"param": "name", "blob_share_mode": "share_mode", "blobs_lr": "lr_mult",
                         "weight_decay": "decay_mult"}


def _is_repeated(descriptor) -> bool:
    # protobuf 7 dropped FieldDescriptor.label in favour of is_repeated; older runtimes lack the latter.
    repeated = getattr(descriptor, "is_repeated", None)
    if repeated is not None:
        return bool(repeated)
    return descriptor.label == descriptor.LABEL_REPEATED


# V0LayerParameter.type -> V1LayerParameter.LayerType (Caffe's UpgradeV0LayerType).
_V0_TYPES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION", "data": "DATA",
    "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS", "flatten": "FLATTEN", "hdf5_data": "HDF5_DATA",
    "hdf5_output": "HDF5_OUTPUT", "im2col": "IM2COL", "images": "IMAGE_DATA", "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT", "lrn": "LRN", "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS",
    "pool": "POOLING", "relu": "RELU", "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT", "tanh": "TANH", "window_data": "WINDOW_DATA",
}


def _upgrade_v0(net: caffe_pb2.NetParameter, source: str) -> None:
    """Caffe's UpgradeV0Net, in place: V0 `layers { layer { type: "conv" ... } }` become V1 layers, and a
    V0 "padding" layer is folded into the convolution reading it (UpgradeV0PaddingLayers)."""
    if not any(layer.HasField("layer") for layer in net.layers):
        return
    padding: dict[str, tuple[str, int]] = {}  # a padding layer's top -> (its bottom, its pad)
    upgraded = []
    for wrapper in net.layers:
        old = wrapper.layer
        if old.type == "padding":
            if len(wrapper.bottom) != 1 or len(wrapper.top) != 1:
                raise CaffeError(f"{source}: V0 padding layer {old.name!r} needs one bottom and one top")
            padding[wrapper.top[0]] = (wrapper.bottom[0], old.pad)
            continue
        if old.type not in _V0_TYPES:
            raise CaffeError(f"{source}: V0 layer {old.name!r} has type {old.type!r}, which Caffe's upgrade does "
                             f"not know")
        new = caffe_pb2.V1LayerParameter(name=old.name, top=wrapper.top, blobs=old.blobs, blobs_lr=old.blobs_lr,
                                         weight_decay=old.weight_decay)
        new.type = caffe_pb2.V1LayerParameter.LayerType.Value(_V0_TYPES[old.type])
        for bottom in wrapper.bottom:
            if bottom in padding:
                if old.type != "conv":
                    raise CaffeError(f"{source}: V0 padding feeds {old.name!r} ({old.type}); only a conv can absorb it")
                bottom, pad = padding[bottom]
                old.pad = pad
            new.bottom.append(bottom)
        if old.type in ("conv", "innerproduct"):
            param = new.convolution_param if old.type == "conv" else new.inner_product_param
            for name in ("num_output", "weight_filler", "bias_filler"):
                if old.HasField(name):
                    getattr(param, name).CopyFrom(getattr(old, name)) if name.endswith("filler") else \
                        setattr(param, name, getattr(old, name))
            if old.HasField("biasterm"):
                param.bias_term = old.biasterm
        if old.type == "conv":
            param = new.convolution_param
            if old.HasField("pad"):
                param.pad.append(old.pad)
            if old.HasField("kernelsize"):
                param.kernel_size.append(old.kernelsize)
            if old.HasField("stride"):
                param.stride.append(old.stride)
            if old.HasField("group"):
                param.group = old.group
        elif old.type == "pool":
            param = new.pooling_param
            for v0_name, name in (("pad", "pad"), ("kernelsize", "kernel_size"), ("stride", "stride")):
                if old.HasField(v0_name):
                    setattr(param, name, getattr(old, v0_name))
            if old.HasField("pool"):
                param.pool = old.pool
        elif old.type == "dropout" and old.HasField("dropout_ratio"):
            new.dropout_param.dropout_ratio = old.dropout_ratio
        elif old.type == "lrn":
            for name in ("local_size", "alpha", "beta", "k"):
                if old.HasField(name):
                    setattr(new.lrn_param, name, getattr(old, name))
        elif old.type == "concat" and old.HasField("concat_dim"):
            new.concat_param.concat_dim = old.concat_dim
        elif old.type in ("data", "images", "window_data") and old.HasField("cropsize"):
            new.transform_param.crop_size = old.cropsize
        upgraded.append(new)
    del net.layers[:]
    net.layers.extend(upgraded)


# V1 data layers whose own params held the transformation fields (Caffe's UpgradeNetDataTransformation).
_V1_TRANSFORMED = {"DATA": "data_param", "IMAGE_DATA": "image_data_param", "WINDOW_DATA": "window_data_param"}


def _upgrade_data_transformation(net: caffe_pb2.NetParameter) -> None:
    """Caffe's UpgradeNetDataTransformation: scale, mean_file, crop_size and mirror move into transform_param."""
    for layer in net.layers:
        field = _V1_TRANSFORMED.get(caffe_pb2.V1LayerParameter.LayerType.Name(layer.type)) \
            if layer.HasField("type") else None
        if field is None or not layer.HasField(field):
            continue
        param = getattr(layer, field)
        for name in ("scale", "mean_file", "crop_size", "mirror"):
            if param.HasField(name):
                setattr(layer.transform_param, name, getattr(param, name))
                param.ClearField(name)


def _recover_v1_params(old: caffe_pb2.V1LayerParameter, new: caffe_pb2.LayerParameter) -> None:
    """DeconvNet's V1 bn_param is field 45, which this schema gives DeepLab v1's padding_param: in a binary a BN
    layer's params decode there, and are read again (same wire bytes) as the BN message they are."""
    if new.type == "BN" and old.HasField("padding_param") and not old.HasField("bn_param"):
        new.segnet_bn_param.ParseFromString(old.padding_param.SerializePartialToString(deterministic=True))
        new.ClearField("padding_param")


def _upgrade_v1(net: caffe_pb2.NetParameter, source: str) -> caffe_pb2.NetParameter:
    """Caffe's UpgradeV1Net: move `layers` (V1) into `layer` with string types and the same parameters."""
    if not net.layers:
        return net
    if net.layer:
        raise CaffeError(f"{source}: mixes V1 'layers' and current 'layer' definitions")
    _upgrade_v0(net, source)
    _upgrade_data_transformation(net)
    upgraded = caffe_pb2.NetParameter()
    upgraded.CopyFrom(net)
    del upgraded.layers[:]
    target_fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    for old in net.layers:
        new = upgraded.layer.add()
        type_name = caffe_pb2.V1LayerParameter.LayerType.Name(old.type)
        new.type = _V1_TYPE_NAMES.get(type_name, type_name)
        for descriptor, value in old.ListFields():
            name = descriptor.name
            if name in _V1_PARAM_SPEC_FIELDS:
                # V1 keeps per-blob settings in parallel lists; the current format has one ParamSpec per blob.
                for index, item in enumerate(value):
                    while len(new.param) <= index:
                        new.param.add()
                    setattr(new.param[index], _V1_PARAM_SPEC_FIELDS[name], item)
                continue
            if name == "type" or name not in target_fields:
                continue
            target = getattr(new, name)
            if _is_repeated(descriptor):
                if descriptor.message_type is not None:
                    for item in value:
                        target.add().CopyFrom(item)
                else:
                    target.extend(value)
            elif descriptor.message_type is not None:
                target.CopyFrom(value)
            else:
                setattr(new, name, value)
        _recover_v1_params(old, new)
    return upgraded


def _read_bytes(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CaffeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CaffeError(f"{path}: is a directory, expected a file") from None
    except OSError as error:
        raise CaffeError(f"{path}: cannot read ({error.strerror})") from None


@dataclass(frozen=True)
class UnknownField:
    """A field our schema lacks (a fork's), skipped while reading: where it was and what it was called.

    A known field given an enum value our schema lacks (Intel Caffe's `engine: MKLDNN`) is one too (`known`).
    """

    source: str
    line: int | None  # text files only
    layer: str | None  # the layer it sits in; None at the net's level
    field: str  # its path from the layer (or net), e.g. "pooling_param.ceil_mode"; a number in a binary
    type: str | None = None  # the layer's type
    value: str | None = None  # the value as written, for a scalar (text files only)
    known: bool = False  # the field is known, its enum `value` is not

    @property
    def where(self) -> str:
        """'file:line: layer 'name' (Type)' or 'file: the net'."""
        place = f"{self.source}:{self.line}" if self.line is not None else self.source
        if self.layer is None:
            return f"{place}: the net"
        return f"{place}: layer {self.layer!r}" + (f" ({self.type})" if self.type else "")

    @property
    def what(self) -> str:
        """'field 'a.b'' or 'field 'a.b' value X'."""
        return f"field {self.field!r}" + (f" value {self.value}" if self.known else "")

    def describe(self) -> str:
        return f"{self.where}: {self.what} is unknown to our Caffe schema (a fork's?), ignored"


_LAYER_MESSAGES = ("LayerParameter", "V1LayerParameter", "V0LayerParameter")


def _layer_type(message) -> str | None:
    """A layer message's type as the converted layer will have it (V1 enums by their upgraded name)."""
    name = message.DESCRIPTOR.name
    if name == "V1LayerParameter":
        if not message.HasField("type"):
            return None
        enum_name = caffe_pb2.V1LayerParameter.LayerType.Name(message.type)
        return _V1_TYPE_NAMES.get(enum_name, enum_name)
    return message.type or None


def _unknown_enum(field, token: str) -> bool:
    """Whether `token` names no value of the enum field (a fork's value) rather than being a syntax error."""
    values = field.enum_type.values_by_name
    if token in values:
        return False
    try:
        number = int(token, 0)
    except ValueError:
        return bool(token) and (token[0].isalpha() or token[0] == "_")
    return number not in field.enum_type.values_by_number


def _recording_parser(found: list):
    """A text parser that skips fields the schema lacks and records each (protobuf's own only skips); a known
    enum field given a value the schema lacks (a fork's) is recorded and skipped the same way.

    Builds on text_format._Parser's hooks, stable since protobuf 3; None where they are missing.
    """
    from google.protobuf import descriptor, text_format

    base = getattr(text_format, "_Parser", None)
    if base is None or not all(hasattr(base, hook) for hook in
                               ("_MergeField", "_MergeMessageField", "_SkipFieldContents", "_MergeScalarField",
                                "_SkipFieldValue")):
        return None

    class Recording(base):
        def __init__(self) -> None:
            super().__init__(allow_unknown_field=True)
            self.frames: list[list] = []  # [field name, layer message or None] per open message field
            self.skipping = 0
            self.scalar_pending = False

        def _MergeMessageField(self, tokenizer, message, field):
            self.frames.append([field.name, None])
            try:
                return super()._MergeMessageField(tokenizer, message, field)
            finally:
                self.frames.pop()

        def _MergeField(self, tokenizer, message):
            if self.frames and self.frames[-1][1] is None and message.DESCRIPTOR.name in _LAYER_MESSAGES:
                self.frames[-1][1] = message
            return super()._MergeField(tokenizer, message)

        def _record(self, tokenizer, name: str, value: str | None = None, known: bool = False) -> None:
            start = next((i for i in range(len(self.frames) - 1, -1, -1) if self.frames[i][1] is not None), None)
            path = [frame[0] for frame in self.frames[start + 1 if start is not None else 0:]] + [name]
            layer = self.frames[start][1] if start is not None else None
            line = getattr(tokenizer, "_line", None)
            found.append((line + 1 if isinstance(line, int) else None, layer, ".".join(path), value, known))

        def _MergeScalarField(self, tokenizer, message, field):
            if field.type == descriptor.FieldDescriptor.TYPE_ENUM and _unknown_enum(field, tokenizer.token):
                if self.frames and self.frames[-1][1] is None and message.DESCRIPTOR.name in _LAYER_MESSAGES:
                    self.frames[-1][1] = message
                self._record(tokenizer, field.name, tokenizer.token, known=True)
                tokenizer.NextToken()
                return None
            return super()._MergeScalarField(tokenizer, message, field)

        def _SkipRepeatedFieldValue(self, tokenizer, *args):
            self.scalar_pending = False  # a list has no one value
            return super()._SkipRepeatedFieldValue(tokenizer, *args)

        def _SkipFieldValue(self, tokenizer):
            # The value of an unknown scalar field (not of one inside an unknown message), as written.
            if self.skipping == 1 and found and found[-1][3] is None and self.scalar_pending:
                found[-1] = (*found[-1][:3], tokenizer.token, False)
            self.scalar_pending = False
            return super()._SkipFieldValue(tokenizer)

        def _SkipFieldContents(self, tokenizer, *args):
            if not self.skipping:
                self._record(tokenizer, args[0] if args and isinstance(args[0], str) else "?")
                self.scalar_pending = True
            self.skipping += 1
            try:
                return super()._SkipFieldContents(tokenizer, *args)
            finally:
                self.skipping -= 1

    return Recording()


def read_prototxt(path: str | os.PathLike, unknown: list[UnknownField] | None = None) -> caffe_pb2.NetParameter:
    """Parse a text-format net definition; syntax errors name file, line and column.

    With `unknown`, fields our schema lacks are skipped and listed there; without, they are errors.
    """
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CaffeError(f"{path}: not a text prototxt (byte {error.start} is not UTF-8)") from None
    return parse_prototxt(text, str(path), unknown)


def _parse_error(error, source: str) -> CaffeError:
    line, column = error.GetLine(), error.GetColumn()
    message = str(error)
    # The runtime prefixes "line:column : "; keep only the reason after it.
    if " : " in message:
        message = message.split(" : ", 1)[1]
    return CaffeError(f"{source}:{line}:{column}: {message}" if line is not None else f"{source}: {message}")


def parse_prototxt(text: str, source: str = "<prototxt>",
                   unknown: list[UnknownField] | None = None) -> caffe_pb2.NetParameter:
    from google.protobuf import text_format

    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as error:
        if unknown is None or not any(text in str(error) for text in ("has no field named", "has no value named",
                                                                       "has no value with number")):
            raise _parse_error(error, source) from None
        net = caffe_pb2.NetParameter()
        found: list = []
        parser = _recording_parser(found)
        try:
            if parser is not None:
                parser.ParseLines(text.split("\n"), net)
            else:
                if "has no field named" not in str(error):
                    raise _parse_error(error, source) from None
                text_format.Parse(text, net, allow_unknown_field=True)
                found.append((error.GetLine(), None, str(error).rsplit("named", 1)[-1].strip(' ."'), None, False))
        except text_format.ParseError as second:
            raise _parse_error(second, source) from None
        # A layer's name may come after the unknown field, so names are read once the whole file is in.
        unknown.extend(UnknownField(source, line, (layer.name or "(unnamed)") if layer is not None else None, path,
                                    _layer_type(layer) if layer is not None else None, value, known)
                       for line, layer, path, value, known in found)
    return _upgrade_v1(net, source)


def read_caffemodel(path: str | os.PathLike) -> caffe_pb2.NetParameter:
    """Parse a binary NetParameter (current or V1 format); garbage and truncation give a CaffeError."""
    return parse_caffemodel(_read_bytes(path), str(path))


# Upstream BVLC numbers these params 143-148, which our schema gives to the fork's params (see
# caffe.proto). In a binary written by upstream Caffe they therefore decode into the fork's
# message; the fork has none of these layer types, so the type says which one was meant. The
# same holds for other forks' params on numbers our schema has given away.
_UPSTREAM_PARAMS = {
    "Input": ("interp_param", "input_param"),
    "Crop": ("seg_accuracy_param", "crop_param"),
    "Parameter": ("mat_write_param", "parameter_param"),
    "Recurrent": ("dense_crf_param", "recurrent_param"),
    "RNN": ("dense_crf_param", "recurrent_param"),
    "LSTM": ("dense_crf_param", "recurrent_param"),
    "Swish": ("domain_transform_param", "swish_param"),
    "Clip": ("adaptive_bias_channel_param", "clip_param"),
    # Other forks' params on numbers this schema gives to another message (see caffe.proto).
    "Upsample": ("embed_param", "upsample_param"),  # SegNet 137
    "ROIPooling": ("domain_transform_param", "roi_pooling_param"),  # Microsoft/caffe 147
    "PSROIPooling": ("bias_channel_param", "psroi_pooling_param"),  # Microsoft/caffe 149
    "CropCenter": ("bias_channel_param", "crop_center_param"),  # lltcggie/caffe 149
    "Reorg": ("bias_channel_param", "reorg_param"),  # MobileNet-YOLO 149
}


# The recurrent, OCR and cascade forks' params (caffe.proto's last block), by the number each fork gives them; a
# type may have several sources (one per fork). Numbers our schema does not know stay unknown fields.
_FORK_PARAMS = {
    "Lstm": (("elu_param", "lstm_param"), ("roi_pooling_param", "lstm_param")),  # CTPN 140, senlinuc 8266711
    "Transpose": (("scale_param", "transpose_param"),),  # CTPN 142
    "Reverse": (("domain_transform_param", "reverse_param"), ("interp_param", "reverse_param")),  # ctc 147, CTPN 143
    "CTCGreedyDecoder": (("bias_channel_param", "ctc_decoder_param"),),  # BVLC's ctc branch 149
    "DenseBlock": (("domain_transform_param", "denseblock_param"),),  # senlinuc/caffe_ocr 147
    "ROIAlign": (("domain_transform_param", "roi_pooling_param"),),  # cascade-rcnn / mscnn 147
    "DecodeBBox": (("unique_label_param", "bbox_reg_param"),),  # cascade-rcnn 150
    "BoxGroupOutput": (("unique_label_param", "bbox_reg_param"),),  # cascade-rcnn 150
    "BoxOutput": (("mat_read_param", "box_output_param"),),  # mscnn 151
}


def _recover_upstream_params(net: caffe_pb2.NetParameter) -> None:
    """Re-read an upstream layer's param from the fork message it decoded into (same wire bytes)."""
    for layer in net.layer:
        sources = _FORK_PARAMS.get(layer.type, ()) + ((_UPSTREAM_PARAMS[layer.type],)
                                                       if layer.type in _UPSTREAM_PARAMS else ())
        for names in sources:
            if not layer.HasField(names[0]) or layer.HasField(names[1]):
                continue
            wire = getattr(layer, names[0]).SerializePartialToString(deterministic=True)
            getattr(layer, names[1]).ParseFromString(wire)
            layer.ClearField(names[0])


def _text_prototxt() -> str:
    return f"this is a text prototxt: pass it with {term('--prototxt', 'prototxt=')} (or use inspect)"


def _is_text_net(data: bytes) -> bool:
    """Whether the bytes are a text-format net definition (what a user may give in place of weights)."""
    try:
        parse_prototxt(data.decode("utf-8"), unknown=[])  # a fork's fields do not make it less a prototxt
    except (UnicodeDecodeError, CaffeError):
        return False
    return True


def parse_caffemodel(data: bytes, source: str = "<caffemodel>") -> caffe_pb2.NetParameter:
    from google.protobuf.message import DecodeError

    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(data)
    except Exception as error:  # noqa: BLE001 - any runtime's decoder failure is a bad file, not a bug of ours
        if _is_text_net(data):
            raise CaffeError(f"{source}: {_text_prototxt()}") from None
        reason = str(error) if isinstance(error, (DecodeError, RuntimeError, ValueError, UnicodeDecodeError)) \
            else f"{type(error).__name__}: {error}"
        raise CaffeError(f"{source}: not a valid caffemodel (protobuf decoding failed: {reason})") from None
    if not net.layer and not net.layers:
        if data and _is_text_net(data):
            raise CaffeError(f"{source}: {_text_prototxt()}")
        raise CaffeError(f"{source}: not a valid caffemodel (it holds no layers)")
    bad = _undecodable_string(net, "")
    if bad is not None:
        field, value = bad
        raise CaffeError(f"{source}: not a valid caffemodel ({field} holds bytes that are not UTF-8, "
                         f"{_bytes_text(value)}: a damaged file)")
    net = _upgrade_v1(net, source)
    _recover_upstream_params(net)
    for layer in net.layer:
        for index, blob in enumerate(layer.blobs):
            blob_shape(blob, f"{source}: layer {layer.name!r} blob {index}")
    return net


def unknown_binary_fields(net: caffe_pb2.NetParameter, source: str) -> list[UnknownField]:
    """The fields of a binary net our schema lacks (kept undecoded by protobuf), by layer and number."""
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet
    except ImportError:  # protobuf < 4.22: nothing to list
        return []

    def walk(message, path: list[str]) -> list[str]:
        found = [".".join([*path, f"#{item.field_number}"]) for item in UnknownFieldSet(message)]
        for descriptor, value in message.ListFields():
            if descriptor.message_type is None or descriptor.message_type.name == "BlobProto":
                continue
            for item in (value if _is_repeated(descriptor) else [value]):
                found += walk(item, [*path, descriptor.name])
        return found

    fields = [UnknownField(source, None, None, f"#{item.field_number}") for item in UnknownFieldSet(net)]
    for layer in net.layer:
        fields += [UnknownField(source, None, layer.name, path, layer.type or None) for path in walk(layer, [])]
    return fields


def ambiguous_binary_fields(net: caffe_pb2.NetParameter, source: str) -> list[str]:
    """Warnings for binary fields two Caffe versions number alike with different meanings (text names differ)."""
    found = []
    for layer in net.layer:
        if layer.type == "Pooling" and layer.pooling_param.HasField("round_mode"):
            mode = caffe_pb2.PoolingParameter.RoundMode.Name(layer.pooling_param.round_mode)
            found.append(f"{source}: layer {layer.name!r}: Pooling field 13 is read as BVLC's round_mode ({mode}); "
                         f"the ceil_mode forks store ceil_mode there with 0 and 1 swapped, synopsys-caffe its "
                         f"pad_type: give the deploy prototxt if the model comes from one")
        if layer.type in ("Convolution", "Deconvolution") and layer.convolution_param.HasField("pad_type"):
            found.append(f"{source}: layer {layer.name!r}: Convolution field 19 is read as synopsys-caffe's pad_type "
                         f"({layer.convolution_param.pad_type}); DeepLab v1 stores hole_w there: give the deploy "
                         f"prototxt if the model comes from DeepLab v1")
        if layer.type == "InnerProduct" and layer.inner_product_param.HasField("relu"):
            found.append(f"{source}: layer {layer.name!r}: InnerProduct field 8 is read as Intel Caffe's relu "
                         f"({str(layer.inner_product_param.relu).lower()}); happynear's forks (NormFace, AM-Softmax) "
                         f"store normalize there: give the deploy prototxt if the model comes from one")
    return found


def _undecodable_string(message, path: str) -> tuple[str, bytes] | None:
    """The first string field that is not UTF-8, as (field path, its bytes): protobuf hands a proto2
    string that is not UTF-8 back as bytes (or raises when it is first read), so a damaged name would
    fail far from here. Blobs hold no strings."""
    for descriptor, value in message.ListFields():
        repeated = _is_repeated(descriptor)
        for index, item in enumerate(value if repeated else [value]):
            where = f"{path}.{descriptor.name}".lstrip(".") + (f"[{index}]" if repeated else "")
            if descriptor.message_type is not None:
                if descriptor.message_type.name != "BlobProto":
                    found = _undecodable_string(item, where)
                    if found is not None:
                        return found
            elif descriptor.type == descriptor.TYPE_STRING and isinstance(item, bytes):
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError:
                    return where, item
    return None


def _bytes_text(value: bytes) -> str:
    """Bytes that are not UTF-8, shown as a Python bytes literal (cut after 60)."""
    return repr(value[:60]) + (" ..." if len(value) > 60 else "")


def h5_name(key: str | bytes, what: str, path: str | os.PathLike) -> str:
    """A name read from an HDF5 file: h5py returns names that are not UTF-8 as bytes, which would fail
    later as a TypeError; one line naming the file and the bytes instead."""
    if isinstance(key, bytes):
        raise CaffeError(f"{path}: {what} {_bytes_text(key)} is not UTF-8 text (a damaged file?)")
    return key


# NVCaffe's raw_data types a blob can be read from (its Blob::FromProto refuses the others).
_RAW_TYPES = {caffe_pb2.BlobProto.FLOAT16: np.dtype("<f2"), caffe_pb2.BlobProto.FLOAT: np.dtype("<f4"),
              caffe_pb2.BlobProto.DOUBLE: np.dtype("<f8")}


def _raw_dtype(blob: caffe_pb2.BlobProto, where: str) -> np.dtype:
    if not blob.HasField("raw_data_type"):
        raise CaffeError(f"{where}: raw_data without raw_data_type (NVCaffe refuses it too)")
    dtype = _RAW_TYPES.get(blob.raw_data_type)
    if dtype is None:
        name = caffe_pb2.BlobProto.RawType.Name(blob.raw_data_type)
        raise CaffeError(f"{where}: raw_data of type {name}, which NVCaffe cannot read as a blob either")
    if len(blob.raw_data) % dtype.itemsize:
        raise CaffeError(f"{where}: raw_data of {len(blob.raw_data)} bytes is not a whole number of "
                         f"{caffe_pb2.BlobProto.RawType.Name(blob.raw_data_type)} values")
    return dtype


def _value_count(blob: caffe_pb2.BlobProto, where: str) -> int:
    """How many values the blob stores, from the field Caffe reads: double_data, else data, else NVCaffe's raw_data."""
    if len(blob.double_data):
        return len(blob.double_data)
    if len(blob.data):
        return len(blob.data)
    if blob.HasField("raw_data"):
        return len(blob.raw_data) // _raw_dtype(blob, where).itemsize
    return 0


def blob_shape(blob: caffe_pb2.BlobProto, where: str) -> tuple[int, ...]:
    """The blob's shape: `shape`, else legacy num/channels/height/width, else 1-D from the data length."""
    count = _value_count(blob, where)
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    elif any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = (count,)
    if any(d < 0 for d in shape):
        raise CaffeError(f"{where}: negative dimension in shape {shape}")
    expected = math.prod(shape)  # Python integers: a product past int64 cannot wrap into a plausible count
    if expected != count:
        raise CaffeError(f"{where}: shape {shape} needs {expected} values, the file holds {count}")
    return shape


def blob_to_array(blob: caffe_pb2.BlobProto, where: str = "blob") -> np.ndarray:
    """The blob as float32, read from the field Caffe's Blob::FromProto reads (NVCaffe's float16 raw_data
    widens exactly)."""
    shape = blob_shape(blob, where)
    if len(blob.double_data):
        values = np.asarray(blob.double_data, dtype=np.float64).astype(np.float32)
    elif len(blob.data) or not blob.HasField("raw_data"):
        values = np.asarray(blob.data, dtype=np.float32)
    else:
        values = np.frombuffer(blob.raw_data, dtype=_raw_dtype(blob, where)).astype(np.float32)
    return values.reshape(shape)


def _collect_h5_layers(path, layer_name: str, group, weights: dict[str, list[np.ndarray]]) -> None:
    """Blobs of one layer group; a '/' in a layer name made HDF5 nest the group inside another one.

    Caffe's H5Gcreate succeeds for "conv1/bn" when the group "conv1" exists (the layer "conv1"
    came first), so "conv1" may hold both its own blobs "0", "1" and the group "bn".
    """
    import h5py

    keys = [h5_name(key, f"a name inside layer {layer_name!r}", path) for key in group.keys()]
    numeric = sorted((key for key in keys if key.isdigit()), key=int)
    nested = [key for key in keys if not key.isdigit()]
    for key in nested:
        if not isinstance(group[key], h5py.Group):
            raise CaffeError(f"{path}: layer {layer_name!r} has a non-numeric blob name {key!r}")
        _collect_h5_layers(path, f"{layer_name}/{key}", group[key], weights)
    if any(not isinstance(group[key], h5py.Dataset) for key in numeric):
        raise CaffeError(f"{path}: layer {layer_name!r} holds a group where blob datasets belong")
    if [int(key) for key in numeric] != list(range(len(numeric))) or any(key != str(int(key)) for key in numeric):
        # Caffe's Net::CopyTrainedLayersFromHDF5 reads blobs 0..n-1 by index: a gap is a damaged file.
        raise CaffeError(f"{path}: layer {layer_name!r} has blobs {numeric}, expected 0 to {len(numeric) - 1}")
    for key in numeric:
        dataset = group[key]
        if dataset.dtype.kind != "f" or dataset.size * 4 > _MAX_BLOB_BYTES:
            raise CaffeError(f"{path}: layer {layer_name!r} blob {key} is not a float array of a sane size "
                             f"({dataset.dtype}, shape {dataset.shape})")
    if numeric or not nested:  # a group of nested layers only is no layer itself
        weights[layer_name] = [np.asarray(group[key][()], dtype=np.float32) for key in numeric]


def read_caffemodel_h5(path: str | os.PathLike) -> dict[str, list[np.ndarray]]:
    """Caffe's HDF5 weights (Net::ToHDF5): group /data/<layer name>/<i> per parameter blob.

    Read in a guarded child process: a damaged HDF5 file is an error within seconds, never a hang.
    """
    from caffe2torch.guard import run_bounded, time_limit

    if not Path(path).is_file():
        raise CaffeError(f"{path}: no such file")
    return run_bounded(_read_h5_weights, (Path(path),), time_limit(Path(path).stat().st_size), str(path))


def _read_h5_weights(path: Path) -> dict[str, list[np.ndarray]]:
    import h5py

    try:
        with h5py.File(path, "r") as file:
            if "data" not in file:
                raise CaffeError(f"{path}: not a Caffe HDF5 weights file (no /data group)")
            weights: dict[str, list[np.ndarray]] = {}
            for layer_name in file["data"].keys():
                name = h5_name(layer_name, "the layer name in /data", path)
                _collect_h5_layers(path, name, file["data"][layer_name], weights)
            return weights
    except CaffeError:
        raise
    except Exception as error:  # noqa: BLE001 - h5py raises many types for a corrupt file
        raise CaffeError(f"{path}: not a readable HDF5 file ({error})") from None


def _legacy_canonical(layer_type: str, index: int, array: np.ndarray) -> np.ndarray:
    """Legacy 4-D blobs (num/channels/height/width) in the shape a current layer expects.

    Caffe accepts a legacy blob when its four dims equal the last four of the target shape; the
    only targets of lower rank in V1-era nets are InnerProduct weights and the biases.
    """
    if array.ndim != 4:
        return array
    if index == 1 and layer_type in ("Convolution", "Deconvolution", "InnerProduct") and array.shape[:3] == (1, 1, 1):
        return array.reshape(array.shape[3])
    if index == 0 and layer_type == "InnerProduct" and array.shape[:2] == (1, 1):
        return array.reshape(array.shape[2:])
    return array


def trained_blobs(net: caffe_pb2.NetParameter, source: str) -> dict[str, list[np.ndarray]]:
    """Parameter blobs of a binary NetParameter, keyed by layer name (as CopyTrainedLayersFrom matches them)."""
    weights: dict[str, list[np.ndarray]] = {}
    for layer in net.layer:
        if not layer.blobs:
            continue
        arrays = []
        for index, blob in enumerate(layer.blobs):
            array = blob_to_array(blob, f"{source}: layer {layer.name!r} blob {index}")
            if not blob.HasField("shape"):
                array = _legacy_canonical(layer.type, index, array)
            arrays.append(array)
        weights[layer.name] = arrays
    return weights


def read_weights(path: str | os.PathLike) -> tuple[dict[str, list[np.ndarray]], caffe_pb2.NetParameter | None]:
    """Weights by layer name from a .caffemodel or .caffemodel.h5, with the stored net (blobs removed) when there is one."""
    path = Path(path)
    if path.suffix in (".prototxt", ".pbtxt"):
        raise CaffeError(f"{path}: {_text_prototxt()}")
    if path.suffix in (".h5", ".hdf5"):
        return read_caffemodel_h5(path), None
    net = read_caffemodel(path)
    weights = trained_blobs(net, str(path))
    return weights, without_blobs(net)


def without_blobs(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """The net definition alone, in a new message so the parsed weights are freed with `net`.

    The blobs are cleared from `net` itself first (it is not used afterwards), so no layer's
    weights are ever copied.
    """
    for layer in net.layer:
        del layer.blobs[:]
    stripped = caffe_pb2.NetParameter()
    stripped.CopyFrom(net)
    return stripped


def read_net_definition(path: str | os.PathLike) -> caffe_pb2.NetParameter:
    """A net definition from a prototxt, or the architecture stored in a binary caffemodel."""
    path = Path(path)
    if path.suffix == ".caffemodel":
        return without_blobs(read_caffemodel(path))
    return read_prototxt(path)
