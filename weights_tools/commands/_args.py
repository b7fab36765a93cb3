""" Argument groups shared by several commands. """
import argparse


def add_model_args(parser: argparse.ArgumentParser, what: str = 'model') -> None:
    """MODEL positional plus --checkpoint / --pretrained / --num-classes / --model-kwargs."""
    parser.add_argument('model', metavar='MODEL',
                        help=f'the {what}: a timm model name (e.g. moejet_vit_tiny), a Hub folder '
                             f'(config.json + model.safetensors), local-dir:FOLDER or hf-hub:ORG/REPO')
    parser.add_argument('--checkpoint', metavar='FILE', default=None,
                        help='weights for a named model (.safetensors, or .pth/.pt read with weights_only=True)')
    parser.add_argument('--pretrained', action='store_true',
                        help='load the named model\'s pretrained weights (MoE names: recycled from dense donors)')
    parser.add_argument('--num-classes', type=int, default=None, help='classifier size of a named model')
    parser.add_argument('--model-kwargs', nargs='*', default=None, metavar='KEY=VALUE',
                        help='extra create_model kwargs, values parsed as Python literals')


def model_kwargs_from(args: argparse.Namespace) -> dict:
    from ..common import parse_model_kwargs

    kwargs = parse_model_kwargs(args.model_kwargs)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    return kwargs
