"""Time to quality: the plain DiT and MaskDiT trained for equal wall-clock budgets, judged along the way.

    python -m benchmarks.time_to_quality --budget 600 --out benchmarks/results/MACHINE/time-to-quality
    python -m benchmarks.time_to_quality --tiny --out /tmp/ttq              # seconds: the CI smoke mode
    python -m benchmarks.time_to_quality --config imagenet256-pretrain --budget 3600 \\
        --target "val_loss<=0.55" data.dataset=latents data.path=/data/latents   # on latents, on a GPU

Both runs take the preset (``--config``, default ``mnist``, plus ``key=value`` overrides) with the
same encoder, data, seed and precision policy: DiT is ``model.arch=dit`` without masking (no
decoder), MaskDiT the preset's model, masked and then unmasked for the last part of the budget,
the same share of it as the preset gives its unmasked steps (1100 of 3600 for mnist; here a share
of the wall-clock budget, since steps are not known in advance). Training is the package's trainer
(``maskdit_fast.train.trainer.train`` with its step hook): the hook evaluates the EMA weights at
evenly spaced points of the training clock, switches MaskDiT to unmasked training and stops the
run at the budget. Evaluation pauses the training clock.

Quality at each point: on MNIST, EMA samples of fixed seeds (class = seed mod 10, the preset's
sampler and guidance) scored by the package's MNIST classifier (accuracy, classifier-feature
Fréchet distance; ``maskdit_fast.eval``); on every dataset, the EMA network's denoising loss on a
fixed batch with fixed noise (``val_loss``: the one metric on latents, where the classifier does
not apply). The report gives the time (and images) each model needs to reach ``--target`` (by
linear interpolation between the evaluation points around it) and their ratio, refused when the
measured policies differ in more than the architecture (``benchmarks/policy.py``).

Writes ``time_to_quality.json``, ``time_to_quality.md`` and ``time_to_quality.png`` (every metric
against training time and against images seen) to ``--out``; the trainer's own files (config.json,
metrics.jsonl) go to ``--out``/dit and ``--out``/maskdit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import kernels
from maskdit_fast.config import Config, ConfigError, config_to_dict, load_config
from maskdit_fast.data.loader import build_loader
from maskdit_fast.diffusion.loss import edm_loss
from maskdit_fast.dist import select_device
from maskdit_fast.models.precision import autocast_for, resolve_precision
from maskdit_fast.train.trainer import train

from .measure import git_state, machine, residual_stream_dtype, versions
from .policy import Policy, compare

SCHEMA = "maskdit_fast-time-to-quality/1"
ROOT = Path(__file__).resolve().parents[1]
METRICS = {"accuracy": ">=", "frechet": "<=", "val_loss": "<="}  # metric -> the direction that is better
EVAL_SEED = 1_000_000  # sample seeds from here on: disjoint from the training grids' seeds (as train.py's report)
NEVER = 10**9  # max_steps / sample_every / ckpt_every of a budgeted run: the hook stops it first
# The CI smoke mode: a model of a few thousand parameters, seconds per run.
TINY = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.decoder_hidden_size=32",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "train.global_batch=8", "sample.num_steps=3",
        "train.log_every=5"]


@dataclass(frozen=True)
class Target:
    """A quality target such as ``accuracy>=0.9``: ``metric`` (a key of METRICS), ``op``, ``value``."""

    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Target:
        match = re.fullmatch(r"\s*(\w+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*", text)
        if match is None or match[1] not in METRICS:
            raise ValueError(f"target {text!r}: write METRIC>=VALUE or METRIC<=VALUE with METRIC one of "
                             f"{', '.join(METRICS)} (e.g. accuracy>=0.9)")
        if match[2] != METRICS[match[1]]:
            raise ValueError(f"target {text!r}: {match[1]} is better when {METRICS[match[1]][0]}, "
                             f"write {match[1]}{METRICS[match[1]]}{match[3]}")
        return cls(match[1], match[2], float(match[3]))

    def met(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value >= self.value if self.op == ">=" else value <= self.value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def time_to_target(points: list[dict], target: Target, x: str) -> dict | None:
    """When a run first reaches ``target`` along ``x`` (``train_s`` or ``images``), from its
    evaluation points in order: None if never; else ``{"first": x at the first point that meets it,
    "before": x at the point before (None if it is the first), "estimate": x where the straight line
    between those two points crosses the target (``first`` when there is no point before)}``."""
    previous = None
    for point in points:
        if target.met(point.get(target.metric)):
            estimate = point[x]
            if previous is not None and previous.get(target.metric) is not None:
                v0, v1 = previous[target.metric], point[target.metric]
                share = (target.value - v0) / (v1 - v0) if v1 != v0 else 1.0
                estimate = previous[x] + min(max(share, 0.0), 1.0) * (point[x] - previous[x])
            return {"first": point[x], "before": None if previous is None else previous[x], "estimate": estimate}
        previous = point
    return None


class Evaluator:
    """Quality of an EMA network: ``val_loss`` always; on MNIST with classes, ``accuracy`` and
    ``frechet`` of ``samples`` generated from fixed seeds. Everything it draws is seeded and the
    caller's RNG is left as it was."""

    def __init__(self, cfg: Config, device: torch.device, samples: int, val_batch: int = 256, val_draws: int = 4):
        self.cfg, self.device = cfg, device
        self.autocast = autocast_for(resolve_precision(cfg.train.precision, device), device)
        loader_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch=val_batch))
        data = build_loader(loader_cfg, device, 0, 1, val_batch, 1)
        data.start(0, 1)
        _, _, self.val_x, self.val_y = next(iter(data.step(0)))
        data.close()
        if cfg.model.num_classes == 0:
            self.val_y = None
        self.val_draws = val_draws
        self.mnist = cfg.data.dataset == "mnist" and cfg.model.num_classes == 10 and samples > 0
        if self.mnist:
            from maskdit_fast.eval import get_mnist_classifier
            from maskdit_fast.generate import seed_labels

            self.classifier = get_mnist_classifier(device=device, progress=False)
            self.seeds = list(range(EVAL_SEED, EVAL_SEED + samples))
            self.labels = seed_labels(self.seeds, 10)

    def metrics(self) -> list[str]:
        return (["accuracy", "frechet"] if self.mnist else []) + ["val_loss"]

    @torch.no_grad()
    def __call__(self, ema_net: torch.nn.Module) -> dict[str, float]:
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(0)
            losses = []
            for _ in range(self.val_draws):  # the same noise for every call: seeded above
                with self.autocast:
                    losses.append(edm_loss(ema_net, self.val_x, self.val_y, 0.0, self.cfg.loss,
                                           self.cfg.model).dsm.float().mean())
            result = {"val_loss": torch.stack(losses).mean().item()}
            if self.mnist:
                from maskdit_fast.eval import mnist_metrics
                from maskdit_fast.generate import generate

                images = generate(ema_net, self.seeds, self.labels, self.cfg.sample, batch_size=250)
                scores = mnist_metrics(images, self.labels, self.classifier)
                result.update(accuracy=scores["accuracy"], frechet=scores["frechet"])
        return result

    def residual_dtype(self, net: torch.nn.Module, mask_ratio: float) -> str:
        """The residual stream's dtype in a training forward of ``net`` under the run's autocast."""
        def forward() -> None:
            with self.autocast:
                edm_loss(net, self.val_x[:2], None if self.val_y is None else self.val_y[:2], mask_ratio,
                         self.cfg.loss, self.cfg.model)

        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), torch.no_grad():
            return residual_stream_dtype(net, forward)


class BudgetHook:
    """The trainer's step hook of one budgeted run: the training clock (wall time since the hook was
    made, just before ``train`` builds the model and data, minus the time spent here evaluating),
    evaluation at ``eval_at`` seconds of it, the switch to unmasked training at ``unmask_at`` (None:
    never), the stop at ``budget_s``. Called after each step with (step, EMA network)."""

    def __init__(self, evaluator: Evaluator, budget_s: float, eval_at: list[float], unmask_at: float | None,
                 batch: int, mask_ratio: float, log: Callable[[str], None] = lambda message: None,
                 timer: Callable[[], float] = time.perf_counter):
        self.evaluator, self.budget_s, self.unmask_at = evaluator, budget_s, unmask_at
        self.pending = sorted(eval_at)
        self.batch, self.mask_ratio, self.log = batch, mask_ratio, log
        self.points: list[dict] = []
        self.eval_s = 0.0
        self.unmasked_from: int | None = None
        self.residual_dtype: str | None = None
        self.steps = 0
        self.train_s = 0.0  # the training clock when the run stopped
        self.timer = timer
        self.start = timer()

    def clock(self) -> float:
        return self.timer() - self.start - self.eval_s

    def __call__(self, step: int, ema_net: torch.nn.Module) -> str | None:
        now = self.clock()
        self.steps = step
        if self.residual_dtype is None:  # measured once, outside the training clock
            paused = self.timer()
            masked = self.mask_ratio if self.unmask_at is not None else 0.0
            self.residual_dtype = self.evaluator.residual_dtype(ema_net, masked)
            self.eval_s += self.timer() - paused
        if self.pending and now >= self.pending[0]:  # the last point is the budget: always evaluated
            self.pending = [at for at in self.pending if at > now]
            paused = self.timer()
            scores = self.evaluator(ema_net)
            spent = self.timer() - paused
            self.eval_s += spent
            self.points.append({"train_s": now, "step": step, "images": step * self.batch, "eval_s": spent,
                                "unmasked": self.unmasked_from is not None, **scores})
            self.log(f"  {now:8.1f} s  step {step:6d}  " + "  ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        if now >= self.budget_s:
            self.train_s = now
            return "stop"
        if self.unmask_at is not None and self.unmasked_from is None and now >= self.unmask_at:
            self.unmasked_from = step
            self.log(f"  {now:8.1f} s  step {step:6d}  unmasked training from here on")
            return "unmask"
        return None


def run_config(base: Config, arch: str) -> Config:
    """The budgeted run's config: ``base`` as DiT (no masking, no decoder) or MaskDiT, run length,
    sampling and checkpoints left to the hook."""
    model = base.model if arch == "maskdit" else dataclasses.replace(base.model, arch="dit", mask_ratio=0.0)
    t = dataclasses.replace(base.train, max_steps=NEVER, unmasked_steps=0, sample_every=NEVER, ckpt_every=NEVER,
                            parallel="none")
    return dataclasses.replace(base, model=model, train=t)


def policy_of(cfg: Config, device: torch.device, residual_dtype: str | None, arch: str) -> Policy:
    """The precision policy a run trained under (autocast as configured, the residual dtype as measured)."""
    precision = resolve_precision(cfg.train.precision, device)
    autocast = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "off")
    probe = torch.empty(1, device=device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision,
                                                                                                   torch.float32))
    with kernels.backend(cfg.model.kernels):
        on = kernels.use_triton(probe)
        attention = kernels.attention_backend(probe)
    return Policy(arch, autocast, residual_dtype, attention, on, cfg.train.compile)


def train_budgeted(base: Config, arch: str, out: Path, budget_s: float, evals: int, unmasked_share: float,
                   evaluator: Evaluator, device: torch.device, progress: bool, log: Callable[[str], None]) -> dict:
    """One budgeted run of ``arch`` (dit | maskdit); returns its record for the report."""
    cfg = run_config(base, arch)
    eval_at = [budget_s * (k + 1) / evals for k in range(evals)]
    unmask_at = budget_s * (1 - unmasked_share) if arch == "maskdit" and unmasked_share > 0 else None
    log(f"{arch}: training for {budget_s:g} s of training clock" +
        (f", unmasked from {unmask_at:g} s" if unmask_at is not None else ""))
    wall = time.perf_counter()
    hook = BudgetHook(evaluator, budget_s, eval_at, unmask_at, cfg.train.global_batch, cfg.model.mask_ratio, log)
    train(cfg, out / arch, progress=progress, step_hook=hook)
    policy = policy_of(cfg, device, hook.residual_dtype, arch)
    return {"arch": arch, "model": config_to_dict(cfg)["model"], "policy": dataclasses.asdict(policy),
            "steps": hook.steps, "images_seen": hook.steps * cfg.train.global_batch, "train_s": hook.train_s,
            "eval_s": hook.eval_s, "wall_s": time.perf_counter() - wall, "unmask_at_s": unmask_at,
            "unmasked_from_step": hook.unmasked_from, "points": hook.points}


def compare_runs(runs: dict[str, dict], target: Target) -> dict:
    """Time and images to ``target`` of each run and MaskDiT's speed-up in time (DiT's time over
    MaskDiT's), refused if the policies differ in more than the architecture."""
    reached = {name: {x: time_to_target(run["points"], target, x) for x in ("train_s", "images")}
               for name, run in runs.items()}
    verdict = compare(Policy(**runs["maskdit"]["policy"]), Policy(**runs["dit"]["policy"]), "arch")
    ratio = None
    if verdict.ok and reached["dit"]["train_s"] and reached["maskdit"]["train_s"]:
        ratio = reached["dit"]["train_s"]["estimate"] / reached["maskdit"]["train_s"]["estimate"]
    return {"target": str(target), "reached": reached, "speedup": ratio, "comparison": verdict.note}


def _fmt_reached(found: dict | None, unit: str, spec: str) -> str:
    if found is None:
        return "–"
    bracket = "" if found["before"] is None else f" (between {found['before']:{spec}} and {found['first']:{spec}})"
    return f"{found['estimate']:{spec}} {unit}{bracket}"


def markdown(report: dict) -> str:
    """The report as markdown: settings, each run's curve, the time to target and the honest scope."""
    s, runs, cmp = report["settings"], report["runs"], report["comparison"]
    lines = [f"# Time to quality: DiT vs MaskDiT on {report['data']}", "",
             f"Command: `{report['command']}`", "",
             "| | |", "|---|---|",
             f"| machine | {report['device']['name']}, {report['device']['platform']} |",
             f"| software | torch {report['versions']['torch']}, Python {report['versions']['python']} |",
             f"| commit | {(report['git']['commit'] or 'unknown')[:12]}"
             f"{' + uncommitted changes' * bool(report['git']['dirty'])} |",
             f"| run | {report['created']} |",
             f"| budget | {s['budget_s']:g} s of training per model, {s['evals']} evaluations each "
             "(evaluation time kept out of the training clock) |",
             f"| MaskDiT | mask ratio {runs['maskdit']['model']['mask_ratio']:g}, unmasked for the last "
             f"{s['unmasked_share']:.1%} of the budget (the preset's share of unmasked steps) |",
             f"| evaluation | {s['evaluation']} |", ""]
    lines += ["| model | autocast | residual | attention | kernels | compile | steps | images seen | training s "
              "| evaluation s |", "|---|---|---|---|---|---|--:|--:|--:|--:|"]
    for name, run in runs.items():
        p = run["policy"]
        lines.append(f"| {name} | {p['autocast']} | {p['residual_dtype']} | {p['attention']} | "
                     f"{'on' if p['kernels'] else 'off'} | {'on' if p['compile'] else 'off'} | {run['steps']} | "
                     f"{run['images_seen']} | {run['train_s']:.1f} | {run['eval_s']:.1f} |")
    metrics = report["metrics"]
    lines += ["", "## Quality along the way", "",
              "| model | training s | step | images | " + " | ".join(metrics) + " |",
              "|---|--:|--:|--:|" + "--:|" * len(metrics)]
    for name, run in runs.items():
        for point in run["points"]:
            cells = " | ".join("–" if point.get(m) is None else f"{point[m]:.4g}" for m in metrics)
            lines.append(f"| {name}{' (unmasked)' * point['unmasked']} | {point['train_s']:.1f} | {point['step']} "
                         f"| {point['images']} | {cells} |")
    lines += ["", f"## Time to {cmp['target']}", ""]
    for name in runs:
        found = cmp["reached"][name]
        lines.append(f"- {name}: not reached within the budget" if found["train_s"] is None else
                     f"- {name}: {_fmt_reached(found['train_s'], 's', '.1f')} of training, "
                     f"{_fmt_reached(found['images'], 'images', '.0f')}")
    if cmp["comparison"]:
        lines.append(f"- ⚠ **no ratio**: MaskDiT {cmp['comparison']}")
    elif cmp["speedup"] is not None:
        faster = (f"MaskDiT {cmp['speedup']:.2f}× faster" if cmp["speedup"] >= 1
                  else f"DiT {1 / cmp['speedup']:.2f}× faster")
        lines.append(f"- MaskDiT reaches it in {1 / cmp['speedup']:.2f}× DiT's training time ({faster})")
    else:
        lines.append("- no ratio: at least one model did not reach the target within the budget")
    lines += ["", "## What this can and cannot show", "",
              "The MaskDiT paper's claim (DiT-XL/2's FID in about 30% of DiT's training time) is at ImageNet "
              "256 scale: DiT-XL/2 encoders on 256 latent tokens, hundreds of thousands of steps, where the encoder "
              "dominates the cost and masking half its tokens nearly halves a step. At MNIST scale the encoder "
              "sees 64 tokens of a small network, per-step overheads (Python, optimizer, EMA, the decoder that "
              "MaskDiT adds) weigh much more, and a run lasts minutes: this measures which model reaches a digit "
              "quality first on this machine in this budget, not the paper's asymptotic saving. The time to "
              "target is interpolated between evaluation points; sample metrics from "
              f"{s['samples']} samples carry a sampling error of a few points of accuracy.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """One figure: each metric (rows) against training time and against images seen (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = report["metrics"]
    target = Target.parse(report["comparison"]["target"])
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.2 * len(metrics)), squeeze=False, layout="constrained")
    for row, metric in enumerate(metrics):
        for col, (x, label) in enumerate((("train_s", "training time (s)"), ("images", "images seen"))):
            ax = axes[row][col]
            for name, run in report["runs"].items():
                points = [p for p in run["points"] if p.get(metric) is not None]
                line, = ax.plot([p[x] for p in points], [p[metric] for p in points], marker="o", label=name)
                found = report["comparison"]["reached"][name][x]
                if metric == target.metric and found is not None:
                    ax.axvline(found["estimate"], color=line.get_color(), linestyle=":", linewidth=1)
                if name == "maskdit" and run["unmasked_from_step"] is not None and x == "train_s":
                    ax.axvspan(run["unmask_at_s"], run["train_s"], color=line.get_color(), alpha=0.08,
                               label="maskdit unmasked")
            if metric == target.metric:
                ax.axhline(target.value, color="grey", linewidth=1, label=str(target))
            if metric == "frechet":  # from thousands (noise) down to about 12 (real digits)
                ax.set_yscale("log")
            ax.set_xlabel(label)
            if x == "images":  # 180000 and its neighbours overlap; 180k does not
                ax.xaxis.set_major_formatter(lambda value, _: f"{value / 1000:g}k")
            ax.set_ylabel(metric)
            ax.legend(fontsize=7, frameon=False)
    fig.suptitle(f"Time to quality on {report['data']}: {report['device']['name']}", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="mnist", help="preset name or YAML path (default: mnist)")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds of training per model (default 600)")
    parser.add_argument("--evals", type=int, default=8, help="evaluation points per run, evenly spaced (default 8)")
    parser.add_argument("--samples", type=int, default=200,
                        help="MNIST: samples per evaluation for accuracy and Fréchet distance (default 200)")
    parser.add_argument("--target", help="quality target, e.g. accuracy>=0.9 (MNIST default) or val_loss<=0.5 "
                                         "(the default elsewhere: the best val_loss both runs reached)")
    parser.add_argument("--unmasked-share", type=float,
                        help="share of MaskDiT's budget trained unmasked (default: the preset's "
                             "train.unmasked_steps / train.max_steps)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, a few seconds per run: the CI smoke mode")
    parser.add_argument("--out", default="runs/time-to-quality", help="output folder (must not hold a report)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (both runs)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.budget = min(args.budget, 4.0)
        args.evals = min(args.evals, 2)
        args.samples = min(args.samples, 20)
    try:
        base = load_config(args.config, (TINY if args.tiny else []) + args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    if base.model.arch != "maskdit" or base.model.mask_ratio <= 0:
        parser.error("the preset must be a masked MaskDiT (model.arch=maskdit, model.mask_ratio > 0): "
                     "the plain DiT is derived from it")
    if base.train.lr_schedule != "constant":
        parser.error("train.lr_schedule must be constant: a budgeted run does not know its step count in advance")
    if args.budget <= 0 or args.evals < 1:
        parser.error("--budget must be positive and --evals at least 1")
    share = base.train.unmasked_steps / base.train.max_steps if args.unmasked_share is None else args.unmasked_share
    if not 0 <= share < 1:
        parser.error(f"--unmasked-share must be in [0, 1), got {share}")
    out = Path(args.out)
    if (out / "time_to_quality.json").exists() or any((out / arch).exists() for arch in ("dit", "maskdit")):
        parser.error(f"{out} already holds a time-to-quality run; choose another --out")
    mnist = base.data.dataset == "mnist" and base.model.num_classes == 10
    try:
        target = Target.parse(args.target or "accuracy>=0.9") if (args.target or mnist) else None
    except ValueError as err:
        parser.error(str(err))
    if target is not None and target.metric != "val_loss" and not mnist:
        parser.error(f"target {target}: the MNIST classifier only judges MNIST digits; use val_loss")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    device = select_device(base.train.device)
    evaluator = Evaluator(base, device, args.samples if mnist else 0)
    runs = {arch: train_budgeted(base, arch, out, args.budget, args.evals, share, evaluator, device,
                                 not args.no_progress, log) for arch in ("dit", "maskdit")}
    if target is None:  # latents: the best loss both runs reached
        best = max(min(p["val_loss"] for p in run["points"]) for run in runs.values())
        target = Target("val_loss", "<=", best)
    evaluation = (f"{args.samples} EMA samples per point (seeds from {EVAL_SEED}, class = seed mod 10, "
                  f"{base.sample.num_steps} {base.sample.solver} steps, guidance {base.sample.cfg_scale:g}), "
                  "MNIST classifier accuracy and classifier-feature Fréchet distance to the 1000 held-out digits; "
                  if mnist else "") + "val_loss: EMA denoising loss, 4 fixed noise draws on a fixed batch of 256"
    report = {"schema": SCHEMA, "command": shlex.join(["python", "-m", "benchmarks.time_to_quality", *argv]),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": machine(device),
              "versions": versions(), "git": git_state(ROOT), "data": "MNIST" if mnist else base.data.dataset,
              "settings": {"config": args.config, "overrides": args.overrides, "tiny": args.tiny,
                           "budget_s": args.budget, "evals": args.evals, "samples": args.samples,
                           "unmasked_share": share, "evaluation": evaluation},
              "metrics": evaluator.metrics(), "runs": runs, "comparison": compare_runs(runs, target)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "time_to_quality.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / "time_to_quality.md").write_text(text)
    plot(report, out / "time_to_quality.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
