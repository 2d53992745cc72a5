"""Images as the pixels the FID networks read: float images in [-1, 1] to 8-bit values ``floor(x * 127.5 + 128)``
clipped to [0, 255] (the rounding a PNG round trip applies), grey repeated to RGB; and TensorFlow 1's legacy
bilinear resize to 299 x 299 (what NVIDIA's Inception network does inside)."""

from __future__ import annotations

import torch

INCEPTION_SIZE = 299


def to_pixels(images: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """Float images (N, C, H, W) in [-1, 1], C in {1, 3} -> float32 (N, 3, H, W) pixel values in [0, 255].

    ``quantize`` (default True) rounds to integers like an 8-bit image: floor(x * 127.5 + 128), clipped;
    ``quantize=False`` keeps ``x * 127.5 + 127.5``.
    """
    x = images.to(torch.float32)
    if quantize:
        x = torch.floor(x * 127.5 + 128.0).clamp(0.0, 255.0)
    else:
        x = (x * 127.5 + 127.5).clamp(0.0, 255.0)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def tf_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Resize (N, C, H, W) to (N, C, size, size) (default 299) like TensorFlow 1's legacy bilinear resize.

    Output pixel j samples the input at coordinate j * H / size (no half-pixel offset), clamped at the border.
    """
    n, _, h, w = x.shape
    if h == size and w == size:
        return x

    def axis(src: int) -> torch.Tensor:
        coord = torch.arange(size, dtype=torch.float64, device=x.device) * (src / size)  # input pixel coordinate
        return ((2.0 * coord + 1.0) / src - 1.0).to(x.dtype)  # grid_sample's normalised coordinate

    gy, gx = torch.meshgrid(axis(h), axis(w), indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).unsqueeze(0).expand(n, -1, -1, -1)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


__all__ = ["INCEPTION_SIZE", "tf_bilinear_resize", "to_pixels"]
