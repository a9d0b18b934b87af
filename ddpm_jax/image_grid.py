"""Image grids as uint8 arrays and PNG files (any path tf.io.gfile can write, gs:// included)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from ddpm_jax import file_io


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 0..255 (round to nearest, as the paper's samples)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, num_cols: int | None = None, padding: int = 2) -> np.ndarray:
  """Tiles uint8 images `[N, H, W, C]` into one `[rows * (H + p) + p, cols * (W + p) + p, C]`."""
  n, h, w, c = images.shape
  cols = num_cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full(
    (rows * (h + padding) + padding, cols * (w + padding) + padding, c), 255, dtype=np.uint8
  )
  for i in range(n):
    r, col = divmod(i, cols)
    y, x = padding + r * (h + padding), padding + col * (w + padding)
    grid[y : y + h, x : x + w] = images[i]
  return grid


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 `[H, W, C]` image (C = 1 or 3) as a PNG, atomically."""
  image = image[..., 0] if image.shape[-1] == 1 else image
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  file_io.write_atomically(path, buffer.getvalue())
