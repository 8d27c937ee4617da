"""icnet_eval: evaluate ICNet on Cityscapes exactly as its authors did (MATLAB imresize, eval_acc.m scoring)."""


def _silence_opencv() -> None:
    # OpenCV prints its own warning lines for a damaged image before returning None; our one-line
    # error already names the file, so its chatter would only break the one-line rule.
    try:
        import cv2

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):
        pass


_silence_opencv()
