""" ``python -m timm_moejet.sharded_checkpoint CHECKPOINT OUTPUT``: export a sharded training checkpoint as a Hub
folder (:mod:`timm_moejet.training.checkpoint`). """
import sys

from .interrupt import run_main, while_importing

with while_importing():  # Ctrl-C: one line and status 130 (timm_moejet.interrupt)
    from .training.checkpoint import (
        RECORD,
        build_model_from_record,
        check_fingerprint,
        export_checkpoint,
        load_checkpoint,
        main,
        read_record,
        resolve_checkpoint,
        save_checkpoint,
    )

__all__ = ['RECORD', 'save_checkpoint', 'load_checkpoint', 'read_record', 'resolve_checkpoint', 'check_fingerprint',
           'build_model_from_record', 'export_checkpoint', 'main']

if __name__ == '__main__':
    sys.exit(run_main('python -m timm_moejet.sharded_checkpoint', main))
