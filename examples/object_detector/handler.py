"""TorchServe handler of the shapes object detector example (archive this file as is)."""

from secure_handler import SecureObjectDetector


class ShapesDetectorHandler(SecureObjectDetector):
    """Finds circles, squares and triangles and returns their boxes in the image's pixels.

    The contract (`tensor` [B, 3, 320, 320] or torchvision-style `list`) is read from the
    model at initialize; the resize, score threshold and limits come from the `handler:`
    section of model-config.yaml.
    """
