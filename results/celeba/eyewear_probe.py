"""Do DDM's CelebA FD samples gain eyewear, and does the gender classifier call eyewear "male"?

results/REPORT.md reads the one CelebA arm where DDM's FD falls (train M:F 1:4, α = 0.5: p̂(male) 0.263 →
0.434) as the evaluation classifier being fooled by dark, sunglass-like occlusions, since eyewear is a
male cue in CelebA (12.7% of men wear `Eyeglasses`, 2.4% of women). This script measures that on the
64 samples per arm that the GPU run saved as grids (`ddm-m*-fd/grids/alpha=*.jpg`, 8×8 tiles of
64 px with 1 px padding, JPEG quality 92 of the PNG grids):

* an `Eyeglasses` classifier, evaluate.py's ConvNet trained on the official train split balanced in
  the four (Eyeglasses × Male) cells, so it cannot read eyewear off gender; accuracy on the test split
  balanced the same way;
* the gender classifier exactly as the reports build it (`get_evaluator`, trained on the balanced
  val split), retrained here on the CPU.

Per arm: the share of the 64 samples with eyewear, the share called male, and the share called male
among samples with and without eyewear. 64 samples is few: read differences of tens of percent only.

    FAIRDIFF_DATA=../shared/data python results/celeba/eyewear_probe.py   # ~5 min on 2 CPU cores
writes results/celeba/eyewear_probe.json and prints a Markdown table.
"""
import json
import sys
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from data import DataConfig, load  # noqa: E402
from evaluate import cached_classifier, get_evaluator, predict  # noqa: E402

HERE = Path(__file__).parent
ARMS = {"4:1": HERE / "ddm-m4f1-fd/grids", "1:4": HERE / "ddm-m1f4-fd/grids"}
ALPHAS = ("0", "0.01", "0.05", "0.1", "0.2", "0.5")
TILE, PAD = 64, 1


def tiles(path: Path) -> torch.Tensor:
    """An 8×8 grid image -> uint8 [64, 3, 64, 64], row by row."""
    grid = decode_image(str(path), mode=ImageReadMode.RGB)                   # [3, 521, 521]
    step = TILE + PAD
    return torch.stack([grid[:, PAD + i * step:PAD + i * step + TILE, PAD + j * step:PAD + j * step + TILE]
                        for i in range(8) for j in range(8)])


def eyewear_classifier(runs: Path):
    """evaluate.py's seeded ConvNet for Eyeglasses on train faces balanced in (Eyeglasses × Male),
    cached in runs/celeba/eval/; -> (net, test accuracy, train faces, test faces)."""
    cfg = DataConfig(dataset="celeba", cond_attr="Eyeglasses", cell_ratio="1,1,1,1", min_cell=20)
    train, test = load(cfg, "train"), load(cfg, "test")                     # label = has eyeglasses
    net, accuracy = cached_classifier(runs / "celeba" / "eval" / "Eyeglasses_cells_e30.pt", 3, 2,
                                      lambda: (train.images, train.label), (test.images, test.label),
                                      epochs=30, device="cpu", flip=True)
    return net, accuracy, len(train.images), len(test.images)


def main():
    runs = ROOT / "runs"
    eyewear, eyewear_acc, n_train, n_test = eyewear_classifier(runs)
    evaluator = get_evaluator(DataConfig(dataset="celeba"), runs_dir=str(runs), device="cpu")
    rows = []
    for ratio, folder in ARMS.items():
        for alpha in ALPHAS:
            images = tiles(folder / f"alpha={alpha}.jpg")
            glasses = predict(eyewear, images, "cpu")[0].argmax(1) == 1      # [64] bool
            male = evaluator.groups(images) == 0                             # group 0 = male
            rows.append({"train_MF": ratio, "alpha": float(alpha), "n": len(images),
                         "eyewear": glasses.float().mean().item(), "male": male.float().mean().item(),
                         "male_given_eyewear": male[glasses].float().mean().item() if glasses.any() else None,
                         "male_given_no_eyewear": male[~glasses].float().mean().item()})
    out = {"eyewear_classifier": {"train_faces": n_train, "test_faces": n_test, "test_accuracy": eyewear_acc},
           "gender_classifier_accuracy": evaluator.accuracies["gender"], "arms": rows}
    (HERE / "eyewear_probe.json").write_text(json.dumps(out, indent=1))
    print(f"Eyeglasses classifier: {n_train} train faces, accuracy {eyewear_acc:.3f} on {n_test} test faces "
          f"(both balanced in Eyeglasses × Male); gender classifier {evaluator.accuracies['gender']:.3f}\n")
    print("| train M:F | α | eyewear | called male | male \\| eyewear | male \\| no eyewear |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        given = "–" if r["male_given_eyewear"] is None else f"{r['male_given_eyewear']:.2f}"
        print(f"| {r['train_MF']} | {r['alpha']:g} | {r['eyewear']:.2f} | {r['male']:.2f} | {given} | "
              f"{r['male_given_no_eyewear']:.2f} |")


if __name__ == "__main__":
    main()
