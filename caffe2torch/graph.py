"""The TEST-phase layer list of a net: inputs with shapes, then layers with their bottom and top blob names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from caffe2torch.errors import CaffeError, ShapelessInput, term
from caffe2torch.data_shapes import data_layer_shapes
from proto import caffe_pb2

Shape = tuple[int, ...]

# Layers that read a dataset: in a train/test net given for conversion their tops become the net's inputs.
DATA_TYPES = {"Data", "ImageData", "HDF5Data", "WindowData", "MemoryData", "DummyData", "ImageSegData",
              "AnnotatedData", "DenseImageData", "VideoData",
              # DeconvNet / DecoupledNet's data layers (their V1 types), Intel Caffe's BoxData
              "WindowSegData", "WindowInstSegData", "WindowClsData", "WindowSegBinary", "SelectSegBinary", "BoxData"}
# Layers that only score training or testing: dropped from a conversion (any type named *Loss too). Intel Caffe's
# OHEM losses, the ROI sampler for them and its YOLO scoring (EvalDetection reads the labels).
SCORING_TYPES = {"Accuracy", "SegAccuracy", "HDF5Output", "MatWrite", "DetectionEvaluate", "Silence",
                 "SoftmaxWithLossOHEM", "SmoothL1LossOHEM", "BoxAnnotatorOHEM", "EvalDetection"}


def is_scoring(layer_type: str) -> bool:
    return layer_type in SCORING_TYPES or layer_type.endswith(("Loss", "Accuracy"))


def is_data_layer(param: caffe_pb2.LayerParameter) -> bool:
    """A layer that reads a dataset: a data type, or a layer with no bottoms that no converter claims and that
    is a Python layer (FCN's voc_layers, ...) or a fork's *Data type (HED's ImageLabelmapData, ...)."""
    if param.type in DATA_TYPES:
        return True
    if not param.bottom and (param.type == "Python" or param.type.endswith("Data")):
        from caffe2torch.layers.registry import CONVERTERS, converter_key

        return converter_key(param) not in CONVERTERS
    return False


@dataclass
class Layer:
    """One TEST-phase layer: its parameters and the blob names it reads and writes."""

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    param: caffe_pb2.LayerParameter


@dataclass
class NetGraph:
    name: str
    inputs: dict[str, Shape]
    layers: list[Layer] = field(default_factory=list)
    # Blobs a Silence layer consumed, with the number of layers before it: they are no net outputs.
    silenced: dict[str, int] = field(default_factory=dict)
    # What was changed to make a train/test net a deployable one, one line each.
    notes: list[str] = field(default_factory=list)


def _rule_matches(rule: caffe_pb2.NetStateRule, state: caffe_pb2.NetState) -> bool:
    """Caffe's Net::StateMeetsRule."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(stage not in stages for stage in rule.stage):
        return False
    if any(stage in stages for stage in rule.not_stage):
        return False
    return True


def included(layer: caffe_pb2.LayerParameter, state: caffe_pb2.NetState) -> bool:
    """Caffe's Net::FilterNet for one layer: include rules if any, else exclude rules."""
    if layer.include and layer.exclude:
        raise CaffeError(f"layer {layer.name!r}: specifies both include and exclude rules")
    if layer.include:
        return any(_rule_matches(rule, state) for rule in layer.include)
    return not any(_rule_matches(rule, state) for rule in layer.exclude)


def _rule_text(rule: caffe_pb2.NetStateRule) -> str:
    parts = [f"phase: {caffe_pb2.Phase.Name(rule.phase)}"] if rule.HasField("phase") else []
    parts += [f"stage: {stage!r}" for stage in rule.stage] + [f"not_stage: {stage!r}" for stage in rule.not_stage]
    parts += [f"{name}: {getattr(rule, name)}" for name in ("min_level", "max_level") if rule.HasField(name)]
    return "{ " + " ".join(parts) + " }"


def _stages_that_include(layer: caffe_pb2.LayerParameter, state: caffe_pb2.NetState) -> list[str] | None:
    """The stages to add to `state` so that one of the layer's include rules takes it (the fewest), or None when
    no stage can (a rule of another phase, a level, a not_stage the state has)."""
    options = []
    for rule in layer.include:
        if rule.HasField("phase") and rule.phase != state.phase or rule.HasField("min_level") or \
                rule.HasField("max_level") or any(stage in state.stage for stage in rule.not_stage):
            continue
        missing = [stage for stage in rule.stage if stage not in state.stage]
        if missing:
            options.append(missing)
    return min(options, key=len) if options else None


def _left_out_producer(net: caffe_pb2.NetParameter, blob: str, state: caffe_pb2.NetState) -> str:
    """Why a bottom has no producer when a layer the net's state leaves out makes it (Caffe's Net refuses such a
    net too): that layer and its rules, and the stages that would take it in; "" otherwise."""
    makers = [layer for layer in net.layer if blob in layer.top and not included(layer, state)]
    if not makers:
        return ""
    # a maker that stages can take in comes first (LRCN's data layers for 'test-on-train' / 'test-on-val')
    options = [(maker, _stages_that_include(maker, state)) for maker in makers]
    layer, stages = next((option for option in options if option[1]), options[0])
    rules = " or ".join(f"include {_rule_text(rule)}" for rule in layer.include) or \
        " or ".join(f"exclude {_rule_text(rule)}" for rule in layer.exclude)
    phase = caffe_pb2.Phase.Name(state.phase)
    if stages:
        pick = term(" ".join(f"--stage {stage}" for stage in stages), f"stages={stages!r}")
        lines = " ".join(f'stage: "{stage}"' for stage in stages)
        hint = (f"; to build the net of that stage, give {pick} (or add `state {{ {lines} }}` to the definition; "
                f"Caffe's test nets get theirs from the solver)")
    elif any(rule.HasField("phase") and rule.phase != state.phase for rule in layer.include):
        hint = f"; Caffe refuses this net in the {phase} phase too (a definition for another phase?)"
    else:
        hint = "; Caffe refuses this net with this state too"
    return (f" (layer {layer.name!r} ({layer.type}) makes it, but the {phase} phase"
            f"{' with stages ' + repr(list(state.stage)) if state.stage else ''} leaves it out: {rules}){hint}")


def kept_layers(net: caffe_pb2.NetParameter, phase: int = caffe_pb2.TEST) -> set[str]:
    """Names of the layers a conversion keeps (build_graph's filter, without shapes): those of the phase that
    are no Input, Silence, data or scoring layer."""
    state = caffe_pb2.NetState()
    state.CopyFrom(net.state)
    state.phase = phase
    return {layer.name or "(unnamed)" for layer in net.layer
            if included(layer, state) and layer.type not in ("Input", "Silence") and not is_data_layer(layer)
            and not is_scoring(layer.type)}


def _declared_inputs(net: caffe_pb2.NetParameter, source: str) -> dict[str, Shape]:
    """Inputs from `input` with `input_shape` (one per input) or legacy `input_dim` (four per input)."""
    names = list(net.input)
    if net.input_shape and net.input_dim:
        raise CaffeError(f"{source}: gives both input_shape and input_dim")
    if net.input_shape:
        if len(net.input_shape) != len(names):
            raise CaffeError(f"{source}: {len(names)} inputs but {len(net.input_shape)} input_shape entries")
        shapes = [tuple(int(d) for d in s.dim) for s in net.input_shape]
    elif net.input_dim:
        if len(net.input_dim) != 4 * len(names):
            raise CaffeError(f"{source}: {len(names)} inputs need {4 * len(names)} input_dim values, got {len(net.input_dim)}")
        dims = [int(d) for d in net.input_dim]
        shapes = [tuple(dims[4 * i : 4 * i + 4]) for i in range(len(names))]
    elif names:
        shapes = [()] * len(names)
    else:
        shapes = []
    return dict(zip(names, shapes))


def build_graph(
    net: caffe_pb2.NetParameter,
    source: str = "<net>",
    input_shapes: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    phase: int = caffe_pb2.TEST,
    assumed_size: tuple[int, int] | None = None,
) -> NetGraph:
    """Filter the net for `phase`, resolve inputs (declared, `Input` layers, overrides) and check the wiring.

    `input_shapes` overrides declared shapes: a mapping by input name, or one shape for a net with
    a single input (e.g. batch 1 for a deploy file written for batch 10). `assumed_size` (H, W) stands
    in, with a note, for the size a data layer does not say (for describing a net, never for converting one).
    """
    state = caffe_pb2.NetState()
    state.CopyFrom(net.state)
    state.phase = phase
    inputs = _declared_inputs(net, source)
    graph = NetGraph(name=net.name, inputs={})
    graph.inputs.update(inputs)
    available = set(inputs)
    readers: dict[str, str] = {}  # a data layer's top -> that layer, for messages

    for param in net.layer:
        if not included(param, state):
            continue
        if param.type == "Input":
            shapes = [tuple(int(d) for d in s.dim) for s in param.input_param.shape]
            if len(shapes) not in (1, len(param.top)):
                raise CaffeError(f"layer {param.name!r} (Input): {len(param.top)} tops but {len(shapes)} shapes")
            for index, top in enumerate(param.top):
                graph.inputs[top] = shapes[0] if len(shapes) == 1 else shapes[index]
                available.add(top)
            continue
        if param.type == "Silence":
            # Silence computes nothing; it only marks its bottoms as used, so it needs no module.
            missing = [bottom for bottom in param.bottom if bottom not in available]
            if missing:
                raise CaffeError(f"layer {param.name!r} (Silence): bottoms {missing} are not produced by any earlier layer or "
                                 f"input{_left_out_producer(net, missing[0], state)}")
            if param.top:
                raise CaffeError(f"layer {param.name!r} (Silence): takes no tops, got {list(param.top)}")
            graph.silenced.update({bottom: len(graph.layers) for bottom in param.bottom})
            continue
        if is_data_layer(param):
            kind = param.type if param.type != "Python" else \
                f"Python {param.python_param.module}.{param.python_param.layer}"
            for top, shape in zip(param.top, data_layer_shapes(param)):
                graph.inputs[top] = shape
                readers[top] = f"layer {param.name!r} ({kind})"
                available.add(top)
            graph.notes.append(f"layer {param.name!r} ({param.type}) reads a dataset: its tops "
                               f"{', '.join(map(repr, param.top))} are taken as the net's inputs")
            continue
        if is_scoring(param.type):
            graph.notes.append(f"layer {param.name!r} ({param.type}) only scores training or testing: left out")
            continue
        for bottom in param.bottom:
            if bottom not in available:
                raise CaffeError(f"layer {param.name!r} ({param.type}): bottom {bottom!r} is not produced by any earlier "
                                 f"layer or input{_left_out_producer(net, bottom, state)}")
        for index, top in enumerate(param.top):
            # Caffe's Net::AppendTop: a top may reuse a name only in place (the bottom at the same index).
            in_place = index < len(param.bottom) and param.bottom[index] == top
            if top in available and not in_place:
                raise CaffeError(f"layer {param.name!r} ({param.type}): top {top!r} is produced by multiple sources "
                                 f"(an earlier layer or input writes it, and this layer does not work in place); "
                                 f"Caffe refuses this net")
        if len(set(param.top)) != len(param.top):
            raise CaffeError(f"layer {param.name!r} ({param.type}): names a top twice {list(param.top)}")
        available.update(param.top)
        graph.layers.append(Layer(param.name, param.type, list(param.bottom), list(param.top), param))

    _drop_unread_inputs(graph, set(readers))
    _apply_overrides(graph, input_shapes, source)
    for name, shape in graph.inputs.items():
        if not shape and name in readers and assumed_size is not None:
            # Images are colour unless the blob is a label map (one value per pixel); the batch is that of the
            # layer's other tops (its labels), else 1.
            batches = [s[0] for other, s in graph.inputs.items() if s and readers.get(other) == readers[name]]
            shape = graph.inputs[name] = (batches[0] if batches else 1, 1 if "label" in name.lower() else 3) + \
                tuple(assumed_size)
            graph.notes.append(f"input {name!r} (from data {readers[name]}) has no size in the net: shown for "
                               f"{'x'.join(map(str, shape))}; give {term('--input-shape', 'input_shape=')} for the size you use")
        if not shape:
            origin = f" (data {readers[name]} does not say its size)" if name in readers else ""
            raise ShapelessInput(f"{source}: input {name!r} has no shape{origin}; give one with "
                                 f"{term('--input-shape', 'input_shape=')}")
        if any(d <= 0 for d in shape):
            raise CaffeError(f"{source}: input {name!r} has a non-positive dimension in shape {shape}")
    _resolve_auto_crops(graph)
    _resolve_textboxes_priors(graph)
    _resolve_faceboxes_priors(graph)
    names = [layer.name for layer in graph.layers]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        # Caffe accepts this; its CopyTrainedLayersFrom gives the weights of a name to the last layer of that name.
        graph.notes.append(f"layer names used more than once: {', '.join(map(repr, duplicates[:5]))}; each gets a "
                           f"module of its own")
    return graph


def _resolve_auto_crops(graph: NetGraph) -> None:
    """HED / RCF's AutoCrop takes its offsets from the whole net: worked out here and written into a copy of
    the layer's crop_param (axis 2), which its converter reads."""
    from caffe2torch.coords import auto_crop_offsets

    crops: dict[str, tuple[int, int]] = {}
    for index, layer in enumerate(graph.layers):
        if layer.type != "AutoCrop":
            continue
        offsets = crops[layer.name] = auto_crop_offsets(graph.layers, index, crops)
        param = caffe_pb2.LayerParameter()
        param.CopyFrom(layer.param)
        param.crop_param.axis = 2
        param.crop_param.ClearField("offset")
        param.crop_param.offset.extend(offsets)
        layer.param = param


def _prediction_heads(graph: NetGraph) -> Callable[[Layer, int], bool] | None:
    """For an SSD-style net (one with DetectionOutput): whether a PriorBox's feature map feeds the location and
    confidence convolutions of `count` priors a cell; None for other nets. The forks that change PriorBox under
    its own type and params (TextBoxes, FaceBoxes) are told apart by these."""
    outputs = [layer for layer in graph.layers if layer.type == "DetectionOutput"]
    if not outputs:
        return None
    param = outputs[0].param.detection_output_param
    loc_classes = 1 if param.share_location else max(int(param.num_classes), 1)
    classes = int(param.num_classes)
    convolutions: dict[str, set[int]] = {}
    for layer in graph.layers:
        if layer.type == "Convolution" and layer.bottoms:
            convolutions.setdefault(layer.bottoms[0], set()).add(int(layer.param.convolution_param.num_output))

    def predicts(prior: Layer, count: int) -> bool:
        return {4 * count * loc_classes, count * classes} <= convolutions.get(prior.bottoms[0], set())

    return predicts


def _with_prior_flag(layer: Layer, flag: str) -> caffe_pb2.LayerParameter:
    """A copy of a PriorBox layer's param with prior_box_param.`flag` set (the graph's own; the net stays as read)."""
    param = caffe_pb2.LayerParameter()
    param.CopyFrom(layer.param)
    setattr(param.prior_box_param, flag, True)
    return param


def _resolve_textboxes_priors(graph: NetGraph) -> None:
    """TextBoxes (MhLiao/TextBoxes) always follows each prior box by a copy half a cell lower, where SSD's
    PriorBox (same type, same params) does not; TextBoxes++ made it the option denser_prior_boxes. A PriorBox
    whose feature map feeds location and confidence convolutions of twice SSD's outputs (and not SSD's) is TextBoxes':
    its param gets denser_prior_boxes, with a note."""
    from caffe2torch.layers.detection import prior_sizes

    predicts = _prediction_heads(graph)
    if predicts is None:
        return
    for layer in graph.layers:
        if layer.type != "PriorBox" or not layer.bottoms or layer.param.prior_box_param.HasField("denser_prior_boxes"):
            continue
        try:
            count = prior_sizes(layer.param)[1]
        except CaffeError:
            continue  # the converter reports it
        if predicts(layer, 2 * count) and not predicts(layer, count):
            layer.param = _with_prior_flag(layer, "denser_prior_boxes")
            graph.notes.append(f"layer {layer.name!r} (PriorBox): its map's location convolution predicts twice "
                               f"SSD's {count} priors a cell: TextBoxes' (MhLiao/TextBoxes) denser boxes, which that "
                               f"fork always makes")


def _resolve_faceboxes_priors(graph: NetGraph) -> None:
    """FaceBoxes' fork (sfzhang15/FaceBoxes) hard-codes its PriorBox under SSD's type and params: densified anchors
    for min_size 32 and 64 and boxes of side min_size - 1. When one PriorBox's map feeds location and confidence
    convolutions of FaceBoxes' prior count (and not SSD's), every PriorBox of the net is FaceBoxes' (one fork built
    it): their params get faceboxes_anchors, with a note."""
    from caffe2torch.layers.detection import prior_sizes

    predicts = _prediction_heads(graph)
    priors = [layer for layer in graph.layers if layer.type == "PriorBox" and layer.bottoms]
    if predicts is None or any(layer.param.prior_box_param.HasField("faceboxes_anchors") for layer in priors):
        return
    for layer in priors:
        try:
            ssd = prior_sizes(layer.param)[1]
            faceboxes = prior_sizes(_with_prior_flag(layer, "faceboxes_anchors"))[1]
        except CaffeError:
            continue  # the converter reports it
        if ssd != faceboxes and predicts(layer, faceboxes) and not predicts(layer, ssd):
            for prior in priors:
                prior.param = _with_prior_flag(prior, "faceboxes_anchors")
            graph.notes.append(f"layer {layer.name!r} (PriorBox): its map's location convolution predicts "
                               f"{faceboxes} priors a cell where SSD's PriorBox makes {ssd}: FaceBoxes' anchors "
                               f"(sfzhang15/FaceBoxes' fork), for every PriorBox of the net")
            return


def _drop_unread_inputs(graph: NetGraph, from_data: set[str]) -> None:
    """Inputs nothing reads any more once scoring layers are left out: a data layer's labels (whatever their
    shape), and declared inputs without a shape."""
    read = {bottom for layer in graph.layers for bottom in layer.bottoms}
    for name in [name for name, shape in graph.inputs.items() if name not in read and (not shape or name in from_data)]:
        del graph.inputs[name]
        graph.notes.append(f"input {name!r} feeds only layers left out: dropped")


def _apply_overrides(graph: NetGraph, overrides, source: str) -> None:
    if overrides is None:
        return
    if not isinstance(overrides, Mapping):
        if len(graph.inputs) != 1:
            raise CaffeError(f"{source}: the net has {len(graph.inputs)} inputs; name the one to reshape")
        overrides = {next(iter(graph.inputs)): overrides}
    for name, shape in overrides.items():
        if name not in graph.inputs:
            raise CaffeError(f"{source}: no input named {name!r} (inputs: {', '.join(graph.inputs)})")
        graph.inputs[name] = tuple(int(d) for d in shape)


def output_blobs(graph: NetGraph) -> list[str]:
    """Caffe's net outputs: blobs written and never read afterwards, sorted by name (Caffe keeps them in a std::set)."""
    last_read: dict[str, int] = {}
    last_write: dict[str, int] = {}
    for index, layer in enumerate(graph.layers):
        for bottom in layer.bottoms:
            last_read[bottom] = index
        for top in layer.tops:
            last_write[top] = index
    for blob, position in graph.silenced.items():
        last_read[blob] = max(last_read.get(blob, -1), position)
    # An in-place layer reads and writes its blob at the same index: still an output if nothing reads it later.
    outputs = [blob for blob, index in last_write.items() if last_read.get(blob, -1) <= index]
    return sorted(outputs)
