"""icnet_eval: evaluate ICNet on Cityscapes exactly as its authors did (MATLAB imresize, eval_acc.m scoring)."""

import sys
import types


def _silence_opencv() -> None:
    # OpenCV prints its own warning lines for a damaged image before returning None; our one-line
    # error already names the file, so its chatter would only break the one-line rule.
    try:
        import cv2

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):
        pass


_silence_opencv()


def segment(image, model, device=None, fast: bool = False, channels: str = "bgr"):
    """trainIds of one uint8 image, BGR unless `channels="rgb"`; the net is loaded once for later calls with the
    same weights (see icnet_eval.api.segment)."""
    from icnet_eval.api import segment as _segment

    return _segment(image, model, device, fast, channels)


def evaluate(list_path, data_root, weights, out="icnet-results", **options):
    """A whole evaluation as the command line runs it; returns the report (see icnet_eval.api.evaluate)."""
    from icnet_eval.api import evaluate as _evaluate

    return _evaluate(list_path, data_root, weights, out, **options)


def __getattr__(name: str):
    if name == "Segmenter":  # ICNet loaded once, segmenting image after image (icnet_eval.api.Segmenter)
        from icnet_eval.api import Segmenter

        return Segmenter
    if name == "load_model":  # the net icnet-eval evaluates, with where it came from (icnet_eval.model)
        from icnet_eval.model import load_model

        return load_model
    raise AttributeError(f"module 'icnet_eval' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps `icnet_eval.segment` the function above: importing the submodule icnet_eval.segment (the CLI's
    segment command, overlays) would otherwise rebind the package attribute to the module, and
    `icnet_eval.segment(image, model)` would then fail with "'module' object is not callable"."""

    def __setattr__(self, name: str, value) -> None:
        if name == "segment" and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable as sys.modules["icnet_eval.segment"] and by `from ... import`
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
