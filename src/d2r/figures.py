"""The D2R paper's figures from any runs (`d2r report RUN... --figure fig2|fig3`):

- Fig. 2, from each run's per-epoch check in metrics.jsonl: (a) the target's robust accuracy
  per epoch of every run on one axis (the paper: a pre-trained vs a learnable guide); (b) the
  guide's clean accuracy beside the target's robust accuracy, per run with a guide (D2R vs
  LBGAT); (c) D2R runs with and without the clean symmetric KL term (beta > 0 vs beta = 0).
- Fig. 3: the class probabilities of the guide and the target of each run for one test image.

Drawn as curves.py draws curves.png: matplotlib's Agg canvas directly, never pyplot. Each
function returns what it drew, read back from the figure's artists, so a test compares the
plotted numbers themselves with their sources.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from d2r import data
from d2r.attacks import label as attack_label
from d2r.config import Config, format_eps
from d2r.experiments import distinguishing, flat_config, label
from d2r.files import atomic_write, check_writable
from d2r.logs import read_metrics
from d2r.measure import as_float
from d2r.report.read import find_runs
from d2r.runs import load_run, read_config

FIGURES = ("fig2", "fig3")


def _canvas(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches the Agg canvas: no pyplot, no global backend
    return fig


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())
    return path


def _drawn(ax) -> dict[str, list[list[float]]]:
    """Every line of `ax` by its legend label: [[x, y], ...] as drawn."""
    return {
        line.get_label(): [[float(a), float(b)] for a, b in line.get_xydata()]
        for line in ax.get_lines()
    }


# Runs -------------------------------------------------------------------------------------------


def _read(run: Path) -> dict[str, Any]:
    """A run's resolved config and its epoch records that carry the per-epoch check."""
    cfg, missing = read_config(run)
    records = [r for r in read_metrics(run, "epoch") if "robust_acc" in r]
    if not records:
        raise ValueError(
            f"{str(run)!r} has no per-epoch check in metrics.jsonl; Fig. 2 plots it per "
            "epoch (train with eval.every=1)"
        )
    return {"dir": run, "cfg": cfg, "flat": flat_config(cfg, missing), "records": records}


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    """Each run by its method (and guide), then what sets it apart from the other runs of that
    method on that data and target (e.g. "beta=0"), then its seed where that is all that
    differs: the rule of `d2r report`'s Setting column."""
    peers: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        cfg: Config = run["cfg"]
        peers.setdefault((cfg.method["name"], cfg.data.name, cfg.target["name"]), []).append(i)
    settings: dict[int, dict[str, Any]] = {}
    shown = frozenset({"method.name", "data.name", "target.name", "guide", "guide.name"})
    for members in peers.values():
        found = distinguishing([runs[i]["flat"] for i in members], skip=shown)
        settings.update(zip(members, found, strict=True))
    texts = []
    for i, run in enumerate(runs):
        cfg = run["cfg"]
        text = cfg.method["name"] + (f" (guide {cfg.guide['name']})" if cfg.guide else "")
        texts.append(text + (f", {label(settings[i])}" if settings[i] else ""))
    return [
        f"{t}, seed {r['cfg'].seed}" if texts.count(t) > 1 else t
        for t, r in zip(texts, runs, strict=True)
    ]


def _check_text(run: dict[str, Any]) -> str:
    """The per-epoch check that made the numbers: "PGD-20, eps 8/255 (Linf), n=1000"."""
    last = run["records"][-1]
    eps = last.get("check_eps", run["cfg"].eval.eps)
    n = f", n={last['check_n']}" if "check_n" in last else ""
    budget = f"eps {format_eps(eps)} ({last.get('check_norm', 'Linf')})"
    return f"{attack_label(run['cfg'].eval.attack)}, {budget}{n}"


def _split_text(runs: list[dict[str, Any]]) -> str:
    """The images the runs' per-epoch checks read: their validation split, held-out test images
    (a run without one, or logged before it existed), or both kinds."""
    splits = {r["records"][-1].get("check_split", "test") for r in runs}
    names = {"val": "the validation split", "test": "held-out test images"}
    return " / ".join(names.get(s, s) for s in sorted(splits, reverse=True))


def _points(run: dict[str, Any], key: str) -> tuple[list[int], list[float]]:
    rows = [(r["epoch"], 100 * r[key]) for r in run["records"] if key in r]
    return [e for e, _ in rows], [v for _, v in rows]


# Fig. 2 -----------------------------------------------------------------------------------------


def fig2(runs: Sequence[str | Path], out: str | Path = ".") -> dict[str, Any]:
    """Draw the three panels of the paper's Fig. 2 from `runs` (run directories, or folders of
    runs) into `out`/fig2.png. Returns {"path", "check", "title", "panels": {"a", "b", "c"},
    "legends"}, each panel {line label: [[epoch, accuracy %], ...]} as drawn, each legend its
    texts as shown (long labels wrapped)."""
    check_writable(out, "figure directory (--out)")  # before any run is read
    read = [_read(run) for run in find_runs(list(runs))]
    for i, (run, text) in enumerate(zip(read, _labels(read), strict=True)):
        run["label"], run["color"] = text, f"C{i % 10}"  # one colour per run in every panel
    checks = list(dict.fromkeys(_check_text(r) for r in read))
    if len(checks) > 1:  # runs checked differently: each label says how
        for run in read:
            run["label"] += f" [{_check_text(run)}]"
    # the legends go below the panels, so the height grows with the number of lines
    rows = sum(len(_wrapped(run["label"]).splitlines()) for run in read)
    fig = _canvas(16, 4.2 + 0.45 * rows)
    axes = fig.subplots(1, 3, sharey=True)
    _panel_runs(axes[0], read)
    _panel_guides(axes[1], read)
    _panel_symmetric(axes[2], read)
    for ax in axes:
        _style_epochs(ax)
    axes[0].set_ylabel(f"accuracy (%); robust: {checks[0]}" if len(checks) == 1 else "accuracy (%)")
    title = fig.suptitle(f"Fig. 2 from {len(read)} run(s): per-epoch check on {_split_text(read)}")
    path = _save(fig, Path(out) / "fig2.png")
    return {
        "path": path,
        "check": checks,
        "title": title.get_text(),
        "panels": dict(zip("abc", map(_drawn, axes), strict=True)),
        "legends": dict(zip("abc", map(_legend_texts, axes), strict=True)),
    }


def _legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


def _style_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_lines():  # wrapped: a long run label stays within its panel's width
        texts = [_wrapped(line.get_label()) for line in ax.get_lines()]
        below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.14)}
        ax.legend(ax.get_lines(), texts, fontsize="small", **below)


LEGEND_WIDTH = 80  # characters of a legend line in "small" type that fit a third of 16 inches


def _wrapped(label: str) -> str:
    return textwrap.fill(label, LEGEND_WIDTH, break_on_hyphens=False)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)


def _panel_runs(ax, runs: list[dict[str, Any]]) -> None:
    """(a): the target's robust accuracy of every run on one axis."""
    for run in runs:
        ax.plot(*_points(run, "robust_acc"), marker="o", color=run["color"], label=run["label"])
    ax.set_title("(a) target robust accuracy per run")


def _panel_guides(ax, runs: list[dict[str, Any]]) -> None:
    """(b): per run with a guide, the guide's clean accuracy (dashed) beside the target's
    robust accuracy (solid), in one colour."""
    with_guide = [r for r in runs if any("guide_clean_acc" in x for x in r["records"])]
    for run in with_guide:
        target = f"target robust: {run['label']}"
        ax.plot(*_points(run, "robust_acc"), marker="o", color=run["color"], label=target)
        style = {"color": run["color"], "linestyle": "--", "marker": "s"}
        ax.plot(*_points(run, "guide_clean_acc"), **style, label=f"guide clean: {run['label']}")
    ax.set_title("(b) guide clean vs target robust accuracy")
    if not with_guide:
        _empty(ax, "no run trains a guide (lbgat, d2r)")


def _panel_symmetric(ax, runs: list[dict[str, Any]]) -> None:
    """(c): D2R runs with the clean symmetric KL term beta * |K1 - K2| (solid) and without it,
    beta = 0 (dashed): the target's robust accuracy."""
    d2r_runs = [r for r in runs if r["cfg"].method["name"] == "d2r"]
    for run in d2r_runs:
        beta = run["cfg"].method.get("beta")
        with_term = beta != 0
        name = f"with symmetric term (beta={beta:g})" if with_term else "without (beta=0)"
        style = {"linestyle": "-" if with_term else "--", "marker": "o" if with_term else "x"}
        style["color"] = run["color"]
        ax.plot(*_points(run, "robust_acc"), **style, label=f"{name}: {run['label']}")
    ax.set_title("(c) D2R with and without the clean symmetric KL")
    if not d2r_runs:
        _empty(ax, "no D2R run among the runs given")


# Fig. 3 -----------------------------------------------------------------------------------------


def fig3(
    runs: Sequence[str | Path], index: int, out: str | Path = ".", checkpoint: str = "last"
) -> dict[str, Any]:
    """Draw test image `index` of the runs' data set and, per run, the class probabilities of
    its guide (when it has one) and its target at `checkpoint` into `out`/fig3-image<index>.png
    (the paper's Fig. 3 compares a guide, a target trained with the symmetric term and one
    without: give both runs). Returns {"path", "index", "label", "probs": {run dir: {"guide",
    "target"}}}, the probabilities read back from the drawn bars."""
    check_writable(out, "figure directory (--out)")  # before any model is loaded
    found = find_runs(list(runs))
    loaded = [_load(run, checkpoint) for run in found]
    image, y = _test_image(loaded, index)
    texts = _labels([{"cfg": cfg, "flat": flat_config(cfg, [])} for cfg, _ in loaded])
    panels = [
        (run, texts[i] if len(found) > 1 else "", loaded[i][1]) for i, run in enumerate(found)
    ]
    # the classifiers drawn: guide and target (not LAS-AT's strategy network)
    n_models = sum(len({"guide", "target"} & set(method.models())) for _, _, method in panels)
    fig = _canvas(3.2 * (1 + n_models), 3.4)
    axes = list(fig.subplots(1, 1 + n_models, squeeze=False)[0])
    _show_image(axes.pop(0), image, index, y)
    probs: dict[str, dict[str, list[float]]] = {}
    for run, text, method in panels:
        probs[str(run)] = {}
        for name in ("guide", "target"):  # the paper's order: guide left of the target
            if name in method.models():
                ax = axes.pop(0)
                _bars(ax, method.models()[name], image, y, f"{name} {text}".strip())
                probs[str(run)][name] = [float(p.get_height()) for p in ax.patches]
    path = _save(fig, Path(out) / f"fig3-image{index}.png")
    return {"path": path, "index": index, "label": y, "probs": probs}


def _load(run: Path, checkpoint: str):
    return load_run(run, checkpoint)  # (config, method in eval mode)


def _test_image(loaded: list, index: int) -> tuple[torch.Tensor, int]:
    """Test image `index` (1, C, H, W) in [0, 1] of the runs' one data set, and its label."""
    names = {cfg.data.name for cfg, _ in loaded}
    if len(names) > 1:
        raise ValueError(f"--figure fig3 needs runs of one data set; got {', '.join(names)}")
    cfg = loaded[0][0]
    x, y = data.load(cfg.data.name, cfg.data.root, "test", verify=cfg.data.verify)
    if not 0 <= index < len(y):
        raise ValueError(
            f"--index {index}: the {cfg.data.name} test split has images 0 to {len(y) - 1}"
        )
    return as_float(x[index : index + 1]), int(y[index])


def _show_image(ax, image: torch.Tensor, index: int, y: int) -> None:
    pixels = image[0].permute(1, 2, 0).cpu().numpy()  # (H, W, C)
    gray = pixels.shape[2] == 1
    ax.imshow(pixels[:, :, 0] if gray else pixels, cmap="gray" if gray else None, vmin=0, vmax=1)
    ax.set_title(f"test image {index}, class {y}")
    ax.axis("off")


def _bars(ax, model: torch.nn.Module, image: torch.Tensor, y: int, title: str) -> None:
    """The model's softmax over the classes (eval mode, fp32), the true class in colour."""
    device = next(model.parameters()).device
    with torch.no_grad():
        probs = F.softmax(model(image.to(device)).float(), 1)[0].cpu()
    colours = ["tab:green" if c == y else "tab:gray" for c in range(len(probs))]
    ax.bar(range(len(probs)), probs.tolist(), color=colours)
    guess = int(probs.argmax())
    verdict = "right" if guess == y else "wrong"
    ax.set_title(f"{title}\npredicts {guess} (p={probs[guess]:.2f}, {verdict})", fontsize="small")
    ax.set_xlabel("class (true class in green)")
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, axis="y")


# `d2r report --figure` ------------------------------------------------------------------------


def add_arguments(parser: Any) -> None:
    """`--figure fig2|fig3` and `--index I` on `d2r report` (report.add_command calls this)."""
    parser.add_argument(
        "--figure",
        choices=FIGURES,
        help="draw the paper's figure instead of the table: fig2 (robust accuracy per epoch of "
        "the runs; guide clean vs target robust; with/without the symmetric term) or fig3 "
        "(guide and target class probabilities for test image --index); into --out or the "
        "current directory",
    )
    parser.add_argument("--index", type=int, help="test image of --figure fig3")


def command(args: Any) -> int:
    """`d2r report RUN... --figure NAME`: draw it, print where it went."""
    if (args.figure == "fig3") != (args.index is not None):
        raise ValueError("--index I goes with --figure fig3 (the test image), and only with it")
    out = args.out or "."
    if args.figure == "fig2":
        drawn = fig2(args.runs, out)
    else:
        drawn = fig3(args.runs, args.index, out, args.checkpoint)
    print(f"wrote {drawn['path']}")
    return 0
