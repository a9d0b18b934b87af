"""Rate-distortion of the progressive lossy code (Ho et al. 2020, sec. 4.3, Table 4, Fig. 5).

Time. `calc_bpd_loop` indexes its terms by the 0-based code step t = 0..T-1 (code step t is the
paper's step t+1): term t >= 1 is KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (the paper's
L_t), term 0 is the discretised decoder NLL (the paper's L_0), and the prior term is the paper's
L_T. The sender transmits x_{T-1} (at the cost of the prior), then x_{T-2}, ..., one reverse step
at a time; sending x_{s-1} given x_s costs term s. *Reverse time* k = T - t counts the steps the
receiver has decoded: it holds the code's x_t, which is the paper's x_{t+1}, and the paper's
"reverse process time T - t + 1" (paper t, 1-based) is the same number k. k runs from 1 (only
x_{T-1} received) to T (x_0 received).

Rate at reverse time k (bits/dim): what the receiver has received down to x_t, t = T - k:
  rate_k = prior + sum_{s = t+1}^{T-1} terms[s].
The decoder term L_0 is not part of any rate: as in the paper, the code is lossy and L_0 is
the distortion in bits, so rate_T + L_0 = total bpd (paper: rate 1.78 + distortion 1.97 = 3.75
bits/dim on CIFAR-10).

Distortion at reverse time k: the RMSE on the 0..255 scale of the x_0 predicted from x_t,
  distortion_k = 127.5 * sqrt(mean over images and dims of (x0_pred - x0)^2),
i.e. the square root of the batch-mean MSE (not the mean of per-image RMSEs); `mse` holds each
image's mean over dims in the [-1, 1] scale, and all images have the same number of dims.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ddpm_jax import file_io

Array = Any
Row = tuple[int, float, float]

CSV_HEADER = "reverse_time,rate_bits_per_dim,distortion_rmse"
PANEL_SIZE = (360, 280)  # Width, height in pixels of each of the three plot panels.
LINE_COLOR = (31, 119, 180)  # The curves' RGB, drawn without antialiasing.
LINE_COLOR_HEX = "#{:02x}{:02x}{:02x}".format(*LINE_COLOR)
_DPI = 100


@dataclasses.dataclass(frozen=True)
class RateDistortion:
  """Rate and distortion at every reverse time k = 1..T (index k - 1), batch means.

  Attributes:
    reverse_time: `[T]` int, 1..T.
    rate: `[T]` bits/dim received at each reverse time (non-decreasing).
    distortion: `[T]` RMSE of the predicted x_0 on the 0..255 scale.
  """

  reverse_time: np.ndarray
  rate: np.ndarray
  distortion: np.ndarray

  @property
  def num_timesteps(self) -> int:
    return int(self.reverse_time.shape[0])

  def table(self, every: int | None = None) -> list[Row]:
    """Rows (reverse time, rate, distortion) at T, T - every, ..., as in the paper's Table 4.

    `every` defaults to T // 10: rows at 1000, 900, ..., 100 for T = 1000, 20, 18, ..., 2 for 20.
    """
    every = every or max(self.num_timesteps // 10, 1)
    if every < 1:
      raise ValueError(f"every must be >= 1, got {every}.")
    times = range(self.num_timesteps, 0, -every)
    return [(k, float(self.rate[k - 1]), float(self.distortion[k - 1])) for k in times]


def rate_distortion(terms_bpd: Array, mse: Array, prior_bpd: Array) -> RateDistortion:
  """The curve from `calc_bpd_loop` outputs: terms `[B, T]`, mse `[B, T]`, prior `[B]`."""
  terms = np.asarray(terms_bpd, np.float64).mean(axis=0)  # [T], indexed by code step t.
  mse_mean = np.asarray(mse, np.float64).mean(axis=0)
  prior = float(np.asarray(prior_bpd, np.float64).mean())
  if terms.shape != mse_mean.shape or terms.ndim != 1:
    raise ValueError(f"terms_bpd {np.shape(terms_bpd)} and mse {np.shape(mse)} must be [B, T].")
  num_timesteps = terms.shape[0]
  # Reverse time k holds x_t, t = T - k, after paying terms T-1 .. t+1: a cumulative sum over
  # the terms in reverse order, shifted by one so that k = 1 has paid the prior only.
  received = np.concatenate([[0.0], np.cumsum(terms[::-1])[:-1]])
  return RateDistortion(
    reverse_time=np.arange(1, num_timesteps + 1),
    rate=prior + received,
    distortion=127.5 * np.sqrt(mse_mean[::-1]),
  )


def write_csv(path: str, rows: Sequence[Row]) -> None:
  """Writes rows (reverse time, rate, distortion) under `CSV_HEADER`, atomically (gs:// too)."""
  lines = [CSV_HEADER] + [f"{int(k)},{rate:.9g},{dist:.9g}" for k, rate, dist in rows]
  file_io.write_atomically(path, ("\n".join(lines) + "\n").encode())


def curve_rows(curve: RateDistortion) -> list[Row]:
  """Every reverse time as a row, from T down to 1 (the order of the paper's table)."""
  return curve.table(every=1)


# ----------------------------------------------------------------------------- plotting


def render_plot(rate: Array, distortion: Array) -> np.ndarray:
  """Fig. 5 as uint8 `[H, W, 3]` (three `PANEL_SIZE` panels side by side): rate and distortion
  against reverse time, and distortion against rate.

  `rate` and `distortion` are `[T]`, indexed by reverse time k - 1 (see `RateDistortion`).
  """
  import matplotlib

  matplotlib.use("Agg")  # No display: draw into memory.
  from matplotlib import pyplot as plt

  rate, distortion = np.asarray(rate, np.float64), np.asarray(distortion, np.float64)
  reverse_time = np.arange(1, rate.shape[0] + 1, dtype=np.float64)
  panels = [
    (reverse_time, rate, "Rate", "reverse process steps (T - t + 1)", "rate (bits/dim)"),
    (
      reverse_time,
      distortion,
      "Distortion",
      "reverse process steps (T - t + 1)",
      "distortion (RMSE, [0, 255])",
    ),
    (rate, distortion, "Rate-distortion", "rate (bits/dim)", "distortion (RMSE, [0, 255])"),
  ]
  width, height = PANEL_SIZE
  fig, axes = plt.subplots(1, 3, figsize=(3 * width / _DPI, height / _DPI), dpi=_DPI)
  try:
    for ax, (x, y, title, xlabel, ylabel) in zip(axes, panels, strict=True):
      ax.plot(x, y, color=LINE_COLOR_HEX, linewidth=2, antialiased=False)
      ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
      ax.set_xlim(left=min(0.0, float(np.min(x))))
      ax.set_ylim(bottom=min(0.0, float(np.min(y))))
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  finally:
    plt.close(fig)


def plot_png(path: str, rate: Array, distortion: Array) -> np.ndarray:
  """Writes `render_plot(rate, distortion)` as a PNG at `path` (atomically); returns the image."""
  pixels = render_plot(rate, distortion)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  file_io.write_atomically(path, buffer.getvalue())
  return pixels
