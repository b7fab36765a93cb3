"""Where the tests find the project's shared, read-only material.

``shared/`` sits next to the checkout (``../shared``), in development and in CI; ``MOEJET_SHARED`` overrides it.
"""
import os
from pathlib import Path

SHARED = Path(os.environ.get('MOEJET_SHARED', Path(__file__).resolve().parents[2] / 'shared'))
OFFICIAL_FIXTURE = SHARED / 'fixtures' / 'official_moejet_reference.safetensors'
