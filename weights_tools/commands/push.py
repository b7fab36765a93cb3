""" ``push``: upload a Hub folder or a model to the Hugging Face Hub with timm's own ``push_to_hf_hub``. """
import argparse
import textwrap

from ..common import CommandError, hub_export_config, load_model
from ._args import add_model_args, model_kwargs_from

EXAMPLE = textwrap.dedent('''\
    example:
      huggingface-cli login       # or set HF_TOKEN
      python -m weights_tools push ./moejet_tiny my-org/moejet_vit_tiny.recycled_importance --private''')


def add_parser(subparsers, parent: argparse.ArgumentParser, formatter) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'push', parents=[parent], formatter_class=formatter, epilog=EXAMPLE,
        help='upload a Hub folder or model to the Hugging Face Hub',
        description='Upload a model to the Hugging Face Hub with timm\'s push_to_hf_hub (weights as safetensors '
                    'only, config.json, and a generated model card when the repo has no README.md). The model '
                    'is rebuilt from MODEL first, so what is uploaded is what timm loads.')
    add_model_args(p, what='model to upload')
    p.add_argument('repo_id', metavar='REPO_ID', help='the Hub repository, ORG/NAME')
    p.add_argument('--revision', default=None, help='branch to push to')
    p.add_argument('--private', action='store_true', help='create the repository as private')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    p.add_argument('--commit-message', default='Add model', help='commit message')
    p.add_argument('--token', default=None, help='Hub token (default: the logged-in token or HF_TOKEN)')
    return p


def run(args: argparse.Namespace) -> int:
    from timm.models import push_to_hf_hub

    repo_id = args.repo_id
    parts = repo_id.split('/')
    if len(parts) > 2 or not all(parts) or any(c.isspace() for c in repo_id):
        raise CommandError(f'REPO_ID must look like ORG/NAME (or NAME), got {repo_id!r}.')
    model, extra = load_model(args.model, args.checkpoint, args.pretrained, model_kwargs_from(args))
    model.eval()
    description = f'{type(model).__name__} exported with timm-moejet (`weights_tools push`).'
    if (model.pretrained_cfg or {}).get('recycling') or extra.get('recycling'):
        description += ' Recycled from dense checkpoints; recipe in config.json, pretrained_cfg.recycling.'
    model_card = dict(
        description=description,
        usage='```python\nimport timm, timm_moejet\n'
              f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True)\n```",
        details={'Model Type': 'Image classification / feature backbone', 'Library': 'timm + timm-moejet'},
    )
    with hub_export_config(model, extra) as model_config:
        result = push_to_hf_hub(
            model, repo_id, commit_message=args.commit_message, token=args.token, revision=args.revision,
            private=args.private, create_pr=args.create_pr, model_config=model_config, model_card=model_card,
            safe_serialization=True,
        )
    print(f'pushed {args.model} to {repo_id}: {result}')
    return 0
