"""What a run feeds the model: ``--image-size`` preprocessing, shared by the CLI and the
scripts so that both keep the model's interpolation."""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_IMAGE_SIZE", "image_size_preprocess"]

#: The largest ``--image-size`` accepted. One 4096×4096 RGB image is 192 MiB in float32
#: and an attack holds several copies per image (clean, adversarial, gradient), so larger
#: sides only end in the out-of-memory killer.
MAX_IMAGE_SIZE = 4096


def image_size_preprocess(preprocess: Any, image_size: int | None) -> Any:
    """The preprocessing for ``--image-size``: resize the short side to
    ``round(image_size · 256 / 224)`` and center-crop ``image_size``, with the model's
    own interpolation.

    Args:
        preprocess: the model's preprocessing (``advtune.models.Preprocess``).
        image_size: the crop side, ``None`` to keep ``preprocess``.

    Returns:
        ``preprocess`` itself for ``None``, else a new ``Preprocess``.

    Raises:
        ValueError: ``image_size`` outside ``[1, MAX_IMAGE_SIZE]``.
    """
    if image_size is None:
        return preprocess
    if isinstance(image_size, bool) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image size must be in [1, {MAX_IMAGE_SIZE}], got {image_size!r}")
    from advtune.models import Preprocess

    interpolation = getattr(preprocess, "interpolation", None)
    kwargs = {"interpolation": interpolation} if interpolation is not None else {}
    return Preprocess(crop_size=image_size, resize_size=round(image_size * 256 / 224), **kwargs)
