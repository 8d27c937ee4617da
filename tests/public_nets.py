"""Builders for the public-architecture tests: prototxt generators, weight-file writers, a NumPy float64 forward.

The generators rebuild well-known deploy nets (layer names, wiring and parameters as upstream
writes them) from our own code; no upstream file is copied.
"""

from __future__ import annotations

import h5py
import numpy as np
from google.protobuf import text_format

from caffe2torch.inspect import describe
from proto import caffe_pb2
from tests.conftest import wire_field

# ---------------------------------------------------------------- prototxt generators


def L(name, kind, bottom=(), top=None, body=""):
    bottoms = [bottom] if isinstance(bottom, str) else list(bottom)
    tops = [name] if top is None else ([top] if isinstance(top, str) else list(top))
    wires = "".join(f' bottom: "{b}"' for b in bottoms) + "".join(f' top: "{t}"' for t in tops)
    return f'layer {{ name: "{name}" type: "{kind}"{wires} {body} }}\n'


def conv(name, bottom, n, k, s=1, p=0, g=1, bias=True, top=None, kind="Convolution"):
    extra = (f" stride: {s}" if s != 1 else "") + (f" pad: {p}" if p else "") + (f" group: {g}" if g != 1 else "")
    extra += "" if bias else " bias_term: false"
    return L(name, kind, bottom, top, f"convolution_param {{ num_output: {n} kernel_size: {k}{extra} }}")


def relu(name, blob):
    return L(name, "ReLU", blob, blob)


def pool(name, bottom, kind="MAX", k=3, s=2, p=0, top=None):
    shape = "global_pooling: true" if k == 0 else f"kernel_size: {k} stride: {s}" + (f" pad: {p}" if p else "")
    return L(name, "Pooling", bottom, top, f"pooling_param {{ pool: {kind} {shape} }}")


def lrn(name, bottom):
    return L(name, "LRN", bottom, None, "lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }")


def fc(name, bottom, n):
    return L(name, "InnerProduct", bottom, None, f"inner_product_param {{ num_output: {n} }}")


def input_layer(shape, name="data"):
    dims = " ".join(f"dim: {d}" for d in shape)
    return L(name, "Input", (), name, f"input_param {{ shape {{ {dims} }} }}")


def alexnet(w=(96, 256, 384, 384, 256, 4096, 4096, 1000), size=227):
    """bvlc_alexnet/deploy.prototxt: LRN, grouped convs, ceil pooling, fc6 on pool5 6x6."""
    c1, c2, c3, c4, c5, f6, f7, f8 = w
    text = input_layer((1, 3, size, size))
    text += conv("conv1", "data", c1, 11, s=4) + relu("relu1", "conv1") + lrn("norm1", "conv1") + pool("pool1", "norm1")
    text += conv("conv2", "pool1", c2, 5, p=2, g=2) + relu("relu2", "conv2") + lrn("norm2", "conv2") + pool("pool2", "norm2")
    text += conv("conv3", "pool2", c3, 3, p=1) + relu("relu3", "conv3")
    text += conv("conv4", "conv3", c4, 3, p=1, g=2) + relu("relu4", "conv4")
    text += conv("conv5", "conv4", c5, 3, p=1, g=2) + relu("relu5", "conv5") + pool("pool5", "conv5")
    for i, (bottom, n) in enumerate((("pool5", f6), ("fc6", f7)), start=6):
        text += fc(f"fc{i}", bottom, n) + relu(f"relu{i}", f"fc{i}")
        text += L(f"drop{i}", "Dropout", f"fc{i}", f"fc{i}", "dropout_param { dropout_ratio: 0.5 }")
    return text + fc("fc8", "fc7", f8) + L("prob", "Softmax", "fc8")


def inception(p, bottom, n1, n3r, n3, n5r, n5, npool):
    text = conv(f"{p}/1x1", bottom, n1, 1) + relu(f"{p}/relu_1x1", f"{p}/1x1")
    text += conv(f"{p}/3x3_reduce", bottom, n3r, 1) + relu(f"{p}/relu_3x3_reduce", f"{p}/3x3_reduce")
    text += conv(f"{p}/3x3", f"{p}/3x3_reduce", n3, 3, p=1) + relu(f"{p}/relu_3x3", f"{p}/3x3")
    text += conv(f"{p}/5x5_reduce", bottom, n5r, 1) + relu(f"{p}/relu_5x5_reduce", f"{p}/5x5_reduce")
    text += conv(f"{p}/5x5", f"{p}/5x5_reduce", n5, 5, p=2) + relu(f"{p}/relu_5x5", f"{p}/5x5")
    text += pool(f"{p}/pool", bottom, k=3, s=1, p=1) + conv(f"{p}/pool_proj", f"{p}/pool", npool, 1)
    text += relu(f"{p}/relu_pool_proj", f"{p}/pool_proj")
    parts = [f"{p}/1x1", f"{p}/3x3", f"{p}/5x5", f"{p}/pool_proj"]
    return text + L(f"{p}/output", "Concat", parts)


GOOGLENET_INCEPTIONS = {  # bvlc_googlenet: name -> (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj)
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64), "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64), "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128), "5a": (256, 160, 320, 32, 128, 128), "5b": (384, 192, 384, 48, 128, 128),
}


def googlenet(size=224):
    text = input_layer((1, 3, size, size))
    text += conv("conv1/7x7_s2", "data", 64, 7, s=2, p=3) + relu("conv1/relu_7x7", "conv1/7x7_s2")
    text += pool("pool1/3x3_s2", "conv1/7x7_s2") + lrn("pool1/norm1", "pool1/3x3_s2")
    text += conv("conv2/3x3_reduce", "pool1/norm1", 64, 1) + relu("conv2/relu_3x3_reduce", "conv2/3x3_reduce")
    text += conv("conv2/3x3", "conv2/3x3_reduce", 192, 3, p=1) + relu("conv2/relu_3x3", "conv2/3x3")
    text += lrn("conv2/norm2", "conv2/3x3") + pool("pool2/3x3_s2", "conv2/norm2")
    bottom = "pool2/3x3_s2"
    for key, widths in GOOGLENET_INCEPTIONS.items():
        if key in ("4a", "5a"):
            text += pool(f"pool{int(key[0]) - 1}/3x3_s2", bottom)
            bottom = f"pool{int(key[0]) - 1}/3x3_s2"
        text += inception(f"inception_{key}", bottom, *widths)
        bottom = f"inception_{key}/output"
    text += pool("pool5/7x7_s1", bottom, "AVE", k=7, s=1)
    text += L("pool5/drop_7x7_s1", "Dropout", "pool5/7x7_s1", "pool5/7x7_s1", "dropout_param { dropout_ratio: 0.4 }")
    return text + fc("loss3/classifier", "pool5/7x7_s1", 1000) + L("prob", "Softmax", "loss3/classifier")


def bn_scale(suffix, blob):
    text = L(f"bn{suffix}", "BatchNorm", blob, blob, "batch_norm_param { use_global_stats: true }")
    return text + L(f"scale{suffix}", "Scale", blob, blob, "scale_param { bias_term: true }")


def bottleneck(key, bottom, mid, out, stride, project):
    """KaimingHe's res<key>: 1x1 (stride) -> 3x3 -> 1x1, BatchNorm+Scale in place, Eltwise with the shortcut."""
    text, shortcut = "", bottom
    if project:
        shortcut = f"res{key}_branch1"
        text += conv(shortcut, bottom, out, 1, s=stride, bias=False) + bn_scale(f"{key}_branch1", shortcut)
    a, b, c = (f"res{key}_branch2{x}" for x in "abc")
    text += conv(a, bottom, mid, 1, s=stride, bias=False) + bn_scale(f"{key}_branch2a", a) + relu(f"{a}_relu", a)
    text += conv(b, a, mid, 3, p=1, bias=False) + bn_scale(f"{key}_branch2b", b) + relu(f"{b}_relu", b)
    text += conv(c, b, out, 1, bias=False) + bn_scale(f"{key}_branch2c", c)
    return text + L(f"res{key}", "Eltwise", [shortcut, c]) + relu(f"res{key}_relu", f"res{key}")


def resnet(blocks=(3, 4, 6, 3), base=64, size=224, classes=1000):
    """ResNet-50/101 deploy: legacy input_dim, conv1 with bias, BatchNorm+Scale in place, pool5 AVE 7."""
    text = f'input: "data" input_dim: 1 input_dim: 3 input_dim: {size} input_dim: {size}\n'
    text += conv("conv1", "data", base, 7, s=2, p=3) + bn_scale("_conv1", "conv1") + relu("conv1_relu", "conv1")
    text += pool("pool1", "conv1")
    bottom = "pool1"
    for stage, count in enumerate(blocks):
        for index in range(count):
            numbered = index and stage in (1, 2) and sum(blocks) > 16  # ResNet-101/152: res4b1 .. res4b22
            key = f"{stage + 2}{f'b{index}' if numbered else chr(ord('a') + index)}"
            stride = 2 if index == 0 and stage > 0 else 1
            text += bottleneck(key, bottom, base << stage, 4 * base << stage, stride, index == 0)
            bottom = f"res{key}"
    text += pool("pool5", bottom, "AVE", k=size // 32, s=1)
    return text + fc("fc1000", "pool5", classes) + L("prob", "Softmax", "fc1000")


def fire(key, bottom, squeeze, expand):
    s, e1, e3 = f"fire{key}/squeeze1x1", f"fire{key}/expand1x1", f"fire{key}/expand3x3"
    text = conv(s, bottom, squeeze, 1) + relu(f"fire{key}/relu_squeeze1x1", s)
    text += conv(e1, s, expand, 1) + relu(f"fire{key}/relu_expand1x1", e1)
    text += conv(e3, s, expand, 3, p=1) + relu(f"fire{key}/relu_expand3x3", e3)
    return text + L(f"fire{key}/concat", "Concat", [e1, e3])


SQUEEZENET_FIRES = [(2, 16, 64), (3, 16, 64), (4, 32, 128), (5, 32, 128), (6, 48, 192), (7, 48, 192),
                    (8, 64, 256), (9, 64, 256)]


def squeezenet(size=227, div=1, classes=1000):
    """SqueezeNet v1.1 deploy: fire modules (Concat), ceil MAX pooling, Dropout, global AVE pooling."""
    text = input_layer((1, 3, size, size)) + conv("conv1", "data", 64 // div, 3, s=2) + relu("relu_conv1", "conv1")
    text += pool("pool1", "conv1")
    bottom = "pool1"
    for key, squeeze, expand in SQUEEZENET_FIRES:
        text += fire(key, bottom, squeeze // div, expand // div)
        bottom = f"fire{key}/concat"
        if key in (3, 5):
            text += pool(f"pool{key}", bottom)
            bottom = f"pool{key}"
    text += L("drop9", "Dropout", bottom, bottom, "dropout_param { dropout_ratio: 0.5 }")
    text += conv("conv10", bottom, classes, 1) + relu("relu_conv10", "conv10")
    return text + pool("pool10", "conv10", "AVE", k=0) + L("prob", "Softmax", "pool10")


MOBILENET_KEYS = ["2_1", "2_2", "3_1", "3_2", "4_1", "4_2", "5_1", "5_2", "5_3", "5_4", "5_5", "5_6", "6"]
MOBILENET_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def mobilenet(size=224, div=1, classes=1000, blocks=MOBILENET_BLOCKS):
    """shicai/MobileNet-Caffe: depthwise group convs, BatchNorm+Scale in place (names with '/'), fc7 as 1x1 conv."""
    def unit(name, bottom, n, k, s, p, g, relu_name):
        return (conv(name, bottom, n, k, s=s, p=p, g=g, bias=False) + bn_scale_slash(name) + relu(relu_name, name))

    text = input_layer((1, 3, size, size)) + unit("conv1", "data", 32 // div, 3, 2, 1, 1, "relu1")
    bottom, channels = "conv1", 32 // div
    for key, (out, stride) in zip(MOBILENET_KEYS, blocks):
        text += unit(f"conv{key}/dw", bottom, channels, 3, stride, 1, channels, f"relu{key}/dw")
        text += unit(f"conv{key}/sep", f"conv{key}/dw", out // div, 1, 1, 0, 1, f"relu{key}/sep")
        bottom, channels = f"conv{key}/sep", out // div
    text += pool("pool6", bottom, "AVE", k=0) + conv("fc7", "pool6", classes, 1)
    return text + L("prob", "Softmax", "fc7")


def bn_scale_slash(blob):
    text = L(f"{blob}/bn", "BatchNorm", blob, blob, "param { lr_mult: 0 decay_mult: 0 } " * 3)
    return text + L(f"{blob}/scale", "Scale", blob, blob, "scale_param { filler { value: 1 } bias_term: true }")


VGG16 = [(64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)]


def fcn32s(size=500, div=1, classes=21, group=1):
    """voc-fcn32s deploy: VGG-16 with pad 100, fc6/fc7 as convolutions, Deconvolution x32 and Crop offset 19."""
    text, bottom = input_layer((1, 3, size, size)), "data"
    for stage, widths in enumerate(VGG16, start=1):
        for index, width in enumerate(widths, start=1):
            name = f"conv{stage}_{index}"
            text += conv(name, bottom, width // div, 3, p=100 if name == "conv1_1" else 1) + relu(f"relu{stage}_{index}", name)
            bottom = name
        text += pool(f"pool{stage}", bottom, k=2, s=2)
        bottom = f"pool{stage}"
    text += conv("fc6", bottom, 4096 // div, 7) + relu("relu6", "fc6") + L("drop6", "Dropout", "fc6", "fc6")
    text += conv("fc7", "fc6", 4096 // div, 1) + relu("relu7", "fc7") + L("drop7", "Dropout", "fc7", "fc7")
    text += conv("score_fr", "fc7", classes, 1)
    text += conv("upscore", "score_fr", classes, 64, s=32, g=group, bias=False, kind="Deconvolution")
    return text + L("score", "Crop", ["upscore", "data"], None, "crop_param { axis: 2 offset: 19 }")


def lenet_train_test(batch=1):
    """examples/mnist/lenet_train_test.prototxt reduced to what matters: phase rules pick data, loss and prob."""
    text = L("mnist", "Data", (), ["data", "label"], 'include { phase: TRAIN } data_param { source: "x" batch_size: 64 }')
    text += L("data", "Input", (), "data", f"include {{ phase: TEST }} input_param {{ shape {{ dim: {batch} dim: 1 dim: 28 dim: 28 }} }}")
    text += conv("conv1", "data", 20, 5) + pool("pool1", "conv1", k=2, s=2)
    text += conv("conv2", "pool1", 50, 5) + pool("pool2", "conv2", k=2, s=2)
    text += fc("ip1", "pool2", 500) + relu("relu1", "ip1") + fc("ip2", "ip1", 10)
    text += L("loss", "SoftmaxWithLoss", ["ip2", "label"], "loss", "include { phase: TRAIN }")
    return text + L("prob", "Softmax", "ip2", "prob", "exclude { phase: TRAIN }")


LENET_V1 = """name: "LeNet" input: "data" input_dim: 2 input_dim: 1 input_dim: 28 input_dim: 28
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1" blobs_lr: 1 blobs_lr: 2
  convolution_param { num_output: 20 kernel_size: 5 stride: 1 weight_filler { type: "xavier" } } }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "conv2" type: CONVOLUTION bottom: "pool1" top: "conv2" param: "shared_w" param: "shared_b"
  convolution_param { num_output: 50 kernel_size: 5 } }
layers { name: "pool2" type: POOLING bottom: "conv2" top: "pool2" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "ip1" type: INNER_PRODUCT bottom: "pool2" top: "ip1" inner_product_param { num_output: 500 } }
layers { name: "relu1" type: RELU bottom: "ip1" top: "ip1" }
layers { name: "ip2" type: INNER_PRODUCT bottom: "ip1" top: "ip2" inner_product_param { num_output: 10 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip2" bottom: "label" top: "loss" include { phase: TRAIN } }
layers { name: "prob" type: SOFTMAX bottom: "ip2" top: "prob" include { phase: TEST } }
"""

# ---------------------------------------------------------------- weights: random blobs, .caffemodel and .caffemodel.h5


def random_blobs(prototxt_path, seed=0) -> dict[str, list[np.ndarray]]:
    """Blobs of Caffe's shapes (as the prototxt-only conversion allocates them) filled with random values."""
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in describe(prototxt_path)["layers"]:
        shapes = [tuple(s) for s in layer["blob_shapes"]]
        if layer["type"] == "BatchNorm":  # mean*s, var*s, s as Caffe stores them
            c, s = shapes[0][0], rng.uniform(0.5, 2.0)
            blobs = [rng.normal(0, 0.1, c) * s, rng.uniform(0.5, 1.5, c) * s, np.array([s])]
        elif layer["type"] == "Scale":
            blobs = [rng.uniform(0.5, 1.5, shapes[0]), rng.normal(0, 0.1, shapes[1])]
        else:
            fan_in = [max(1, int(np.prod(s[1:]))) for s in shapes]
            blobs = [rng.normal(0, np.sqrt(2.0 / f) if len(s) > 1 else 0.1, s) for s, f in zip(shapes, fan_in)]
        if blobs:
            weights[layer["name"]] = [b.astype(np.float32) for b in blobs]
    return weights


def upstream_bytes(net):
    """Serialize as upstream BVLC Caffe numbers its fields: input_param 143, crop_param 144 (ours: 10143, 10144)."""
    layers = list(net.layer)
    head = caffe_pb2.NetParameter()
    head.CopyFrom(net)
    head.ClearField("layer")
    data = head.SerializeToString()
    for layer in layers:
        extra = b""
        for field, number in (("input_param", 143), ("crop_param", 144)):
            if layer.HasField(field):
                extra += wire_field(number, getattr(layer, field).SerializeToString())
                layer.ClearField(field)
        data += wire_field(100, layer.SerializeToString() + extra)
    return data


def write_caffemodel(prototxt_text, weights, path, v1=False, upstream=False):
    """A binary NetParameter as Caffe's Net::ToProto writes it (V1: `layers` with legacy 4-D blob dims)."""
    net = caffe_pb2.NetParameter()
    text_format.Parse(prototxt_text, net)
    for layer in (net.layers if v1 else net.layer):
        for array in weights.get(layer.name, []):
            blob = layer.blobs.add()
            if v1:
                blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - array.ndim) + array.shape
            else:
                blob.shape.dim.extend(array.shape)
            blob.data.extend(array.ravel().tolist())
    path.write_bytes(upstream_bytes(net) if upstream else net.SerializeToString())


def write_caffemodel_h5(prototxt_text, weights, path):
    """Caffe's Net::ToHDF5 layout: /data/<layer name>/<i>, an empty group for layers without parameters."""
    net = caffe_pb2.NetParameter()
    text_format.Parse(prototxt_text, net)
    with h5py.File(path, "w") as file:
        data = file.create_group("data")
        for layer in net.layer:
            group = data.require_group(layer.name)  # '/' in a name nests groups, as H5Gcreate does
            for index, array in enumerate(weights.get(layer.name, [])):
                group.create_dataset(str(index), data=array)
        file.create_group("diff")

# ---------------------------------------------------------------- independent NumPy float64 forward (Caffe's rules)


def np_conv(x, w, b, s, p, g, deconv=False):
    n, c, h, wd = x.shape
    k = w.shape[2]
    if deconv:  # scatter every input pixel through the kernel, then crop `p` on each side
        out_c = w.shape[1] * g
        full = np.zeros((n, out_c, (h - 1) * s + k, (wd - 1) * s + k))
        ci, co = c // g, out_c // g
        for gi in range(g):
            contrib = np.einsum("nchw,cokl->nohwkl", x[:, gi * ci:(gi + 1) * ci], w[gi * ci:(gi + 1) * ci])
            for i in range(k):
                for j in range(k):
                    full[:, gi * co:(gi + 1) * co, i:i + (h - 1) * s + 1:s, j:j + (wd - 1) * s + 1:s] += contrib[..., i, j]
        y = full[:, :, p:full.shape[2] - p, p:full.shape[3] - p]
    else:
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        oh, ow = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
        ci, co = c // g, w.shape[0] // g
        y = np.zeros((n, w.shape[0], oh, ow))
        for gi in range(g):
            for i in range(k):
                for j in range(k):
                    patch = xp[:, gi * ci:(gi + 1) * ci, i:i + (oh - 1) * s + 1:s, j:j + (ow - 1) * s + 1:s]
                    y[:, gi * co:(gi + 1) * co] += np.einsum("nchw,oc->nohw", patch, w[gi * co:(gi + 1) * co, :, i, j])
    return y if b is None else y + b[None, :, None, None]


def np_pool(x, kind, k, s, p):
    h, w = x.shape[2:]
    k = k or h  # global pooling (square maps here)
    out = [-(-(n + 2 * p - k) // s) + 1 for n in (h, w)]
    out = [o - 1 if p and (o - 1) * s >= n + p else o for o, n in zip(out, (h, w))]
    y = np.zeros(x.shape[:2] + tuple(out))
    for oy in range(out[0]):
        for ox in range(out[1]):
            y0, x0 = oy * s - p, ox * s - p
            y1, x1 = min(y0 + k, h + p), min(x0 + k, w + p)
            area = (y1 - y0) * (x1 - x0)
            window = x[:, :, max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)]
            y[:, :, oy, ox] = window.max(axis=(2, 3)) if kind == "MAX" else window.sum(axis=(2, 3)) / area
    return y


def np_forward(prototxt_text, weights, inputs):
    """Run a net layer by layer in float64 following the reference README's Caffe semantics."""
    net = caffe_pb2.NetParameter()
    text_format.Parse(prototxt_text, net)
    blobs = {name: v.astype(np.float64) for name, v in inputs.items()}
    P = caffe_pb2.PoolingParameter
    for layer in net.layer:
        if layer.type == "Input" or any(r.phase == caffe_pb2.TRAIN for r in layer.include):
            continue
        xs = [blobs[b] for b in layer.bottom]
        ws = [w.astype(np.float64) for w in weights.get(layer.name, [])]
        kind, x = layer.type, xs[0]
        if kind in ("Convolution", "Deconvolution"):
            cp = layer.convolution_param
            s, p = (cp.stride or [1])[0], (cp.pad or [0])[0]
            y = np_conv(x, ws[0], ws[1] if cp.bias_term else None, s, p, cp.group, kind == "Deconvolution")
        elif kind == "Pooling":
            pp = layer.pooling_param
            y = np_pool(x, "MAX" if pp.pool == P.MAX else "AVE", 0 if pp.global_pooling else pp.kernel_size,
                        pp.stride, pp.pad)
        elif kind == "LRN":
            lp, half = layer.lrn_param, (layer.lrn_param.local_size - 1) // 2
            sq = np.pad(x * x, ((0, 0), (half, half), (0, 0), (0, 0)))
            window = sum(sq[:, i:i + x.shape[1]] for i in range(lp.local_size))
            y = x * (lp.k + lp.alpha / lp.local_size * window) ** -lp.beta
        elif kind == "ReLU":
            y = np.maximum(x, 0)
        elif kind == "BatchNorm":
            f = 1 / ws[2][0]
            y = (x - f * ws[0][None, :, None, None]) / np.sqrt(f * ws[1][None, :, None, None] + 1e-5)
        elif kind == "Scale":
            y = x * ws[0][None, :, None, None] + ws[1][None, :, None, None]
        elif kind == "Eltwise":
            y = sum(xs)
        elif kind == "Concat":
            y = np.concatenate(xs, axis=1)
        elif kind == "InnerProduct":
            y = x.reshape(x.shape[0], -1) @ ws[0].T + ws[1]
        elif kind == "Softmax":
            e = np.exp(x - x.max(axis=1, keepdims=True))
            y = e / e.sum(axis=1, keepdims=True)
        elif kind == "Dropout":
            y = x
        elif kind == "Crop":
            o, (h, w) = layer.crop_param.offset[0], xs[1].shape[2:]
            y = x[:, :, o:o + h, o:o + w]
        else:
            raise AssertionError(f"no NumPy rule for {kind}")
        blobs[layer.top[0]] = y
    return blobs
