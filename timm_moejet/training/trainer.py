""" ``python -m timm_moejet.train``: fine-tune a MoE Jetpack model sharded with FSDP2, from timm's own parts.

timm's ``train.py`` replicates the model with DDP. For models whose weights, gradients and AdamW state do not fit one
device, this trainer shards them with FSDP2 (:func:`timm_moejet.parallel.shard_model`) and checkpoints with
``torch.distributed.checkpoint`` (:mod:`timm_moejet.sharded_checkpoint`). Everything else is timm's:
``create_dataset``, ``create_loader``, ``create_optimizer_v2``, ``create_scheduler_v2``, ``Mixup``, the losses, and
train.py's argument names and defaults (``--config`` YAML too) for the options it supports. Run it under ``torchrun``
(one process per device); without torchrun it trains in one process.

Reproducibility: the random state (dropout, drop path, routing noise, expert dropout, mixup, the data workers' seeds)
is re-seeded from ``--seed``, the rank and the optimizer update count before every update, so a resume continues
exactly where the checkpoint left off. The training order is torch's ``DistributedSampler`` (seed 0 + epoch) on
every world size, so N processes with ``-b B`` see the same global batches as one process with ``-b N*B``.
"""
import argparse
import json
import logging
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import yaml

from ..cost import num_params
from ..errors import InvalidArgument, MoEJetError, OutputExists

__all__ = ['main', 'parse_args', 'train', 'SyntheticImages']

_logger = logging.getLogger('timm_moejet.train')


class SyntheticImages(torch.utils.data.Dataset):
    """``--dataset synthetic``: random RGB images (fixed by their index) with labels ``index % num_classes``, for
    smoke tests and exact-continuation checks without data on disk. ``create_loader`` sets ``transform``."""

    def __init__(self, num_samples: int, size: int, num_classes: int) -> None:
        self.num_samples, self.size, self.num_classes = num_samples, size, num_classes
        self.transform = None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        from PIL import Image
        g = torch.Generator().manual_seed(index)
        pixels = torch.randint(0, 256, (self.size, self.size, 3), generator=g, dtype=torch.uint8)
        img = Image.fromarray(pixels.numpy())
        return (self.transform(img) if self.transform is not None else img), index % self.num_classes


def _parser() -> argparse.ArgumentParser:
    from timm.utils import ParseKwargs

    p = argparse.ArgumentParser(prog='python -m timm_moejet.train', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a('--config', default='', help='YAML file of argument defaults (as timm train.py --config)')
    # data (train.py's names)
    a('--data-dir', default=None, help='dataset root')
    a('--dataset', default='', help='timm dataset ("" image folder, "torch/...", "hfds/...", ...) or "synthetic"')
    a('--train-split', default='train')
    a('--train-num-samples', type=int, default=None, help='samples of an iterable dataset; synthetic: its size')
    a('--img-size', type=int, default=None, help='input image size (default: the model\'s)')
    a('--input-size', type=int, nargs=3, default=None, help='input dimensions (C H W)')
    a('--mean', type=float, nargs='+', default=None)
    a('--std', type=float, nargs='+', default=None)
    a('--interpolation', default='')
    a('--workers', '-j', type=int, default=4)
    a('--pin-mem', action='store_true')
    a('--no-aug', action='store_true', help='no training augmentation (resize and center crop)')
    a('--hflip', type=float, default=0.5)
    a('--aa', default=None, help='auto-augment policy, e.g. rand-m9-mstd0.5-inc1')
    a('--reprob', type=float, default=0.)
    a('--remode', default='pixel')
    a('--mixup', type=float, default=0.)
    a('--cutmix', type=float, default=0.)
    a('--mixup-prob', type=float, default=1.)
    a('--mixup-switch-prob', type=float, default=0.5)
    a('--smoothing', type=float, default=0.1)
    # model
    a('--model', default='moejet_vit_tiny')
    a('--pretrained', action='store_true')
    a('--num-classes', type=int, default=None)
    a('--drop', type=float, default=0.)
    a('--drop-path', type=float, default=None)
    a('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    a('--grad-checkpointing', action='store_true')
    # optimisation
    a('-b', '--batch-size', type=int, default=128, help='batch size per process')
    a('--grad-accum-steps', type=int, default=1)
    a('--opt', default='sgd')
    a('--opt-eps', type=float, default=None)
    a('--opt-betas', type=float, nargs='+', default=None)
    a('--momentum', type=float, default=0.9)
    a('--weight-decay', type=float, default=2e-5)
    a('--layer-decay', type=float, default=None)
    a('--opt-kwargs', nargs='*', default={}, action=ParseKwargs)
    a('--clip-grad', type=float, default=None, help='clip the gradient norm (the norm over every shard)')
    a('--sched', default='cosine')
    a('--sched-on-updates', action='store_true')
    a('--lr', type=float, default=None)
    a('--lr-base', type=float, default=0.1, help='lr = lr_base * global batch / lr_base_size when --lr is not set')
    a('--lr-base-size', type=int, default=256)
    a('--lr-base-scale', default='', help='"linear", "sqrt" (default: sqrt for adam-like optimizers, else linear)')
    a('--warmup-lr', type=float, default=1e-5)
    a('--min-lr', type=float, default=0.)
    a('--epochs', type=int, default=300)
    a('--warmup-epochs', type=int, default=5)
    a('--warmup-prefix', action='store_true')
    a('--cooldown-epochs', type=int, default=0)
    a('--decay-epochs', type=float, default=90)
    a('--decay-rate', type=float, default=0.1)
    a('--seed', type=int, default=42)
    a('--amp', action='store_true', help='bfloat16 mixed precision (FSDP2 MixedPrecisionPolicy + autocast)')
    a('--amp-dtype', default='bfloat16', help='bfloat16 only: float16 would need a sharded gradient scaler')
    # sharding and checkpoints
    a('--no-reshard-after-forward', action='store_true',
      help='keep gathered parameters from the forward to the backward (less traffic, more memory)')
    a('--cpu-offload', action='store_true', help='keep shards, gradients and the optimizer step on the CPU')
    a('--output', default='', help='output folder (default: ./output/train)')
    a('--experiment', default='', help='sub-folder of --output (default: the model name)')
    a('--resume', default='', help='a sharded checkpoint (epoch_N, or the checkpoints folder: its latest)')
    a('--checkpoint-hist', type=int, default=10, help='checkpoints to keep')
    a('--log-interval', type=int, default=50)
    a('--no-export', action='store_true', help='do not write model.safetensors + config.json at the end')
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """train.py's parsing: ``--config`` YAML sets defaults, the command line overrides them."""
    parser = _parser()
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument('--config', default='')
    known, remaining = config.parse_known_args(argv)
    if known.config:
        try:
            with open(known.config) as f:
                parser.set_defaults(**(yaml.safe_load(f) or {}))
        except (OSError, yaml.YAMLError) as e:
            raise InvalidArgument(f'cannot read --config {known.config}: {e}') from e
    return parser.parse_args(remaining)


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


def _fingerprint(args: argparse.Namespace, world_size: int) -> Dict[str, Any]:
    """What a resume must share with the checkpoint: the model and what fixes the sequence of updates."""
    return dict(model=args.model, model_kwargs=args.model_kwargs, num_classes=args.num_classes,
                opt=args.opt, global_batch=args.batch_size * world_size * args.grad_accum_steps,
                dataset=args.dataset, train_split=args.train_split, train_num_samples=args.train_num_samples,
                amp=args.amp, seed=args.seed)


def _reseed(args: argparse.Namespace, num_updates: int, rank: int) -> None:
    from timm.utils import random_seed
    random_seed(args.seed + 1_000_003 * num_updates, rank)


def _check_args(args: argparse.Namespace, world_size: int, output_dir: Path) -> None:
    if args.amp and args.amp_dtype != 'bfloat16':
        raise InvalidArgument(f'--amp-dtype {args.amp_dtype} is not supported with FSDP2 here; use bfloat16.')
    if args.num_classes is None:
        raise InvalidArgument('--num-classes is required.')
    if args.batch_size < 1 or args.grad_accum_steps < 1:
        raise InvalidArgument('--batch-size and --grad-accum-steps must be positive.')
    if args.dataset == 'synthetic' and not args.train_num_samples:
        raise InvalidArgument('--dataset synthetic needs --train-num-samples.')
    if not args.resume and (output_dir / 'checkpoints').exists():
        raise OutputExists(f'{output_dir} holds checkpoints of an earlier run: pass --resume {output_dir}/checkpoints '
                           f'to continue it, or another --experiment.')


def _loader(args: argparse.Namespace, model: nn.Module, device: torch.device):
    from timm.data import create_dataset, create_loader, resolve_data_config

    data_config = resolve_data_config(vars(args), model=model)
    if args.dataset == 'synthetic':
        dataset = SyntheticImages(args.train_num_samples, data_config['input_size'][-1], args.num_classes)
    else:
        dataset = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                                 batch_size=args.batch_size, seed=args.seed, num_samples=args.train_num_samples)
    # distributed=True on one process too: DistributedSampler gives every world size the same global batches
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, hflip=args.hflip, auto_augment=args.aa,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, distributed=True, pin_memory=args.pin_mem, device=device, use_prefetcher=False,
        persistent_workers=False)


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


def train(args: argparse.Namespace) -> int:
    """Train as the arguments say; returns the exit status."""
    import torch.distributed as dist
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    from ..build import create_model
    from . import checkpoint as ckpt
    from .sharding import init_device_mesh, plan_shards, shard_model

    # FSDP2 warns of every unit returning a view; the MoE layers' outputs are only ever used out of place
    warnings.filterwarnings('ignore', message='FSDP2-wrapped module .* returned a view tensor')
    # bad input is refused before the process group, the model or any output exists
    world = int(os.environ.get('WORLD_SIZE', 1))
    output_dir = Path(args.output or 'output/train') / (args.experiment or args.model.replace('/', '_'))
    _check_args(args, world, output_dir)
    fingerprint = _fingerprint(args, world)
    record = None
    if args.resume:
        record = ckpt.read_record(args.resume)
        ckpt.check_fingerprint(record, fingerprint, args.resume)

    device = _setup_distributed()
    rss_start = _peak_rss()  # the memory a process needs beyond torch, timm and the process group
    rank = dist.get_rank()

    from timm.utils import random_seed
    random_seed(args.seed, 0)  # the same initial weights on every rank (each keeps its shard of them)
    model = create_model(args.model, pretrained=args.pretrained and record is None, num_classes=args.num_classes,
                         drop_rate=args.drop, drop_path_rate=args.drop_path, **args.model_kwargs)
    model.to(device)
    plan_shards(model, world)  # a world size that cannot split the experts evenly fails here, before any step
    shard_model(model, init_device_mesh(device.type), mixed_precision=args.amp,
                reshard_after_forward=not args.no_reshard_after_forward, cpu_offload=args.cpu_offload,
                grad_checkpointing=args.grad_checkpointing)

    global_batch = args.batch_size * world * args.grad_accum_steps
    if args.lr is None:
        scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
        ratio = global_batch / args.lr_base_size
        args.lr = args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    loader = _loader(args, model, device)
    updates_per_epoch = len(loader) // args.grad_accum_steps
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                updates_per_epoch=updates_per_epoch)

    start_epoch, num_updates = 0, 0
    if record is not None:
        record = ckpt.load_checkpoint(args.resume, model, optimizer)
        start_epoch, num_updates = record['epoch'], record['num_updates']
    # timm's schedulers are functions of the epoch and the update count: restoring those restores them
    scheduler.step(start_epoch)
    if args.sched_on_updates:
        scheduler.step_update(num_updates)

    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                      num_classes=args.num_classes)
        loss_fn: nn.Module = SoftTargetCrossEntropy()
    else:
        loss_fn = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else nn.CrossEntropyLoss()
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else nullcontext

    log = None
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        log = open(output_dir / 'steps.jsonl', 'a')
        (output_dir / 'args.yaml').write_text(yaml.safe_dump(vars(args), default_flow_style=False))
        _logger.info(f'{args.model}: {num_params(model) / 1e6:.1f}M parameters sharded '
                     f'over {world} process(es), global batch {global_batch}, lr {args.lr:.3g}')
    for epoch in range(start_epoch, num_epochs):
        loader.sampler.set_epoch(epoch)
        _reseed(args, num_updates, rank)  # the data workers' seeds are drawn when the iterator starts
        model.train()
        start = time.time()
        for batch_idx, (x, y) in enumerate(loader):
            micro = batch_idx % args.grad_accum_steps
            if batch_idx // args.grad_accum_steps >= updates_per_epoch:
                break  # an incomplete accumulation at the end of the epoch is dropped
            if micro == 0:
                _reseed(args, num_updates, rank)
            x, y = x.to(device), y.to(device)
            if mixup is not None:
                x, y = mixup(x, y)
            last = micro == args.grad_accum_steps - 1
            model.set_requires_gradient_sync(last)
            with autocast():
                loss = loss_fn(model(x), y)
            (loss / args.grad_accum_steps).backward()
            if not last:
                continue
            if args.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            scheduler.step_update(num_updates)
            loss_sum = torch.tensor([loss.item()], dtype=torch.float64)
            peak = torch.tensor([_peak_rss() - rss_start], dtype=torch.float64)
            dist.all_reduce(loss_sum)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            mean_loss = loss_sum.item() / world
            if rank == 0:  # the loss of the global batch; the largest peak memory growth of any process
                log.write(json.dumps(dict(step=num_updates, epoch=epoch, loss=mean_loss,
                                          lr=optimizer.param_groups[0]['lr'],
                                          peak_rss_growth=int(peak.item()))) + '\n')
                log.flush()
                if num_updates % args.log_interval == 0:
                    _logger.info(f'epoch {epoch} update {num_updates}: loss {mean_loss:.4f}')
        scheduler.step(epoch + 1)
        saved = ckpt.save_checkpoint(output_dir / 'checkpoints', epoch + 1, model, optimizer,
                                     dict(model=args.model, model_kwargs=args.model_kwargs,
                                          num_classes=args.num_classes, fingerprint=fingerprint,
                                          num_updates=num_updates, world_size=world), keep=args.checkpoint_hist)
        if rank == 0:
            _logger.info(f'epoch {epoch}: {time.time() - start:.1f} s, saved {saved}')
    if rank == 0:
        log.close()
        if not args.no_export and num_epochs > start_epoch:
            out, _ = ckpt.export_checkpoint(output_dir / 'checkpoints', output_dir / 'model', overwrite=True)
            _logger.info(f'exported {out} (model.safetensors + config.json)')
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        args = parse_args(argv)
        return train(args)
    except MoEJetError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
