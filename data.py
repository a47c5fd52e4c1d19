"""Datasets with a controllable bias: colored MNIST, digit-pair MNIST and CelebA-64.

Every dataset is returned as one `Split` of plain tensors (no DataLoader):

    images  uint8 [N, 3, H, W]   RGB, H = W = 32 (MNIST) or 64 (CelebA)
    group   int64 [N]            the sensitive attribute y (color / digit / Male)
    label   int64 [N]            the class c a model may be conditioned on (digit / Smiling)

Bias. For two groups the training split keeps a share `bias` of group 0 and 1 - bias of group 1:

    n_0 = round(bias * N),  n_1 = N - n_0

where N is `n_train` (0 = the largest N both groups can fill). Held-out splits are balanced 50/50,
so an evaluation never inherits the training bias.

* `cmnist`      MNIST digits padded to 32x32 and painted in a group color (group 0 red, group 1
                green by default). Colors are assigned to a random permutation of the images, so the
                digits keep their natural distribution inside each group.  label = digit.
* `mnist-pair`  two digits (default 7 vs 8) in gray, group = which digit, label = group.
* `celeba`      CelebA aligned faces, center crop 140 -> 64x64, group = `Male` (group 0 = male,
                so `bias` is the share of men), label = `--cond-attr` (default Smiling).
                `--cell-ratio a,b,c,d` instead fixes the shares of the four cells
                (cond=1,male) : (cond=1,female) : (cond=0,male) : (cond=0,female), which InvDiff
                uses to build a spurious correlation between Smiling and Male.

MNIST is read from torchvision's raw layout by `datafiles`, which checks all four files before it
unpacks or reads any. `--download` says when the network is used: `auto` (the default) lets
torchvision fetch MNIST when none of its files is there, `true` also fetches the missing files of a
partial copy and CelebA (from Google Drive, with the package gdown), `false` never. CelebA is read
with a few lines of our own (the attribute and partition rows, torchvision.io for the JPEGs) because
`torchvision.datasets.CelebA` checks MD5s of annotation files that a subset cannot match. Decoded
CelebA images are cached once as a uint8 tensor in cache_dir() ($FAIRDIFF_CACHE, default
<--runs>/cache). A faulty file raises one line that names it.
"""
import argparse
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision.io import decode_image, encode_jpeg, write_file
from torchvision.transforms.v2.functional import center_crop, resize

import datafiles

DATASETS = ("cmnist", "mnist-pair", "celeba")
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
          "magenta": (255, 0, 255), "cyan": (0, 255, 255), "white": (255, 255, 255)}
MNIST_FILES = datafiles.MNIST_FILES
DOWNLOAD = datafiles.DOWNLOAD            # the values of --download: auto, true, false
CELEBA_FILES = ["img_align_celeba/", "list_attr_celeba.txt", "list_eval_partition.txt"]
CELEBA_CROP, CELEBA_SIZE = 140, 64          # the usual CelebA-64 preprocessing (crop, then resize)
MNIST_PAD = 2                               # 28 + 2·2 = 32 pixels
CACHE_DIR = None           # decoded-image caches: None = $FAIRDIFF_CACHE, else <run root>/cache (cache_dir)


@dataclass
class DataConfig:
    dataset: str = "cmnist"        # cmnist | mnist-pair | celeba
    data_root: str = ""            # '' = $FAIRDIFF_DATA, else ./data
    bias: float = 0.8              # share of group 0 in the training split
    spurious: float = 0.0          # cmnist: P(digit d has its majority color d mod G) (> 0 overrides bias)
    n_train: int = 0               # training-set size (0 = as large as the bias allows; celeba 7000)
    colors: str = "red,green"      # cmnist: one color per group
    digits: str = "7,8"            # mnist-pair: digit of group 0, digit of group 1
    cond_attr: str = "Smiling"     # celeba: the class label c
    cell_ratio: str = ""           # celeba: cond x group cell shares, e.g. "1,4,4,1" (overrides bias)
    min_cell: int = 100            # celeba with cell_ratio: refuse a split whose cell has fewer images
    download: str = "auto"         # auto | true | false: when to fetch absent files (see the docstring)
    seed: int = 0


@dataclass
class Split:
    images: torch.Tensor           # uint8 [N, 3, H, W]
    group: torch.Tensor            # int64 [N]
    label: torch.Tensor            # int64 [N]
    group_names: list
    num_classes: int

    def __len__(self):
        return len(self.images)

    def subset(self, idx):
        return Split(self.images[idx], self.group[idx], self.label[idx], self.group_names, self.num_classes)


def data_root(cfg: DataConfig) -> Path:
    return Path(cfg.data_root or os.environ.get("FAIRDIFF_DATA") or "data")


def check_config(cfg: DataConfig):
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    if not 0.0 <= cfg.bias <= 1.0:
        raise ValueError(f"--bias {cfg.bias} is outside [0, 1] (it is the share of group 0)")
    if not 0.0 <= cfg.spurious <= 1.0:
        raise ValueError(f"--spurious {cfg.spurious} is outside [0, 1] (it is P(a digit's majority color))")
    if cfg.spurious and cfg.dataset != "cmnist":
        raise ValueError(f"--spurious {cfg.spurious} applies to --dataset cmnist only (got {cfg.dataset})")
    if cfg.download not in DOWNLOAD:
        raise ValueError(f"--download {cfg.download!r}: choose auto (fetch MNIST when none of its files is "
                         f"there), true (fetch whatever is missing, CelebA too) or false (never use the network)")
    if cfg.n_train < 0:
        raise ValueError(f"--n-train {cfg.n_train} must be >= 0 (0 = as many as the bias allows)")
    names = cfg.colors.split(",")
    for name in names:
        if name not in COLORS:
            raise ValueError(f"--colors {cfg.colors!r}: unknown color {name!r}; choose from {', '.join(COLORS)}")
    if len(names) < 2 or len(set(names)) < len(names):
        raise ValueError(f"--colors {cfg.colors!r}: give two or more different colors (one per group), e.g. red,green")
    pair = cfg.digits.split(",")
    if len(pair) != 2 or len(set(pair)) != 2 or not set(pair) <= set("0123456789"):
        raise ValueError(f"--digits {cfg.digits!r} must name two different digits, e.g. 7,8")


def load(cfg: DataConfig, split: str) -> Split:
    """split: 'train' (biased, what generators learn from), 'test' (balanced, held out), and for
    celeba also 'val' (balanced; the evaluation classifier trains on it)."""
    check_config(cfg)
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; choose train, val or test")
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.dataset == "celeba":
        return _celeba(cfg, split, gen)
    images, digits = _mnist(cfg, train=split == "train")
    if cfg.dataset == "cmnist":
        return _cmnist(cfg, split, images, digits, gen)
    return _mnist_pair(cfg, split, images, digits, gen)


# ---------------------------------------------------------------------------------------- sampling
def biased_indices(group: torch.Tensor, shares, n: int, gen: torch.Generator) -> torch.Tensor:
    """Pick n indices so that group k makes up shares[k] of them (at random within each group).
    n = 0 takes the largest n every group can fill. Raises if a group is too small."""
    shares = torch.tensor(shares, dtype=torch.float64)
    shares = shares / shares.sum()
    avail = torch.bincount(group, minlength=len(shares)).double()
    if n == 0:
        n = int(min(avail[k] / s for k, s in enumerate(shares) if s > 0))
    counts = (shares * n).round().long()
    counts[-1] = n - counts[:-1].sum()
    picked = []
    for k, c in enumerate(counts.tolist()):
        members = (group == k).nonzero().squeeze(1)
        if c > len(members):
            raise ValueError(f"group {k} has {len(members)} images but {c} are needed for "
                             f"{n} images at shares {shares.tolist()}; lower --n-train")
        picked.append(members[torch.randperm(len(members), generator=gen)[:c]])
    idx = torch.cat(picked)
    return idx[torch.randperm(len(idx), generator=gen)]


# ------------------------------------------------------------------------------------------- MNIST
def _mnist(cfg: DataConfig, train: bool):
    """-> images uint8 [N, 32, 32], digits int64 [N]; the files are checked first (see datafiles)."""
    gray, digits = datafiles.load_mnist(data_root(cfg) / "MNIST" / "raw", train, cfg.download)  # [N, 28, 28], [N]
    return F.pad(gray, (MNIST_PAD,) * 4), digits


def _cmnist(cfg, split, gray, digits, gen):
    """Paint each digit in its group's color: pixel = intensity/255 * color."""
    n_groups = len(cfg.colors.split(","))
    if split == "train":
        shares = [cfg.bias, 1 - cfg.bias] if n_groups == 2 else [1.0 / n_groups] * n_groups
    else:
        shares = [1.0 / n_groups] * n_groups                    # balanced held-out split
    n = cfg.n_train if split == "train" else 0
    n = n or len(gray)
    if n > len(gray):
        raise ValueError(f"--n-train {n} is more than the {len(gray)} MNIST images; lower --n-train")
    # Colors go to a random permutation, so digits keep their natural distribution per group.
    order = torch.randperm(len(gray), generator=gen)[:n]
    if split == "train" and cfg.spurious:     # group 0..G-1 per image: the digit's majority color or another
        majority = digits[order] % n_groups                                  # [n]
        other = (majority + torch.randint(1, n_groups, (n,), generator=gen)) % n_groups
        group = torch.where(torch.rand(n, generator=gen) < cfg.spurious, majority, other)
    else:                                     # the shares, in the permuted order
        counts = (torch.tensor(shares, dtype=torch.float64) * n).round().long()
        counts[-1] = n - counts[:-1].sum()
        group = torch.repeat_interleave(torch.arange(n_groups), counts)  # [n]
    names = cfg.colors.split(",")
    palette = torch.tensor([COLORS[c] for c in names], dtype=torch.float32)  # [K, 3]
    intensity = gray[order].float().unsqueeze(1) / 255                      # [n, 1, 32, 32]
    images = (intensity * palette[group][:, :, None, None]).round().to(torch.uint8)  # [n, 3, 32, 32]
    shuffle = torch.randperm(n, generator=gen)
    return Split(images[shuffle], group[shuffle], digits[order][shuffle], names, 10)


def _mnist_pair(cfg, split, gray, digits, gen):
    pair = [int(d) for d in cfg.digits.split(",")]                     # two different digits (check_config)
    keep = (digits == pair[0]) | (digits == pair[1])
    gray, group = gray[keep], (digits[keep] == pair[1]).long()
    shares = [cfg.bias, 1 - cfg.bias] if split == "train" else [0.5, 0.5]
    idx = biased_indices(group, shares, cfg.n_train if split == "train" else 0, gen)
    images = gray[idx].unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # [n, 3, 32, 32] gray RGB
    return Split(images, group[idx], group[idx], [str(d) for d in pair], 2)


# ------------------------------------------------------------------------------------------ CelebA
def read_celeba_table(path: Path):
    """list_attr_celeba.txt -> (ids, attribute names, int8 [N, A] of ±1).

    Line 1 is the image count N, line 2 the A attribute names, then per image '<id>.jpg' and A
    values of 1 or -1. Anything else (an empty file, a cut-off one) raises one line naming the file."""
    lines = path.read_text(errors="replace").splitlines()
    head = [line.split() for line in lines[:2]]
    if len(head) < 2 or len(head[0]) != 1 or not head[0][0].isdigit() or not head[1]:
        raise ValueError(f"{path} is empty or malformed: expected line 1 = the image count, line 2 = "
                         f"the attribute names, then '<id>.jpg' and one 1 or -1 per attribute; copy it again")
    names = head[1]
    rows = [(k, line.split()) for k, line in enumerate(lines[2:], start=3) if line.strip()]
    for k, r in rows:
        if len(r) != len(names) + 1 or not set(r[1:]) <= {"1", "-1"}:
            raise ValueError(f"{path} line {k} is malformed ({' '.join(r)[:40]!r}): expected '<id>.jpg' "
                             f"and {len(names)} values of 1 or -1; copy it again")
    if int(head[0][0]) != len(rows):
        raise ValueError(f"{path} says {head[0][0]} images on line 1 but lists {len(rows)} "
                         f"(cut off?); copy it again")
    values = torch.tensor([[int(v) for v in r[1:]] for _, r in rows], dtype=torch.int8)
    return [r[0] for _, r in rows], names, values


def read_partition(path: Path, ids) -> torch.Tensor:
    """list_eval_partition.txt ('<id>.jpg 0|1|2' per line: train, val, test) -> int64 [N] for ids."""
    part = {}
    for k, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        r = line.split()
        if r and (len(r) != 2 or r[1] not in ("0", "1", "2")):
            raise ValueError(f"{path} line {k} is malformed ({line.strip()[:40]!r}): expected "
                             f"'<id>.jpg 0|1|2' (train, val, test); copy it again")
        if r:
            part[r[0]] = int(r[1])
    missing = [name for name in ids if name not in part]
    if missing:
        raise ValueError(f"{path} {'is empty' if not part else f'has no row for {missing[0]}'} "
                         f"({len(missing)} of the images in list_attr_celeba.txt lack one): expected "
                         f"'<id>.jpg 0|1|2' per image; copy it again")
    return torch.tensor([part[name] for name in ids])


def decode_face(path: Path) -> torch.Tensor:
    """One aligned CelebA JPEG -> uint8 [3, 64, 64] (center-crop 140, resize 64; a 64-px copy as is)."""
    try:
        img = decode_image(str(path), mode=torchvision.io.ImageReadMode.RGB)   # [3, 218, 178]
    except RuntimeError as e:      # torchvision's message starts with its own source location
        reason = re.sub(r"^\w+, \S+:\d+, ", "", str(e)).splitlines()[0]
        raise ValueError(f"{path} is not a readable image ({reason}); copy it again, or delete it "
                         f"(missing images are left out)") from None
    if img.shape[-1] != CELEBA_SIZE:
        img = resize(center_crop(img, [CELEBA_CROP]), [CELEBA_SIZE], antialias=True)
    return img


def cache_dir() -> Path:
    """Where decoded images are cached: CACHE_DIR if set, else $FAIRDIFF_CACHE, else <run root>/cache,
    the run root being $FAIRDIFF_RUNS (the command lines set it from --runs) or ./runs."""
    return Path(CACHE_DIR or os.environ.get("FAIRDIFF_CACHE") or Path(os.environ.get("FAIRDIFF_RUNS", "runs")) / "cache")


def celeba_images(root: Path, ids) -> torch.Tensor:
    """Decode every id once; cached in cache_dir() as uint8 [N, 3, 64, 64]."""
    folder = root / "celeba" / "img_align_celeba"
    cache = cache_dir() / f"celeba_{CELEBA_SIZE}px_{len(ids)}_{ids[0]}_{ids[-1]}.pt"
    shape = (len(ids), 3, CELEBA_SIZE, CELEBA_SIZE)
    out = datafiles.load_cache(cache, lambda x: torch.is_tensor(x) and x.shape == shape and x.dtype == torch.uint8)
    if out is not None:
        return out
    from tqdm import tqdm
    out = torch.empty(shape, dtype=torch.uint8)
    for i, name in enumerate(tqdm(ids, desc="decoding CelebA once", leave=False)):
        out[i] = decode_face(folder / name)
    datafiles.save_cache(out, cache)
    return out


def _celeba(cfg, split, gen):
    root = data_root(cfg)
    base = root / "celeba"
    missing = [f for f in CELEBA_FILES if not (base / f).exists()]
    if missing and cfg.download == "true" and importlib.util.find_spec("gdown") is None:
        raise FileNotFoundError(
            f"--download true cannot fetch CelebA: torchvision fetches it from Google Drive with the "
            f"package gdown, which is not installed; place {', '.join(CELEBA_FILES)} in "
            f"{base.resolve()}/ by hand (or pip install gdown)")
    if missing and cfg.download == "true":
        torchvision.datasets.CelebA(root, split="all", download=True)
        missing = []
    if missing:
        raise FileNotFoundError(
            f"CelebA not found under data root {root.resolve()}: expected {base}/ with "
            f"{', '.join(CELEBA_FILES)} (torchvision's layout); missing {', '.join(missing)}; "
            f"place them there by hand, or point --data-root / FAIRDIFF_DATA at a folder that has them, or "
            f"pass --download true (Google Drive, needs gdown)")
    ids, names, attrs = read_celeba_table(base / "list_attr_celeba.txt")
    if "Male" not in names:
        raise ValueError(f"{base / 'list_attr_celeba.txt'} has no Male column (the group); copy it again")
    if cfg.cond_attr not in names:
        raise ValueError(f"--cond-attr {cfg.cond_attr!r} is not a CelebA attribute; one of {', '.join(names)}")
    present = [i for i, name in enumerate(ids) if (base / "img_align_celeba" / name).exists()]
    if not present:
        raise FileNotFoundError(f"no images of list_attr_celeba.txt found in {base / 'img_align_celeba'}")
    ids = [ids[i] for i in present]
    attrs = attrs[present]
    group = (attrs[:, names.index("Male")] < 0).long()            # 0 = male, 1 = female
    label = (attrs[:, names.index(cfg.cond_attr)] > 0).long()     # 1 = has cond_attr
    partition = read_partition(base / "list_eval_partition.txt", ids)     # [N] 0 train, 1 val, 2 test
    wanted = {"train": 0, "val": 1, "test": 2}[split]
    pool = (partition == wanted).nonzero().squeeze(1)
    if cfg.cell_ratio:
        try:
            ratios = [float(r) for r in cfg.cell_ratio.split(",")]
        except ValueError:
            ratios = []
        if len(ratios) != 4 or min(ratios) < 0:
            raise ValueError(f"--cell-ratio {cfg.cell_ratio!r} needs four shares >= 0 for "
                             "(cond,male):(cond,female):(not cond,male):(not cond,female)")
        cells = (1 - label) * 2 + group                            # 0..3 in the order above
        for name, k in (("train", 0), ("val", 1), ("test", 2)):    # all splits: fail before any training
            check_cells(cells[partition == k], ratios if name == "train" else [1.0] * 4, cfg, name)
        cell = cells[pool]
    if split == "train" and cfg.cell_ratio:
        idx = pool[biased_indices(cell, ratios, cfg.n_train or 0, gen)]
    elif split == "train":
        idx = pool[biased_indices(group[pool], [cfg.bias, 1 - cfg.bias], cfg.n_train or 7000, gen)]
    else:  # balanced in the group, and, for InvDiff's cells, in the cond attribute too
        balanced = cell if cfg.cell_ratio else group[pool]
        idx = pool[biased_indices(balanced, [1.0] * (4 if cfg.cell_ratio else 2), 0, gen)]
    images = celeba_images(root, ids)[idx]
    return Split(images, group[idx], label[idx], ["male", "female"], 2)


def check_cells(cell: torch.Tensor, shares, cfg: DataConfig, split: str):
    """Refuse a split in which a cell that is asked for holds fewer than cfg.min_cell images (the
    rarest cell sets the training-set size, and the evaluation classifiers learn from every cell)."""
    counts = torch.bincount(cell, minlength=4).tolist()
    names = [f"{c}, {g}" for c in (cfg.cond_attr, f"not {cfg.cond_attr}") for g in ("male", "female")]
    for k, (n, share) in enumerate(zip(counts, shares)):
        if share > 0 and n < cfg.min_cell:
            raise ValueError(f"--cond-attr {cfg.cond_attr}: the {split} split has only {n} images of "
                             f"({names[k]}), fewer than --min-cell {cfg.min_cell}; choose another "
                             f"--cond-attr (e.g. Smiling) or lower --min-cell")


def export_celeba64(cfg: DataConfig, out: Path):
    """Write a compact copy (64x64 JPEGs + the two lists) that carries to a GPU machine."""
    root = data_root(cfg)
    ids, _, _ = read_celeba_table(root / "celeba" / "list_attr_celeba.txt")
    images = celeba_images(root, ids)
    (out / "celeba" / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    for name, img in zip(ids, images):
        write_file(str(out / "celeba" / "img_align_celeba" / name), encode_jpeg(img, quality=90))
    for f in CELEBA_FILES[1:]:
        (out / "celeba" / f).write_bytes((root / "celeba" / f).read_bytes())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="inspect a dataset, or export CelebA at 64 px")
    p.add_argument("--dataset", default="cmnist")
    p.add_argument("--data-root", default="")
    p.add_argument("--bias", type=float, default=0.8)
    p.add_argument("--export-celeba64", default="", help="folder to write a 64-px CelebA copy to")
    a = p.parse_args()
    cfg = DataConfig(dataset=a.dataset, data_root=a.data_root, bias=a.bias)
    if a.export_celeba64:
        export_celeba64(cfg, Path(a.export_celeba64))
    else:
        for s in ("train", "test"):
            d = load(cfg, s)
            share = torch.bincount(d.group, minlength=len(d.group_names)).float() / len(d)
            print(f"{s}: {len(d)} images {tuple(d.images.shape[1:])}, group shares "
                  + ", ".join(f"{n} {v:.3f}" for n, v in zip(d.group_names, share.tolist())))
