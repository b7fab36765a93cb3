""" ``calibrate``: activation statistics of a dense donor over an image folder, for data-driven recycling. """
import argparse
import time

from ..options import (
    BATCH_SIZE,
    DEVICE,
    LIMIT,
    SEED,
    WORKERS,
    Command,
    check_file_output,
    file_output,
    option,
    resolve_device,
)

COMMAND = Command(
    'calibrate', 'measure a dense donor\'s activation statistics on your images',
    'Run a dense timm donor over an image folder (timm\'s dataset and the donor\'s eval transform) and write its '
    'per-block activation statistics (safetensors, with the donor\'s identity) for recycle --stats / '
    'create_model(..., recycle_stats=FILE).', '''\
example:
  python -m benchmarks.digits.data ./digits --image-size 32        # or any folder of class_name/*.png
  weights-tools calibrate --donor vit_small_patch16_224.augreg_in21k --images ./digits \\
      --limit 1000 --batch-size 64 --output vit_small_digits_stats.safetensors''', (
        option('--donor', required=True, help='the dense donor: a timm name with its tag (from the Hub cache), '
                                              'ORG/REPO or hf-hub:ORG/REPO, a Hub folder, or a weights file (then '
                                              'also --donor-arch)'),
        option('--donor-arch', default=None, help='timm architecture of a weights-file donor'),
        option('--images', required=True, metavar='FOLDER', help='image folder (class_name/*.png ...)'),
        option('--split', default='train', help='split subfolder used when the folder has them (train, validation '
                                                '...)'),
        LIMIT, SEED, BATCH_SIZE, WORKERS, DEVICE,
        option('--no-coactivation', action='store_true',
               help='skip the hidden-unit co-activation matrices (needed only by --strategy graph)'),
        option('--no-progress', action='store_true', help='no progress bar'),
        file_output('the statistics file'),
    ))


def run(args: argparse.Namespace) -> int:
    from timm_moejet.checkpoint_io.donors import load_donor
    from timm_moejet.image_folder import image_loader
    from timm_moejet.recycling import collect_statistics

    inputs = {'donor': args.donor, 'image folder': args.images}
    check_file_output(args, inputs)
    device = resolve_device(args.device)
    model = load_donor(args.donor, role='donor').build_model(args.donor_arch)
    loader, summary = image_loader(args.images, model, args.limit, args.batch_size, args.seed, args.workers,
                                   split=args.split)
    start = time.perf_counter()
    stats = collect_statistics(model, loader, device=device, progress=not args.no_progress, donor_id=args.donor,
                               coactivation=not args.no_coactivation)
    seconds = time.perf_counter() - start
    check_file_output(args, inputs)  # again: the output may have appeared during the pass
    stats.save(args.output)
    print(f'calibrated {stats.describe()} on {summary["images"]} of {summary["available"]} images '
          f'({summary["classes"]} classes, seed {args.seed}) from {args.images}: {len(loader)} batches of '
          f'<= {args.batch_size}, {stats.num_tokens} tokens per statistic, blocks {list(stats.blocks)}, '
          f'{seconds:.1f}s on {device}')
    print(f'statistics written to {args.output}')
    return 0
