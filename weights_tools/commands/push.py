""" ``push``: upload a Hub folder or a model to the Hugging Face Hub with timm's own ``push_to_hf_hub``. """
import argparse
import textwrap

from ._args import add_model_args, model_kwargs_from

EXAMPLE = textwrap.dedent('''\
    example:
      huggingface-cli login       # or set HF_TOKEN
      weights-tools push ./moejet_tiny my-org/moejet_vit_tiny.recycled_importance --private''')


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
    from timm_moejet.build import load_model
    from timm_moejet.checkpoint_io.hub import check_repo_id, push_to_hub

    check_repo_id(args.repo_id)  # before the model is built
    model, extra = load_model(args.model, args.checkpoint, args.pretrained, model_kwargs_from(args), ema=args.ema)
    result = push_to_hub(model.eval(), args.repo_id, extra, commit_message=args.commit_message, token=args.token,
                         revision=args.revision, private=args.private, create_pr=args.create_pr)
    print(f'pushed {args.model} to {args.repo_id}: {result}')
    return 0
