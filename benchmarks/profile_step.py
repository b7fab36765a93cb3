""" Profile one train step of a model: the top kernels by device time and the number of launches.

    python -m benchmarks.profile_step --model moejet_vit_tiny --device cuda --batch-size 256 [--compile]

On CUDA it counts CUDA kernels (bf16 autocast, AdamW fused); on the CPU the same code counts CPU ops, so the logic
can be checked without a GPU.
"""
import argparse

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import timm_moejet  # noqa: F401  (registers the models)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--model', default='moejet_vit_tiny')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--compile', action='store_true')
    parser.add_argument('--top', type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = timm.create_model(args.model).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == 'cuda')
    step_model = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch_size, *model.pretrained_cfg['input_size'], device=device)
    target = torch.arange(args.batch_size, device=device) % model.num_classes

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(step_model(x).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == 'cuda':
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    cuda = device.type == 'cuda'
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind]
    launches = sum(e.count for e in events)
    total_ms = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in events) / 1e3
    label = 'CUDA kernels' if cuda else 'CPU ops'
    print(f'{args.model} train step, batch {args.batch_size}{" compiled" if args.compile else ""}: '
          f'{launches} {label}, {total_ms:.1f} ms {"device" if cuda else "CPU"} time')
    sort_by = 'self_cuda_time_total' if cuda else 'self_cpu_time_total'
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.top, max_name_column_width=60))


if __name__ == '__main__':
    from benchmarks.entry import run_main
    run_main(main, 'python -m benchmarks.profile_step')
