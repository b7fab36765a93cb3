""" ``select``: Weight Selection: a smaller dense timm model initialised from a larger donor of its family. """
import argparse

from timm_moejet.recycling import BLOCK_MAPS

from ..options import MODEL_SETTINGS, SEED, Command, check_file_output, file_output, model_kwargs_from, option

COMMAND = Command(
    'select', 'initialise a smaller dense model from a larger one (Weight Selection)',
    'Weight Selection (Xu et al., ICLR 2024), the "Dense (21k)" baseline of MoE Jetpack\'s tables: every tensor of '
    'the smaller model keeps evenly spaced elements of the donor\'s along each dimension that shrinks; a stage with '
    'fewer blocks takes evenly spaced (or the first) donor blocks. Writes a safetensors file that timm loads with '
    'pretrained_cfg_overlay=dict(file=...).', '''\
example:
  weights-tools select --model convnext_femto --donor convnext_tiny.fb_in22k \\
      --output convnext_femto_ws.safetensors
  python -c "import timm; timm.create_model('convnext_femto', pretrained=True, \\
      pretrained_cfg_overlay=dict(file='convnext_femto_ws.safetensors'))"''', (
        option('--model', required=True, help='the smaller dense architecture (a timm name)'),
        option('--donor', required=True, help='the larger donor of the same family: a timm name with its tag, '
                                              'ORG/REPO or hf-hub:ORG/REPO, a Hub folder or a weights file'),
        option('--block-map', default='even', choices=BLOCK_MAPS,
               help='which donor blocks a stage with fewer blocks takes'),
        SEED(help='seed of what the donor cannot give (a head for another number of classes)'),
        MODEL_SETTINGS, file_output('the weights file to write'),
    ))


def run(args: argparse.Namespace) -> int:
    from timm_moejet.build import build_selected_model
    from timm_moejet.checkpoint_io import save_safetensors_atomic
    from timm_moejet.cost import count_params

    check_file_output(args, {'donor': args.donor})
    model = build_selected_model(args.model, args.donor, args.block_map, init_seed=args.seed,
                                 **model_kwargs_from(args))
    save_safetensors_atomic(model.state_dict(), args.output, overwrite=args.overwrite)
    print(f'selected {args.model} ({count_params(model)["total"] / 1e6:.2f}M parameters) from {args.donor} (blocks: '
          f'{args.block_map}) to {args.output}')
    return 0
