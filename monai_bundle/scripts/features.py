"""Frozen-backbone image features, cached on disk so head training takes seconds.

Each view is a fixed dihedral transform of the preprocessed image (the cheap, exact
augmentations for dermoscopy, which has no canonical orientation).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from monai_bundle.scripts.network import FusionNet
from monai_bundle.scripts.transforms import load_rgb, preprocess_rgb

log = logging.getLogger(__name__)

VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: torch.flip(x, dims=[-1]),
    "vflip": lambda x: torch.flip(x, dims=[-2]),
    "rot90": lambda x: torch.rot90(x, 1, dims=[-2, -1]),
}


class _ImageFiles(Dataset[torch.Tensor]):
    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return preprocess_rgb(load_rgb(self.paths[index]))


def _cache_key(paths: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]


@torch.inference_mode()
def image_features(
    network: FusionNet,
    paths: Sequence[str],
    views: Sequence[str],
    cache_dir: str | Path,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Features per view, shape (len(paths), 1280), computed once and cached by path list."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = _cache_key(paths)
    files = {view: cache / f"features-{key}-{view}.npy" for view in views}
    todo = [view for view, f in files.items() if not f.exists()]
    if todo:
        network = network.eval().to(memory_format=torch.channels_last)
        out = {
            view: np.zeros((len(paths), network_feature_width(network)), np.float32)
            for view in todo
        }
        loader = DataLoader(_ImageFiles(paths), batch_size=batch_size, num_workers=1)
        start = 0
        for batch in tqdm(loader, desc=f"image features ({', '.join(todo)})", unit="batch"):
            for view in todo:
                x = VIEWS[view](batch).contiguous(memory_format=torch.channels_last)
                out[view][start : start + len(batch)] = network.image_features(x).numpy()
            start += len(batch)
        for view in todo:
            tmp = files[view].with_suffix(".tmp.npy")
            np.save(tmp, out[view])
            tmp.rename(files[view])
            log.info("cached %s features for %d images in %s", view, len(paths), files[view])
    return {view: np.load(f) for view, f in files.items()}


def network_feature_width(network: FusionNet) -> int:
    return int(network.classifier[1].in_features - network.metadata_branch[0].out_features)
