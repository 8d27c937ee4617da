"""happynear's layers (AM-Softmax's LabelSpecificAdd, NormFace's Normalize) against loops of their Forward_cpu."""
import numpy as np
import pytest
import torch

from caffe2torch.errors import CaffeError
from caffe2torch.layers import convert_layer
from tests.conftest import layer_from_text, load_standalone, random_net, run_layer

F = np.float32


def label_specific_add_reference(x: np.ndarray, label: np.ndarray, bias: float, train: bool) -> np.ndarray:
    """Forward_cpu: copy, then (TRAIN only: transform_test_ is false in TEST) top[i, gt] += bias where > -bias."""
    top = x.copy().reshape(x.shape[0], -1)
    if train:
        bias = F(bias)
        for i in range(x.shape[0]):
            gt = int(label.reshape(-1)[i])  # static_cast<int>
            if top[i, gt] > -bias:
                top[i, gt] = F(top[i, gt] + bias)
    return top.reshape(x.shape)


LAYER = 'name: "margin" type: "LabelSpecificAdd" label_specific_add_param { bias: -0.35 }'


def test_label_specific_add_matches_the_fork_loop_in_training_and_passes_scores_at_test():
    x = np.array([[0.9, -0.2, 0.3], [0.1, 0.34, -0.5], [0.2, 0.36, 0.0], [-0.3, 0.1, 0.7]], F)
    label = np.array([0.0, 1.0, 1.9, 2.0], F)  # 1.9 truncates to 1; 0.34 is not > 0.35: unchanged
    converted = convert_layer(layer_from_text(LAYER), [x.shape, label.shape], [])
    assert converted.top_shapes == [x.shape]
    module = converted.module
    with torch.no_grad():
        module.train()
        trained = module(torch.from_numpy(x), torch.from_numpy(label)).numpy()
        module.eval()
        tested = module(torch.from_numpy(x), torch.from_numpy(label)).numpy()
    np.testing.assert_array_equal(trained, label_specific_add_reference(x, label, -0.35, train=True))
    assert trained[0, 0] == F(F(0.9) + F(-0.35)) and trained[1, 1] == x[1, 1] and trained[2, 1] == F(F(0.36) - F(0.35))
    np.testing.assert_array_equal(tested, x)


def test_label_specific_add_checks_its_labels():
    with pytest.raises(CaffeError, match=r"bottom 1 \(labels\) has shape \(3,\): expected one label for each of the 4"):
        convert_layer(layer_from_text(LAYER), [(4, 3), (3,)], [])
    module = convert_layer(layer_from_text(LAYER), [(4, 3), (4,)], []).module.train()
    with pytest.raises(CaffeError, match="LabelSpecificAdd: 4 labels for 8 samples"):
        module(torch.zeros(8, 3), torch.zeros(4))
    with pytest.raises(CaffeError, match=r"a label outside the 3 classes \(labels -1 to 1\)"):
        module(torch.zeros(4, 3), torch.tensor([0.0, 1.0, -1.0, 1.0]))  # an ignore label of -1


def test_an_am_softmax_head_trains_with_its_margin_and_runs_standalone(tmp_path):
    net = random_net(tmp_path, """input: "data" input_shape { dim: 4 dim: 6 }
input: "label" input_shape { dim: 4 }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "margin" type: "LabelSpecificAdd" bottom: "fc" bottom: "label" top: "margin"
  label_specific_add_param { bias: -0.35 } }
""", 0.5)
    x, label = torch.randn(4, 6, generator=torch.Generator().manual_seed(3)), torch.tensor([0.0, 2.0, 1.0, 2.0])
    with torch.no_grad():
        scores = net.fc(x)
        assert torch.equal(net(x, label), scores)  # a converted net is in eval mode: the scores as they are
        net.train()
        want = label_specific_add_reference(scores.numpy(), label.numpy(), -0.35, train=True)
        np.testing.assert_array_equal(net(x, label).numpy(), want)
        net.eval()
    from caffe2torch.folder import save_net

    save_net(net, tmp_path / "folder")
    with torch.no_grad():
        assert torch.equal(load_standalone(tmp_path / "folder")(x, label), net(x, label))


def happynear_normalize_reference(x: np.ndarray, kind: str) -> np.ndarray:
    """normalize_layer.cpp's Forward_cpu: per (n, s), a float sum over channels in order, += 1e-6 (a double sum
    stored as float), sqrt for L2; then each value over it."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    top = np.empty_like(flat)
    for i in range(n):
        for s in range(flat.shape[2]):
            total = F(0)
            for j in range(c):
                total = F(total + (F(flat[i, j, s] * flat[i, j, s]) if kind == "L2" else abs(flat[i, j, s])))
            total = F(float(total) + 1e-6)
            norm = F(np.sqrt(total)) if kind == "L2" else total
            top[i, :, s] = flat[i, :, s] / norm
    return top.reshape(x.shape)


@pytest.mark.parametrize("kind", ["L2", "L1"])
def test_happynears_normalize_matches_the_fork_loop(kind):
    """NormFace's Normalize (normalize_param, no scale blob), told from SSD's (norm_param) by its param."""
    x = np.random.default_rng(7).normal(0, 1, (2, 5, 3, 2)).astype(F)
    x[1, :, 0, 0] = 0  # an all-zero pixel: 0 / sqrt(1e-6)
    layer = layer_from_text(f'name: "n" type: "Normalize" normalize_param {{ normalize_type: "{kind}" }}')
    converted, got = run_layer(layer, [x.shape], [], x)
    assert converted.top_shapes == [x.shape]
    np.testing.assert_allclose(got, happynear_normalize_reference(x, kind), rtol=3e-7, atol=0)
    assert np.all(got[1, :, 0, 0] == 0)
    with pytest.raises(CaffeError, match="normalize_type 'L3': the fork implements L2 and L1"):
        convert_layer(layer_from_text('name: "n" type: "Normalize" normalize_param { normalize_type: "L3" }'),
                      [x.shape], [])
