"""The one error type users see: a one-line problem and fix, exit code 2 in the CLI."""


class QConvertError(Exception):
    """Bad input (file, checkpoint, model, data): the message names the problem and the fix."""


class ParityError(QConvertError):
    """The ONNX model does not match PyTorch within the asked thresholds (exit code 1)."""
