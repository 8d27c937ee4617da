"""Generates the ICNet Cityscapes Caffe net definition (NetParameter) for any input size.

Two variants: `bn=True` is the official `icnet_cityscapes_bnnomerge.prototxt` (every
convolution but the classifier has `bias_term: false` and is followed by a fork `BN` layer),
`bn=False` the official `icnet_cityscapes.prototxt` (BN folded into the convolution biases).
At 1025x2049 both equal the official files message by message; at 257x513 the merged one
equals the reference `icnet_merged_257x513.prototxt`.

Every size is derived from the input size with Caffe's own arithmetic (convolution floor,
pooling ceil with the pad clipping rule, Interp `shrink` -> `(H-1)/f + 1` and `zoom` ->
`H + (H-1)(f-1)`). Only two kinds of layer depend on the input size:

* Pyramid pooling on the conv5_3 map (size S per axis) must give n = 1, 2, 3, 6 bins:
  n = 1: kernel = stride = S.  n > 1: `stride = floor((S-1)/n)`, `kernel = S - (n-1)*stride`,
  so the last window ends exactly at the map edge and Caffe's ceil rule
  `ceil((S - kernel)/stride) + 1` gives exactly n bins without padding. For 2:1 maps
  (`W-1 == 2(H-1)`, as at 1025x2049 and 257x513) the official file instead uses
  `stride_w = 2*stride_h` (20 rather than floor(64/3) = 21 at 33x65); that rule is kept
  for such maps so the official numbers come out. Every result is checked against the ceil
  rule; maps with fewer than n+1 rows or columns cannot be pooled this way and raise
  CaffeError. The four Interp layers after them get explicit `height`/`width` = conv5_3 size.
* The cascade's `zoom_factor: 2` Interp layers (`conv5_4_interp`, `sub24_sum_interp`) are
  summed (after a same-size dilated conv) with a map of the next finer branch. Zooming
  gives `2S-1`, which equals that map only for some input sizes (e.g. 1025x2049, 257x513,
  513x1025, but not 1024x2048, where `sub24_sum_interp` would give 129 rows against 128).
  Where the zoom does not match, the layer gets explicit `height`/`width` of the map it is
  summed with instead of `zoom_factor`, so the net is valid for every input size; where it
  matches the official `zoom_factor: 2` is kept. `conv6_interp` (summed with nothing)
  always keeps the official `zoom_factor: 4`.
"""

from __future__ import annotations

from typing import Callable

from google.protobuf import text_format

from caffe2torch.errors import CaffeError
from proto import caffe_pb2

MapSize = tuple[int, int]

PYRAMID_BINS = (1, 2, 3, 6)
NUM_CLASSES = 19
# The full-resolution branch: three 3x3 stride-2 convolutions on data_sub1.
SUB1_CONVS = (("conv1_sub1", 32), ("conv2_sub1", 32), ("conv3_sub1", 64))


def conv_out(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    """Caffe convolution output size along one axis (floor rule)."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def pool_out(size: int, kernel: int, stride: int, pad: int) -> int:
    """Caffe pooling output size along one axis (ceil rule; with padding the last window must start inside)."""
    out = -(-(size + 2 * pad - kernel) // stride) + 1
    if pad > 0 and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def pyramid_pool_geometry(map_size: MapSize, bins: int, layer_name: str) -> tuple[MapSize, MapSize]:
    """Kernel (h, w) and stride (h, w) of the AVE pooling giving `bins` x `bins` outputs on `map_size`."""
    height, width = map_size
    if bins == 1:
        return (height, width), (height, width)
    if height < bins + 1 or width < bins + 1:
        raise CaffeError(
            f"{layer_name}: the conv5_3 map is only {height}x{width}, pyramid pooling into "
            f"{bins}x{bins} bins needs at least {bins + 1} rows and columns; use a larger input size"
        )
    stride_h = (height - 1) // bins
    if width - 1 == 2 * (height - 1):
        stride_w = 2 * stride_h  # the official files' rule for their 2:1 maps
    else:
        stride_w = (width - 1) // bins
    kernel = (height - (bins - 1) * stride_h, width - (bins - 1) * stride_w)
    stride = (stride_h, stride_w)
    got = tuple(pool_out(size, k, s, 0) for size, k, s in zip(map_size, kernel, stride))
    if got != (bins, bins):
        raise CaffeError(f"{layer_name}: kernel {kernel} stride {stride} give {got} bins on {map_size}, not {bins}")
    return kernel, stride


class _IcnetBuilder:
    """Appends ICNet's layers in the official order and tracks each blob's map size."""

    def __init__(self, height: int, width: int, bn: bool) -> None:
        self.bn = bn
        self.net = caffe_pb2.NetParameter()
        self.net.input.append("data")
        self.net.input_dim.extend([1, 3, height, width])
        self.sizes: dict[str, MapSize] = {"data": (height, width)}

    def _layer(self, name: str, type_name: str, bottoms: list[str], top: str) -> caffe_pb2.LayerParameter:
        layer = self.net.layer.add()
        layer.name = name
        layer.type = type_name
        layer.bottom.extend(bottoms)
        layer.top.append(top)
        return layer

    def scale(self, name: str, bottom: str) -> str:
        self._layer(name, "Scale", [bottom], name)
        self.sizes[name] = self.sizes[bottom]
        return name

    def relu(self, blob: str) -> str:
        self._layer(f"{blob}/relu", "ReLU", [blob], blob)
        return blob

    def batch_norm(self, blob: str) -> None:
        layer = self._layer(f"{blob}/bn", "BN", [blob], blob)
        # slope and bias learn, mean and variance are statistics
        for lr_mult in (1, 1, 0, 0):
            param = layer.param.add()
            param.lr_mult = lr_mult
            param.decay_mult = 0
        bn_param = layer.bn_param
        bn_param.slope_filler.type = "constant"
        bn_param.slope_filler.value = 1
        bn_param.bias_filler.type = "constant"
        bn_param.bias_filler.value = 0
        bn_param.frozen = True
        bn_param.momentum = 0.95

    def conv(self, name: str, bottom: str, num_output: int, kernel: int = 1, stride: int = 1,
             dilation: int = 1, relu: bool = True) -> str:
        """Convolution (+ BN in the BN variant) (+ ReLU): the unit every ICNet branch is made of."""
        pad = dilation * (kernel - 1) // 2
        layer = self._layer(name, "Convolution", [bottom], name)
        param = layer.param.add()
        param.lr_mult = 1
        param.decay_mult = 1
        conv_param = layer.convolution_param
        conv_param.num_output = num_output
        conv_param.pad.append(pad)
        conv_param.kernel_size.append(kernel)
        conv_param.stride.append(stride)
        conv_param.weight_filler.type = "msra"
        if dilation > 1:
            conv_param.dilation.append(dilation)
        height, width = self.sizes[bottom]
        self.sizes[name] = (conv_out(height, kernel, stride, pad, dilation),
                            conv_out(width, kernel, stride, pad, dilation))
        if self.bn:
            conv_param.bias_term = False
            self.batch_norm(name)
        if relu:
            self.relu(name)
        return name

    def classifier(self, name: str, bottom: str) -> str:
        """The final 1x1 convolution: keeps its bias in both variants, no BN, bias with lr_mult 2, no pad field."""
        layer = self._layer(name, "Convolution", [bottom], name)
        for lr_mult in (1, 2):
            param = layer.param.add()
            param.lr_mult = lr_mult
            param.decay_mult = 1
        conv_param = layer.convolution_param
        conv_param.num_output = NUM_CLASSES
        conv_param.kernel_size.append(1)
        conv_param.stride.append(1)
        conv_param.weight_filler.type = "msra"
        self.sizes[name] = self.sizes[bottom]
        return name

    def max_pool(self, name: str, bottom: str, kernel: int, stride: int, pad: int) -> str:
        layer = self._layer(name, "Pooling", [bottom], name)
        pool_param = layer.pooling_param
        pool_param.pool = caffe_pb2.PoolingParameter.MAX
        pool_param.kernel_size = kernel
        pool_param.stride = stride
        pool_param.pad = pad
        self.sizes[name] = tuple(pool_out(size, kernel, stride, pad) for size in self.sizes[bottom])
        return name

    def ave_pool(self, name: str, bottom: str, kernel: MapSize, stride: MapSize) -> str:
        layer = self._layer(name, "Pooling", [bottom], name)
        pool_param = layer.pooling_param
        pool_param.pool = caffe_pb2.PoolingParameter.AVE
        pool_param.kernel_h, pool_param.kernel_w = kernel
        pool_param.stride_h, pool_param.stride_w = stride
        self.sizes[name] = tuple(pool_out(size, k, s, 0) for size, k, s in zip(self.sizes[bottom], kernel, stride))
        return name

    def shrink(self, name: str, bottom: str) -> str:
        self._layer(name, "Interp", [bottom], name).interp_param.shrink_factor = 2
        self.sizes[name] = tuple((size - 1) // 2 + 1 for size in self.sizes[bottom])
        return name

    def resize(self, name: str, bottom: str, size: MapSize) -> str:
        interp_param = self._layer(name, "Interp", [bottom], name).interp_param
        interp_param.height, interp_param.width = size
        self.sizes[name] = size
        return name

    def zoom(self, name: str, bottom: str, factor: int, target: MapSize | None = None) -> str:
        """Interp by `zoom_factor`, or to explicit `target` size when the zoom would not reach it."""
        zoomed = tuple(size + (size - 1) * (factor - 1) for size in self.sizes[bottom])
        if target is not None and zoomed != target:
            return self.resize(name, bottom, target)
        self._layer(name, "Interp", [bottom], name).interp_param.zoom_factor = factor
        self.sizes[name] = zoomed
        return name

    def eltwise_sum(self, name: str, bottoms: list[str], explicit_operation: bool) -> str:
        # the official files spell out `operation: SUM` in the residual blocks only
        layer = self._layer(name, "Eltwise", bottoms, name)
        if explicit_operation:
            layer.eltwise_param.operation = caffe_pb2.EltwiseParameter.SUM
        self.sizes[name] = self.sizes[bottoms[0]]
        return name

    def bottleneck(self, name: str, bottom: str, width: int, stride: int = 1, dilation: int = 1,
                   project: bool = False) -> str:
        """ResNet bottleneck: 1x1 reduce, 3x3 (dilated), 1x1 increase, plus a 1x1 projection when shapes change."""
        reduced = self.conv(f"{name}_1x1_reduce", bottom, width, stride=stride)
        middle = self.conv(f"{name}_3x3", reduced, width, kernel=3, dilation=dilation)
        increased = self.conv(f"{name}_1x1_increase", middle, 4 * width, relu=False)
        shortcut = bottom
        if project:
            shortcut = self.conv(f"{name}_1x1_proj", bottom, 4 * width, stride=stride, relu=False)
        self.eltwise_sum(name, [shortcut, increased], explicit_operation=True)
        return self.relu(name)

    def stage(self, prefix: str, bottom: str, blocks: int, width: int, stride: int = 1,
              dilation: int = 1, after_first: Callable[[str], str] | None = None) -> str:
        """`blocks` bottlenecks named prefix_1.. ; `after_first` may transform the first block's output."""
        blob = self.bottleneck(f"{prefix}_1", bottom, width, stride, dilation, project=True)
        if after_first is not None:
            blob = after_first(blob)
        for index in range(2, blocks + 1):
            blob = self.bottleneck(f"{prefix}_{index}", blob, width, dilation=dilation)
        return blob

    def pyramid_pooling(self, bottom: str) -> str:
        """PSP module: AVE pooling into 1, 2, 3, 6 bins, each resized back, all summed with the input."""
        map_size = self.sizes[bottom]
        resized = []
        for bins in PYRAMID_BINS:
            pool_name = f"{bottom}_pool{bins}"
            kernel, stride = pyramid_pool_geometry(map_size, bins, pool_name)
            pooled = self.ave_pool(pool_name, bottom, kernel, stride)
            resized.append(self.resize(f"{pool_name}_interp", pooled, map_size))
        return self.eltwise_sum(f"{bottom}_sum", [bottom] + resized[::-1], explicit_operation=False)


def _sub1_size(size: MapSize) -> MapSize:
    """Map size at the end of the full-resolution branch (needed before that branch is built)."""
    for _ in SUB1_CONVS:
        size = tuple(conv_out(s, 3, 2, 1) for s in size)
    return size


def icnet_net(height: int, width: int, bn: bool) -> caffe_pb2.NetParameter:
    """The ICNet Cityscapes deploy net for a 1x3xHxW input; `bn` keeps separate BN layers."""
    for label, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
            # input_dim is an int32 field: a larger size would fail in protobuf with a traceback
            raise CaffeError(f"ICNet input {label} must be a positive integer of at most 2147483647, got {value!r}")
    net = _IcnetBuilder(height, width, bn)
    data_sub1 = net.scale("data_sub1", "data")
    data_sub2 = net.shrink("data_sub2", data_sub1)

    # 1/2-resolution branch: ResNet stem and stages 2-3, then shrunk once more for the 1/4 branch
    blob = net.conv("conv1_1_3x3_s2", data_sub2, 32, kernel=3, stride=2)
    blob = net.conv("conv1_2_3x3", blob, 32, kernel=3)
    blob = net.conv("conv1_3_3x3", blob, 64, kernel=3)
    blob = net.max_pool("pool1_3x3_s2", blob, kernel=3, stride=2, pad=1)
    blob = net.stage("conv2", blob, blocks=3, width=32)
    conv3_sub4 = net.stage("conv3", blob, blocks=4, width=64, stride=2,
                           after_first=lambda conv3_1: net.shrink(f"{conv3_1}_sub4", conv3_1))
    conv3_1 = "conv3_1"

    # 1/4-resolution branch: dilated stages 4-5 and pyramid pooling
    blob = net.stage("conv4", conv3_sub4, blocks=6, width=128, dilation=2)
    blob = net.stage("conv5", blob, blocks=3, width=256, dilation=4)
    blob = net.pyramid_pooling(blob)
    blob = net.conv("conv5_4_k1", blob, 256)

    # cascade feature fusion 1/4 -> 1/2
    blob = net.zoom("conv5_4_interp", blob, 2, target=net.sizes[conv3_1])
    coarse = net.conv("conv_sub4", blob, 128, kernel=3, dilation=2, relu=False)
    fine = net.conv("conv3_1_sub2_proj", conv3_1, 128, relu=False)
    blob = net.relu(net.eltwise_sum("sub24_sum", [fine, coarse], explicit_operation=False))

    # cascade feature fusion 1/2 -> full-resolution branch (three stride-2 convs on data_sub1)
    blob = net.zoom("sub24_sum_interp", blob, 2, target=_sub1_size(net.sizes[data_sub1]))
    coarse = net.conv("conv_sub2", blob, 128, kernel=3, dilation=2, relu=False)
    fine = data_sub1
    for name, num_output in SUB1_CONVS:
        fine = net.conv(name, fine, num_output, kernel=3, stride=2)
    fine = net.conv("conv3_sub1_proj", fine, 128, relu=False)
    blob = net.relu(net.eltwise_sum("sub12_sum", [fine, coarse], explicit_operation=False))

    blob = net.zoom("sub12_sum_interp", blob, 2)
    blob = net.classifier("conv6_cls", blob)
    net.zoom("conv6_interp", blob, 4)
    return net.net


def icnet_prototxt(height: int, width: int, bn: bool) -> str:
    """`icnet_net` in protobuf text format (what a .prototxt holds)."""
    return text_format.MessageToString(icnet_net(height, width, bn))
