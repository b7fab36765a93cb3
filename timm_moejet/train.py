""" ``python -m timm_moejet.train``: the FSDP2 trainer (:mod:`timm_moejet.training.trainer`). """
import sys

from .interrupt import run_main, while_importing

with while_importing():  # Ctrl-C: one line and status 130 (timm_moejet.interrupt)
    from .training.trainer import SyntheticImages, main, parse_args, train

__all__ = ['main', 'parse_args', 'train', 'SyntheticImages']

if __name__ == '__main__':
    sys.exit(run_main('python -m timm_moejet.train', main))
