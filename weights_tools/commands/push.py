""" ``push``: upload a Hub folder or a model to the Hugging Face Hub, as ``export`` writes it. """
import argparse

from ..options import MODEL_SOURCE, Command, model_kwargs_from, option

COMMAND = Command(
    'push', 'upload a Hub folder or model to the Hugging Face Hub',
    'Upload a model to the Hugging Face Hub as export writes it (weights as safetensors only, config.json), with a '
    'generated model card when the repo has no README.md. The model is rebuilt from MODEL first, so what is '
    'uploaded is what timm loads.', '''\
example:
  huggingface-cli login       # or set HF_TOKEN
  weights-tools push ./moejet_tiny my-org/moejet_vit_tiny.recycled_importance --private''', (
        MODEL_SOURCE,
        option('repo_id', metavar='REPO_ID', help='the Hub repository, ORG/NAME'),
        option('--revision', default=None, help='branch to push to'),
        option('--private', action='store_true', help='create the repository as private'),
        option('--create-pr', action='store_true', help='open a pull request instead of committing'),
        option('--commit-message', default='Add model', help='commit message'),
        option('--token', default=None, help='Hub token (default: the logged-in token or HF_TOKEN)'),
    ))


def run(args: argparse.Namespace) -> int:
    from timm_moejet.build import load_model
    from timm_moejet.checkpoint_io.hub import check_repo_id, push_to_hub

    check_repo_id(args.repo_id)  # before the model is built
    model, extra = load_model(args.model, args.checkpoint, args.pretrained, model_kwargs_from(args), ema=args.ema)
    result = push_to_hub(model.eval(), args.repo_id, extra, commit_message=args.commit_message, token=args.token,
                         revision=args.revision, private=args.private, create_pr=args.create_pr)
    print(f'pushed {args.model} to {args.repo_id}: {result}')
    return 0
