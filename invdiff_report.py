"""InvDiff's environment table, verdict and report (the hidden group y is read here, and only here).

Environment table. For each loss form and K (invdiff.py, step 1), on the first seed:
* AUC = P(ℓ_i > ℓ_j) for i bias-conflicting and j bias-aligned (Mann–Whitney), where an image is
  bias-conflicting when its group is not the most common group of its class c. AUC > 0.5: the
  conflicting images have the higher loss; < 0.5: the lower (the direction depends on the data); the
  row z0-norm scores images by the latent's energy ‖z₀‖² alone, with no model;
* purity against the true cells c × y of the hard assignment argmax_k w_ik, Σ_k max_cell n_k,cell / N,
  and the environment sizes S_k / N;
* the effective minority share: the weight the objective L = mean_k R_k + λ · Var_k R_k puts on
  the conflicting images, Σ_{i conflicting} v_i / Σ_i v_i with v_i = ∂L/∂ℓ_i (invdiff.py, step 3) at
  the base's own per-image ε-loss, for every λ, and the share of images with v_i < 0. Plain ERM puts
  the conflicting images' own share of the data there; the oracle cells at λ = 0 put ½ (two groups).

Verdict (`verdict`, stated in the report before its tables), per sampling ratio r and CFG scale s,
with Bias (evaluate.py) read per seed and the across-seed 95% t-interval (metrics.seed_summary):
* "InvDiff reduces Bias" only if the oracle cells at λ lower Bias clearly below the base's, the
  inferred environments at the same λ reach ≥ 50% of the oracle's reduction, the inferred arm's Bias
  is clearly below the random arm's, and the inferred arm keeps mean cond acc ≥ 0.95× and FID-C ≤ 1.5×
  the base's;
* "the invariance term helps" only if some λ > 0 on the inferred environments has Bias clearly below
  λ = 0's, within the same cond acc and FID-C limits.
"Clearly below" is the paired across-seed difference (arms of a seed share batches and sampling noise)
d̄ < −2 · max(SE_d, √2/√(n·S)), n samples an arm, S seeds: |2p̂ − 1| read from n_c samples of a class has
SE ≤ 1/√n_c, so one arm's Bias has SE ≤ 1/√(n·S) and a difference of two ≤ √2 times that; the floor
keeps agreement by chance between few seeds from passing. With S = 3 seeds a margin of 2·SE_d alone
would pass by chance about 9% of the time (t with 2 degrees of freedom), and each (r, CFG) setting gets
its own verdict: read a single pass among many settings with that in mind.
The environment table weighs the whole training set; training estimates the same risks per batch.
"""
import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid
from tqdm import tqdm

import evaluate
import metrics

SHARE_OF_ORACLE = 0.5    # the inferred arm must reach half of the oracle's Bias reduction
ACC_SLACK, FID_SLACK = 0.95, 1.5
SE_MARGIN = 2.0


# ------------------------------------------------------------------------------ environment table
def cross_counts(a, b) -> torch.Tensor:
    """n[i, j] = #{images with a = i and b = j}: int64 [max a + 1, max b + 1] for a, b int [N]."""
    rows, cols = int(a.max()) + 1, int(b.max()) + 1
    return torch.bincount(a.cpu() * cols + b.cpu(), minlength=rows * cols).view(rows, cols)


def conflicting(label, group) -> torch.Tensor:
    """bool [N]: the image's group is not the most common group of its class."""
    return group.cpu() != cross_counts(label, group).argmax(1)[label.cpu()]


def auc(scores, positive) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann–Whitney U / (n₊ n₋))."""
    scores, positive = scores.cpu().double(), positive.cpu()
    _, inverse, counts = scores.unique(return_inverse=True, return_counts=True)
    below = counts.cumsum(0) - counts                                              # images ranked before each value
    ranks = (below + (counts + 1) / 2).double()[inverse]                           # average rank, 1-based
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    return ((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def effective_weights(losses, W, lam: float) -> torch.Tensor:
    """v_i = ∂L/∂ℓ_i = Σ_k (w_ik / S_k) · (1/K + 2λ (R_k − R̄) / (K − 1)): [N] for ℓ [N], W [N, K]."""
    losses, W = losses.double(), W.double()
    S = W.sum(0)                                                                   # [K]
    keep = S > 0
    W, S, K = W[:, keep], S[keep], int(keep.sum())
    R = (W * losses[:, None]).sum(0) / S                                           # [K]
    tilt = 2 * lam * (R - R.mean()) / (K - 1) if K > 1 else torch.zeros_like(R)
    return (W / S) @ (1 / K + tilt)


def environment_row(losses, W, cells, conflict, objective, lams) -> dict:
    """One row of the table for environments W [N, K]; losses None (a reference row, no ℓ): AUC NaN."""
    hard = W.argmax(1).cpu()
    counts = cross_counts(hard, cells)                                             # [≤K, cells]
    row = {"auc": float("nan") if losses is None else auc(losses, conflict),
           "purity": counts.max(1).values.sum().item() / len(hard),
           "sizes": sorted((W.sum(0).cpu() / len(W)).tolist(), reverse=True),
           "conflicting_share_max": max(conflict[hard == k].double().mean().item() for k in hard.unique())}
    for lam in lams:
        v = effective_weights(objective.cpu(), W.cpu(), lam)
        row[f"minority_share_lam{lam:g}"] = (v[conflict].sum() / v.sum()).item()
        row[f"negative_lam{lam:g}"] = (v < 0).double().mean().item()
    return row


def environment_table(candidates: dict, label, group, objective, lams) -> dict:
    """candidates: (form, K) -> (ℓ [N], W [N, K]); objective: the base's ε-loss ℓ_i [N] (the weights')."""
    label, group = label.cpu(), group.cpu()
    G = int(group.max()) + 1
    cells, conflict = label * G + group, conflicting(label, group)
    rows = [{"form": form, "K": K, **environment_row(losses.cpu(), W.cpu(), cells, conflict, objective, lams)}
            for (form, K), (losses, W) in candidates.items()]
    N = len(label)
    for name, W in (("erm (one environment)", torch.ones(N, 1)),
                    ("oracle cells", torch.nn.functional.one_hot(cells).double())):
        rows.append({"form": name, "K": W.shape[1], **environment_row(None, W, cells, conflict, objective, lams)})
    return {"rows": rows, "lams": list(lams), "conflicting": conflict.double().mean().item(), "N": N}


def environment_markdown(table: dict) -> str:
    lams = table["lams"]
    head = ["ℓ form", "K", "AUC (conflicting)", "purity (cells)", "largest S_k/N", "max conflicting share",
            *[f"minority weight λ={lam:g}" for lam in lams], *[f"v<0 λ={lam:g}" for lam in lams]]
    lines = [head, ["---"] * len(head)]
    for r in table["rows"]:
        lines.append([r["form"], str(r["K"]), f"{r['auc']:.3f}", f"{r['purity']:.3f}", f"{r['sizes'][0]:.3f}",
                      f"{r['conflicting_share_max']:.3f}", *[f"{r[f'minority_share_lam{lam:g}']:.3f}" for lam in lams],
                      *[f"{r[f'negative_lam{lam:g}']:.3f}" for lam in lams]])
    return "\n".join(["## Environments inferred without labels (groups read only for this table)", "",
                      f"{table['N']} training images, {table['conflicting']:.3f} of them bias-conflicting "
                      "(their group is not their class's most common). AUC > 0.5: conflicting images have the "
                      "higher ℓ. Minority weight: the share of the objective's weight on conflicting images "
                      "(ERM: their share of the data); v<0: images the objective rewards fitting worse.", "",
                      *("| " + " | ".join(r) + " |" for r in lines)]) + "\n"


def write_environments(out: Path, table: dict):
    (out / "environments.json").write_text(json.dumps(table, indent=2))
    md = environment_markdown(table)
    (out / "environments.md").write_text(md)
    print(md)


# ------------------------------------------------------------------------------------------ verdict
def verdict(per_seed: dict, lam: float, n_samples: int) -> dict:
    """per_seed: arm name -> {'Bias': [per seed], 'cond_acc': […], 'FID_C': […]}, the names of
    invdiff.Arm plus 'base', every list over the same seeds in one order. -> both verdicts, their checks."""
    S = len(per_seed["base"]["Bias"])
    if any(len(v) != S for arm in per_seed.values() for v in arm.values()):
        raise ValueError("verdict: every arm needs a value for each of the base's seeds")
    floor = math.sqrt(2 / (n_samples * S))
    mean = {name: {k: metrics.seed_summary(v)["mean"] for k, v in arm.items()} for name, arm in per_seed.items()}

    def clearly_lower(a, b):                              # paired across seeds, beyond sampling resolution
        d = metrics.paired(per_seed[a]["Bias"], per_seed[b]["Bias"])
        return d["diff"] < -SE_MARGIN * max(d["se"], floor), d

    def keeps_quality(name):
        return (mean[name]["cond_acc"] >= ACC_SLACK * mean["base"]["cond_acc"]
                and mean[name]["FID_C"] <= FID_SLACK * mean["base"]["FID_C"])

    inferred, oracle, random = (f"{k} λ={lam:g}" for k in ("inferred", "oracle", "random"))
    out = {"reduces": False, "helps": False, "checks": {}}
    if {inferred, oracle, random} <= set(per_seed):
        oracle_clear, d_oracle = clearly_lower(oracle, "base")
        reduction = {n: mean["base"]["Bias"] - mean[n]["Bias"] for n in (inferred, oracle)}
        below_random, d_random = clearly_lower(inferred, random)
        share = reduction[inferred] / reduction[oracle] if reduction[oracle] > 0 else float("nan")
        checks = {"oracle_lowers": oracle_clear, "oracle_vs_base": d_oracle, "share_of_oracle": share,
                  "below_random": below_random, "inferred_vs_random": d_random, "quality": keeps_quality(inferred)}
        out["reduces"] = bool(oracle_clear and share >= SHARE_OF_ORACLE and checks["below_random"] and checks["quality"])
        out["checks"]["reduces"] = checks
    lam0 = "inferred λ=0"
    others = [n for n in per_seed if n.startswith("inferred λ=") and n != lam0 and lam0 in per_seed]
    for name in others:
        lower, d = clearly_lower(name, lam0)
        out["checks"][f"{name} vs λ=0"] = {"lower": lower, **d, "quality": keeps_quality(name)}
        out["helps"] |= bool(lower and keeps_quality(name))
    return out


def verdict_rule() -> str:
    return ("Rule, fixed before the runs: InvDiff reduces Bias only if the oracle cells at λ lower Bias clearly "
            f"below the base's, the inferred environments at the same λ reach ≥ {SHARE_OF_ORACLE:.0%} of the oracle's "
            "reduction, the inferred arm's Bias is clearly below the random arm's, and it keeps mean cond acc ≥ "
            f"{ACC_SLACK:g}× and FID-C ≤ {FID_SLACK:g}× the base's. The invariance term helps only if some λ > 0 "
            "on the inferred environments has Bias clearly below λ = 0's within the same limits. \"Clearly below\": "
            f"the paired across-seed difference d̄ < −{SE_MARGIN:g}·max(SE_d, √2/√(n·S)), n samples an arm, S seeds. "
            "Otherwise the report says it does not.")


# ------------------------------------------------------------------------------------------- report
def settings(results) -> list:
    return sorted({(r["r"], r["scale"]) for r in results if r["arm"] != "base"})


def read_samples(samples, evaluator, data_cfg, per_class: int):
    """Bias, cond acc, FID-C, FD of every (fields, uint8 [C·n, 3, H, W]) -> result rows, and the first 8
    samples per class of the first seed of each (arm, r, scale) for the grids."""
    real = evaluator.real_moments(data_cfg, "test")
    rows, grids = [], {}
    for fields, images in tqdm(samples, desc="evaluating", leave=False):
        by_class = images.unflatten(0, (-1, per_class))                               # [C, n, 3, H, W]
        arm = {"name": fields["arm"], "class_images": dict(enumerate(by_class))}
        row = evaluate.evaluate_arm(arm, evaluator, real)
        rows.append({**fields, **{k: row[k] for k in ("Bias_mean", "cond_acc", "FID_C", "FD_half_l1")}})
        grids.setdefault((fields["arm"], fields["r"], fields["scale"]), by_class[:, :8])     # [C, ≤8, 3, H, W]
    return rows, grids


def write_report(out: Path, cfg, table: dict, samples, evaluator, data_cfg, log: Path, arms, extra: dict) -> dict:
    """metrics.json, report.md, grids_r<r>_s<s>.png, loss.png from the samples of every arm and seed."""
    results, grids = read_samples(samples, evaluator, data_cfg, cfg.samples_per_class)
    n = len(samples[0][1])                                                              # samples behind a Bias
    summary = {"settings": [], **extra}
    lines = [f"# InvDiff on {cfg.dataset}", "", verdict_rule(), ""]
    for r, scale in settings(results):
        rows = [x for x in results if (x["arm"] == "base" and x["scale"] == scale) or (x["r"] == r and x["scale"] == scale)]
        per_seed = defaultdict(lambda: defaultdict(list))
        for x in sorted(rows, key=lambda x: x["seed"]):
            for key in ("Bias_mean", "cond_acc", "FID_C"):
                per_seed[x["arm"]]["Bias" if key == "Bias_mean" else key].append(x[key])
        v = verdict(per_seed, cfg.lam, n)
        stats = {name: {k: metrics.seed_summary(vals) for k, vals in arm.items()} for name, arm in per_seed.items()}
        summary["settings"].append({"r": r, "scale": scale, "verdict": v, "arms": stats})
        lines += [f"## r = {r:g}, CFG {scale:g}", "",
                  f"**{'InvDiff reduces Bias' if v['reduces'] else 'InvDiff does not reduce Bias'}; "
                  f"{'the invariance term helps' if v['helps'] else 'the invariance term does not help'}.**", "",
                  "| arm | Bias [95% CI across seeds] | cond acc | FID-C | seeds |", "|---|---|---|---|---|"]
        for name, s in stats.items():
            b = s["Bias"]
            lines.append(f"| {name} | {b['mean']:.3f} [{b['lo']:.3f}, {b['hi']:.3f}] | {s['cond_acc']['mean']:.3f} | "
                         f"{s['FID_C']['mean']:.2f} | {b['n']} |")
        lines.append("")
        plot_grids(grids, r, scale, out / f"grids_r{r:g}_s{scale:g}.png")
    plot_loss(log, arms, out / "loss.png")
    lines += [environment_markdown(table), "Sample grids: grids_r<r>_s<scale>.png (the first seed, one row per class); "
              "the modules' training loss: loss.png.", "",
              f"Settings: ℓ {cfg.env_loss}, K = {cfg.envs}, β = {cfg.env_beta:g}; G_ψ {cfg.module}; {cfg.guidance_form} "
              f"ε̃ trained at r = {cfg.train_ratio:g}; {cfg.steps} steps of batch {cfg.batch_size} per arm; "
              f"{cfg.samples_per_class} samples per class, DDIM-{cfg.sample_steps}; seeds {cfg.seeds}; "
              f"{extra['device']}, {extra['seconds']:.0f} s."]
    summary["environments"], summary["results"] = table, results
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def plot_grids(grids: dict, r: float, scale: float, path: Path):
    """One panel per arm (the first seed): uint8 [C, k, 3, H, W] as C rows of k; the base beside every r."""
    panels = [(name, x) for (name, r_, s), x in grids.items() if s == scale and (r_ == r or name == "base")]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    classes, per_class, _, h, w = panels[0][1].shape
    height = 3.2 * classes * h / (per_class * w) + 0.4                  # a panel as tall as its grid, plus a title
    fig = Figure(figsize=(3.2 * cols, height * rows), tight_layout=True)
    for i, (name, x) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(make_grid(x.flatten(0, 1), nrow=x.shape[1], padding=1).permute(1, 2, 0).numpy())
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"r = {r:g}, CFG {scale:g}: one row per class, the first seed", fontsize=10)
    fig.savefig(path, dpi=110)


def plot_loss(log: Path, arms, path: Path):
    """Each arm kind's training loss (mean over its seeds) against the step, log scale."""
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if not rows:
        return
    fig = Figure(figsize=(5.5, 3.5), tight_layout=True)
    ax = fig.add_subplot()
    for name in dict.fromkeys(arm.name for arm in arms):
        mine = [a for a, arm in enumerate(arms) if arm.name == name]
        ax.plot([x["step"] for x in rows], [sum(x["arm_loss"][a] for a in mine) / len(mine) for x in rows], label=name)
    ax.set(xlabel="step", ylabel="L (invariance objective)", yscale="log", title="G_ψ training")
    ax.legend(fontsize=6)
    fig.savefig(path, dpi=110)
