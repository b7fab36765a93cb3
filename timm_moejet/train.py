""" ``python -m timm_moejet.train``: the FSDP2 trainer (:mod:`timm_moejet.training.trainer`). """
import sys

from .training.trainer import SyntheticImages, main, parse_args, train

__all__ = ['main', 'parse_args', 'train', 'SyntheticImages']

if __name__ == '__main__':
    sys.exit(main())
