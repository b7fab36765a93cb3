""" Training memory per rank and bytes moved per step, DDP against FSDP2: modeled from the models' real parameter
counts and activations, and measured on the CPU (gloo).

    python -m benchmarks.fsdp_memory [--ranks 1 2 8 64] [--models ...]   # the state and traffic table
    python -m benchmarks.fsdp_memory --per-gpu moejet_vit_base --gpus 8 -b 128   # one GPU's modeled total
    python -m benchmarks.fsdp_memory --measure   # step time and peak memory per rank, 1 and 2 processes, eager and
                                                 # --torchcompile (the trainer itself under torchrun, gloo)

Every model is built on the meta device (no memory, no weights) and counted; FSDP2's shards are those
``timm_moejet.training.plan_shards`` gives (the largest shard of every parameter). Per rank, AdamW in float32:

* DDP: weights 4P + gradients 4P + AdamW moments 8P, plus DDP's gradient buckets 4P (timm's train.py leaves
  ``gradient_as_bucket_view`` off) = 20P bytes on every rank, whatever the number of ranks.
* FSDP2: 16 bytes per local element (weights, gradients, moments of the shard), plus, while a unit runs, its gathered
  weights and gradients: at most about 3 units' worth (the unit, the next one prefetched, its unsharded gradient),
  which the table gives as 12 bytes per element of the largest unit.

Bytes sent per rank per step (ring collectives, N ranks, f = (N - 1) / N): DDP all-reduces the gradients,
2f x 4P; FSDP2 all-gathers the weights in the forward and again in the backward (reshard_after_forward) and
reduce-scatters the gradients, 3f x 4P (2f x 4P without resharding after the forward).

Per GPU (``--per-gpu``), FSDP2 with AdamW: 16 bytes per local element + 12 bytes per element of the largest unit
(as above) + activations. The activations are counted, not guessed: the model runs a float32 training forward on the
meta device (no memory) and every tensor autograd saves for the backward is summed (parameters excluded: they are
state; views counted once). With ``--grad-checkpointing`` a block keeps only its input (tokens x width x 4 bytes)
and one block's saved tensors exist again while it is recomputed in the backward: activations = (saved outside the
blocks) + blocks x input + the largest block's saved tensors. Under ``--amp`` most activations are bfloat16 (about
half); the figure is the float32 one.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import timm
import torch

import timm_moejet  # noqa: F401  (registers the models)
from timm_moejet.cost import num_params
from timm_moejet.training import plan_shards

MODELS = ('moejet_vit_tiny', 'moejet_vit_small', 'moejet_vit_base', 'moejet_convnext_femto')
RANKS = (1, 2, 8, 64)


def _gb(n: float) -> str:
    return f'{n / 1e9:.2f}' if n < 1e11 else f'{n / 1e9:.0f}'


def rows(models: Sequence[str], ranks: Sequence[int]) -> List[List[str]]:
    out = []
    for name in models:
        with torch.device('meta'):
            model = timm.create_model(name)
        total = num_params(model)
        for n in ranks:
            plan = plan_shards(model, n)
            local = plan.local_numel(model)
            unit = plan.largest_unit_numel(model)
            f = (n - 1) / n
            out.append([name, f'{total / 1e9:.3f}', str(n), _gb(20 * total), _gb(16 * local),
                        _gb(16 * local + 12 * unit), _gb(2 * f * 4 * total), _gb(2 * f * 2 * total),
                        _gb(3 * f * 4 * total), _gb(f * (2 + 2 + 4) * total)])
    return out


HEADER = ['model', 'params (B)', 'ranks', 'DDP state/rank', 'FSDP2 state/rank', 'FSDP2 peak/rank',
          'DDP sent/step', 'DDP bf16 hook sent/step', 'FSDP2 sent/step', 'FSDP2 bf16 sent/step']


def activation_bytes(name: str, batch: int, img_size: int = 224) -> Dict[str, int]:
    """Bytes autograd saves in a float32 training forward of ``batch`` images (meta device): in all, per block
    (the largest) and of the block inputs, and the number of blocks."""
    from timm_moejet.family import family_of_model

    with torch.device('meta'):
        model = timm.create_model(name, img_size=img_size)
    model.train()
    params = {id(p) for p in model.parameters()}
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t
        while base._base is not None:
            base = base._base
        if id(base) not in params:
            saved[id(base)] = base.numel() * base.element_size()
        return t

    per_block, inputs = [], []

    def before(module: torch.nn.Module, args: tuple) -> None:
        per_block.append(-sum(saved.values()))
        inputs.append(args[0].numel() * args[0].element_size())

    def after(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        per_block.append(per_block.pop() + sum(saved.values()))

    blocks = family_of_model(model).block_modules(model)
    hooks = [b.register_forward_pre_hook(before) for b in blocks] + [b.register_forward_hook(after) for b in blocks]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(torch.empty(batch, 3, img_size, img_size, device='meta'))
    for h in hooks:
        h.remove()
    del out
    return dict(total=sum(saved.values()), largest_block=max(per_block), block_inputs=sum(inputs),
                blocks_saved=sum(per_block), blocks=len(blocks))


def per_gpu(name: str, gpus: int, batch: int) -> List[List[str]]:
    """The modeled memory of one GPU of ``gpus`` training ``name`` with FSDP2 and AdamW at ``batch`` images per GPU:
    without and with gradient checkpointing."""
    with torch.device('meta'):
        model = timm.create_model(name)
    plan = plan_shards(model, gpus)
    state, gathered = 16 * plan.local_numel(model), 12 * plan.largest_unit_numel(model)
    acts = activation_bytes(name, batch)
    checkpointed = acts['total'] - acts['blocks_saved'] + acts['block_inputs'] + acts['largest_block']
    out = []
    for label, act in (('eager', acts['total']), ('--grad-checkpointing', checkpointed)):
        out.append([name, str(gpus), str(batch), label, _gb(state), _gb(gathered), _gb(act),
                    _gb(state + gathered + act)])
    return out


PER_GPU_HEADER = ['model', 'GPUs', 'batch/GPU', 'activations', 'state 16 x local', 'gathered 12 x unit',
                  'activations (fp32)', 'total/GPU']
# the measured runs: moejet_vit_test widened to 51M parameters, MoE in every block (tests/test_fsdp.py's memory run)
MEASURE_MODEL = ['--model', 'moejet_vit_test', '--img-size', '32', '--model-kwargs', 'img_size=32', 'patch_size=8',
                 'embed_dim=128', 'moe_blocks=(0,1,2,3)', 'num_core_experts=64', 'num_univ_experts=128',
                 'moe_noise_std=0', 'moe_expert_drop=0', 'moe_drop_path_rate=0']
MEASURE_RECIPE = ['--dataset', 'synthetic', '--num-classes', '10', '--epochs', '1', '--opt', 'adamw',
                  '--opt-kwargs', 'fused=True', '--lr', '1e-3', '--warmup-epochs', '0', '--no-aug', '--workers', '0',
                  '--no-export', '--log-interval', '1000']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def measure_one(nproc: int, compiled: bool, global_batch: int, updates: int, skip: int, out: Path) -> List[str]:
    """One trainer run under torchrun (gloo); its median step time after ``skip`` updates (compilation happens in
    the first) and the largest peak memory growth of a process (``steps.jsonl``)."""
    name = f'p{nproc}_{"compiled" if compiled else "eager"}'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--rdzv-backend', 'c10d',
           '--rdzv-endpoint', f'localhost:{_free_port()}', '-m', 'timm_moejet.train', *MEASURE_MODEL,
           *MEASURE_RECIPE, '-b', str(global_batch // nproc), '--train-num-samples', str(global_batch * updates),
           '--output', str(out), '--experiment', name] + (['--torchcompile'] if compiled else [])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'), PYTHONWARNINGS='ignore',
               MALLOC_MMAP_THRESHOLD_='65536')
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    steps = [json.loads(line) for line in (out / name / 'steps.jsonl').read_text().splitlines()]
    times = [s['step_time'] for s in steps[skip:]]
    return [str(nproc), 'compiled' if compiled else 'eager', f'{1e3 * statistics.median(times):.0f}',
            f'{1e3 * min(times):.0f}-{1e3 * max(times):.0f}', f'{steps[-1]["peak_rss_growth"] / 2 ** 20:.0f}']


MEASURE_HEADER = ['processes', 'mode', 'step ms (median)', 'step ms (range)', 'peak growth MiB/process']


def _print_table(header: List[str], table: List[List[str]]) -> None:
    print('| ' + ' | '.join(header) + ' |')
    print('|' + '|'.join('---' for _ in header) + '|')
    for row in table:
        print('| ' + ' | '.join(row) + ' |')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=list(MODELS))
    parser.add_argument('--ranks', nargs='+', type=int, default=list(RANKS))
    parser.add_argument('--per-gpu', default='', help='model whose per-GPU memory to model (e.g. moejet_vit_base)')
    parser.add_argument('--gpus', type=int, default=8)
    parser.add_argument('-b', '--batch-size', type=int, default=128, help='images per GPU (--per-gpu)')
    parser.add_argument('--measure', action='store_true', help='time the trainer on the CPU (gloo)')
    parser.add_argument('--global-batch', type=int, default=8)
    parser.add_argument('--updates', type=int, default=8)
    parser.add_argument('--skip', type=int, default=3, help='updates left out of the timing (compilation)')
    args = parser.parse_args()
    if args.measure:
        print(f'CPU, gloo, {" ".join(MEASURE_MODEL[1:2] + MEASURE_MODEL[5:])}, global batch {args.global_batch}, '
              f'AdamW (fused); {args.updates} updates, the first {args.skip} not timed')
        with tempfile.TemporaryDirectory() as tmp:
            _print_table(MEASURE_HEADER, [measure_one(n, c, args.global_batch, args.updates, args.skip, Path(tmp))
                                          for n in (1, 2) for c in (False, True)])
    elif args.per_gpu:
        print('GB = 1e9 bytes per GPU; FSDP2, AdamW, float32 state and activations')
        _print_table(PER_GPU_HEADER, per_gpu(args.per_gpu, args.gpus, args.batch_size))
    else:
        print('GB = 1e9 bytes per rank; AdamW, float32 state; sent = bytes each rank sends per optimizer step')
        _print_table(HEADER, rows(args.models, args.ranks))


if __name__ == '__main__':
    from benchmarks.entry import run_main
    run_main(main, 'python -m benchmarks.fsdp_memory')
