""" ``python -m timm_moejet.train``: fine-tune a MoE Jetpack model sharded with FSDP2, from timm's own parts.

timm's ``train.py`` replicates the model with DDP. For models whose weights, gradients and AdamW state do not fit one
device, this trainer shards them with FSDP2 (:func:`timm_moejet.training.shard_model`) and checkpoints with
``torch.distributed.checkpoint`` (:mod:`timm_moejet.training.checkpoint`). Everything else is timm's:
``create_dataset``, ``create_loader``, ``create_optimizer_v2``, ``create_scheduler_v2``, ``Mixup``, the losses, and
train.py's argument names and defaults (``--config`` YAML too) for the options it supports (:mod:`.args`). Run it
under ``torchrun`` (one process per device); without torchrun it trains in one process.

Reproducibility: the random state (dropout, drop path, routing noise, expert dropout, mixup, the data workers' seeds)
is re-seeded from ``--seed``, the rank and the optimizer update count before every update, so a resume continues
exactly where the checkpoint left off. The training order is torch's ``DistributedSampler`` (seed 0 + epoch) on
every world size, so N processes with ``-b B`` see the same global batches as one process with ``-b N*B``.

A run is a :class:`Run` (what it trains with: model, optimizer, schedule, loader, loss, log) that :func:`train`
builds (:func:`build_run`), then steps through epochs (:func:`train_epoch`: :func:`forward_backward` per micro-batch,
:func:`optimizer_step` per update, which also updates the model EMA), validates the model and its EMA
(:mod:`.validation`, every ``--val-interval`` epochs), writes ``summary.csv``, saves a sharded checkpoint (the EMA's
shards with the model's) and keeps the best and the latest (:mod:`.history`), and exports the model (and its EMA) at
the end. ``--torchcompile`` compiles every block (:func:`~timm_moejet.training.sharding.shard_model`).
"""
import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TextIO

import torch
import torch.nn as nn
import yaml

from ..checkpoint_io import atomic_write_bytes
from ..cost import num_params
from ..errors import MoEJetError
from . import checkpoint as ckpt
from .args import check_args, fingerprint, output_dir, parse_args
from .data import SyntheticImages, check_batches, train_dataset, train_loader
from .ema import ShardedEma, check_ema_args
from .sharding import check_compile_args
from .validation import (
    check_validation_args,
    eval_loader,
    truncate_summary,
    validate,
    validation_enabled,
    write_summary,
)

__all__ = ['main', 'parse_args', 'train', 'Run', 'build_run', 'train_epoch', 'SyntheticImages']

_logger = logging.getLogger('timm_moejet.train')


def _setup_distributed() -> torch.device:
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU), or make a one-process group."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    device = torch.device('cuda', torch.cuda.current_device()) if cuda else torch.device('cpu')
    if not dist.is_initialized():
        if 'RANK' in os.environ:
            dist.init_process_group('nccl' if cuda else 'gloo', device_id=device if cuda else None)
        else:
            dist.init_process_group('nccl' if cuda else 'gloo', store=dist.HashStore(), rank=0, world_size=1)
    return device


# numpy takes seeds below 2**32; the rank is added to the seed (room for 2**16 processes)
_SEEDS = 2 ** 32 - 2 ** 16


def _reseed(args: argparse.Namespace, num_updates: int, rank: int) -> None:
    """Seed every generator from ``--seed``, the update count and the rank, wrapped into numpy's range (a long run
    passes 2**32 after about 4,300 updates)."""
    from timm.utils import random_seed
    random_seed((args.seed + 1_000_003 * num_updates) % _SEEDS, rank)


def _peak_rss() -> int:
    """The process's peak resident set in bytes.

    Linux's ``VmHWM`` first: ``ru_maxrss`` carries over the parent's peak through ``fork``/``exec``, so a trainer
    started by a large process (a test runner, a notebook) would report no growth at all.
    """
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)  # KiB


@dataclasses.dataclass
class Run:
    """What one training run works with, on one rank.

    Attributes:
        args: The parsed arguments.
        world: Processes in the group.
        rank: This process's rank.
        device: This process's device.
        output_dir: The run's folder (checkpoints, steps.jsonl, args.yaml, the exported model).
        fingerprint: What a resume must share with the checkpoint.
        model: The sharded model.
        optimizer: timm's optimizer over the shards.
        scheduler: timm's scheduler.
        num_epochs: Epochs the schedule runs.
        loader: The training loader.
        updates_per_epoch: Optimizer updates an epoch makes (as train.py: a trailing partial accumulation is one).
        loss_fn: The loss (soft targets with mixup/cutmix).
        mixup: timm's ``Mixup``, or None.
        autocast: A context of bfloat16 autocast with ``--amp``, else of nothing.
        rss_start: Peak memory before the model was built (what the steps log reports is the growth).
        log: ``steps.jsonl`` on rank 0, one line per update; None on the other ranks.
        epoch: The epoch the next update belongs to.
        num_updates: Optimizer updates made.
        ema: The model EMA (``--model-ema``), sharded like the model, or None.
        eval_loader: This rank's validation loader, or None without validation.
        losses: The global losses of the current epoch's updates.
        last_log: When the previous update was logged (its step time is the interval).
    """
    args: argparse.Namespace
    world: int
    rank: int
    device: torch.device
    output_dir: Path
    fingerprint: Dict[str, Any]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    num_epochs: int
    loader: Any
    updates_per_epoch: int
    loss_fn: nn.Module
    mixup: Optional[Callable]
    autocast: Callable[[], Any]
    rss_start: int
    log: Optional[TextIO] = None
    epoch: int = 0
    num_updates: int = 0
    ema: Optional[ShardedEma] = None
    eval_loader: Any = None
    losses: List[float] = dataclasses.field(default_factory=list)
    last_log: float = 0.


def _build_model(args: argparse.Namespace, device: torch.device, world: int, resuming: bool) -> nn.Module:
    """The model, the same initial weights on every rank (each keeps its shard of them), sharded with FSDP2."""
    from timm.utils import random_seed

    from ..build import create_model
    from ..checkpoint_io.hub import hub_errors_named
    from .sharding import init_device_mesh, plan_shards, shard_model

    random_seed(args.seed, 0)
    with hub_errors_named(f'--model {args.model}'):  # an hf-hub: model, or pretrained weights, offline
        model = create_model(args.model, pretrained=args.pretrained and not resuming, num_classes=args.num_classes,
                             drop_rate=args.drop, drop_path_rate=args.drop_path, **args.model_kwargs)
    model.to(device)
    plan_shards(model, world)  # a world size that cannot split the experts evenly fails here, before any step
    return shard_model(model, init_device_mesh(device.type), mixed_precision=args.amp,
                       reshard_after_forward=not args.no_reshard_after_forward, cpu_offload=args.cpu_offload,
                       grad_checkpointing=args.grad_checkpointing, compile_backend=args.torchcompile,
                       compile_mode=args.torchcompile_mode)


def _build_ema(args: argparse.Namespace, device: torch.device, model: nn.Module) -> ShardedEma:
    """The model EMA: a second model sharded with the same plan (eager: it only validates), starting as a copy."""
    from ..build import create_model
    from ..layers import experts_to_be_loaded
    from .sharding import init_device_mesh, shard_model

    with experts_to_be_loaded():  # every weight is copied from the model just below
        module = create_model(args.model, num_classes=args.num_classes, drop_rate=args.drop,
                              drop_path_rate=args.drop_path, **args.model_kwargs)
    module.to(device)
    shard_model(module, init_device_mesh(device.type), mixed_precision=args.amp, cpu_offload=args.cpu_offload)
    ema = ShardedEma(module, args.model_ema_decay, args.model_ema_warmup)
    ema.reset(model)
    return ema


def _loss_and_mixup(args: argparse.Namespace) -> tuple:
    """timm's losses as train.py chooses them, and its ``Mixup`` when mixup or cutmix is asked for."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                      num_classes=args.num_classes)
        return SoftTargetCrossEntropy(), mixup
    return (LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else nn.CrossEntropyLoss()), None


def _scaled_lr(args: argparse.Namespace, global_batch: int) -> float:
    """``--lr``, or train.py's rule: ``--lr-base`` scaled by the global batch (sqrt for adaptive optimizers)."""
    if args.lr is not None:
        return args.lr
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    ratio = global_batch / args.lr_base_size
    return args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)


def build_run(args: argparse.Namespace) -> Run:
    """Check the arguments (before the process group, the model or any output exists), join the process group and
    build everything a run trains with; a resumed run continues from its checkpoint's epoch and update count."""
    import torch.distributed as dist
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    world = int(os.environ.get('WORLD_SIZE', 1))
    folder = output_dir(args)
    check_args(args, world, folder)
    check_validation_args(args)
    check_ema_args(args)
    check_compile_args(args)
    recorded = fingerprint(args, world)
    record = ckpt.read_record(args.resume) if args.resume else {}
    if args.resume:
        ckpt.check_fingerprint(record, recorded, args.resume)
    dataset = train_dataset(args)
    check_batches(args, dataset, world)
    device = _setup_distributed()
    rss_start = _peak_rss()  # the memory a process needs beyond torch, timm and the process group
    model = _build_model(args, device, world, resuming=bool(args.resume))
    args.lr = _scaled_lr(args, args.batch_size * world * args.grad_accum_steps)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    loader = train_loader(args, model, device, dataset)
    updates_per_epoch = -(-len(loader) // args.grad_accum_steps)
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                updates_per_epoch=updates_per_epoch)
    loss_fn, mixup = _loss_and_mixup(args)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else nullcontext
    run = Run(args, world, dist.get_rank(), device, folder, recorded, model, optimizer, scheduler, num_epochs, loader,
              updates_per_epoch, loss_fn, mixup, autocast, rss_start)
    run.ema = _build_ema(args, device, model) if args.model_ema else None
    run.eval_loader = eval_loader(args, model, run.rank, world) if validation_enabled(args) else None
    if args.resume:
        # train.py: the EMA resumes from the checkpoint's, or starts as the model where it has none
        saved_ema = run.ema is not None and record.get('model_ema', False)
        record = ckpt.load_checkpoint(args.resume, model, optimizer,
                                      extra={'model_ema': run.ema.module} if saved_ema else None)
        if run.ema is not None and not saved_ema:
            run.ema.reset(model)
        run.epoch, run.num_updates = record['epoch'], record['num_updates']
    # timm's schedulers are functions of the epoch and the update count: restoring those restores them
    scheduler.step(run.epoch)
    if args.sched_on_updates:
        scheduler.step_update(run.num_updates)
    return run


def forward_backward(run: Run, x: torch.Tensor, y: torch.Tensor, last: bool, accum: int) -> float:
    """One micro-batch of an update of ``accum``: its share of the update's gradient (synchronised over the ranks on
    the ``last`` one only); returns its loss on this rank."""
    x, y = x.to(run.device), y.to(run.device)
    if run.mixup is not None:
        x, y = run.mixup(x, y)
    run.model.set_requires_gradient_sync(last)
    with run.autocast():
        loss = run.loss_fn(run.model(x), y)
    (loss / accum).backward()
    return loss.item()


def optimizer_step(run: Run) -> None:
    """The optimizer update of the accumulated gradient, the EMA's update and the scheduler's update step."""
    if run.args.clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.args.clip_grad)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.num_updates += 1
    if run.ema is not None:
        run.ema.update(run.model, run.num_updates)
    run.scheduler.step_update(run.num_updates)


def _log_update(run: Run, loss: float) -> None:
    """One line of ``steps.jsonl`` (rank 0): the loss of the global batch, the largest peak memory growth of any
    process (a collective: every rank calls it)."""
    import torch.distributed as dist

    loss_sum = torch.tensor([loss], dtype=torch.float64)
    peak = torch.tensor([_peak_rss() - run.rss_start], dtype=torch.float64)
    dist.all_reduce(loss_sum)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    mean_loss = loss_sum.item() / run.world
    run.losses.append(mean_loss)
    now = time.perf_counter()
    step_time, run.last_log = now - run.last_log, now
    if run.log is not None:
        run.log.write(json.dumps(dict(step=run.num_updates, epoch=run.epoch, loss=mean_loss,
                                      lr=run.optimizer.param_groups[0]['lr'], step_time=step_time,
                                      peak_rss_growth=int(peak.item()))) + '\n')
        run.log.flush()
        if run.num_updates % run.args.log_interval == 0:
            _logger.info(f'epoch {run.epoch} update {run.num_updates}: loss {mean_loss:.4f}')


def train_epoch(run: Run) -> float:
    """The updates of one epoch, then the scheduler's epoch step; returns the epoch's mean global loss. The random
    state is re-seeded before each update, after its first micro-batch is drawn. As train.py, the micro-batches left
    at the end of an epoch (fewer than ``--grad-accum-steps``) make one more update, their losses averaged over their
    own count."""
    num_batches, accum = len(run.loader), run.args.grad_accum_steps
    run.losses = []
    run.last_log = time.perf_counter()
    run.loader.sampler.set_epoch(run.epoch)
    _reseed(run.args, run.num_updates, run.rank)  # the data workers' seeds are drawn when the iterator starts
    run.model.train()
    for batch_idx, (x, y) in enumerate(run.loader):
        micro, first = batch_idx % accum, batch_idx - batch_idx % accum
        if micro == 0:
            _reseed(run.args, run.num_updates, run.rank)
        size = min(accum, num_batches - first)  # this update's micro-batches
        loss = forward_backward(run, x, y, last=micro == size - 1, accum=size)
        if micro == size - 1:
            optimizer_step(run)
            _log_update(run, loss)
    run.scheduler.step(run.epoch + 1)
    return sum(run.losses) / max(len(run.losses), 1)


def _validate(run: Run) -> Optional[Dict[str, float]]:
    """Validation after this epoch (every ``--val-interval`` epochs and after the last), or None. With
    ``--model-ema`` the ``loss``/``top1``/``top5`` are the EMA's, as in train.py (they choose the best checkpoint),
    and the model's are ``model_loss``/``model_top1``/``model_top5``."""
    epochs_done = run.epoch + 1
    if run.eval_loader is None or (epochs_done % run.args.val_interval and epochs_done != run.num_epochs):
        return None
    metrics = validate(run.model, run.eval_loader, run.device, run.autocast, run.args.num_classes)
    if run.ema is None:
        return metrics
    ema_metrics = validate(run.ema.module, run.eval_loader, run.device, run.autocast, run.args.num_classes,
                           label=' (EMA)')
    return OrderedDict(**ema_metrics, **{f'model_{k}': v for k, v in metrics.items()})


def _summary_keys(run: Run) -> List[str]:
    keys = ['loss', 'top1', 'top5']
    return keys + [f'model_{k}' for k in keys] if run.ema is not None else keys


def _save(run: Run, metrics: Optional[Dict[str, float]]) -> Path:
    """The sharded checkpoint of the epoch just finished, with the EMA's shards and the epoch's validation metric
    (a collective)."""
    args = run.args
    record = dict(model=args.model, model_kwargs=args.model_kwargs, num_classes=args.num_classes,
                  fingerprint=run.fingerprint, num_updates=run.num_updates, world_size=run.world,
                  model_ema=run.ema is not None, eval_metric=args.eval_metric,
                  metric=metrics[args.eval_metric] if metrics else None)
    return ckpt.save_checkpoint(run.output_dir / 'checkpoints', run.epoch + 1, run.model, run.optimizer, record,
                                keep=args.checkpoint_hist,
                                extra={'model_ema': run.ema.module} if run.ema is not None else None)


def _drop_logged_after(log: Path, num_updates: int) -> None:
    """Keep the lines of ``steps.jsonl`` up to update ``num_updates`` (a resume makes the later ones again; a line
    cut by a kill is dropped too)."""
    if not log.is_file():
        return
    kept = []
    for line in log.read_bytes().decode(errors='replace').splitlines():  # a damaged line is dropped as a cut one
        try:
            step = json.loads(line).get('step')
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(step, int) and step <= num_updates:
            kept.append(line + '\n')
    atomic_write_bytes(''.join(kept).encode(), log)


def _open_log(run: Run) -> None:
    """Rank 0: the run's folder, its arguments (``args.yaml``) and its step log."""
    if run.rank != 0:
        return
    run.output_dir.mkdir(parents=True, exist_ok=True)
    # steps.jsonl is a log appended to as the run goes (a resume continues it), not an output written once
    _drop_logged_after(run.output_dir / 'steps.jsonl', run.num_updates)
    run.log = open(run.output_dir / 'steps.jsonl', 'a')
    atomic_write_bytes(yaml.safe_dump(vars(run.args), default_flow_style=False).encode(), run.output_dir / 'args.yaml')
    truncate_summary(run.output_dir / 'summary.csv', run.epoch)  # rows past the resumed checkpoint are redone
    global_batch = run.args.batch_size * run.world * run.args.grad_accum_steps
    _logger.info(f'{run.args.model}: {num_params(run.model) / 1e6:.1f}M parameters sharded over {run.world} '
                 f'process(es), global batch {global_batch}, lr {run.args.lr:.3g}')


def _export(run: Run) -> None:
    """The latest checkpoint as ``model/`` (``model.safetensors`` + ``config.json``), and its EMA as ``model_ema/``
    (rank 0)."""
    for name, ema in (('model', False), ('model_ema', True))[:2 if run.ema is not None else 1]:
        out, _ = ckpt.export_checkpoint(run.output_dir / 'checkpoints', run.output_dir / name, overwrite=True, ema=ema)
        _logger.info(f'exported {out} (model.safetensors + config.json)')


def train(args: argparse.Namespace) -> int:
    """Train as the arguments say; returns the exit status."""
    import torch.distributed as dist

    # FSDP2 warns of every unit returning a view; the MoE layers' outputs are only ever used out of place
    warnings.filterwarnings('ignore', message='FSDP2-wrapped module .* returned a view tensor')
    run = build_run(args)
    start_epoch = run.epoch
    _open_log(run)
    for run.epoch in range(start_epoch, run.num_epochs):
        start = time.time()
        train_loss = train_epoch(run)
        metrics = _validate(run)
        if run.rank == 0:  # before the checkpoint: a resume from the previous one drops the row and writes it again
            write_summary(run.output_dir / 'summary.csv', run.epoch, train_loss, metrics, _summary_keys(run),
                          run.optimizer.param_groups[0]['lr'])
        saved = _save(run, metrics)
        if run.rank == 0:
            _logger.info(f'epoch {run.epoch}: {time.time() - start:.1f} s, saved {saved}')
    if run.rank == 0:
        run.log.close()
        if not args.no_export and run.num_epochs > start_epoch:
            _export(run)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; returns the exit status (2 for bad input, one line)."""
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        return train(parse_args(argv))
    except MoEJetError as e:
        import torch.distributed as dist
        if dist.is_initialized():  # refused after the group was made: leave none behind (a caller may train again)
            dist.destroy_process_group()
        print('error: ' + ' '.join(str(e).split()), file=sys.stderr)  # one line, whatever the message quotes
        return 2


if __name__ == '__main__':
    sys.exit(main())
