"""Does scoring at a larger input size help a network trained at 224 px? (issue 18, item 3)

ISIC 2020 images are 512 px; HAM10000's are 224 px as published and the ISIC Archive's 180 px.
Training with random resized crops shows lesions larger than a whole-image view does, so a
network often ranks better when tested a little above its training size (Touvron et al.,
FixRes, 2019). This scores the validation split of a trained model at several input sizes,
with the test-time views the model ships with, and prints AUC per source.

    python -m training.input_size --model-dir monai_bundle/models --sizes 224 256 288 320
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from training.data import SOURCES, encode_frame, load_cases, split_by_group
from training.images import decoded_images, normalised
from training.whole_network import network_for, validation_split_seed


@torch.inference_mode()
def auc_by_size(
    model_dir: Path, data_root: Path, sizes: list[int], cache_dir: str | None
) -> dict[int, dict[str, float]]:
    trained = json.loads((model_dir / "validation_metrics.json").read_text())
    recipe = trained["recipe"]
    cases = load_cases(data_root, recipe["include_archive"])
    is_val = np.array(split_by_group(cases, recipe["val_fraction"], validation_split_seed(recipe)))
    val = cases.frame[is_val].reset_index(drop=True)
    network = network_for(recipe)
    network.load_state_dict(torch.load(model_dir / "model.pt", weights_only=True))
    network = network.eval().to(memory_format=torch.channels_last)
    metadata = torch.from_numpy(encode_frame(val))
    labels = val.label.to_numpy()
    out: dict[int, dict[str, float]] = {}
    for size in sizes:
        images = decoded_images(list(val.image), size, cache_dir)
        logits = []
        for start in range(0, len(images), 32):
            x = normalised(images[start : start + 32]).contiguous(memory_format=torch.channels_last)
            logits.append(network(x, metadata[start : start + 32])[:, 0])
        scores = torch.cat(logits).numpy()
        out[size] = {"all": float(roc_auc_score(labels, scores))}
        for source in SOURCES:
            mask = (val.source == source).to_numpy()
            out[size][source] = float(roc_auc_score(labels[mask], scores[mask]))
        print(size, " ".join(f"{k} {v:.4f}" for k, v in out[size].items()), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("monai_bundle/models"))
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache-dir", default="var/cache")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 256, 288, 320])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = auc_by_size(args.model_dir, args.data_root, args.sizes, args.cache_dir)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
