""" ``export``: any registered model or checkpoint -> a timm Hub folder (model.safetensors + config.json). """
import argparse
import textwrap

from timm_moejet.cost import count_params

from ._args import add_model_args, add_output_args, check_output_free, model_kwargs_from

EXAMPLE = textwrap.dedent('''\
    example:
      weights-tools export moejet_vit_test --num-classes 10 --checkpoint finetuned.safetensors \\
          --output ./moejet_test_digits
      python -c "import timm, timm_moejet; timm.create_model('local-dir:./moejet_test_digits', pretrained=True)"''')


def add_parser(subparsers, parent: argparse.ArgumentParser, formatter) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'export', parents=[parent], formatter_class=formatter, epilog=EXAMPLE,
        help='write a model or checkpoint as a timm Hub folder',
        description='Write a registered model (optionally with --checkpoint weights or --pretrained), a Hub folder '
                    'or an hf-hub: model as a timm Hub folder: model.safetensors + config.json, loadable with '
                    'timm.create_model("local-dir:FOLDER", pretrained=True).')
    add_model_args(p)
    add_output_args(p, 'the folder to write', folder=True)
    return p


def run(args: argparse.Namespace) -> int:
    from timm_moejet.build import load_model
    from timm_moejet.checkpoint_io.hub import save_hub_folder

    check_output_free(args.output, args.overwrite, 'output folder',
                      {'model': args.model, 'checkpoint': args.checkpoint})
    model, extra = load_model(args.model, args.checkpoint, args.pretrained, model_kwargs_from(args), ema=args.ema)
    out = save_hub_folder(model.eval(), args.output, args.overwrite, extra_config=extra)
    n = count_params(model)['total']
    print(f'exported {args.model} ({type(model).__name__}, {n / 1e6:.2f}M parameters) to {out}/ '
          f'(model.safetensors + config.json)')
    return 0
