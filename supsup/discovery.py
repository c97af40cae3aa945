"""Training without task identity: notice a new task in a stream of batches and allocate a mask.

The paper's NNs scenario (Section 3.4): the learner sees batches whose task is never named. Every
`check_every` batches it superimposes n = max(#masks, min_candidates) masks at alpha = 1/n on the
current batch and computes nu = softmax(-dH/dalpha). A mask that fits the batch lowers the output
entropy H much more than the others, so nu peaks on it; when no candidate stands out,
max(nu) < (1 + eps) / n, the batch is taken to come from a new task and a new mask is allocated
(up to `budget` masks; past it the best existing mask is reused). Between checks the chosen mask
keeps training on every batch.

Empty slots. While fewer masks exist than `min_candidates`, the remaining candidate slots hold the
masks of fresh scores: slot j is exactly the mask that allocation would give mask id j (scores from
a generator keyed by (network seed, "discovery", j, layer index)), like the untrained score tensors
preallocated for every task in the authors' code. They are the reference a trained mask has to
beat. If such an empty slot wins above the threshold, no trained mask explains the batch either,
so that also allocates a new mask.

Every mask keeps its own `TaskScores` and optimiser, so training an old mask again resumes its
optimiser state. The candidates live in one `MaskBank` whose rows are refreshed in place
(`MaskBank.replace`) when their mask changed since the last check: one mask's packing per check
instead of rebuilding the bank.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from supsup.bank import MaskBank
from supsup.binding import use_scores, use_task
from supsup.inference import alpha_gradients, infer_task
from supsup.layers import kaiming_uniform_scores
from supsup.networks import SupermaskNet
from supsup.objectives import OBJECTIVES
from supsup.scores import TaskScores, _param_name
from supsup.seeding import generator
from supsup.tasks import TaskSet
from supsup.train import TrainConfig, _optimizer

Segment = tuple[int, int, int]  # (first batch, last batch, mask id), both ends included


@dataclass(frozen=True)
class DiscoveryConfig:
    """The allocation rule (the paper's defaults) and how each mask is trained.

    Of `train`, the optimiser fields (optimizer, lr, momentum, weight_decay) and the mask rule
    (rule, density, erdos_renyi_scale) are used; steps, epochs, batch_size and seed are not, since
    the stream decides how many batches of which size arrive. The schedule must stay constant:
    an open-ended stream has no last step to anneal towards.
    """

    check_every: int = 100
    budget: int = 2500
    min_candidates: int = 5
    eps: float = 2**-3
    objective: str = "entropy"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1 batch, got {self.check_every}")
        if self.budget < 1:
            raise ValueError(f"budget must allow at least 1 mask, got {self.budget}")
        if self.min_candidates < 1:
            raise ValueError(f"min_candidates must be >= 1, got {self.min_candidates}")
        if not math.isfinite(self.eps) or self.eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.train.schedule != "constant" or self.train.warmup_steps:
            raise ValueError("discovery trains on an open-ended stream: train.schedule must be "
                             "'constant' and train.warmup_steps 0")


@dataclass(frozen=True)
class DiscoveryDecision:
    """One check: what nu looked like and which mask trains until the next check.

    reason: "first batch", "new task" (no candidate stood out, or an empty slot won),
    "budget" (a new task, but the budget is spent: the best existing mask is reused) or
    "continue" (an existing mask stood out). window_loss / window_accuracy are the training
    means over the batches since the previous check (nan at the first).
    """

    batch: int
    num_masks: int  # masks allocated before this decision
    candidates: int  # n
    nu_max: float  # nan at the first batch, where no gradient is taken
    threshold: float  # (1 + eps) / n
    best_slot: int  # argmax nu (-1 at the first batch)
    allocated: bool
    mask_id: int
    reason: str
    window_loss: float
    window_accuracy: float


@dataclass
class DiscoveryResult:
    """What a stream taught: masks in order of allocation and how the stream was spent on them.

    bank: the discovered masks, ids 0..num_masks-1, with their BN statistics when the network has
    BN layers (`bank.bn_stats(mask_id, key)`).
    segments: (first batch, last batch, mask id) stretches the stream trained each mask on.
    mask_per_batch / loss / accuracy: one entry per batch (training loss and accuracy before the
    batch's update).
    """

    bank: MaskBank
    segments: list[Segment]
    decisions: list[DiscoveryDecision]
    mask_per_batch: list[int]
    loss: list[float]
    accuracy: list[float]
    seconds: float

    @property
    def num_masks(self) -> int:
        return self.bank.num_tasks

    @property
    def num_batches(self) -> int:
        return len(self.mask_per_batch)

    @property
    def budget_reached(self) -> bool:
        return any(d.reason == "budget" for d in self.decisions)


class MaskDiscovery:
    """The learner's state, fed one batch at a time: `feed(x, y)`, then `result()`.

    `discover` drives it over an iterable; use the class directly to interleave the stream with
    logging or checkpoints.
    """

    def __init__(self, net: SupermaskNet, config: DiscoveryConfig | None = None) -> None:
        self.net = net
        self.config = config or DiscoveryConfig()
        self.device = next(iter(net.masked_layers().values())).weight.device
        self.scores: list[TaskScores] = []  # one per allocated mask, index = mask id
        self.optimizers: list[torch.optim.Optimizer] = []
        # Rows 0..max(#masks, min_candidates)-1: allocated masks, then fresh empty slots.
        self.candidates = MaskBank(net.layer_shapes(), net.bn_features(), self.device)
        self._slot_scores: dict[int, TaskScores] = {}  # fresh scores of empty slots
        self._stale: set[int] = set()  # masks trained since their bank row was written
        self.decisions: list[DiscoveryDecision] = []
        self.mask_per_batch: list[int] = []
        self.loss: list[float] = []
        self.accuracy: list[float] = []
        self._current = -1
        self._window: list[tuple[float, float]] = []
        self._seconds = 0.0

    @property
    def num_masks(self) -> int:
        return len(self.scores)

    # ------------------------------------------------------------------------------ masks
    def _fresh_scores(self, mask_id: int) -> TaskScores:
        """Scores of mask `mask_id` as allocation creates them, from their own generator."""
        t = self.config.train
        scores = TaskScores(self.net, [mask_id], rule=t.rule, density=t.density,
                            erdos_renyi_scale=t.erdos_renyi_scale)
        with torch.no_grad():
            for key, layer in self.net.masked_layers().items():
                g = generator(self.net.spec.seed, "discovery", mask_id, layer.layer_index)
                fresh = kaiming_uniform_scores(layer.shape, layer.fan_in, g)
                scores.scores[_param_name(key)].copy_(fresh.unsqueeze(0))
        return scores.to(self.device)

    def _slot(self, mask_id: int) -> TaskScores:
        if mask_id < self.num_masks:
            return self.scores[mask_id]
        if mask_id not in self._slot_scores:
            self._slot_scores[mask_id] = self._fresh_scores(mask_id)
        return self._slot_scores[mask_id]

    def _row_content(self, mask_id: int) -> tuple[dict[str, torch.Tensor],
                                                  dict[str, torch.Tensor]]:
        masks, stats = self._slot(mask_id).export()[mask_id]
        return masks, stats

    def _sync_candidates(self, n: int) -> None:
        """Make bank rows 0..n-1 hold the current masks of allocated ids and fresh empty slots."""
        for mask_id in range(self.candidates.num_tasks, n):
            masks, stats = self._row_content(mask_id)
            self.candidates.add(mask_id, masks, stats or None)
            self._stale.discard(mask_id)
        for mask_id in sorted(self._stale):
            masks, stats = self._row_content(mask_id)
            self.candidates.replace(mask_id, masks, stats or None)
        self._stale.clear()

    def _allocate(self) -> int:
        mask_id = self.num_masks
        scores = self._slot_scores.pop(mask_id, None)
        if scores is None:
            scores = self._fresh_scores(mask_id)
        self.scores.append(scores)
        self.optimizers.append(_optimizer(list(scores.parameters()), self.config.train))
        return mask_id

    # ----------------------------------------------------------------------------- stream
    def _check(self, batch: int, x: torch.Tensor) -> DiscoveryDecision:
        cfg = self.config
        m = self.num_masks
        window = self._window or [(math.nan, math.nan)]
        w_loss = sum(v[0] for v in window) / len(window)
        w_acc = sum(v[1] for v in window) / len(window)
        self._window = []
        if m == 0:
            mask_id = self._allocate()
            return DiscoveryDecision(batch, 0, 0, math.nan, math.nan, -1, True, mask_id,
                                     "first batch", w_loss, w_acc)
        n = max(m, cfg.min_candidates)
        self._sync_candidates(n)
        rows = self.candidates.rows(range(n))
        grads = alpha_gradients(self.net, self.candidates, x, rows, cfg.objective).cpu()
        nu = torch.softmax(-grads.double(), 0)
        threshold = (1.0 + cfg.eps) / n
        best = int(nu.argmax())
        nu_max = float(nu[best])
        if nu_max >= threshold and best < m:
            mask_id, allocated, reason = best, False, "continue"
        elif m < cfg.budget:
            mask_id, allocated, reason = self._allocate(), True, "new task"
        else:
            mask_id, allocated, reason = int(nu[:m].argmax()), False, "budget"
        return DiscoveryDecision(batch, m, n, nu_max, threshold, best, allocated, mask_id,
                                 reason, w_loss, w_acc)

    def feed(self, x: torch.Tensor, y: torch.Tensor) -> DiscoveryDecision | None:
        """Take one batch x (B, *input_shape), y (B,): check if it is a check batch, then train.

        Returns the decision made on this batch, or None between checks.
        """
        self.net.check_input(x)
        if y.dim() != 1 or y.shape[0] != x.shape[0] or x.shape[0] == 0 or y.is_floating_point():
            raise ValueError(f"batch {len(self.mask_per_batch)}: labels must have shape "
                             f"(B,) = ({x.shape[0]},) with B >= 1 and an integer dtype, got "
                             f"{tuple(y.shape)} {y.dtype}")
        outputs = self.net.spec.num_outputs
        if int(y.min()) < 0 or int(y.max()) >= outputs:
            raise ValueError(f"batch {len(self.mask_per_batch)}: labels must lie in "
                             f"0..{outputs - 1} (the network's outputs), got "
                             f"{int(y.min())}..{int(y.max())}")
        start = time.perf_counter()
        x, y = x.to(self.device), y.to(self.device)
        batch = len(self.mask_per_batch)
        decision = None
        if batch % self.config.check_every == 0:
            decision = self._check(batch, x)
            self.decisions.append(decision)
            self._current = decision.mask_id
        loss, acc = self._train_step(self._current, x, y)
        self._window.append((loss, acc))
        self.mask_per_batch.append(self._current)
        self.loss.append(loss)
        self.accuracy.append(acc)
        self._seconds += time.perf_counter() - start
        return decision

    def _train_step(self, mask_id: int, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """One optimiser step on one mask's scores (a group of one)."""
        scores, opt = self.scores[mask_id], self.optimizers[mask_id]
        self.net.train()
        with use_scores(self.net, scores):
            logits = self.net(x.unsqueeze(0))[0]  # (B, outputs)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self._stale.add(mask_id)
        with torch.no_grad():
            acc = (logits[:, : self.net.spec.num_classes].argmax(-1) == y).float().mean()
        return float(loss.detach()), float(acc)

    def result(self) -> DiscoveryResult:
        """The discovered masks and the record of the stream so far."""
        if not self.mask_per_batch:
            raise ValueError("the stream yielded no batches: nothing was discovered")
        self._sync_candidates(max(self.candidates.num_tasks, self.num_masks))
        bank = self.candidates.subset(range(self.num_masks))
        return DiscoveryResult(bank, segments(self.mask_per_batch), list(self.decisions),
                               list(self.mask_per_batch), list(self.loss), list(self.accuracy),
                               self._seconds)


def discover(
    net: SupermaskNet,
    stream: Iterable[tuple[torch.Tensor, torch.Tensor]],
    config: DiscoveryConfig | None = None,
    *,
    callback: Callable[[DiscoveryDecision], None] | None = None,
) -> DiscoveryResult:
    """Learn masks from a stream of (x (B, *input_shape), y (B,)) batches of unnamed tasks.

    `callback` receives every check's decision as it is made.
    """
    learner = MaskDiscovery(net, config)
    for x, y in stream:
        decision = learner.feed(x, y)
        if decision is not None and callback is not None:
            callback(decision)
    return learner.result()


def segments(mask_per_batch: Sequence[int]) -> list[Segment]:
    """Runs of equal mask ids: [(first batch, last batch, mask id), ...]."""
    out: list[Segment] = []
    for i, mask_id in enumerate(mask_per_batch):
        if out and out[-1][2] == mask_id and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i, mask_id)
        else:
            out.append((i, i, mask_id))
    return out


# ------------------------------------------------------------------ evaluation against truth
def stream_from_tasks(
    tasks: TaskSet,
    task_order: Sequence[int],
    batches_per_task: int,
    batch_size: int,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches x (B, *input), y (B,): `batches_per_task` of each task in `task_order`.

    A task may appear more than once; it then continues its own shuffled order instead of
    repeating batches. The true task of each batch is `stream_task_labels(...)`, kept apart so
    the learner never sees it.
    """
    if batches_per_task < 1:
        raise ValueError(f"batches_per_task must be >= 1, got {batches_per_task}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = [tasks.check_task(t) for t in task_order]
    if not order:
        raise ValueError("task_order is empty: name at least one task to stream")
    visits = Counter(order)
    per_task = {
        t: tasks.train_batches([t], batch_size, visits[t] * batches_per_task, seed=seed)
        for t in visits
    }
    for t in order:
        for _ in range(batches_per_task):
            x, y = next(per_task[t])
            yield x[0], y[0]


def stream_task_labels(task_order: Sequence[int], batches_per_task: int) -> list[int]:
    """The true task of every batch of `stream_from_tasks` with the same arguments."""
    return [int(t) for t in task_order for _ in range(batches_per_task)]


def allocation_report(
    result: DiscoveryResult, true_task_per_batch: Sequence[int]
) -> dict[str, object]:
    """How the discovered masks line up with the true tasks, from the batches each trained on.

    mask_to_task: each mask's majority true task; mask_purity: the share of its batches from that
    task; purity: the share of all batches whose mask's majority task is their own task;
    task_to_masks: per true task, the masks trained on it, most batches first.
    """
    truth = [int(t) for t in true_task_per_batch]
    if len(truth) != result.num_batches:
        raise ValueError(f"true_task_per_batch has {len(truth)} entries; the stream had "
                         f"{result.num_batches} batches")
    per_mask: dict[int, Counter[int]] = {}
    per_task: dict[int, Counter[int]] = {}
    for mask_id, t in zip(result.mask_per_batch, truth):
        per_mask.setdefault(mask_id, Counter())[t] += 1
        per_task.setdefault(t, Counter())[mask_id] += 1
    mask_to_task = {m: c.most_common(1)[0][0] for m, c in sorted(per_mask.items())}
    mask_purity = {m: c.most_common(1)[0][1] / sum(c.values())
                   for m, c in sorted(per_mask.items())}
    agree = sum(c.most_common(1)[0][1] for c in per_mask.values())
    return {
        "num_masks": result.num_masks,
        "num_true_tasks": len(per_task),
        "batches": len(truth),
        "mask_to_task": mask_to_task,
        "mask_purity": mask_purity,
        "purity": agree / len(truth),
        "task_to_masks": {t: [m for m, _ in c.most_common()] for t, c in sorted(per_task.items())},
    }


@dataclass(frozen=True)
class DiscoveredEvaluation:
    """Test accuracy of one true task when the mask is inferred among the discovered ones."""

    task_id: int
    examples: int
    accuracy: float  # predictions made with the inferred mask, whatever it is
    inferred: dict[int, int]  # mask id -> number of inferences that chose it


def evaluate_discovered(
    net: SupermaskNet,
    bank: MaskBank,
    tasks: TaskSet,
    task_ids: Sequence[int],
    *,
    batch_size: int = 128,
    method: str = "one_shot",
    objective: str = "entropy",
    mode: str = "one_image",
    split: str = "test",
) -> list[DiscoveredEvaluation]:
    """Per true task: infer a mask for every test batch (`infer_task`), classify with it.

    Discovered masks carry no task names, so nothing is counted as the "right" mask: accuracy is
    what the inferred mask predicts. `inferred` shows which masks a task's batches went to.
    """
    if bank.num_tasks == 0:
        raise ValueError("the bank holds no discovered masks to evaluate")
    device = next(iter(net.masked_layers().values())).weight.device
    out = []
    net.eval()
    for t in task_ids:
        correct = n = 0
        inferred: Counter[int] = Counter()
        for x, y in tasks.eval_batches(t, split, batch_size):
            found = infer_task(net, bank, x, method=method, objective=objective, mode=mode)
            pred = torch.empty_like(y)
            for mask_id in found.task_ids.unique().tolist():
                sel = found.task_ids == mask_id
                with use_task(net, bank, mask_id), torch.no_grad():
                    logits = net(x[sel].to(device))
                pred[sel] = logits[:, : tasks.num_classes].argmax(-1).cpu()
                inferred[int(mask_id)] += int(sel.sum()) if mode == "per_example" else 1
            correct += int((pred == y).sum())
            n += y.numel()
        if n == 0:
            raise ValueError(f"task {t} has no {split} examples to evaluate")
        out.append(DiscoveredEvaluation(int(t), n, correct / n, dict(sorted(inferred.items()))))
    return out
