"""TorchServe handler of the shapes image classifier example (archive this file as is)."""

from secure_handler import SecureImageClassifier


class ShapesImageHandler(SecureImageClassifier):
    """Names the shape in an image: circle, square, triangle, star or cross.

    The model (see build_model.py) expects the library's default transform, short side 256,
    centre crop 224, ImageNet mean and std, so nothing is overridden here. Limits come from
    the `handler:` section of model-config.yaml; labels from index_to_name.json.
    """
