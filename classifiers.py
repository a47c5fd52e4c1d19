"""The evaluation classifiers: one small CNN architecture, its training, batched prediction, a cache.

ConvNet: three conv-BN-ReLU-maxpool blocks (widths 16, 32, 64), adaptive average pooling to 4×4, a
128-d penultimate layer (FID-C's features, evaluate.py) and a linear head; uint8 images reach it
scaled to [−1, 1]. Training: Adam with a one-cycle schedule (peak lr 3e-3), batch 256, seeded order
and seeded initial weights. `cached_classifier` trains one once and keeps {weights, held-out
accuracy} in a file (written atomically, retrained when unreadable); evaluate.get_evaluator picks
which classifiers a dataset gets and the data they learn from.
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import datafiles

BATCH = 1000             # images per classifier forward pass


class ConvNet(nn.Module):
    """Three conv-BN-ReLU-maxpool blocks, a 128-d penultimate layer (the FID-C features), a head."""

    def __init__(self, in_channels: int, num_classes: int, widths=(16, 32, 64), dim: int = 128):
        super().__init__()
        layers, c = [], in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(c * 16, dim), nn.ReLU())
        self.head = nn.Linear(dim, num_classes)

    def features(self, x):                      # x float in [0, 1], [B, C, H, W]
        return self.body(x * 2 - 1)             # [B, 128]

    def forward(self, x):
        return self.head(self.features(x))      # [B, num_classes]


def train_classifier(net, images, targets, *, epochs, device, seed=0, flip=False, desc="classifier"):
    """Adam with a one-cycle schedule, batch 256, seeded order; images uint8 [N, C, H, W]."""
    gen = torch.Generator().manual_seed(seed)
    net.to(device).train()
    batch = min(256, len(images))
    per_epoch = len(images) // batch
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * per_epoch)
    bar = tqdm(total=epochs * per_epoch, desc=f"training {desc}", leave=False)
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=gen)[:per_epoch * batch].split(batch):
            x = images[idx].to(device).float() / 255                       # [B, C, H, W]
            if flip:  # mirror half the faces: a free augmentation for a small training set
                mirror = (torch.rand(len(x), generator=gen) < 0.5).to(device)
                x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(net(x), targets[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return net.eval()


@torch.inference_mode()
def predict(net, images, device):
    """uint8 [N, C, H, W] -> (softmax [N, classes], features [N, 128]) on the CPU, in batches."""
    probs, feats = [], []
    for x in images.split(BATCH):
        f = net.features(x.to(device).float() / 255)
        probs.append(net.head(f).softmax(1).cpu())
        feats.append(f.cpu())
    return torch.cat(probs), torch.cat(feats)


def cached_classifier(path: Path, in_channels, num_classes, train, test, *, epochs, device, flip=False, seed=0):
    """Load `path`, or train a seeded ConvNet on train() = (uint8 images, targets), measure its accuracy
    on test = (images, targets) and save {weights, accuracy} atomically. -> (net, accuracy)."""
    with torch.random.fork_rng(devices=[]):     # seeded initial weights; the caller's RNG is untouched
        torch.manual_seed(seed)
        net = ConvNet(in_channels, num_classes)
    ckpt = datafiles.load_cache(path, lambda c: isinstance(c, dict) and {"state_dict", "accuracy"} <= c.keys())
    if ckpt is not None:                        # absent, or unreadable (then retrained)
        net.load_state_dict(ckpt["state_dict"])
        return net.to(device).eval(), ckpt["accuracy"]
    images, targets = train()
    train_classifier(net, images, targets, epochs=epochs, device=device, seed=seed, flip=flip, desc=path.stem)
    accuracy = (predict(net, test[0], device)[0].argmax(1) == test[1]).double().mean().item()
    datafiles.save_cache({"state_dict": net.state_dict(), "accuracy": accuracy}, path)   # per-process temp name
    return net, accuracy
