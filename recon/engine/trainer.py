"""The reconstruction stages: a baseline PromptMR+ or the 4-expert mixture.

``run_stage`` is the one entry point for every stage (the classifier stage's hooks are in
:mod:`recon.engine.classifier_stage`). The stage skeleton (resume, optimizer, events, checkpoints,
divergence) is :func:`recon.engine.loop.run_loop`; this module holds the reconstruction stage's hooks:
the model, one training epoch with the explicit schedules of :mod:`recon.schedules`, and validation
with the official metric.

Exact resume: the learning rate is a pure function of the epoch, every random draw of a sample
comes from ``(seed, epoch, index)``, and the shuffle order from ``(seed, epoch)``; a checkpoint
holds the weights, the optimizer state, the epoch, the best metric and the RNG streams, so a
resumed run repeats the uninterrupted run's later epochs.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from recon.data.dataset import SliceDataset
from recon.data.layout import FilePair, data_fingerprint, discover_split, open_h5
from recon.data.names import EXPERTS, expert_name
from recon.engine import distributed as dist
from recon.engine.checkpoint import Checkpoint, build_model, load_state_strict
from recon.engine.loop import DivergenceError, StageHooks, run_loop
from recon.engine.stage import StageConfig
from recon.engine.transform import EpochDataset, StageTransform, TrainItem, collate_items
from recon.engine.remask import RemaskedDataset, stats_key
from recon.engine.validation import metrics_from_stats, panel_indices, remasked_metrics, validate
from recon.errors import InputError
from recon.events import Callback, ConsoleCallback, Divergence, Panel, StageEnd
from recon.fft import center_crop
from recon.losses import MaskedSSIMLoss, VolumeAreaCache
from recon.models.experts import MixtureOfExperts
from recon.models.promptmr import PromptMR, count_parameters
from recon.seeding import derive_seed, determinism_flags, worker_init_fn

log = logging.getLogger(__name__)

STUCK_LOSS = 1.0 - 1e-4
#: how a training slice's mask was chosen (:class:`recon.augment.mask_aug.MaskDecision` ``kind``)
MASK_KINDS = ("file", "public", "equispaced", "random")
#: metrics whose value at the best epoch is reported as ``best_<name with / as _>`` (with the selected one)
BEST_OF = ("val/ssim", "val/leaderboard", "val_remasked/ssim", "val_remasked/leaderboard")
#: per epoch, the share of the trained slices of each mask kind and of the slices MRAugment changed
SHARE_NAMES = {**{f"mask/{kind}": f"train/mask_share/{kind}" for kind in MASK_KINDS},
               "augmented": "train/augmented_share"}


@dataclass
class _Data:
    train: SliceDataset
    val: SliceDataset
    pairs: list[FilePair]
    fingerprint: dict[str, Any]


def _load_data(cfg: StageConfig) -> _Data:
    root = Path(cfg.data.root)
    train_pairs = [p for split in cfg.data.train_splits for p in discover_split(root, split)]
    val_pairs = discover_split(root, cfg.data.val_split)
    if cfg.data.use_val_for_final:
        # one shuffled pool of train + val (the team ran val as a second sequential pass)
        train_pairs = train_pairs + val_pairs
    adj = cfg.data.num_adj_slices
    # the sensitivity net reads the ACS block only when mask_center is set; validation uses the training crop
    need_acs = cfg.model.mask_center
    train = SliceDataset(train_pairs, num_adj_slices=adj, load_target=True, require_acs=need_acs)
    val = SliceDataset(val_pairs, num_adj_slices=adj, load_target=True, crop=train.crop, require_acs=need_acs)
    all_pairs = train_pairs + ([] if cfg.data.use_val_for_final else val_pairs)
    fingerprint = data_fingerprint(all_pairs)
    # promotion compares models on the same validation data: keep that digest on its own
    fingerprint["val_digest"] = data_fingerprint(val_pairs)["digest"]
    return _Data(train, val, all_pairs, fingerprint)


def best_key(metric: str) -> str:
    """The running-best metric name of a validation metric: ``best_val_leaderboard``..."""
    return "best_" + metric.replace("/", "_")


def _val_slices(cfg: StageConfig, val: SliceDataset) -> int:
    n = len(val)
    return n if cfg.data.max_val_slices is None else min(n, cfg.data.max_val_slices)


def _resolve_select_metric(cfg: StageConfig, metric: str, val: SliceDataset) -> str:
    """Check that the scored validation slices can report ``metric``.

    A ``.../leaderboard`` needs acc4 and acc8 slices, a per-group metric that group. A leaderboard
    the slices cannot report (a smoke test's ``data.max_val_slices`` keeps one acceleration) becomes
    the same pass's ``.../ssim``, with a warning; the checkpoint's ``best_metric_name``, the
    ``best_*`` metric and the registered version name the metric used. A per-group metric the slices
    cannot report is refused.
    """
    groups = {expert_name(val.pairs[f].anatomy, val.pairs[f].acc) for f, _ in val.index[:_val_slices(cfg, val)]}
    accs = {g.rsplit("acc", 1)[1] for g in groups}
    prefix, _, rest = metric.partition("/")
    if rest == "leaderboard":
        missing = sorted({"4", "8"} - accs)
    elif rest.startswith("ssim/"):
        group = rest[len("ssim/"):]
        missing = [] if (group in groups or group.removeprefix("acc") in accs) else [group]
    else:
        missing = []
    if not missing:
        return metric
    what = (f"the validation slices scored ({cfg.data.val_split}, data.max_val_slices="
            f"{cfg.data.max_val_slices}) have no {' or '.join('acc' + m if m.isdigit() else m for m in missing)}")
    if rest == "leaderboard":
        log.warning("train.select_metric: %s cannot be computed (%s); selecting on %s/ssim",
                    metric, what, prefix)
        return f"{prefix}/ssim"
    raise InputError(f"train.select_metric = {metric}: {what}")


def _fill_area_cache(cache: VolumeAreaCache, pairs: list[FilePair]) -> None:
    """Foreground areas of every training volume's labels (for the sqrt-area weight), read once."""
    for pair in pairs:
        if pair.name in cache or pair.image is None:
            continue
        with open_h5(pair.image) as f:
            cache.add_volume(pair.name, f["image_label"][()], pair.anatomy)


def _build_model(cfg: StageConfig) -> nn.Module:
    if cfg.stage.kind == "moe":
        return MixtureOfExperts(cfg.model, cfg.moe.experts)
    return PromptMR(cfg.model)


def _init_weights(cfg: StageConfig, model: nn.Module, donor: Checkpoint) -> None:
    """Weights-only initialisation from another stage's checkpoint (an MoE from a baseline: every expert)."""
    donor_model = build_model(donor)
    if isinstance(model, MixtureOfExperts) and isinstance(donor_model, PromptMR):
        for name in model.names:
            load_state_strict(model.experts[name], donor_model.state_dict(), donor.source)
    elif type(donor_model) is type(model):
        load_state_strict(model, donor_model.state_dict(), donor.source)
    else:
        raise InputError(f"{donor.source}: a {donor.kind} checkpoint cannot initialise a {cfg.stage.kind} stage")
    log.info("initialised weights from %s (epoch %s)", donor.source, donor.epoch)


def _order(cfg: StageConfig, n: int, epoch: int) -> list[int]:
    order = np.random.default_rng(derive_seed(cfg.seed, "shuffle", epoch)).permutation(n).tolist()
    if cfg.data.max_train_slices is not None:
        order = order[: cfg.data.max_train_slices]
    return order


def _loader(ds: EpochDataset, indices: list[int], cfg: StageConfig, epoch: int) -> DataLoader:
    ds.set_epoch(epoch)
    workers = cfg.data.num_workers
    return DataLoader(
        ds,
        batch_size=cfg.train.batch_size,
        sampler=indices,
        num_workers=workers,
        collate_fn=collate_items,
        worker_init_fn=worker_init_fn if workers else None,
        generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "loader", epoch)),
        persistent_workers=False,
    )


def _groups(items: list[TrainItem]) -> Iterator[list[TrainItem]]:
    """Items that can share one forward pass: same expert and same shapes."""
    buckets: dict[tuple, list[TrainItem]] = defaultdict(list)
    for item in items:
        buckets[(item.expert, tuple(item.masked_kspace.shape), tuple(item.target.shape))].append(item)
    yield from buckets.values()


class ReconStage(StageHooks):
    """The hooks of a baseline or MoE reconstruction stage (see :class:`recon.engine.loop.StageHooks`)."""

    def __init__(self, cfg: StageConfig, resolved: dict[str, Any]) -> None:
        super().__init__(cfg, resolved)
        self.model = _build_model(cfg)
        self.checkpoint_family = cfg.stage.family
        self.loss_fn = MaskedSSIMLoss(cfg.loss)
        self.areas = VolumeAreaCache()
        self.data = _load_data(cfg)
        if cfg.loss.sqrt_area_weight:
            _fill_area_cache(self.areas, list(self.data.train.pairs))
        self.probe: float | None = None
        self.select_metric = _resolve_select_metric(cfg, self.select_metric, self.data.val)
        self.best_values: dict[str, float] = {}
        self.remask_ds: RemaskedDataset | None = None

    # ----------------------------------------------------------------- forward
    def net_for(self, expert: str) -> nn.Module:
        """The network that reconstructs ``expert``'s slices (the whole model unless an MoE)."""
        if isinstance(self.model, MixtureOfExperts):
            return self.model.expert(expert)
        return self.model

    def forward(self, items: list[TrainItem], net: nn.Module | None = None) -> torch.Tensor:
        """Cropped magnitude outputs ``(B, h, w)`` for items of one expert and shape."""
        net = net if net is not None else self.net_for(items[0].expert)
        kspace = torch.stack([it.masked_kspace for it in items]).to(self.device, non_blocking=True)
        mask = torch.stack([it.mask for it in items]).to(self.device, non_blocking=True)
        use_amp = self.cfg.train.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, enabled=use_amp):
            image = net(kspace, mask, -1).image
        return center_crop(image.float(), *items[0].target.shape[-2:])

    def eval_forward(self, items: list[TrainItem]) -> torch.Tensor:
        """Outputs for a mixed validation batch, in its order (one forward per expert and shape)."""
        outs = []
        for group in _groups(items):
            net = self.model.expert(group[0].expert) if isinstance(self.model, MixtureOfExperts) else self.model
            outs.append((group, self.forward(group, net)))
        by_index = {it.index: out for group, out in outs for it, out in zip(group, out)}
        return torch.stack([by_index[it.index] for it in items])

    # ----------------------------------------------------------------- epochs
    def train_epoch(self, epoch: int, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One epoch over the shuffled (and sharded) training slices; see :class:`StageHooks`."""
        cfg, ds = self.cfg, self.train_ds
        indices = self.ctx.shard(_order(cfg, len(ds), epoch))
        self.model.train()
        losses: list[float] = []
        stuck = 0
        counts: dict[str, int] = defaultdict(int)
        step = 0
        loader = _loader(ds, indices, cfg, epoch)
        if cfg.train.progress and self.ctx.is_main:
            from tqdm import tqdm

            loader = tqdm(loader, desc=f"epoch {epoch}", leave=False, unit="step")
        for items in loader:
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for group in _groups(items):
                output = self.forward(group)
                target = torch.stack([it.target for it in group]).to(self.device)
                max_value = torch.tensor([it.max_value for it in group], device=self.device)
                weights = torch.tensor(
                    [self.areas.weight(it.fname, it.slice_idx, it.target, it.anatomy, it.augmented) for it in group],
                    device=self.device,
                )
                result = self.loss_fn(output, target, max_value, [it.anatomy for it in group], weights, epoch)
                loss = result.loss * (len(group) / len(items))
                loss.backward()
                total += float(loss.detach())
                for it in group:
                    counts[f"mask/{it.mask_kind}"] += 1
                    counts["augmented"] += int(it.augmented)
                    counts[f"expert/{it.expert}"] += 1
            if self.ctx.enabled:  # one decision on every rank: the global batch's mean loss
                total = self.ctx.all_reduce_sum([total])[0] / self.ctx.world_size
            if not math.isfinite(total):
                raise DivergenceError(Divergence(epoch, step, "non-finite loss", total))
            stuck = stuck + 1 if total >= STUCK_LOSS else 0
            if stuck >= cfg.train.stuck_steps:
                raise DivergenceError(Divergence(epoch, step, f"loss stuck at 1 for {stuck} steps", total))
            self.ctx.sync_gradients(self.model)
            if cfg.optim.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip_norm)
            optimizer.step()
            losses.append(total)
            step += 1
        kinds = tuple(f"mask/{kind}" for kind in MASK_KINDS) + ("augmented",)
        slices_here = sum(v for k, v in counts.items() if k.startswith("expert/"))
        summed = self.ctx.all_reduce_sum(
            [float(sum(losses)), float(len(losses)), float(slices_here)] + [float(counts.get(k, 0)) for k in kinds]
        )
        loss_sum, steps, slices = summed[0], summed[1], summed[2]
        metrics = {"train/loss": loss_sum / max(steps, 1.0), "train/steps": steps / self.ctx.world_size,
                   "train/slices": slices}
        if slices:
            for key, value in zip(kinds, summed[3:]):
                metrics[SHARE_NAMES[key]] = value / slices
        return metrics

    def validate_epoch(self, epoch: int, panels: bool) -> tuple[dict[str, float], tuple[Panel, ...]]:
        """Validate; in a data-parallel run each rank scores whole volumes and the sums are reduced once."""
        val_ds, panel_at = self.val_ds, self.panel_at if panels else []
        self.model.eval()
        n = len(val_ds)
        if self.cfg.data.max_val_slices is not None:
            n = min(n, self.cfg.data.max_val_slices)
        val_ds.set_epoch(epoch)
        mine = [i for i in range(n) if val_ds.base.index[i][0] % self.ctx.world_size == self.ctx.rank]
        size = self.cfg.train.batch_size

        def batches() -> Iterator[list[TrainItem]]:
            for start in range(0, len(mine), size):
                yield [val_ds[i] for i in mine[start:start + size]]

        stats, panels = validate(batches(), self.eval_forward, panel_at)
        experts = sorted(set(self.cfg.moe.experts) | set(EXPERTS))
        metrics = metrics_from_stats(self._reduce(stats, experts))
        if self.remask_ds is not None:
            ds = self.remask_ds
            mine = ds.indices_for_rank(self.ctx.rank, self.ctx.world_size)
            remasked, _ = validate(ds.batches(mine, size), self.eval_forward, key=stats_key)
            keys = [f"{kind}:{e}" for kind in ds.kinds for e in experts]
            metrics.update(remasked_metrics(self._reduce(remasked, keys)))
        return metrics, tuple(panels)

    def _reduce(self, stats: dict[str, tuple[float, int]], keys: list[str]) -> dict[str, tuple[float, int]]:
        """Per-group sums over every rank (unchanged in a single process)."""
        if not self.ctx.enabled:
            return stats
        flat = [float(x) for k in keys for x in stats.get(k, (0.0, 0))]
        summed = self.ctx.all_reduce_sum(flat)
        return {k: (summed[2 * i], int(round(summed[2 * i + 1]))) for i, k in enumerate(keys)}

    # ----------------------------------------------------------------- loop hooks
    def init_weights(self, donor: Checkpoint) -> None:
        """Weights from another stage (an MoE from a baseline: every expert starts from it)."""
        _init_weights(self.cfg, self.model, donor)

    def prepare(self, start: int) -> None:
        """The epoch datasets, the fixed panel slices and the memory probe's estimate."""
        cfg = self.cfg
        self.train_ds = EpochDataset(self.data.train, StageTransform(cfg, train=True))
        self.val_ds = EpochDataset(self.data.val, StageTransform(cfg, train=False))
        self.probe = self.probe_mb(self.data) if cfg.train.probe_memory else None
        self.panel_at = panel_indices(len(self.val_ds), cfg.train.panel_slices)
        if cfg.validation.remask.enabled:
            self.remask_ds = RemaskedDataset(self.data.val, cfg, _val_slices(cfg, self.data.val))

    def start_fields(self) -> dict[str, Any]:
        """StageStart fields of a reconstruction stage."""
        cfg = self.cfg
        trainable, _fixed = count_parameters(self.model)
        return {
            "family": None if cfg.stage.family == "none" else cfg.stage.family,
            "seeds": {"stage": cfg.seed, "model": cfg.model.seed}, "data_fingerprint": self.data.fingerprint,
            "param_count": trainable,
            "determinism": {**determinism_flags(), "deterministic": cfg.deterministic,
                            "world_size": self.ctx.world_size},
        }

    def trained_slices(self, train_metrics: dict[str, float]) -> float:
        """``train/slices`` (all ranks)."""
        return train_metrics["train/slices"]

    def schedule_metrics(self, epoch: int, lr: float) -> dict[str, float]:
        """``lr``, ``schedule/p_remask`` (what the mask augmentation does: 1 for a Hacker), ``schedule/p_aug``
        and, when the anatomies' schedules differ, ``schedule/p_aug/brain`` and ``schedule/p_aug/knee``."""
        transform = self.train_ds.transform
        p_mask, p_aug = transform.probabilities(epoch)
        metrics = {"lr": lr, "schedule/p_remask": transform.mask_aug.remask_probability(p_mask), "schedule/p_aug": p_aug}
        if transform.aug_per_anatomy:
            metrics.update({f"schedule/p_aug/{a}": transform.aug_probability(a, epoch) for a in transform.aug_schedules})
        return metrics

    def score(self, metrics: dict[str, float]) -> float:
        """The value of :attr:`select_metric` (``train.select_metric`` resolved)."""
        if self.select_metric not in metrics:
            have = ", ".join(sorted(k for k in metrics if k.startswith("val")))
            raise InputError(f"train.select_metric = {self.select_metric}: not reported by validation (have: {have})")
        return float(metrics[self.select_metric])

    def record_best(self, metrics: dict[str, float], best: float) -> bool:
        """A higher :attr:`select_metric`; remembers that epoch's :data:`BEST_OF` values."""
        improved = self.score(metrics) > best
        if improved:
            self.best_values = {m: float(metrics[m]) for m in (*BEST_OF, self.select_metric) if m in metrics}
        return improved

    def best_metrics(self, best: float) -> dict[str, float]:
        """``best_<metric>`` of the best epoch: the selected metric (``best``) and :data:`BEST_OF`."""
        out = {best_key(m): v for m, v in self.best_values.items()}
        out[best_key(self.select_metric)] = best
        return out

    def resumed(self, checkpoint: Checkpoint) -> None:
        """The best epoch's reported values from the checkpoint's ``best_*`` metrics."""
        stored = checkpoint.metrics
        self.best_values = {m: float(stored[best_key(m)]) for m in (*BEST_OF, self.select_metric)
                            if best_key(m) in stored}

    def extra_metrics(self) -> dict[str, float]:
        """``memory/probe_predicted_mb`` when the probe ran."""
        return {"memory/probe_predicted_mb": self.probe} if self.probe is not None else {}

    def model_config(self) -> dict[str, Any]:
        """``PromptMRConfig.to_dict()`` (one for all experts)."""
        return self.cfg.model.to_dict()

    def experts(self) -> tuple[str, ...]:
        """The MoE's expert names in order, else none."""
        return tuple(self.model.names) if isinstance(self.model, MixtureOfExperts) else ()

    def probe_mb(self, data: _Data) -> float | None:
        """The memory probe's figure for one step at the largest training input, in MiB (None if unavailable).

        For an MoE it adds the weights and optimizer state of the experts that do not train the step, as
        the tuner's prediction does (:mod:`tracking.tune.memory`).
        """
        try:
            from recon.engine.memory import probe_training_step
        except ImportError:
            return None
        shapes = [tuple(f["kspace"]["keys"]["kspace"]["shape"]) for f in data.fingerprint["files"]]
        if not shapes:
            return None
        _, coils, height, width = max(shapes, key=lambda s: s[1] * s[2] * s[3])
        estimate = probe_training_step(self.cfg.model, coils, height, width, device=str(self.device),
                                       batch_size=self.cfg.train.batch_size)
        peak = estimate.peak_bytes
        if isinstance(self.model, MixtureOfExperts):  # the idle experts' weights and AdamW state stay resident
            peak += (len(self.model.names) - 1) * (estimate.params_bytes + estimate.optimizer_bytes)
        return peak / 2**20


def run_stage(
    cfg: StageConfig,
    resolved: dict[str, Any],
    callbacks: Callback | None = None,
    resume: str | Path | None = None,
    init_from: str | Path | None = None,
) -> StageEnd:
    """Run one training stage.

    Args:
        cfg: the typed stage configuration.
        resolved: its fully resolved plain form (saved with every checkpoint).
        callbacks: listeners; :class:`ConsoleCallback` when None.
        resume: checkpoint file or stage folder to resume exactly (``last`` of a folder).
        init_from: checkpoint to initialise the weights from (weights only; MoE from a baseline).

    Returns:
        The :class:`StageEnd` event (also sent to the callbacks).

    Raises:
        DivergenceError: the loss became non-finite or stuck at 1 (after the divergence event).
    """
    callbacks = callbacks if callbacks is not None else ConsoleCallback()
    if cfg.stage.kind == "classifier":
        if dist.context().enabled:
            raise InputError(f"stage {cfg.stage.name}: the classifier stage runs in one process; "
                             "start it without --nproc/torchrun")
        from recon.engine.classifier_stage import ClassifierStage

        return run_loop(ClassifierStage(cfg, resolved), callbacks, resume=resume, init_from=init_from)
    return run_loop(ReconStage(cfg, resolved), callbacks, resume=resume, init_from=init_from)
