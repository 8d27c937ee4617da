"""Small nets, one per fork layer type, whose params the fuzz test in test_robustness.py makes hostile: NaN,
infinities, zeros, negatives, 2^31 - 1, 2^32 - 1, 2^63 - 1 (seeded, so the same nets on every run)."""

from __future__ import annotations

import numpy as np

# A small net per fork layer type; `{param}` takes its params (and `{nms}` DetectionOutput's nms_param).
_IMAGE = 'input: "data" input_shape { dim: 1 dim: 8 dim: 8 dim: 8 }\n'
_SSD_HEAD = ('input: "data" input_shape { dim: 1 dim: 3 dim: 32 dim: 32 }\n'
             'input: "feat" input_shape { dim: 1 dim: 4 dim: 4 dim: 4 }\n'
             'layer { name: "loc" type: "Convolution" bottom: "feat" top: "loc" convolution_param { num_output: 8 '
             'kernel_size: 1 } }\n'
             'layer { name: "lp" type: "Permute" bottom: "loc" top: "lp" permute_param { order: 0 order: 2 order: 3 '
             'order: 1 } }\n'
             'layer { name: "lf" type: "Flatten" bottom: "lp" top: "lf" }\n'
             'layer { name: "conf" type: "Convolution" bottom: "feat" top: "conf" convolution_param { num_output: 6 '
             'kernel_size: 1 } }\n'
             'layer { name: "cs" type: "Sigmoid" bottom: "conf" top: "cs" }\n'
             'layer { name: "cp" type: "Permute" bottom: "cs" top: "cp" permute_param { order: 0 order: 2 order: 3 '
             'order: 1 } }\n'
             'layer { name: "cf" type: "Flatten" bottom: "cp" top: "cf" }\n'
             'layer { name: "prior" type: "PriorBox" bottom: "feat" bottom: "data" top: "prior" prior_box_param { '
             'min_size: 8 aspect_ratio: 2 flip: false variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 } }\n'
             'layer { name: "det" type: "DetectionOutput" bottom: "lf" bottom: "cf" bottom: "prior" top: "det" '
             'detection_output_param { nms_param { {nms} } {param} } }\n')
_ROIS = 'input: "data" input_shape { dim: 1 dim: 8 dim: 6 dim: 6 }\ninput: "rois" input_shape { dim: 3 dim: 5 }\n'
_PROPOSAL = ('input: "scores" input_shape { dim: 1 dim: 18 dim: 4 dim: 5 }\n'
             'input: "deltas" input_shape { dim: 1 dim: 36 dim: 4 dim: 5 }\n'
             'input: "im_info" input_shape { dim: 1 dim: 3 }\n'
             'layer { name: "proposal" type: "Python" bottom: "scores" bottom: "deltas" bottom: "im_info" top: "rois" '
             'python_param { module: "rpn.proposal_layer" layer: "ProposalLayer" param_str: "{param}" } }\n')
_MASKED = (_IMAGE + 'layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" top: "mask" pooling_param { '
           'pool: MAX kernel_size: 2 stride: 2 } }\n'
           'layer { name: "up" type: "Upsample" bottom: "pool" bottom: "mask" top: "up" upsample_param { {param} } }\n')


def _one(kind: str, param: str) -> str:
    return _IMAGE + f'layer {{ name: "l" type: "{kind}" bottom: "data" top: "out" {param} {{ {{param}} }} }}\n'


# Layer type -> (net, the params of a net that works, the fields fuzzed with their kinds: float, int, uint,
# bool, py (a param_str value) or a tuple of enum names; a "+" marks a repeated field (a list in a param_str),
# whose fuzzed values replace or add to the working ones, where a single field's replace it).
FORK_NETS = {
    "Normalize": (_one("Normalize", "norm_param"), {}, {"across_spatial": "bool", "channel_shared": "bool",
                                                         "eps": "float"}),
    "Permute": (_one("Permute", "permute_param"), {}, {"order": "uint+"}),
    "PriorBox": ('input: "data" input_shape { dim: 1 dim: 3 dim: 32 dim: 32 }\n'
                 'input: "feat" input_shape { dim: 1 dim: 4 dim: 4 dim: 4 }\n'
                 'layer { name: "prior" type: "PriorBox" bottom: "feat" bottom: "data" top: "prior" '
                 'prior_box_param { {param} } }\n', {"min_size": ["8"]},
                 {"min_size": "float+", "max_size": "float+", "aspect_ratio": "float+", "flip": "bool", "clip": "bool",
                  "variance": "float+", "img_size": "uint", "img_h": "uint", "img_w": "uint", "step": "float",
                  "step_h": "float", "step_w": "float", "offset": "float"}),
    "DetectionOutput": (_SSD_HEAD, {"num_classes": "3", "nms:nms_threshold": "0.45"},
                        {"background_label_id": "int", "share_location": "bool", "keep_top_k": "int",
                         "code_type": ("CORNER", "CENTER_SIZE", "CORNER_SIZE"), "confidence_threshold": "float",
                         "variance_encoded_in_target": "bool", "nms:nms_threshold": "float", "nms:top_k": "int",
                         "nms:eta": "float", "num_classes": "uint"}),
    "ROIPooling": (_ROIS + 'layer { name: "l" type: "ROIPooling" bottom: "data" bottom: "rois" top: "out" '
                   'roi_pooling_param { {param} } }\n', {"pooled_h": "2", "pooled_w": "2"},
                   {"pooled_h": "uint", "pooled_w": "uint", "spatial_scale": "float"}),
    "PSROIPooling": (_ROIS + 'layer { name: "l" type: "PSROIPooling" bottom: "data" bottom: "rois" top: "out" '
                     'psroi_pooling_param { {param} } }\n',
                     {"spatial_scale": "1", "output_dim": "2", "group_size": "2"},
                     {"spatial_scale": "float", "output_dim": "int", "group_size": "int"}),
    "Proposal": (_PROPOSAL, {"feat_stride": "16", "scales": ["8", "16", "32"], "ratios": ["0.5", "1", "2"]},
                 {"feat_stride": "py", "scales": "py+", "ratios": "py+"}),
    "Reorg": (_one("Reorg", "reorg_param"), {"stride": "2"}, {"stride": "uint", "reverse": "bool"}),
    "YoloDetectionOutput": (
        'input: "data" input_shape { dim: 1 dim: 12 dim: 4 dim: 4 }\n'
        'layer { name: "l" type: "YoloDetectionOutput" bottom: "data" top: "out" yolo_detection_output_param { '
        '{param} } }\n', {"num_classes": "1", "num_box": "2", "biases": ["1", "2", "3", "4"]},
        {"confidence_threshold": "float", "nms_threshold": "float", "biases": "float+", "num_box": "uint",
         "num_classes": "uint", "coords": "uint"}),
    "Yolov3DetectionOutput": (
        'input: "a" input_shape { dim: 1 dim: 6 dim: 4 dim: 4 }\n'
        'input: "b" input_shape { dim: 1 dim: 6 dim: 8 dim: 8 }\n'
        'layer { name: "l" type: "Yolov3DetectionOutput" bottom: "a" bottom: "b" top: "out" '
        'yolov3_detection_output_param { {param} } }\n',
        {"num_classes": "1", "num_box": "1", "mask_group_num": "2", "mask": ["0", "1"],
         "biases": ["10", "14", "23", "27"], "anchors_scale": ["32", "16"]},
        {"confidence_threshold": "float", "nms_threshold": "float", "biases": "float+", "mask": "uint+",
         "anchors_scale": "uint+", "mask_group_num": "uint", "num_box": "uint"}),
    "Upsample": (_MASKED, {"scale": "2"}, {"scale": "uint", "scale_h": "uint", "scale_w": "uint", "pad_out_h": "bool",
                                           "pad_out_w": "bool", "upsample_h": "uint", "upsample_w": "uint"}),
    "NearestUpsample": (_one("Upsample", "upsample_param"), {}, {"scale": "uint"}),
    "ShuffleChannel": (_one("ShuffleChannel", "shuffle_channel_param"), {"group": "2"}, {"group": "uint"}),
    "ReLU6": (_one("ReLU6", "relu6_param"), {}, {"negative_slope": "float"}),
    "ReLU": (_one("ReLU", "relu_param"), {}, {"negative_slope": "float", "relu6": "bool", "maximum": "float",
                                              "minimum": "float"}),
    "Padding": (_one("Padding", "padding_param"), {"pad_beg": "1", "pad_end": "1"},
                {"pad_beg": "int", "pad_end": "int"}),
    "CropCenter": (_one("CropCenter", "crop_center_param"), {"crop_size": ["0", "0", "1", "2"]},
                   {"crop_size": "uint+"}),
    "ResizeBilinear": (_one("ResizeBilinear", "resize_bilinear_param"), {"data_format": '"NCHW"'},
                       {"output_height": "int", "output_width": "int", "scale_height": "float", "scale_width": "float",
                        "align_corners": "bool", "half_pixel_centers": "bool", "pytorch_half_pixel": "bool"}),
    "Interp": (_one("Interp", "interp_param"), {"zoom_factor": "2"},
               {"zoom_factor": "int", "shrink_factor": "int", "height": "int", "width": "int", "pad_beg": "int",
                "pad_end": "int"}),
    "BN": (_one("BN", "bn_param"), {}, {"eps": "float", "momentum": "float", "frozen": "bool",
                                        "bn_mode": ("LEARN", "INFERENCE")}),
    "Dropout": (_one("Dropout", "dropout_param"), {"scale_train": "false"}, {"dropout_ratio": "float"}),
    "SpatialDropout": (_IMAGE + 'layer { name: "l" type: "Python" bottom: "data" top: "out" python_param { '
                       'module: "spatial_dropout" layer: "SpatialDropoutLayer" param_str: "{param}" } }\n', {},
                       {"p": "py"}),
    "Pooling": (_one("Pooling", "pooling_param"), {"pool": "MAX", "kernel_size": "3"},
                {"ceil_mode": "bool", "pad_type": "int", "pad_l": "int", "pad_r": "int", "pad_t": "int", "pad_b": "int",
                 "stride": "uint", "kernel_size": "uint", "pad": "uint", "pool": ("MAX", "AVE", "AVE_EXC_PAD")}),
    "ConvolutionDepthwise": (_one("ConvolutionDepthwise", "convolution_param"), {"kernel_size": "3"},
                             {"kernel_size": "uint+", "stride": "uint+", "pad": "uint+", "dilation": "uint+",
                              "bias_term": "bool"}),
}

HOSTILE = {
    "float": ["nan", "-nan", "inf", "-inf", "0", "-1", "1e-45", "0.5", "1", "2", "3", "1e30", "9223372036854775807"],
    "int": ["0", "-1", "1", "2", "3", "7", "99999", "2147483647", "-2147483648", "9223372036854775807"],
    "uint": ["0", "1", "2", "3", "4", "7", "99999", "2147483647", "4294967295", "9223372036854775807"],
    "py": ["16", "8", "2.5", "0.5", "32", "0", "-4", "1e999", "-1e999", "'a'", "True", "None", "[8]",
           "9223372036854775807"],
}


def _fuzzed_value(kind: str | tuple, rng: np.random.Generator) -> str:
    if isinstance(kind, tuple):
        return kind[rng.integers(len(kind))]
    if kind == "bool":
        return ["true", "false"][rng.integers(2)]
    return HOSTILE[kind.rstrip("+")][rng.integers(len(HOSTILE[kind.rstrip("+")]))]


def fork_net(kind: str, rng: np.random.Generator, fuzz: bool = True) -> str:
    """The kind's net with its working params, 1 to 3 of its fields given hostile values (when `fuzz`)."""
    template, working, fields = FORK_NETS[kind]
    params = {field: list(value) if isinstance(value, list) else [value] for field, value in working.items()}
    names = list(fields)
    for index in rng.choice(len(names), size=min(len(names), int(rng.integers(1, 4))), replace=False) if fuzz else []:
        field, field_kind = names[index], fields[names[index]]
        if "+" not in str(field_kind):
            params[field] = [_fuzzed_value(field_kind, rng)]
            continue
        values = params.setdefault(field, [])
        for _ in range(rng.integers(1, 3)):  # a repeated field's value replaced, or one more
            value = _fuzzed_value(field_kind, rng)
            if values and rng.random() < 0.5:
                values[rng.integers(len(values))] = value
            else:
                values.append(value)
    if "param_str" in template:  # a Python layer's param_str: a dict literal inside a prototxt string
        body = "{" + ", ".join(f"'{field}': " + (f"[{', '.join(values)}]" if "+" in fields[field] else values[0])
                               for field, values in params.items()) + "}"
        return template.replace("{param}", body.replace("\\", "\\\\").replace("'", "\\'"))
    text = {False: [], True: []}
    for field, values in params.items():
        text[field.startswith("nms:")] += [f"{field.removeprefix('nms:')}: {value}" for value in values]
    return template.replace("{nms}", " ".join(text[True])).replace("{param}", " ".join(text[False]))
