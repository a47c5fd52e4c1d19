"""Evaluation: which group a generated image belongs to, and how fair and how good a set of samples is.

Readers (classifiers.py's CNNs, trained once on real data, cached in `runs/<dataset>/eval/`):

    cmnist      group = color of the foreground pixels (nearest palette color), read from pixels;
                class = digit, from a small CNN trained on real MNIST, fed gray = max over RGB
    mnist-pair  group = the digit CNN's prediction mapped to its group (-1: neither of the two digits)
    celeba      group = a gender CNN (0 male, 1 female) trained on the balanced `val` split;
                class = a `cond_attr` CNN (e.g. Smiling) trained on `val` balanced in that attribute

An arm (a dict of uint8 images [N, 3, H, W]: pooled, per requested group, or per class) gets every
metric its images allow (`evaluate_arm`); the equations are metrics.py's:
* p̂, FD_half_l1 and FD_l2 with bootstrap 95% CIs, on all its images;
* SPD, for a model conditioned on the group a. success = the sample is classified as the requested
  group (for the MNIST datasets also as a confidently recognised digit, softmax ≥ 0.9, any digit);
* Bias (InvDiff), for class-conditional samples, reported as mean and std (ddof 0) over the classes;
* FID-C, the Fréchet distance on the penultimate layer of the evaluation CNN (digit CNN for MNIST,
  gender CNN for CelebA), and that CNN's mean max-softmax on the arm (`confidence`: samples that
  stop looking like data score low), both from one forward pass.

FID-C's real side is the held-out test set reweighted to the arm's own group share (test image i of
group g weighs p̂_g / n_g), so FID-C measures image quality and FD the group share: the two axes of
tradeoff.png, and real training vs real test images is FID-C's floor. (`FID_C_vs_balanced` in
metrics.json uses the balanced test set as it is, so a wrong share costs it too.) The test features
are reduced once to per-group moments (`Evaluator.real_moments`), from which each arm's reweighted
reference follows in closed form (metrics.mixture_moments). The digit CNN sees gray images, so for
cmnist the foreground's mean color (3 numbers) is appended, scaled to the same total variance on
real test images as the CNN features: an off-palette hue costs FID-C. Not Inception-FID: never
compare the two.

`evaluate_arms` writes metrics.json, report.md, tradeoff.png and sample grids;
`python evaluate.py --run runs/<dataset>/base-<hash>` samples a trained model and evaluates it as one arm.
"""
import json
import math
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from classifiers import cached_classifier, predict
from data import COLORS, DOWNLOAD, DataConfig, biased_indices, load
from config import ConfigError, Parser, check_device, check_writable
from metrics import bias_score, bootstrap, fd_half_l1, fd_l2, frechet_to_reference, group_moments, group_shares, spd

FOREGROUND = 0.5         # a pixel whose brightest channel is ≥ this (of 1) belongs to the digit
CONFIDENT = 0.9          # softmax probability of "a confidently recognised digit"
MAX_REFERENCE = 10_000   # real images per split behind the reference features
EPOCHS = {"digit": 3, "celeba": 15}   # classifier training epochs; get_evaluator(epochs=) overrides


def foreground_color(images) -> torch.Tensor:
    """Mean over foreground pixels of RGB / max(RGB): exactly the palette color on real cmnist images.
    uint8 [N, 3, H, W] -> float [N, 3] (zeros for an image without foreground pixels)."""
    x = images.float() / 255                                               # [N, 3, H, W]
    value = x.amax(1, keepdim=True)                                        # [N, 1, H, W]
    fg = (value >= FOREGROUND).float()
    chroma = x / value.clamp_min(1e-6)                                     # every pixel scaled to max 1
    return (chroma * fg).sum((2, 3)) / fg.sum((2, 3)).clamp_min(1)         # [N, 3]


class Evaluator:
    """Reads the group, class and features of uint8 images [N, 3, H, W] (on any device) of one dataset."""

    def __init__(self, data_cfg: DataConfig, nets: dict, accuracies: dict, device="cpu", color_scale=1.0):
        self.cfg, self.nets, self.accuracies = data_cfg, nets, accuracies
        self.device, self.color_scale = device, color_scale
        self.num_groups = len(data_cfg.colors.split(",")) if data_cfg.dataset == "cmnist" else 2
        if self.num_groups < 2:
            raise ValueError(f"--colors {data_cfg.colors!r} names one group; fairness needs at least two")
        self.palette = torch.tensor([COLORS[c] for c in data_cfg.colors.split(",")]) / 255  # [K, 3]
        self.memo = {}                                                     # real_features' cache

    def _digits(self, images):                  # the digit CNN on gray = max over RGB
        return predict(self.nets["digit"], images.amax(1, keepdim=True), self.device)

    def groups(self, images) -> torch.Tensor:
        """int64 [N]: the group, -1 = none (cmnist: no foreground; mnist-pair: another digit)."""
        images = check_images(images)
        if self.cfg.dataset == "cmnist":
            color = foreground_color(images)                                # [N, 3]
            nearest = torch.cdist(color, self.palette).argmin(1)            # [N]
            return torch.where(color.amax(1) > 0, nearest, -1)
        if self.cfg.dataset == "mnist-pair":
            return self.classes(images)[0]
        return predict(self.nets["gender"], images, self.device)[0].argmax(1)

    def classes(self, images):
        """(pred int64 [N], confidence float [N]): the digit (cmnist), the group (mnist-pair, -1 for
        another digit) or whether cond_attr is present (celeba)."""
        images = check_images(images)
        net = self.nets.get("attr")
        probs = predict(net, images, self.device)[0] if net else self._digits(images)[0]   # [N, classes]
        confidence, pred = probs.max(1)
        if self.cfg.dataset == "mnist-pair":
            to_group = torch.full((10,), -1)
            to_group[[int(d) for d in self.cfg.digits.split(",")]] = torch.tensor([0, 1])
            pred = to_group[pred]
        return pred, confidence

    def features(self, images) -> torch.Tensor:
        """float [N, D]: the CNN's penultimate layer (cmnist: + the scaled foreground color)."""
        return self.read_features(images)[0]

    def read_features(self, images) -> tuple:
        """(features [N, D], the same CNN's max softmax [N]) from one forward pass."""
        images = check_images(images)
        if self.cfg.dataset == "celeba":
            probs, feats = predict(self.nets["gender"], images, self.device)   # [N, 2], [N, 128]
        else:
            probs, feats = self._digits(images)                                 # [N, 10], [N, 128]
        if self.cfg.dataset == "cmnist":
            feats = torch.cat([feats, self.color_scale * foreground_color(images)], 1)  # [N, 131]
        return feats, probs.max(1).values

    def real_features(self, cfg: DataConfig, split: str):
        """(features [M, D], true group [M]) of up to MAX_REFERENCE real images (seeded pick), cached."""
        key = (split, *vars(cfg).values())
        if key not in self.memo:
            real = load(cfg, split)
            pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:MAX_REFERENCE]
            self.memo[key] = self.features(real.images[pick]), real.group[pick]
        return self.memo[key]

    def real_moments(self, cfg: DataConfig, split: str) -> tuple:
        """metrics.group_moments of real_features(cfg, split): FID-C's real side for every arm."""
        return group_moments(*self.real_features(cfg, split), self.num_groups)


def check_images(images) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    return images.cpu()


def get_evaluator(data_cfg: DataConfig, runs_dir="runs", device=None, epochs=None) -> Evaluator:
    """Train (once, cached in runs_dir/<dataset>/eval/) or load the dataset's classifiers.
    epochs: None = EPOCHS; fewer gives a quicker, less accurate evaluator (the tiny preset)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = Path(runs_dir) / data_cfg.dataset / "eval"
    if data_cfg.dataset == "celeba":
        val, test = load(data_cfg, "val"), load(data_cfg, "test")
        n_epochs = epochs or EPOCHS["celeba"]
        nets, accuracies = {}, {}
        for key, name, target in (("gender", "gender", "group"), ("attr", data_cfg.cond_attr, "label")):
            # each classifier trains on val balanced in its own target (val is balanced in gender only)
            keep = biased_indices(getattr(val, target), [1, 1], 0, torch.Generator().manual_seed(0))
            nets[key], accuracies[name] = cached_classifier(
                folder / f"{name}_e{n_epochs}.pt", 3, 2, lambda: (val.images[keep], getattr(val, target)[keep]),
                (test.images, getattr(test, target)), epochs=n_epochs, device=device, flip=True)
        return Evaluator(data_cfg, nets, accuracies, device)

    # MNIST: every digit image, colored or gray, reaches the CNN as gray = max over RGB
    mnist = replace(DataConfig(), dataset="cmnist", data_root=data_cfg.data_root, download=data_cfg.download,
                    bias=0.5, colors=data_cfg.colors if data_cfg.dataset == "cmnist" else "red,green")
    test = load(mnist, "test")                                              # all 10,000, balanced colors

    def gray(split):                            # what the digit CNN sees: uint8 [N, 1, 32, 32], digit [N]
        return split.images.amax(1, keepdim=True), split.label
    n_epochs = epochs or EPOCHS["digit"]
    net, accuracy = cached_classifier(folder / f"digit_e{n_epochs}.pt", 1, 10, lambda: gray(load(mnist, "train")),
                                      gray(test), epochs=n_epochs, device=device)
    evaluator = Evaluator(data_cfg, {"digit": net}, {"digit": accuracy}, device)
    if data_cfg.dataset == "cmnist":
        color_right = evaluator.groups(test.images) == test.group
        evaluator.accuracies["color (from pixels)"] = color_right.double().mean().item()
        cnn, color = evaluator._digits(test.images)[1], foreground_color(test.images)   # [M, 128], [M, 3]
        evaluator.color_scale = math.sqrt(cnn.var(0).sum() / color.var(0).sum().clamp_min(1e-12))
    return evaluator


# ------------------------------------------------------------------------------ reference & arms
def reference(evaluator: Evaluator, data_cfg: DataConfig, n: int = 2000) -> dict:
    """The training data's own group share and FD; FID-C of n real training images vs the real test
    images reweighted to the training share: the floor for an arm of n samples."""
    train = load(data_cfg, "train")
    p = group_shares(train.group, evaluator.num_groups)
    train_features, _ = evaluator.real_features(data_cfg, "train")
    floor = frechet_to_reference(train_features[:n], evaluator.real_moments(data_cfg, "test"), p)
    return {"group_names": train.group_names, "train_p_hat": p.tolist(), "train_FD_half_l1": fd_half_l1(p).item(),
            "train_FD_l2": fd_l2(p).item(), "FID_C_floor": floor, "FID_C_floor_n": min(n, len(train_features))}


def pooled_images(arm: dict, per_condition: int = None) -> torch.Tensor:
    """What p̂, FD and FID-C are computed on: `images`, else all `class_images`, else all `cond_images`
    (only the first per_condition of each condition, if given)."""
    if arm.get("images") is not None:
        return arm["images"]
    by_condition = arm.get("class_images") or arm.get("cond_images")
    if not by_condition:
        raise ValueError(f"arm {arm.get('name')!r} has none of images, cond_images, class_images")
    return torch.cat([images[:per_condition].cpu() for images in by_condition.values()])


def evaluate_arm(arm: dict, evaluator: Evaluator, real) -> dict:
    """Every metric the arm's images allow (SPD needs cond_images; Bias and cond_acc class_images).
    real = the test features' group moments, Evaluator.real_moments."""
    pool, k = pooled_images(arm), evaluator.num_groups
    groups = evaluator.groups(pool)                                                      # [N]
    p, ci = group_shares(groups, k), bootstrap(groups, k)
    features, confidence = evaluator.read_features(pool)                                 # [N, D], [N]
    matched = p if p.sum() > 0 else torch.full((k,), 1 / k)      # no sample in any group: balanced
    out = {"name": arm["name"], "n": len(pool), "no_group": (groups < 0).double().mean().item(),
           "p_hat": p.tolist(), "p_hat_ci": ci["p_hat"].tolist(),
           "FD_half_l1": fd_half_l1(p).item(), "FD_half_l1_ci": ci["FD_half_l1"].tolist(),
           "FD_l2": fd_l2(p).item(), "FD_l2_ci": ci["FD_l2"].tolist(),
           "FID_C": frechet_to_reference(features, real, matched),
           "FID_C_vs_balanced": frechet_to_reference(features, real), "confidence": confidence.mean().item()}
    if arm.get("cond_images"):
        success = {}
        for a, images in arm["cond_images"].items():
            hit = evaluator.groups(images) == int(a)
            if evaluator.cfg.dataset != "celeba":                # … and a confidently recognised digit
                hit &= evaluator.classes(images)[1] >= CONFIDENT
            success[str(int(a))] = hit
        out["SPD"] = spd(list(success.values()))
        out["success_rate"] = {a: hit.double().mean().item() for a, hit in success.items()}
    if arm.get("class_images"):
        bias, fd, correct = {}, {}, []
        for c, images in arm["class_images"].items():
            groups = evaluator.groups(images)
            bias[str(int(c))] = bias_score(torch.bincount(groups[groups >= 0], minlength=k))
            fd[str(int(c))] = fd_half_l1(group_shares(groups, k)).item()
            correct.append(evaluator.classes(images)[0] == int(c))
        values = torch.tensor(list(bias.values()), dtype=torch.float64)
        out.update(Bias_mean=values.mean().item(), Bias_std=values.std(correction=0).item(), Bias_per_class=bias,
                   FD_half_l1_per_class=fd, cond_acc=torch.cat(correct).double().mean().item())
    out.update({key: value for key, value in arm.items() if key not in ("images", "cond_images", "class_images")})
    return out


def evaluate_arms(arms, evaluator: Evaluator, data_cfg: DataConfig, out_dir, *, method, preset, device_name,
                  extra=None) -> dict:
    """Evaluate each arm; write metrics.json, report.md, tradeoff.png, samples_<arm>.png and samples.png
    to out_dir and print the table. extra: more top-level fields for metrics.json (e.g. the config)."""
    metrics = {"dataset": data_cfg.dataset, "device": device_name, "preset": preset, "method": method,
               "classifiers": dict(evaluator.accuracies)}
    if not arms:
        raise ValueError("evaluate_arms got no arms; pass a list of at least one arm dict")
    if set(extra or {}) & {*metrics, "reference", "arms"}:
        raise ValueError(f"extra fields {sorted(extra)} reuse metrics.json's own keys; rename them")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics["reference"] = reference(evaluator, data_cfg, n=max(len(pooled_images(arm)) for arm in arms))
    real = evaluator.real_moments(data_cfg, "test")
    metrics["arms"] = [evaluate_arm(arm, evaluator, real) for arm in tqdm(arms, desc="evaluate", leave=False)]
    metrics.update(extra or {})
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_tradeoff(metrics, out_dir / "tradeoff.png")
    plot_samples(arms, out_dir)
    (out_dir / "report.md").write_text(report(metrics))
    print(format_table(metrics))
    return metrics


# -------------------------------------------------------------------------------------- reporting
DEFINITIONS = [
    "FD_half_l1 = ½ Σ_k |p̂_k − 1/K| (= |p̂_0 − 0.5| for two groups), FD_l2 = ‖p̂ − u‖₂; p̂ leaves out samples in "
    "no group (`no_group` in metrics.json); 95% CIs by the percentile bootstrap, 1000 resamples.",
    "SPD = max_a P(success | cond = a) − min_a P(success | cond = a); success = the sample is classified as the "
    "requested group (MNIST: and recognised as a digit with softmax ≥ 0.9).",
    "Bias = InvDiff's Σ_{i<j} |n_i − n_j| / N_p / (K(K−1)/2) per class condition p, mean ± std over conditions; "
    "cond acc = the share of class-conditional samples classified as the requested class.",
    "FID-C = Fréchet distance of the evaluation classifier's penultimate features (cmnist: and foreground color) "
    "to real test images reweighted to the arm's group share; not Inception-FID, never compare the two."]
METRIC_KEYS = {"name", "n", "no_group", "p_hat", "p_hat_ci", "FD_half_l1", "FD_half_l1_ci", "FD_l2", "FD_l2_ci",
               "FID_C", "FID_C_vs_balanced", "confidence", "SPD", "success_rate", "Bias_mean", "Bias_std",
               "Bias_per_class", "FD_half_l1_per_class", "cond_acc"}


def format_table(metrics: dict) -> str:
    """Markdown, one row per arm, method fields (e.g. alpha) first; '–' where a metric does not apply."""
    arms, names = metrics["arms"], metrics["reference"]["group_names"]
    fields = [key for key in dict.fromkeys(key for arm in arms for key in arm) if key not in METRIC_KEYS
              and all(isinstance(arm.get(key), (int, float, str, type(None))) for arm in arms)]

    def cell(value, digits=3):
        return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    def with_ci(value, ci):
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    two = len(names) == 2
    header = ["arm", *fields, f"p̂({names[0]}) [95% CI]" if two else f"p̂ ({'/'.join(names)})",
              "FD_half_l1 [95% CI]", "FD_l2", "SPD", "Bias (mean ± std)", "cond acc", "FID-C"]
    rows = [[arm["name"], *(cell(arm.get(key)) for key in fields),
             with_ci(arm["p_hat"][0], arm["p_hat_ci"][0]) if two else "/".join(f"{v:.2f}" for v in arm["p_hat"]),
             with_ci(arm["FD_half_l1"], arm["FD_half_l1_ci"]), cell(arm["FD_l2"]), cell(arm.get("SPD")),
             f"{arm['Bias_mean']:.3f} ± {arm['Bias_std']:.3f}" if "Bias_mean" in arm else "–",
             cell(arm.get("cond_acc")), cell(arm["FID_C"], 2)] for arm in arms]
    return "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows])


def report(metrics: dict) -> str:
    ref = metrics["reference"]
    shares = ", ".join(f"{name} {v:.3f}" for name, v in zip(ref["group_names"], ref["train_p_hat"]))
    accuracies = ", ".join(f"{name} {acc:.4f}" for name, acc in metrics["classifiers"].items())
    return "\n\n".join([
        f"# {metrics['method']} on {metrics['dataset']} (preset {metrics['preset']}, {metrics['device']})",
        format_table(metrics),
        f"Reference lines: the training data's own group share ({shares}) has FD_half_l1 = "
        f"{ref['train_FD_half_l1']:.3f} and FD_l2 = {ref['train_FD_l2']:.3f}; {ref['FID_C_floor_n']} real training "
        f"images vs the real test images score FID-C = {ref['FID_C_floor']:.2f}, the floor.",
        f"Held-out accuracy of the evaluation classifiers: {accuracies}.",
        "\n".join(f"- {line}" for line in DEFINITIONS),
        "![trade-off](tradeoff.png)", "![samples](samples.png)"]) + "\n"


def plot_tradeoff(metrics: dict, path: Path):
    """FD_half_l1 (with its 95% CI) against FID-C, one labelled point per arm, reference lines in gray."""
    fig = Figure(figsize=(5.5, 4.5), tight_layout=True)
    ax = fig.add_subplot()
    for arm in metrics["arms"]:
        fd, (lo, hi) = arm["FD_half_l1"], arm["FD_half_l1_ci"]
        ax.errorbar(fd, arm["FID_C"], xerr=[[max(fd - lo, 0)], [max(hi - fd, 0)]], fmt="o", capsize=3)
        ax.annotate(arm["name"], (fd, arm["FID_C"]), textcoords="offset points", xytext=(4, 4))
    ax.axvline(metrics["reference"]["train_FD_half_l1"], ls="--", c="gray", label="training data's FD")
    ax.axhline(metrics["reference"]["FID_C_floor"], ls=":", c="gray", label="FID-C floor (real vs real)")
    ax.set(xlabel="FD_half_l1 (95% CI)", ylabel="FID-C (not Inception-FID)", title=metrics["method"])
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def plot_samples(arms, out_dir: Path, n=64):
    """samples_<arm>.png: an 8×8 grid per arm (conditions mixed); samples.png: all arms side by side."""
    fig = Figure(figsize=(3 * len(arms), 3.3), tight_layout=True)
    for i, arm in enumerate(arms):
        conditions = len(arm.get("class_images") or arm.get("cond_images") or [0])
        images = pooled_images(arm, per_condition=-(-n // conditions))[:n]                 # [≤ 64, 3, H, W]
        grid = make_grid(images.cpu().float() / 255, nrow=8, padding=1)                   # [3, H', W']
        name = re.sub(r"[^A-Za-z0-9._=-]+", "_", arm["name"].replace("α", "alpha").replace("λ", "lambda"))
        save_image(grid, out_dir / f"samples_{name}.png")
        ax = fig.add_subplot(1, len(arms), i + 1)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_title(arm["name"])
        ax.axis("off")
    fig.savefig(out_dir / "samples.png", dpi=120)


# -------------------------------------------------------------------------------------------- CLI
def check_report_folder(folder: Path):
    """The report goes to folder (created later if absent): fail now, not after sampling."""
    try:
        check_writable(folder if folder.exists() else folder.parent)
    except ConfigError:
        raise ConfigError(f"report folder {folder} is not writable; make it writable or copy the run elsewhere") from None


def main(argv=None):
    """python evaluate.py --run runs/cmnist/<stage>: sample --n images and evaluate them as one arm."""
    p = Parser(description="sample a trained model and evaluate it as one arm")
    p.add_argument("--run", required=True, help="a base model run folder, e.g. runs/cmnist/base-<hash>")
    p.add_argument("--n", type=int, default=2000, help="samples to draw")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--runs-dir", default="runs", help="where the evaluation classifiers are cached")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--data-root", default=None, help="the data root (default: the run's, else $FAIRDIFF_DATA)")
    p.add_argument("--download", choices=DOWNLOAD, default=None,
                   help="auto: fetch MNIST when none of its files is there (default); true: whatever is missing; false: never")
    try:
        a = p.parse_args(argv)
        run = Path(a.run)
        if not run.is_dir():
            raise FileNotFoundError(f"--run {a.run} is not a folder; pass a trained run such as runs/cmnist/base-<hash>")
        if run.name.startswith("vae-"):
            raise ValueError(f"--run {a.run} is an autoencoder run; pass a base model run such as "
                             f"runs/{run.parent.name}/base-<hash>")
        if a.n < 2:
            raise ValueError(f"--n {a.n} must be at least 2 (FID-C needs a covariance)")
        device = check_device(a.device)
        check_report_folder(run / "eval")
        from ddpm import load_pipeline          # here, so that evaluate.py imports without ddpm.py
        pipe = load_pipeline(run, device)
        given = {"data_root": a.data_root, "download": a.download}
        data_cfg = replace(pipe.data_cfg, **{k: v for k, v in given.items() if v is not None})
        evaluator = get_evaluator(data_cfg, a.runs_dir, device)
        arm = {"name": run.name, "images": pipe.sample(a.n, seed=a.seed)}
        evaluate_arms([arm], evaluator, data_cfg, run / "eval", method=run.name, preset=pipe.preset,
                      device_name=device, extra={"run": str(a.run), "n": a.n, "seed": a.seed})
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
