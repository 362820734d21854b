"""``raydiff bench quality``: which training and sampling choices make better samples, at fixed compute.

Small models are trained side by side in this process on the built-in shapes (same network,
steps, batch, learning-rate schedule and seed set for every arm; see quality_run.py) and scored
against training progress by KID/FID with features of a CNN trained on the real images, the
class judge, the shape judge and the held-out validation loss. Arms, each changing one thing
from the base (linear schedule, eps prediction, uniform weighting, label dropout 0.1):

- weighting: uniform (base) vs ``min_snr`` (γ = 5) vs ``p2`` (γ = 1, k = 1);
- schedule: linear (base) vs cosine;
- prediction: eps (base) vs v; and v with the cosine schedule together (``v-cosine``), also
  with min-SNR weighting (``v-cosine-min-snr``, the demo's defaults);
- label dropout 0.1 (base) vs 0, each sampled with guidance 1, 2 and 4;
- sampler, on the base (eps) and the v models: DDIM at 10/20/50/100 steps with η = 1 (raydiff's
  default) and at 20/100 steps with η = 0, vs ancestral DDPM at 1000 (base); the defaults' arm
  at 10/20/50/100 steps vs DDPM at 1000, and with guidance 2.

Output: a table on stdout (mean ± std over seeds; a difference to the base arm smaller than
twice its standard error is marked "~" = within noise), every measurement as CSV, and a PNG of
the curves and the sampler sweep. ``--quick`` is the CI setting (16x16 images, a few steps,
one seed, DDIM at 5/10/20 steps and DDPM at 100): it checks that the bench runs, its numbers mean
little.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from orchestrator.bench.quality_arms import ARMS, Arm, SamplerSpec, Setting


METRICS = ("kid", "fid", "class_acc", "shape_acc", "val_loss")
# Lower is better for these (the plot says which way is better).
LOWER_BETTER = {"kid", "fid", "val_loss"}

# About an hour on 2 CPU cores (bf16): 400 steps of batch 64 per arm, scored every 100 steps.
FULL = Setting(steps=400, eval_every=100, eval_per_class=10)
# The sweep's DDPM at 100 respaced steps and DDIM up to 20: the same samplers at a sixth of the
# network evaluations (1000-step DDPM was 33 of the quick run's 80 s, issue 18).
QUICK = Setting(model="unet-tiny", resolution=16, images_per_class=24, steps=24, batch=16, warmup_steps=4, eval_every=12,
                eval_per_class=1, val_per_class=2, curve_sampler=SamplerSpec("ddim-10", num_steps=10),
                ddim_steps=(5, 10, 20), ddpm_steps=100)


DEFAULTS_ARM = "v-cosine-min-snr"
GUIDED_STEPS = 20


def sampler_sweep(s: Setting) -> list[tuple[str, SamplerSpec]]:
    """(arm name, sampler) pairs scored on the final models."""
    if GUIDED_STEPS not in s.ddim_steps or len(s.ddim_steps) < 2:
        raise ValueError(f"ddim_steps {s.ddim_steps}: needs at least two step counts, {GUIDED_STEPS} among them")
    out: list[tuple[str, SamplerSpec]] = []
    for arm in ("base", "v-pred"):
        out += [(arm, SamplerSpec(f"ddim-{n}", num_steps=n)) for n in s.ddim_steps]
        out += [(arm, SamplerSpec(f"ddim-{n}-eta0", num_steps=n, eta=0.0)) for n in (s.ddim_steps[1], s.ddim_steps[-1])]
    ddpm = SamplerSpec(f"ddpm-{s.ddpm_steps}", sampler="ddpm", num_steps=s.ddpm_steps)
    out.append(("base", ddpm))
    # raydiff's defaults (v, cosine, min-SNR): the steps curve against DDPM, and the grid's guidance.
    out += [(DEFAULTS_ARM, SamplerSpec(f"ddim-{n}", num_steps=n)) for n in s.ddim_steps]
    guided = [SamplerSpec(f"ddim-{GUIDED_STEPS}-g{g:g}", num_steps=GUIDED_STEPS, guidance_scale=g) for g in (2.0, 4.0)]
    out += [(DEFAULTS_ARM, ddpm), (DEFAULTS_ARM, guided[0])]
    out += [(arm, spec) for arm in ("base", "dropout-0") for spec in guided]
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def within_noise(a: list[float], b: list[float]) -> str:
    """'~' if the means differ by less than 2 standard errors of their difference, '' if more,
    '?' with one seed (no spread to compare with)."""
    if len(a) < 2 or len(b) < 2:
        return "?"
    se = math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))
    return "~" if abs(np.mean(a) - np.mean(b)) < 2 * se else ""


def run_bench(s: Setting, arms: tuple[Arm, ...], sweep: list[tuple[str, SamplerSpec]], *, log=print) -> list[dict]:
    """Every measurement as a row: kind ('curve' or 'sampler'), arm, sampler, seed, step, metrics."""
    # Imported here: the CLI loads this module for every command, the network stack only to run it.
    from orchestrator.bench.quality_run import Scorer, Trained, demo_images, draw_samples, train_arm

    data = demo_images(s.images_per_class, s.resolution, seed=0)
    val = demo_images(s.val_per_class, s.resolution, seed=1)  # held out: another seed
    scorer = Scorer.build(*data, val)
    log(f"judges: class {scorer.features.val_accuracy:.1%}, shape {scorer.shape.val_accuracy:.1%} held-out accuracy "
        f"on real images")
    rows: list[dict] = []
    bf16 = s.use_bf16()
    for seed in s.seeds:
        models: dict[str, Trained] = {}
        for arm in arms:
            tr = train_arm(arm, s, data, scorer, seed, log=log)
            models[arm.name] = tr
            for r in tr.curve:
                rows.append({"kind": "curve", "arm": arm.name, "sampler": s.curve_sampler.name, "seed": seed,
                             **r, "train_s": round(tr.seconds, 1)})
        for arm_name, spec in sweep:
            if arm_name not in models:
                continue
            tr = models[arm_name]
            t0 = time.perf_counter()
            samples, labels = draw_samples(tr.model, tr.arm, spec, s.eval_per_class, seed=1000 + seed, bf16=bf16)
            secs = time.perf_counter() - t0
            row = {"kind": "sampler", "arm": arm_name, "sampler": spec.name, "seed": seed, "step": s.steps,
                   **scorer.score_samples(samples, labels), "sample_s": round(secs, 1)}
            rows.append(row)
            log(f"  {arm_name} seed {seed} {spec.name}: " + ", ".join(f"{k} {row[k]:.4g}" for k in METRICS if k in row))
    return rows


def _fmt(vals: list[float]) -> str:
    m, sd = mean_std(vals)
    digits = 4 if abs(m) < 1 else 2
    return f"{m:.{digits}f}" if math.isnan(sd) else f"{m:.{digits}f}±{sd:.{digits}f}"


def summary_table(rows: list[dict], steps: int) -> str:
    """Final-step curve rows per arm, then sampler rows; mean±std over seeds; '~' within noise of
    the base arm (or of DDPM-1000 for samplers, of guidance 1 for guidance)."""
    def group(kind: str) -> dict[tuple[str, str], list[dict]]:
        out: dict[tuple[str, str], list[dict]] = {}
        for r in rows:
            if r["kind"] == kind and r["step"] == steps:
                out.setdefault((r["arm"], r["sampler"]), []).append(r)
        return out

    lines = []
    head = f"{'arm':<17} {'sampler':<14} " + " ".join(f"{m:>20}" for m in METRICS)
    for kind, title in (("curve", "training arms (final step; ~ = within noise of base)"),
                        ("sampler", "sampling (~ = within noise of the reference row: DDPM / guidance 1)")):
        g = group(kind)
        if not g:
            continue
        lines += [title, head]
        for (arm, sampler), rs in g.items():
            if kind == "curve":
                ref = g.get(("base", sampler), [])
            elif sampler.startswith(f"ddim-{GUIDED_STEPS}-g"):
                ref = [r for r in rows if r["kind"] == "curve" and r["arm"] == arm and r["step"] == steps]
            else:
                ddpm = {a: rs for (a, name), rs in g.items() if name.startswith("ddpm-")}
                ref = ddpm.get(arm, ddpm.get("base", []))
            cells = []
            for m in METRICS:
                vals = [r[m] for r in rs if m in r]
                if not vals:
                    cells.append(f"{'-':>20}")
                    continue
                mark = within_noise(vals, [r[m] for r in ref if m in r]) if ref and rs is not ref else ""
                cells.append(f"{_fmt(vals) + (' ' + mark if mark else ''):>20}")
            lines.append(f"{arm:<17} {sampler:<14} " + " ".join(cells))
        lines.append("")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    curves = [r for r in rows if r["kind"] == "curve"]
    for ax, metric in zip(axes[:2], ("fid", "shape_acc")):
        for arm in dict.fromkeys(r["arm"] for r in curves):
            steps = sorted({r["step"] for r in curves if r["arm"] == arm})
            stats = [mean_std([r[metric] for r in curves if r["arm"] == arm and r["step"] == st]) for st in steps]
            m = np.array([a for a, _ in stats])
            sd = np.nan_to_num(np.array([b for _, b in stats]))
            ax.plot(steps, m, marker="o", label=arm)
            ax.fill_between(steps, m - sd, m + sd, alpha=0.15)
        ax.set_xlabel("training step")
        ax.set_ylabel(metric + (" (lower is better)" if metric in LOWER_BETTER else " (higher is better)"))
        ax.set_yscale("log" if metric == "fid" else "linear")
        ax.legend(fontsize=8)
    # The sampling trade-off: FID against DDIM steps per arm and eta; DDPM as a line.
    ax = axes[2]
    sampl = [r for r in rows if r["kind"] == "sampler"]
    ddim_steps = sorted({int(r["sampler"].split("-")[1]) for r in sampl
                         if r["sampler"].startswith("ddim-") and "-g" not in r["sampler"]})
    for i, arm in enumerate(dict.fromkeys(r["arm"] for r in sampl)):
        color = f"C{i}"  # one colour per arm: its DDIM curves and its DDPM line
        for suffix, style in (("", "-"), ("-eta0", "--")):
            pts = [(n, [r["fid"] for r in sampl if r["arm"] == arm and r["sampler"] == f"ddim-{n}{suffix}"])
                   for n in ddim_steps]
            pts = [(n, mean_std(v)) for n, v in pts if v]
            if pts:
                ax.errorbar([n for n, _ in pts], [m for _, (m, _) in pts], yerr=np.nan_to_num([sd for _, (_, sd) in pts]),
                            marker="o", linestyle=style, capsize=3, color=color,
                            label=f"{arm} DDIM η={'0' if suffix else '1'}")
        for name in dict.fromkeys(r["sampler"] for r in sampl if r["arm"] == arm and r["sampler"].startswith("ddpm-")):
            ddpm = [r["fid"] for r in sampl if r["arm"] == arm and r["sampler"] == name]
            ax.axhline(mean_std(ddpm)[0], color=color, linestyle=":", label=f"{arm} DDPM {name.removeprefix('ddpm-')}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("DDIM steps")
    ax.set_ylabel("FID, ref-CNN features (lower is better)")
    ax.set_title("sampling at the final step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cmd_bench_quality(args: argparse.Namespace) -> int:
    s = QUICK if args.quick else FULL
    if args.steps:
        s = replace(s, steps=args.steps, eval_every=min(s.eval_every, args.steps))
    if args.seeds:
        s = replace(s, seeds=tuple(range(args.seeds)))
    if args.eval_every:
        s = replace(s, eval_every=args.eval_every)
    arms = ARMS if not args.arms else tuple(a for a in ARMS if a.name in args.arms.split(","))
    unknown = set(args.arms.split(",")) - {a.name for a in ARMS} if args.arms else set()
    if unknown:
        print(f"raydiff: --arms {args.arms}: unknown {sorted(unknown)}; choose from {[a.name for a in ARMS]}",
              file=sys.stderr)
        return 2
    if args.model:
        s = replace(s, model=args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"setting: {asdict(s)}", flush=True)
    rows = run_bench(s, arms, sampler_sweep(s), log=lambda m: print(m, flush=True))
    table = summary_table(rows, s.steps)
    print(table)
    write_csv(rows, out / "quality.csv")
    (out / "quality.txt").write_text(table)
    plot(rows, out / "quality.png")
    print(f"wrote {out / 'quality.csv'}, {out / 'quality.txt'} and {out / 'quality.png'} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0
