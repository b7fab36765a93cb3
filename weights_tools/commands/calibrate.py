""" ``calibrate``: activation statistics of a dense donor over an image folder, for data-driven recycling. """
import argparse
import textwrap
import time

from ._args import COUNT_ARG, NON_NEGATIVE_ARG, SEED_ARG, add_output_args, check_file_output, resolve_device

EXAMPLE = textwrap.dedent('''\
    example:
      python -m benchmarks.digits.data ./digits --image-size 32        # or any folder of class_name/*.png
      weights-tools calibrate --donor vit_small_patch16_224.augreg_in21k --images ./digits \\
          --limit 1000 --batch-size 64 --output vit_small_digits_stats.safetensors''')


def add_parser(subparsers, parent: argparse.ArgumentParser, formatter) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'calibrate', parents=[parent], formatter_class=formatter, epilog=EXAMPLE,
        help='measure a dense donor\'s activation statistics on your images',
        description='Run a dense timm donor over an image folder (timm\'s dataset and the donor\'s eval transform) '
                    'and write its per-block activation statistics (safetensors, with the donor\'s identity) for '
                    'recycle --stats / create_model(..., recycle_stats=FILE).')
    p.add_argument('--donor', required=True,
                   help='the dense donor: a timm name with its tag (from the Hub cache), ORG/REPO or '
                        'hf-hub:ORG/REPO, a Hub folder, or a weights file (then also --donor-arch)')
    p.add_argument('--donor-arch', default=None, help='timm architecture of a weights-file donor')
    p.add_argument('--images', required=True, metavar='FOLDER', help='image folder (class_name/*.png ...)')
    p.add_argument('--split', default='train',
                   help='split subfolder used when the folder has them (train, validation ...)')
    p.add_argument('--limit', type=COUNT_ARG, default=None, help='use at most this many images (class-balanced)')
    p.add_argument('--seed', type=SEED_ARG, default=0, help='seed of the class-balanced random subset')
    p.add_argument('--batch-size', type=COUNT_ARG, default=32, help='images per forward')
    p.add_argument('--workers', type=NON_NEGATIVE_ARG, default=0, help='DataLoader worker processes')
    p.add_argument('--device', default='cpu', help='torch device, e.g. cpu or cuda')
    p.add_argument('--no-coactivation', action='store_true',
                   help='skip the hidden-unit co-activation matrices (needed only by --strategy graph)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    add_output_args(p, 'the statistics file')
    return p


def run(args: argparse.Namespace) -> int:
    from timm_moejet.checkpoint_io.donors import load_donor
    from timm_moejet.image_folder import image_loader
    from timm_moejet.recycling import collect_statistics

    inputs = {'donor': args.donor, 'image folder': args.images}
    check_file_output(args, inputs)
    device = resolve_device(args.device)
    donor = load_donor(args.donor, role='donor')
    model = donor.build_model(args.donor_arch)
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
