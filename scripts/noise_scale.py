"""Steps to a target loss against the batch size, and the gradient noise scale measured on the way.

The worked example of docs/instrumentation.md: for each batch size, the digits MLP trains with
plain SGD at each learning rate of a grid until the EMA of its training loss reaches the target;
the fewest steps over the grid is S(B). McCandlish et al. (2018) predict
S(B) = S_min (1 + B_noise / B): steps halve with each doubling of the batch while B << B_noise and
stop improving once B >> B_noise. The fit of that curve to the measured S(B) gives B_noise (the
paper's B_crit = E_min / S_min, which B_simple approximates up to the Hessian's effects; the
steps are counted where a 0.9 EMA of the training loss crosses the target, a lag of about 10
steps that makes the fit's B_noise about 8 % low here); the
trainer's own ``per_sample/noise_scale_ema`` (B_simple), read at the step each run reached the
target, is the estimate the instrument gives without any of these runs.

    python scripts/noise_scale.py                       # writes outputs/noise_scale/
    python scripts/noise_scale.py --batch-sizes 16 64 256 --lrs 0.1 0.4 --target 0.3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.callbacks import Callback
from trainer.components import build
from trainer.logger import event_dir
from trainer.run import run

ROOT = Path(__file__).resolve().parents[1]


class StopAtTarget(Callback):
    """Ends training once the EMA (decay 0.9) of the step's mean training loss is at or below
    ``target`` (a host read per step: fine for a study, not for training)."""

    def __init__(self, target: float):
        self.target, self.ema, self.reached = target, None, None

    def on_train_step_end(self, trainer, out) -> None:
        loss = float(out.losses.float().mean())  # host sync: every step (a study)
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        if self.reached is None and self.ema <= self.target:
            self.reached = out.step
            trainer.max_steps = out.step  # the loop ends after this step


#: every run's data: the default (digits), each step a batch of B (the epoch's short last batch
#: dropped: S(B) at B = 512 counted every third step's 414 samples as 512 until 2026-12-08)
STUDY = ["trainer.device=cpu", "logging.progress=false", "data.drop_last=true"]


def training_split() -> int:
    """The study's training split's size (its data built as a run builds it)."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=STUDY)
    data = build("data", cfg.data)
    data.setup(torch.device("cpu"), cfg.seed)
    return data.train_loader.num_samples


def last_value(run_dir: Path, tag: str, until: int) -> float:
    acc = EventAccumulator(str(event_dir(run_dir)), size_guidance={"scalars": 0})
    acc.Reload()
    values = [e.value for e in acc.Scalars(tag) if e.step <= until] if tag in acc.Tags()[
        "scalars"] else []  # fmt: skip
    finite = [v for v in values if math.isfinite(v)]
    return finite[-1] if finite else math.nan


def fit(best: dict[int, dict], target: float, rows: list[dict]) -> dict:
    """The fit of S(B) = S_min (1 + B_noise / B) to the best runs' steps (least squares in
    1/B), and the median B_simple of the best runs measured before they reached the target."""
    bs = sorted(best)
    # S(B) = S_min + S_min·B_noise · (1/B): least squares in 1/B
    x = torch.tensor([1 / b for b in bs], dtype=torch.float64)
    y = torch.tensor([float(best[b]["steps"]) for b in bs], dtype=torch.float64)
    slope, intercept = (
        torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), y.unsqueeze(1))
        .solution.flatten()
        .tolist()
    )
    s_min, b_noise = intercept, slope / intercept
    # the predicted form needs S_min > 0 and B_noise >= 0: steps that fall with the batch size
    # and level off; a fit outside it (too few or too noisy points) is said, not plotted
    fit_ok = s_min > 0 and b_noise >= 0
    # B_simple of the runs measured before they reached the target (a run reaching it before
    # the first measured step, 5, has none: NaN, which statistics.median would order by chance)
    measured = [best[b]["b_simple"] for b in bs if math.isfinite(best[b]["b_simple"])]
    return {
        "target": target,
        "runs": rows,
        "best": [best[b] for b in bs],
        "fit": {"s_min": s_min, "b_noise": b_noise, "of_the_predicted_form": fit_ok},
        "b_simple_median": statistics.median(measured) if measured else math.nan,
        "b_simple_runs": len(measured),
    }


def best_runs(rows: list[dict]) -> dict[int, dict]:
    """Per batch size, its run that reached the target in the fewest steps (the first such run
    of the grid on a tie); a batch size none of whose runs reached it is left out."""
    best: dict[int, dict] = {}
    for r in rows:
        if r["steps"] is not None and (
            r["batch_size"] not in best or r["steps"] < best[r["batch_size"]]["steps"]
        ):
            best[r["batch_size"]] = r
    return best


def refusal(
    batch_sizes: list[int], lrs: list[float], target: float, max_steps: int, train_samples: int
) -> str:
    """Why the grid cannot make a study ("" when it can), checked before any run trains (a bad
    value at a later run lost the earlier ones). ``train_samples``: the training split's."""
    if any(b < 2 for b in batch_sizes):
        return "--batch-sizes: each must be >= 2 (the noise scale needs two samples)"
    if too_big := [b for b in batch_sizes if b > train_samples]:
        # (every step of such a run was a batch of the whole split, credited to B, a probe's)
        return (f"--batch-sizes: {', '.join(map(str, too_big))} larger than the training split "
                f"({train_samples} samples): no step has such a batch")  # fmt: skip
    if len(set(batch_sizes)) < 2:  # (said after every run had trained, as "raise --max-steps")
        return "--batch-sizes: give at least two different ones (S(B) is fitted to them)"
    if any(not (math.isfinite(lr) and lr > 0) for lr in lrs):
        return "--lrs: each must be finite and > 0"
    if not (math.isfinite(target) and target > 0):
        return "--target: must be finite and > 0 (a training loss to reach)"
    if max_steps < 1:
        return "--max-steps: must be >= 1"
    return ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.2, 0.4, 0.8, 1.6, 3.2])
    p.add_argument("--target", type=float, default=0.1, help="train-loss EMA to reach")
    p.add_argument("--max-steps", type=int, default=4000)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "noise_scale")
    args = p.parse_args()
    # (a value given twice trained twice, into the same folder: the first run set aside)
    args.batch_sizes, args.lrs = (
        list(dict.fromkeys(args.batch_sizes)),
        list(dict.fromkeys(args.lrs)),
    )
    why = refusal(args.batch_sizes, args.lrs, args.target, args.max_steps, training_split())
    if why:
        p.error(why)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    rows = []
    for b in args.batch_sizes:
        for lr in args.lrs:
            overrides = [
                *STUDY, f"data.batch_size={b}",
                "optimizer=sgd", "optimizer.momentum=0", f"optimizer.lr={lr}", "scheduler=none",
                "trainer.max_epochs=100000", f"trainer.max_steps={args.max_steps}",
                "instrument=none", "instrument.per_sample.every_n_steps=5",
                "logging.every_n_steps=5", "trainer.checkpoint.every_n_steps=0",
            ]  # fmt: skip
            with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
                cfg = compose("train", overrides=overrides)
            run_dir = args.out / f"b{b}_lr{lr}"
            stop = StopAtTarget(args.target)
            run(cfg, run_dir, callbacks=[stop])
            noise = last_value(run_dir, "per_sample/noise_scale_ema", stop.reached or 0)
            rows.append({"batch_size": b, "lr": lr, "steps": stop.reached, "b_simple": noise})
            print(f"B={b:4d} lr={lr:<5} steps to target: {stop.reached}  B_simple {noise:.1f}")
    best = best_runs(rows)
    bs = sorted(best)
    if len(bs) < 2:
        raise SystemExit("fewer than two batch sizes reached the target; raise --max-steps")
    summary = fit(best, args.target, rows)
    s_min, b_noise = summary["fit"]["s_min"], summary["fit"]["b_noise"]
    fit_ok, b_simple = summary["fit"]["of_the_predicted_form"], summary["b_simple_median"]
    measured = summary["b_simple_runs"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "noise_scale.json").write_text(json.dumps(summary, indent=2))
    print(f"fit: S_min {s_min:.1f} steps, B_noise {b_noise:.1f}; measured B_simple {b_simple:.1f} "
          f"(median of {measured} of {len(bs)} best runs)")  # fmt: skip
    lrs = {row["lr"] for row in rows}
    if len(bs) < 3 or len(lrs) == 1:  # (two points fit exactly, and a single, low learning
        # rate limits the large batches: a reduced run's B_noise of 2.9 beside a measured
        # B_simple of 47.5 was printed without a word, a review's)
        print(f"warning: {len(bs)} batch size(s) reached the target, with {len(lrs)} "
              "learning rate(s): S(B) is the fewest steps over a learning-rate grid, and a fit "
              "needs 3 or more batch sizes; this B_noise says little")  # fmt: skip
    if not fit_ok:
        print("warning: the fit is not of the predicted form S_min(1 + B_noise/B) with S_min > 0 "
              "and B_noise >= 0 (too few batch sizes, or steps that do not fall with B): its "
              "B_noise means nothing; more batch sizes, or a lower --target")  # fmt: skip
    if not measured:
        print("warning: no run was measured before it reached the target (the noise scale is "
              "measured every 5 steps): no B_simple; a lower --target")  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(bs, [best[b]["steps"] for b in bs], "o", label="steps to target (best lr)")
    grid = torch.logspace(math.log10(bs[0]), math.log10(bs[-1]), 100).tolist()
    if fit_ok:
        ax.loglog(grid, [s_min * (1 + b_noise / g) for g in grid], "-",
                  label=f"S_min(1 + B_noise/B), B_noise = {b_noise:.0f}")  # fmt: skip
    if measured:
        ax.axvline(b_simple, color="C2", ls="--", label=f"B_simple (instrument) = {b_simple:.0f}")
    ax.set_xlabel("batch size B")
    ax.set_ylabel(f"optimizer steps to train-loss EMA {args.target}")
    ax.set_title("digits / MLP, SGD")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "noise_scale.png", dpi=120)
    print(f"wrote {args.out / 'noise_scale.png'} and noise_scale.json")


if __name__ == "__main__":
    main()
