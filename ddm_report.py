"""DDM's evaluation and report: samples of every arm at every CFG scale, diagnostics, seeds, the verdict.

Per arm, seed and CFG scale (evaluate.evaluate_arm): p̂, FD_half_l1 (and its bootstrap CI over
samples), SPD, FID-C and confidence, the evaluation classifier's mean max-softmax on the samples
(the gender CNN on CelebA, the digit CNN on MNIST: an arm whose samples stop looking like data
scores low); and the diagnostics that explain a result:
* FD_corrected: FD of the confusion-corrected p̂ (metrics.corrected_shares), with the group reader's
  confusion matrix measured on VAE reconstructions of real held-out images (closest to samples);
* C_entropy: the indicator's entropy on the arm's own samples, each noised at a random t and read
  with the condition it was drawn with (every group's samples, SPD);
* C_acc_t<bin>: the indicator's accuracy on real held-out latents noised in four t-bins.
Then across seeds: mean and 95% t-interval per arm (metrics.seed_summary), the paired verdict
(metrics.ddm_verdict) per scenario, train ratio and CFG scale, and the FD trajectory of the α = 0
and best α arms at 25%, 50% and 100% of the fine-tune (so "debiases" can be told from "adapts
more slowly"). Written: metrics.json, report.md, tradeoff.png, grids/<arm>.png.
"""
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torchvision.utils import save_image
from tqdm import tqdm

import data
import ddm
import evaluate
import metrics
from config import device_name
from stack import Stacked, arm_batch

N_DIAGNOSTIC = 1000      # real held-out latents behind C's accuracy
GRID = 64                # samples in an arm's grid


# ---------------------------------------------------------------------------------------- sampling
SAMPLE_SEED = 10 ** 6      # arm noise: SAMPLE_SEED·(1 + group) + seed, apart from training's seed·1000


def conditions(pipe, cfg, scenario: str, num_groups: int) -> dict:
    """The class row each arm is sampled with: {group (FD: one entry, 0): row} (ddm.class_row)."""
    groups = torch.arange(num_groups if scenario == "spd" else 1)
    rows = ddm.class_row(cfg.protocol, scenario, pipe.unet.num_classes, groups)
    return dict(zip(groups.tolist(), rows.tolist()))


def sample_arms(pipe, stack: Stacked, arms: list, cfg, class_row: int, scale: float, group: int):
    """Latents of every arm for one class row at one CFG scale: [A, n, c, h, w]. Arm a's noise comes
    from seed SAMPLE_SEED·(1 + group) + seed_a, so arms of one seed share it and seeds never do."""
    A, n = len(arms), cfg.n_samples
    cond = torch.full((A, n), class_row, dtype=torch.long, device=pipe.device)
    return pipe.sample_latents(n, cond, seed=[SAMPLE_SEED * (1 + group) + arm.seed for arm in arms],
                               steps=cfg.sample_steps, guidance_scale=scale, model=lambda z, t, c: stack(z, t, c)[0],
                               batch_size=arm_batch(A, 2 if scale != 1 else 1))


@torch.inference_mode()
def indicator_probs(stack: Stacked, z0, cond, t, seed=0) -> torch.Tensor:
    """softmax C(ε̂) of latents z0 [A, N, …] noised at timesteps t [N] (shared by the arms), each arm
    with its own conditions cond [A, N] -> [A, N, K], in chunks of stack.LATENTS_PER_PASS latents."""
    gen = torch.Generator(z0.device).manual_seed(seed)
    noise = torch.randn(z0.shape[1:], generator=gen, device=z0.device)                 # [N, c, h, w]
    scheduler, A, out = stack.template.scheduler, len(z0), []
    for i in range(0, z0.shape[1], arm_batch(A)):
        part = slice(i, i + arm_batch(A))
        z_t = scheduler.add_noise(z0[:, part].flatten(0, 1), noise[part].repeat(A, 1, 1, 1),    # every arm
                                  t[part].repeat(A)).view_as(z0[:, part])                    # the same noise
        out.append(stack(z_t, t[part].expand(A, -1), cond[:, part])[1].float().softmax(-1))
    return torch.cat(out, 1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def reader_confusion(pipe, evaluator, test) -> dict:
    """The group reader's confusion on real held-out images and on their VAE reconstructions."""
    real = data.load(pipe.data_cfg, "test")
    pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:N_DIAGNOSTIC]
    recon = pipe.decode(test["z0"][pick.to(test["z0"].device)]).cpu()
    k = evaluator.num_groups
    return {"real": metrics.confusion_matrix(real.group[pick], evaluator.groups(real.images[pick]), k),
            "reconstructed": metrics.confusion_matrix(test["group"][pick].cpu(), evaluator.groups(recon), k)}


def scales_of(cfg, scenario) -> list:
    return [1.0] if scenario == "fd" and cfg.protocol == "biased-base" else ddm.parse_list(cfg, "guidance_scales")


def sample_and_score(pipe, stack, arms, cfg, scenario, num_groups, evaluator, confusion, real, scale) -> list:
    """One record per arm at one CFG scale (every metric and diagnostic but C's accuracy)."""
    rows = conditions(pipe, cfg, scenario, num_groups)
    T = stack.template.scheduler.num_train_timesteps
    images, c_entropy = {}, torch.zeros(len(arms))
    for g, class_row in rows.items():
        z = sample_arms(pipe, stack, arms, cfg, class_row, scale, group=g)                  # [A, n, c, h, w]
        images[g] = pipe.decode(z.flatten(0, 1)).cpu().unflatten(0, z.shape[:2])            # [A, n, 3, H, W] uint8
        t = torch.randint(0, T, (z.shape[1],), generator=torch.Generator().manual_seed(1)).to(z.device)
        cond = torch.full(z.shape[:2], class_row, dtype=torch.long, device=z.device)
        c_entropy += entropy(indicator_probs(stack, z, cond, t)).mean(1).cpu() / len(rows)
    records = []
    for a, arm in enumerate(tqdm(arms, desc=f"evaluating {scenario} CFG {scale:g}", leave=False)):
        item = {"name": arm.name}
        if scenario == "fd":
            item["images"] = images[0][a]
        else:
            item["cond_images"] = {g: images[g][a] for g in rows}
        m = evaluate.evaluate_arm(item, evaluator, real)
        p_corr = metrics.corrected_shares(torch.tensor(m["p_hat"]), confusion["reconstructed"])
        m.update(scenario=arm.scenario, ratio=arm.ratio, kind=arm.kind, alpha=arm.alpha, seed=arm.seed,
                 scale=scale, p_hat_corrected=p_corr.tolist(), FD_corrected=metrics.fd_half_l1(p_corr).item(),
                 C_entropy=c_entropy[a].item())
        m["grid"] = evaluate.pooled_images(item, per_condition=-(-GRID // len(rows)))[:GRID]
        records.append(m)
    return records


def t_bins(T: int) -> list:
    """The four quarters of [0, T) in which C's accuracy is read."""
    return [(T * q // 4, T * (q + 1) // 4) for q in range(4)]


def indicator_accuracy(pipe, stack, arms, cfg, scenario, test) -> torch.Tensor:
    """C's accuracy on real held-out latents per t-bin, each arm with its training condition: [A, bins]."""
    z0, y = test["z0"][:N_DIAGNOSTIC], test["group"][:N_DIAGNOSTIC]
    cond = ddm.class_row(cfg.protocol, scenario, pipe.unet.num_classes, y)
    A, gen, out = len(arms), torch.Generator().manual_seed(2), []
    for lo, hi in t_bins(stack.template.scheduler.num_train_timesteps):
        t = torch.randint(lo, hi, (len(z0),), generator=gen).to(z0.device)
        p = indicator_probs(stack, z0.expand(A, *z0.shape), cond.expand(A, -1), t)          # [A, N, K]
        out.append((p.argmax(-1) == y).float().mean(1).cpu())
    return torch.stack(out, 1)


def evaluate_scenario(pipe, stack, arms, cfg, scenario, num_groups, evaluator, test, confusion, out: Path) -> dict:
    """Every arm at every CFG scale, C's accuracy, and (FD) the trajectory of α = 0 and the best α."""
    real = evaluator.real_moments(pipe.data_cfg, "test")
    acc = indicator_accuracy(pipe, stack, arms, cfg, scenario, test)
    records = []
    for scale in scales_of(cfg, scenario):
        for a, m in enumerate(sample_and_score(pipe, stack, arms, cfg, scenario, num_groups, evaluator,
                                               confusion, real, scale)):
            m.update({f"C_acc_t{lo}-{hi}": acc[a, i].item()
                      for i, (lo, hi) in enumerate(t_bins(stack.template.scheduler.num_train_timesteps))})
            records.append(m)
    trajectory = []
    if scenario == "fd":
        trajectory = fd_trajectory(pipe, stack, arms, cfg, records, evaluator, confusion, real, out)
    return {"records": records, "trajectory": trajectory}


def fd_trajectory(pipe, stack, arms, cfg, records, evaluator, confusion, real, out) -> list:
    """FD and FID-C of the α = 0 arm and of each ratio's best α > 0 (lowest mean FD at the first CFG
    scale) at the 25% and 50% snapshots; the 100% points are the final records."""
    scale = scales_of(cfg, "fd")[0]
    chosen = set()
    for ratio in dict.fromkeys(arm.ratio for arm in arms):
        fd = defaultdict(list)
        for m in records:
            if m["ratio"] == ratio and m["kind"] == "ddm" and m["scale"] == scale:
                fd[m["alpha"]].append(m["FD_half_l1"])
        best = min((a for a in fd if a > 0), key=lambda a: sum(fd[a]) / len(fd[a]), default=None)
        chosen |= {(ratio, 0.0), (ratio, best)}
    picked = [i for i, arm in enumerate(arms) if arm.kind == "ddm" and (arm.ratio, arm.alpha) in chosen]
    final = {k: v.clone() for k, v in stack.state_dict().items()}
    rows = []
    for step in ddm.trajectory_steps(cfg):
        if not (out / f"ema_step{step}.pt").exists():     # trained by a run that kept no snapshots
            print(f"trajectory: no snapshot at step {step} in {out} (rerun with --fresh to keep them)")
            continue
        snap = torch.load(out / f"ema_step{step}.pt", map_location=pipe.device, weights_only=True)
        stack.load_state_dict(snap["ema_model"])
        sub = Stacked([stack.arm(i) for i in picked]).eval()
        for m in sample_and_score(pipe, sub, [arms[i] for i in picked], cfg, "fd", num_groups=0, evaluator=evaluator,
                                  confusion=confusion, real=real, scale=scale):
            m.pop("grid")
            rows.append({**m, "step": step})
    stack.load_state_dict(final)
    return rows


# ----------------------------------------------------------------------------------------- across seeds
def aggregate(records: list, keys: list) -> list:
    """One row per (ratio, kind, α, scale): seed_summary of each key, in sweep order."""
    groups = defaultdict(list)
    for m in records:
        groups[(m["ratio"], m["kind"], m["alpha"], m["scale"])].append(m)
    rows = []
    for (ratio, kind, alpha, scale), ms in groups.items():
        ms = sorted(ms, key=lambda m: m["seed"])
        row = {"ratio": ratio, "kind": kind, "alpha": alpha, "scale": scale, "seeds": [m["seed"] for m in ms]}
        for key in keys:
            if all(key in m for m in ms):
                row[key] = metrics.seed_summary([m[key] for m in ms])
                row[key]["values"] = [m[key] for m in ms]
        rows.append(row)
    return rows


def verdicts(rows: list, metric: str, n_samples: int) -> list:
    """metrics.ddm_verdict per (ratio, scale), for DDM's α and, separately, for the adversarial ablation."""
    out = []
    for ratio, scale in dict.fromkeys((r["ratio"], r["scale"]) for r in rows):
        mine = [r for r in rows if r["ratio"] == ratio and r["scale"] == scale]
        plain = next(r for r in mine if r["kind"] == "ddm" and r["alpha"] == 0)
        rebalanced = next((r for r in mine if r["kind"] == "rebalanced"), None)
        if any(r["seeds"] != plain["seeds"] for r in mine):    # the paired differences pair by seed
            raise ValueError(f"train {ratio}, CFG {scale:g}: arms were evaluated at different seeds")
        for kind in ("ddm", "adversarial"):
            arms = {name(r): {"alpha": r["alpha"], "FID_C": r["FID_C"]["values"], metric: r[metric]["values"],
                              **({metric + "_corrected": r[metric + "_corrected"]["values"]} if metric == "FD" else {})}
                    for r in mine if r["kind"] in (kind, "rebalanced") or r is plain}
            if not any(r["kind"] == kind and r["alpha"] > 0 for r in mine):
                continue
            v = metrics.ddm_verdict(arms, name(plain), rebalanced and name(rebalanced), metric,
                                    corrected=metric == "FD", n_samples=n_samples)
            out.append({"ratio": ratio, "scale": scale, "kind": kind, **v})
    return out


def name(row) -> str:
    return " ".join(filter(None, [row["ratio"], row["kind"], f"α={row['alpha']:g}", f"CFG {row['scale']:g}"]))


# ----------------------------------------------------------------------------------------------- report
def write_report(results: dict, cfg, pipe, evaluator, confusion, out: Path, *, preset, wall_seconds) -> dict:
    """metrics.json (every seed's record, the across-seed rows, verdicts, trajectory), report.md,
    tradeoff.png and grids/<arm>.png (first seed) in `out`; prints the report's tables."""
    out.mkdir(parents=True, exist_ok=True)
    keys = ["p0", "FD", "FD_corrected", "FID_C", "SPD", "confidence", "C_entropy"]
    keys += [k for k in next(iter(results.values()))["records"][0] if k.startswith("C_acc_t")]
    summary = {"dataset": cfg.dataset, "protocol": cfg.protocol, "preset": preset, "device": device_name(pipe.device),
               "config": dict(vars(cfg)), "base_model": str(pipe.run_dir), "classifiers": dict(evaluator.accuracies),
               "wall_seconds": wall_seconds, "reference": evaluate.reference(evaluator, pipe.data_cfg, n=cfg.n_samples),
               "confusion": {k: v.tolist() for k, v in confusion.items()}, "scenarios": {}}
    (out / "grids").mkdir(exist_ok=True)
    for scenario, res in results.items():
        for m in res["records"] + res["trajectory"]:
            m["FD"], m["p0"] = m["FD_half_l1"], m["p_hat"][0]
        first_seed = res["records"][0]["seed"]
        for m in res["records"]:
            grid = m.pop("grid")
            if m["seed"] == first_seed:
                save_image(grid.float() / 255, out / "grids" / f"{file_name(m)}.png", nrow=8, padding=1)
        rows = aggregate(res["records"], keys)
        summary["scenarios"][scenario] = {
            "rows": rows, "verdicts": verdicts(rows, "FD" if scenario == "fd" else "SPD", cfg.n_samples),
            "trajectory": trajectory_rows(res["trajectory"], keys),
            "per_seed": [strip(m) for m in res["records"]], "trajectory_per_seed": [strip(m) for m in res["trajectory"]]}
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    text = report(summary)
    (out / "report.md").write_text(text)
    plot_tradeoff(summary, out / "tradeoff.png")
    print(text.split("## Definitions")[0])
    return summary


def trajectory_rows(trajectory: list, keys: list) -> list:
    return [{**row, "step": step} for step in sorted({m["step"] for m in trajectory})
            for row in aggregate([m for m in trajectory if m["step"] == step], keys)]


def strip(m: dict) -> dict:
    return {k: v for k, v in m.items() if not torch.is_tensor(v)}


def file_name(m) -> str:
    text = f"{m['scenario']}_{m['ratio'].replace(':', 'to')}_{m['kind']}_alpha={m['alpha']:g}_cfg={m['scale']:g}"
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


# ------------------------------------------------------------------------------------------ markdown
def cell(summary: dict, digits=3) -> str:
    """'mean [lo, hi]' of a seed_summary (just the mean for one seed, '–' for none)."""
    if summary is None or summary["n"] < 2:
        return "–" if summary is None else f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} [{summary['lo']:.{digits}f}, {summary['hi']:.{digits}f}]"


def verdict_line(v: dict, metric: str) -> str:
    what = "DDM" if v["kind"] == "ddm" else "the adversarial ablation"
    head = f"- {v['ratio'] or 'train data'} · CFG {v['scale']:g} · {what}: **{'lowers' if v['lowers'] else 'does not lower'} {metric}**"
    if not v["checks"]:
        return head
    best = v["passing"][0] if v["passing"] else min(      # else the arm closest to passing
        v["checks"], key=lambda n: max(d["diff"] for d in v["checks"][n]["lower"].values()))
    c = v["checks"][best]
    diffs = "; ".join(f"{k}: {d['diff']:+.3f} ± {d['se']:.3f}" for k, d in c["lower"].items())
    return f"{head} (closest: {best}; paired differences {diffs}; FID-C {c['FID_C']:.2f}, limit {c['FID_C_limit']:.2f})"


def report(summary: dict) -> str:
    ref, names = summary["reference"], summary["reference"]["group_names"]
    cfg = summary["config"]
    n_seeds = len(cfg["seeds"].split(","))
    bins = [k[len("C_acc_t"):] for k in next(iter(summary["scenarios"].values()))["rows"][0] if k.startswith("C_acc_t")]
    lines = [f"# DDM, protocol {summary['protocol']}, on {summary['dataset']} (preset {summary['preset']}, "
             f"{summary['device']})", "",
             f"Every arm at {n_seeds} seed(s) ({cfg['seeds']}); cells are the across-seed mean with its 95% t-interval. "
             f"Fine-tune: {cfg['finetune']}" + (f" (r = {cfg['lora_rank']}, scale {cfg['lora_alpha'] / cfg['lora_rank']:g})"
                                                if cfg["finetune"] == "lora" else "") +
             f", {cfg['steps']} steps at batch {cfg['batch_size']}, lr {cfg['lr']:g}, weight decay {cfg['weight_decay']:g}, "
             f"clip by {cfg['grad_clip_mode']} {cfg['grad_clip']:g}, EMA {cfg['ema_decay']:g}; {cfg['n_samples']} samples "
             f"per arm and CFG scale, {cfg['sample_steps']} DDIM steps. Base model: `{summary['base_model']}`.", "",
             "## The rule", "", metrics.verdict_rule("FD"), "", metrics.verdict_rule("SPD"), "", "## Verdicts", ""]
    for scenario, res in summary["scenarios"].items():
        lines += [verdict_line(v, "FD" if scenario == "fd" else "SPD") for v in res["verdicts"]]
    for scenario, res in summary["scenarios"].items():
        metric = [f"p̂({names[0]})", "FD", "FD corrected"] if scenario == "fd" else ["SPD"]
        keys = ["p0", "FD", "FD_corrected"] if scenario == "fd" else ["SPD"]
        header = ["train", "arm", "α", "CFG", *metric, "FID-C", "confidence", "C entropy", f"C acc (t {' / '.join(bins)})"]
        lines += ["", f"## {scenario.upper()} scenario", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for r in res["rows"]:
            acc = " / ".join(f"{r[f'C_acc_t{b}']['mean']:.2f}" for b in bins)
            lines.append("| " + " | ".join([r["ratio"] or "data", r["kind"], f"{r['alpha']:g}", f"{r['scale']:g}",
                                            *(cell(r.get(k)) for k in keys), cell(r["FID_C"], 2), cell(r["confidence"]),
                                            cell(r["C_entropy"]), acc]) + " |")
        if res["trajectory"]:
            lines += ["", f"### Trajectory (FD, CFG {res['trajectory'][0]['scale']:g}): the α = 0 arm and the best α "
                      "along the fine-tune (100% = the table above)", "",
                      "| train | α | step | FD | FID-C |", "| --- | --- | --- | --- | --- |"]
            lines += [f"| {r['ratio']} | {r['alpha']:g} | {r['step']} | {cell(r['FD'])} | {cell(r['FID_C'], 2)} |"
                      for r in res["trajectory"]]
    conf = summary["confusion"]
    lines += ["", "## Group reader", "",
              "Held-out accuracy of the evaluation classifiers: " +
              ", ".join(f"{k} {v:.4f}" for k, v in summary["classifiers"].items()) + ".",
              f"Confusion P(read j | true i) on {N_DIAGNOSTIC} real held-out images: {fmt_matrix(conf['real'])}; "
              f"on their VAE reconstructions: {fmt_matrix(conf['reconstructed'])} (the one FD corrected uses).",
              f"Training data of the base model: p̂ = {ref['train_p_hat'][0]:.3f}; FID-C floor (real vs real) "
              f"{ref['FID_C_floor']:.2f}. Wall time of the whole run {summary['wall_seconds']:.0f} s.",
              "", "## Definitions", "", *(f"- {d}" for d in evaluate.DEFINITIONS),
              "- confidence = the evaluation classifier's mean max-softmax on the samples (CelebA: gender CNN; MNIST: "
              "digit CNN); C entropy = the indicator's entropy on the arm's own samples noised at a random t, read with "
              "their own condition; C acc = its accuracy on real held-out latents per t-bin.",
              "", "![trade-off](tradeoff.png)", "", "Grids (first seed): `grids/`."]
    return "\n".join(lines) + "\n"


def fmt_matrix(m) -> str:
    return "[" + "; ".join(", ".join(f"{v:.3f}" for v in row) for row in m) + "]"


# ----------------------------------------------------------------------------------------------- plot
def plot_tradeoff(summary: dict, path: Path):
    """One panel per (scenario, CFG scale) and train ratio: FD (or SPD) against FID-C, across-seed 95%
    intervals, DDM's α joined in order, the adversarial ablation dashed, the rebalanced baseline as a
    star, both baselines as vertical lines, and (FD) the α = 0 arm's trajectory in gray."""
    panels = [(s, scale, ratio) for s, res in summary["scenarios"].items()
              for scale in dict.fromkeys(r["scale"] for r in res["rows"])
              for ratio in dict.fromkeys(r["ratio"] for r in res["rows"])]
    cols = len({p[2] for p in panels})
    fig = Figure(figsize=(4.2 * cols, 3.6 * -(-len(panels) // cols)), tight_layout=True)
    for i, (scenario, scale, ratio) in enumerate(panels):
        ax = fig.add_subplot(-(-len(panels) // cols), cols, i + 1)
        res, key = summary["scenarios"][scenario], "FD" if scenario == "fd" else "SPD"
        rows, labels = [r for r in res["rows"] if r["scale"] == scale and r["ratio"] == ratio], []
        for kind, style in (("ddm", "o-"), ("adversarial", "s--")):
            mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["alpha"])
            if not mine:
                continue
            x, y = [r[key]["mean"] for r in mine], [r["FID_C"]["mean"] for r in mine]
            err = [[r[key]["mean"] - r[key]["lo"] for r in mine], [r[key]["hi"] - r[key]["mean"] for r in mine]]
            line = ax.errorbar(x, y, xerr=err, fmt=style, capsize=2, label=kind, ms=4).lines[0]
            labels.append((kind, mine, x, y, line.get_color()))
        for r in rows:
            if r["kind"] == "rebalanced":
                ax.plot(r[key]["mean"], r["FID_C"]["mean"], "*", ms=11, c="k", label="rebalanced α=0")
                ax.axvline(r[key]["mean"], ls=":", c="k", lw=0.8)
            if r["kind"] == "ddm" and r["alpha"] == 0:
                ax.axvline(r[key]["mean"], ls=":", c="tab:blue", lw=0.8)
        traj = [r for r in res.get("trajectory", []) if r["ratio"] == ratio and r["alpha"] == 0 and r["scale"] == scale]
        if traj:
            ax.plot([r["FD"]["mean"] for r in traj], [r["FID_C"]["mean"] for r in traj], "x:", c="gray",
                    label="α=0 at 25%, 50%")
        ys = [r["FID_C"]["mean"] for r in rows]
        if ys and min(ys) > 0 and max(ys) / min(ys) > 10:
            ax.set_yscale("log")
        for kind, mine, x, y, color in labels:            # α labels; points closer than 25 px share one label
            px = ax.transData.transform(list(zip(x, y)))                                   # [n, 2] pixels
            for group in near_groups(px, 25.0):
                ax.annotate(", ".join(f"{mine[j]['alpha']:g}" for j in group), (x[group[0]], y[group[0]]),
                            textcoords="offset points", xytext=(5, 5) if kind == "ddm" else (-6, 3),
                            ha="left" if kind == "ddm" else "right", fontsize=7, color=color)
        ax.set(xlabel=f"{key} (95% CI across seeds)", ylabel="FID-C", title=f"{scenario.upper()} · train {ratio or 'data'} · CFG {scale:g}")
        ax.legend(fontsize=6)
    fig.savefig(path, dpi=110)


def near_groups(points, min_dist: float) -> list:
    """Indices of points [n, 2] in order, in runs within min_dist of the run's first point (one label each)."""
    groups = []
    for j, p in enumerate(points):
        if groups and ((p - points[groups[-1][0]]) ** 2).sum() ** 0.5 < min_dist:
            groups[-1].append(j)
        else:
            groups.append([j])
    return groups
