""" ``export``: any registered model or checkpoint -> a timm Hub folder (model.safetensors + config.json). """
import argparse

from ..options import MODEL_SOURCE, Command, check_output_free, folder_output, model_kwargs_from

COMMAND = Command(
    'export', 'write a model or checkpoint as a timm Hub folder',
    'Write a registered model (optionally with --checkpoint weights or --pretrained), a Hub folder or an hf-hub: '
    'model as a timm Hub folder: model.safetensors + config.json, loadable with '
    'timm.create_model("local-dir:FOLDER", pretrained=True).', '''\
example:
  weights-tools export moejet_vit_test --num-classes 10 --checkpoint finetuned.safetensors \\
      --output ./moejet_test_digits
  python -c "import timm, timm_moejet; timm.create_model('local-dir:./moejet_test_digits', pretrained=True)"''',
    (MODEL_SOURCE, folder_output('the folder to write')))


def run(args: argparse.Namespace) -> int:
    from timm_moejet.build import load_model
    from timm_moejet.checkpoint_io.hub import save_hub_folder
    from timm_moejet.cost import count_params

    check_output_free(args.output, args.overwrite, 'output folder',
                      {'model': args.model, 'checkpoint': args.checkpoint}, folder=True)
    model, extra = load_model(args.model, args.checkpoint, args.pretrained, model_kwargs_from(args), ema=args.ema)
    out = save_hub_folder(model.eval(), args.output, args.overwrite, extra_config=extra)
    print(f'exported {args.model} ({type(model).__name__}, {count_params(model)["total"] / 1e6:.2f}M parameters) to '
          f'{out}/ (model.safetensors + config.json)')
    return 0
