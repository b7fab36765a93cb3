""" The keys a trainer ``--config`` YAML may hold, checked before anything runs.

A key is one of three kinds:

* an option of the trainer (its parser's ``dest``): supported, nothing to list here (adding an option to
  :mod:`.args` makes its key supported);
* a key of timm's ``train.py`` that does not change the trained weights (logging, evaluation, compilation, devices):
  :data:`IGNORED`, named once and left out;
* a key of ``train.py`` that would change training but that this trainer does not implement: :data:`DEFAULT_ONLY`,
  accepted (and named once) only at the value this trainer's behaviour equals, refused at any other.

Any other key is refused, with the closest known key when there is one (a typo).
"""
import difflib
from typing import Any, Dict, Iterable, List, Tuple

from ..errors import InvalidArgument

__all__ = ['IGNORED', 'DEFAULT_ONLY', 'split_config']

# train.py keys that do not change what is trained: reporting, evaluation, compilation, devices and loaders' plumbing
IGNORED = frozenset({
    'device_modules', 'device', 'local_rank', 'log_wandb', 'wandb_project', 'wandb_tags', 'wandb_resume_id',
    'recovery_interval', 'save_images', 'no_prefetcher', 'use_multi_epochs_loader', 'synchronize_step', 'no_ddp_bb',
    'channels_last', 'torchscript', 'fuser', 'dist_bn', 'worker_seeding', 'dataset_trust_remote_code',
    'tta',  # test-time augmentation of train.py's validation (validation, EMA and compile keys are options)
})

# train.py keys that change training, with the value this trainer does what they say at (train.py's default,
# or what this trainer always does): any other value is refused
DEFAULT_ONLY: Dict[str, Any] = {
    'clip_mode': 'norm', 'initial_checkpoint': '', 'pretrained_path': None, 'model_dtype': None, 'in_chans': None,
    'gp': None, 'class_map': '', 'no_resume_opt': False, 'start_epoch': None, 'jsd_loss': False, 'bce_loss': False,
    'aug_splits': 0, 'aug_repeats': 0, 'split_bn': False, 'sync_bn': False, 'vflip': 0., 'scale': [0.08, 1.0],
    'ratio': [3. / 4., 4. / 3.], 'color_jitter': 0.4, 'mixup_mode': 'batch', 'mixup_off_epoch': 0,
    'cutmix_minmax': None, 'drop_connect': None, 'drop_block': None, 'bn_momentum': None, 'bn_eps': None,
    'fast_norm': False, 'lr_noise': None, 'lr_cycle_mul': 1.0, 'lr_cycle_limit': 1, 'lr_cycle_decay': 0.5,
    'lr_k_decay': 1.0, 'epoch_repeats': 0.,
}


def _unknown(key: str, known: Iterable[str], where: str) -> InvalidArgument:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    hint = f'did you mean {close[0]!r}? ' if close else ''
    return InvalidArgument(f'{where}: unknown key {key!r}; {hint}keys are the trainer\'s option names with _ '
                           f'(see --help). Nothing was run.')


def split_config(config: Dict[str, Any], options: Iterable[str], where: str) -> Tuple[Dict[str, Any], List[str]]:
    """The keys of a ``--config`` mapping that are trainer options, and the train.py keys that are left out.

    Args:
        config: The YAML's top-level mapping.
        options: The trainer's option names (``dest``).
        where: How messages name the file (``--config PATH``).

    Raises:
        InvalidArgument: A key nobody knows (with the closest known name), or a train.py key at a value that would
            change training in a way this trainer does not implement.
    """
    options = set(options)
    used, left_out = {}, []
    for key, value in config.items():
        key = str(key)
        if key in options:
            used[key] = value
        elif key in IGNORED:
            left_out.append(key)
        elif key in DEFAULT_ONLY:
            if value != DEFAULT_ONLY[key]:
                raise InvalidArgument(f'{where}: {key}: {value!r} would change training and this trainer does not '
                                      f'support it (only {DEFAULT_ONLY[key]!r}); remove the key or use timm\'s '
                                      f'train.py. Nothing was run.')
            left_out.append(key)
        else:
            raise _unknown(key, options | IGNORED | set(DEFAULT_ONLY), where)
    return used, left_out
