"""Write MNIST-format files (torchvision's raw layout) for tests that need a synthetic MNIST."""
import struct
from pathlib import Path

import torch


def write_idx_split(raw: Path, split: str, images: torch.Tensor, labels: torch.Tensor):
    """images uint8 [n, 28, 28], labels [n] -> raw/<split>-images-idx3-ubyte and -labels-idx1-ubyte."""
    n = len(images)
    header = struct.pack(">IIII", 2051, n, 28, 28)                           # IDX: magic, count, rows, cols
    (raw / f"{split}-images-idx3-ubyte").write_bytes(header + images.numpy().tobytes())
    header = struct.pack(">II", 2049, n)
    (raw / f"{split}-labels-idx1-ubyte").write_bytes(header + labels.to(torch.uint8).numpy().tobytes())


def write_mnist(root: Path, make_split, n_train: int, n_test: int) -> Path:
    """root/MNIST/raw/ with a train and a t10k split from make_split(n, seed) -> (images, labels)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        write_idx_split(raw, split, *make_split(n, seed))
    return root
