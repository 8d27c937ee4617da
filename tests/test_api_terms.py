"""One check, two audiences: errors name the command line's options under a command and the Python API's
arguments from Python (caffe2torch.errors.term)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import caffe2torch
import icnet_eval
from caffe2torch.cli import main as caffe2torch_main
from caffe2torch.errors import CaffeError, command_line_terms, term
from icnet_eval.cli import main as icnet_main


def test_term_follows_the_context():
    assert term("--force", "force=True") == "force=True"
    with command_line_terms():
        assert term("--force", "force=True") == "--force"
    assert term("--force", "force=True") == "force=True"


def test_replacing_a_folder_names_force_in_each_ones_terms(units_dir, tmp_path):
    net = caffe2torch.convert(units_dir / "unit_conv_basic.caffemodel")
    caffe2torch.save(net, tmp_path / "api")
    with pytest.raises(CaffeError, match="holds an earlier caffe2torch output; pass force=True to replace it$"):
        caffe2torch.save(net, tmp_path / "api")
    arguments = ["convert", str(units_dir / "unit_conv_basic.caffemodel"), "-o", str(tmp_path / "cli")]
    assert CliRunner().invoke(caffe2torch_main, arguments).exit_code == 0
    again = CliRunner().invoke(caffe2torch_main, arguments)
    assert again.exit_code == 2 and again.output.strip().endswith("pass --force to replace it")


def test_hdf5_weights_without_a_definition(units_dir, tmp_path):
    import shutil

    alone = tmp_path / "alone.caffemodel.h5"
    shutil.copy(units_dir / "unit_conv_basic.caffemodel.h5", alone)
    with pytest.raises(CaffeError, match="HDF5 weights carry no net definition; give one with prototxt=$"):
        caffe2torch.convert(alone)
    result = CliRunner().invoke(caffe2torch_main, ["convert", str(alone)])
    assert result.exit_code == 2 and result.output.strip().endswith("give one with --prototxt")


def test_icnet_eval_api_names_its_arguments(tmp_path):
    with pytest.raises(CaffeError, match=f"^list_path {tmp_path / 'missing.txt'}: no such file$"):
        icnet_eval.evaluate(tmp_path / "missing.txt", tmp_path, tmp_path / "w.caffemodel", tmp_path / "out")
    result = CliRunner().invoke(icnet_main, ["--list", str(tmp_path / "missing.txt"), "--data-root", str(tmp_path),
                                             "--weights", str(tmp_path / "w.caffemodel")])
    assert result.exit_code == 2 and f"--list {tmp_path / 'missing.txt'}: no such file" in result.output
    with pytest.raises(CaffeError, match="^weights .*nothing: no such file$"):
        icnet_eval.segment(np.zeros((8, 8, 3), np.uint8), tmp_path / "nothing")
