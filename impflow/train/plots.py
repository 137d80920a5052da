"""Figures written by the training tasks (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["save_curves", "save_density_and_samples", "save_image_grid"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - the train extra installs it
        raise ImportError(
            "figures need matplotlib: pip install 'impflow[train]' (or pip install matplotlib)"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def save_density_and_samples(
    path,
    log_prob_fn,
    samples: torch.Tensor,
    data: torch.Tensor,
    *,
    limit: float = 4.0,
    resolution: int = 200,
    title: str = "",
) -> Path:
    """Data, model density (heat map of ``exp(log_prob)`` on a grid over ``[-limit, limit]²``)
    and model samples side by side.

    Args:
        log_prob_fn: maps ``(N, 2)`` points to ``(N,)`` log-densities.
        samples, data: ``(N, 2)`` points.
    """
    plt = _pyplot()
    axis = torch.linspace(-limit, limit, resolution)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    density = torch.cat([log_prob_fn(chunk).exp().cpu() for chunk in grid.split(10000)])
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, points, name in ((axes[0], data, "data"), (axes[2], samples, "samples")):
        points = points.detach().cpu()
        ax.hist2d(
            points[:, 0].numpy(),
            points[:, 1].numpy(),
            bins=resolution // 2,
            range=[[-limit, limit], [-limit, limit]],
            cmap="viridis",
        )
        ax.set_title(name)
    axes[1].imshow(
        density.reshape(resolution, resolution).numpy(),
        origin="lower",
        extent=(-limit, limit, -limit, limit),
        cmap="viridis",
    )
    axes[1].set_title("density")
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xticks([]), ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return _save(fig, plt, path)


def save_curves(path, x: torch.Tensor, curves: dict, *, title: str = "") -> Path:
    """Line plot of several curves ``name -> y`` over the same ``x`` (1-D tensors)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, y in curves.items():
        ax.plot(x.detach().cpu().numpy(), y.detach().cpu().numpy(), label=name)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, plt, path)


def save_image_grid(path, images: torch.Tensor, *, title: str = "") -> Path:
    """A grid of ``(N, C, H, W)`` images with values in ``[0, 1]`` (C = 1 or 3)."""
    plt = _pyplot()
    images = images.detach().cpu().clamp(0, 1)
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.ones(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i in range(n):
        r, k = divmod(i, cols)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = (
            images[i]
        )
    fig, ax = plt.subplots(figsize=(cols, rows))
    shown = canvas[0] if c == 1 else canvas.permute(1, 2, 0)
    ax.imshow(shown.numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    ax.axis("off")
    if title:
        ax.set_title(title)
    return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
