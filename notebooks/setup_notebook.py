"""What the three notebooks share: their first code cell's setup, and `show`, the image grid they draw.

Each notebook finds the repository root itself (it has to, before it can import this file), then:

    sys.path.insert(0, str(ROOT / "notebooks"))
    from setup_notebook import DEVICE, PRESET, RUNS, setup, show
    setup(ROOT)

Only the standard library is imported at the top of this file: in a fresh Python (a hosted notebook)
torch and the other requirements are not there until setup() has installed them, so everything that
needs them imports them inside the function that uses them.
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

PRESET, DEVICE = "tiny", "cpu"                    # every notebook runs on a CPU in a few minutes
RUNS = os.environ.get("FAIRDIFF_RUNS", "runs")   # run folders; a stage already there (same config hash) is reused


def install_requirements(root: Path):
    """pip-install root/requirements.txt into this kernel when one of its packages cannot be imported."""
    requirements = root / "requirements.txt"
    names = [re.split(r"[<>=!~ ]", line)[0] for line in requirements.read_text().splitlines() if line.strip()]
    if any(importlib.util.find_spec(name) is None for name in names):
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-r", str(requirements)])
        importlib.invalidate_caches()   # the import system may have listed site-packages before pip wrote there


def setup(root: Path):
    """Work from the repository root, with the requirements installed and torch on one thread; print the
    preset, the data root and the run folder."""
    os.chdir(root)                     # the notebooks' relative paths (runs/, data/, results/) start here
    sys.path.insert(0, str(root))      # the project's modules are flat files in the root
    install_requirements(root)

    import torch
    torch.set_num_threads(1)   # the tiny models gain nothing from more threads; on a busy CPU extra threads spin-wait

    import data
    print(f"preset {PRESET} on {DEVICE}; data root {data.data_root(data.DataConfig()).resolve()}; "
          f"run folders in {Path(RUNS).resolve()}")


def show(images, nrow=16, title="", ax=None):
    """Draw uint8 images [N, 3, H, W] as one grid."""
    import matplotlib.pyplot as plt   # by then the notebook has imported pyplot, with its inline backend
    from torchvision.utils import make_grid

    grid = make_grid(images.cpu().float() / 255, nrow=nrow, padding=1, pad_value=1)   # [3, H', W']
    if ax is None:
        rows = -(-len(images) // nrow)
        ax = plt.figure(figsize=(0.36 * nrow, 0.36 * rows + 0.4)).gca()   # about one screen pixel per image pixel
    ax.imshow(grid.permute(1, 2, 0).numpy())
    ax.set_title(title)
    ax.axis("off")
