"""Backbone outputs cached on disk, so training runs on them instead of on images.

Each view is a fixed transform of the preprocessed image (``network.VIEWS``). ``image_features``
holds one array per view and per tap (the head's 1280 features, or one block's pooled output), so
heads that read different taps share one backbone pass. ``block_maps`` holds whole block outputs,
the input of the top blocks when those are fine-tuned.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from monai_bundle.scripts.network import HEAD_TAP, VIEWS, FusionNet
from monai_bundle.scripts.transforms import load_rgb, preprocess_rgb

log = logging.getLogger(__name__)


class _ImageFiles(Dataset[torch.Tensor]):
    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return preprocess_rgb(load_rgb(self.paths[index]))


def _channels_last(network: FusionNet) -> FusionNet:
    """A copy of the network in eval mode and channels-last layout (faster on CPU).

    A copy, because convolutions in the two layouts round differently: converting the caller's
    network would make fine-tuning it depend on whether the cache was cold (same seed, other
    weights).
    """
    with torch.inference_mode(False):
        return copy.deepcopy(network).eval().to(memory_format=torch.channels_last)


def _cache_key(paths: Sequence[str], signature: str) -> str:
    text = "\n".join(paths) + (f"\n{signature}" if signature else "")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_file(cache: Path, key: str, view: str, tap: str) -> Path:
    suffix = "" if tap == HEAD_TAP else f"-{tap}"
    return cache / f"features-{key}-{view}{suffix}.npy"


@torch.inference_mode()
def image_features(
    network: FusionNet,
    paths: Sequence[str],
    views: Sequence[str],
    cache_dir: str | Path,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Features per view, shape (len(paths), network.image_feature_width), cached by path list."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = _cache_key(paths, network.feature_signature())
    taps = network.tap_names()
    files = {(v, t): _cache_file(cache, key, v, t) for v in views for t in taps}
    todo = sorted({v for (v, _), f in files.items() if not f.exists()}, key=list(views).index)
    if todo:
        owed = {k: f for k, f in files.items() if k[0] in todo}
        _compute(network, paths, todo, owed, batch_size)
        log.info("cached features of %d images, views %s, in %s", len(paths), todo, cache)
    return {
        view: np.concatenate([np.load(files[(view, tap)]) for tap in taps], axis=1)
        for view in views
    }


def _compute(
    network: FusionNet,
    paths: Sequence[str],
    views: Sequence[str],
    files: dict[tuple[str, str], Path],
    batch_size: int,
) -> None:
    network = _channels_last(network)
    out: dict[tuple[str, str], list[np.ndarray]] = {k: [] for k in files}
    loader = DataLoader(_ImageFiles(paths), batch_size=batch_size, num_workers=1)
    for batch in tqdm(loader, desc=f"image features ({', '.join(views)})", unit="batch"):
        for view in views:
            x = VIEWS[view](batch).contiguous(memory_format=torch.channels_last)
            for tap, value in network.pooled_taps(x).items():
                if (view, tap) in out:
                    out[(view, tap)].append(value.numpy())
    for (view, tap), chunks in out.items():
        tmp = files[(view, tap)].with_name(files[(view, tap)].stem + ".tmp.npy")
        np.save(tmp, np.concatenate(chunks).astype(np.float32))
        tmp.rename(files[(view, tap)])


def _map_file(cache: Path, key: str, view: str, block: int) -> Path:
    return cache / f"maps-{key}-{view}-block{block}.npy"


@torch.inference_mode()
def block_maps(
    network: FusionNet,
    paths: Sequence[str],
    views: Sequence[str],
    blocks: Sequence[int],
    cache_dir: str | Path,
    batch_size: int = 32,
) -> dict[tuple[str, int], np.ndarray]:
    """Full output maps of ``blocks`` per view (float16, memory-mapped), cached by path list.

    Fine-tuning the top blocks then starts from these instead of from the image: the frozen
    lower blocks, which cost most of a forward pass, run once per image and view.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = _cache_key(paths, network.feature_signature())
    blocks = sorted(blocks)
    files = {(v, b): _map_file(cache, key, v, b) for v in views for b in blocks}
    todo = sorted({v for (v, _), f in files.items() if not f.exists()}, key=list(views).index)
    if todo:
        network = _channels_last(network)
        out: dict[tuple[str, int], list[np.ndarray]] = {(v, b): [] for v in todo for b in blocks}
        loader = DataLoader(_ImageFiles(paths), batch_size=batch_size, num_workers=1)
        for batch in tqdm(loader, desc=f"block maps ({', '.join(todo)})", unit="batch"):
            for view in todo:
                x = VIEWS[view](batch).contiguous(memory_format=torch.channels_last)
                x = network.block_output(x, blocks[0])
                out[(view, blocks[0])].append(x.half().numpy())
                for previous, block in zip(blocks, blocks[1:], strict=False):
                    x = network.blocks_between(x, previous + 1, block)
                    out[(view, block)].append(x.half().numpy())
        for (view, block), chunks in out.items():
            tmp = files[(view, block)].with_name(files[(view, block)].stem + ".tmp.npy")
            np.save(tmp, np.ascontiguousarray(np.concatenate(chunks)))
            tmp.rename(files[(view, block)])
        log.info("cached block maps of %d images, views %s, in %s", len(paths), todo, cache)
    return {k: np.load(f, mmap_mode="r") for k, f in files.items()}
