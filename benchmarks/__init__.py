"""timm-moejet's benchmarks, run from a checkout as ``python -m benchmarks.<name>``."""
# Every benchmark imports timm_moejet; importing it here, first, runs the seconds of importing torch and timm under
# its Ctrl-C guard (timm_moejet.interrupt: one line, exit status 130) before a benchmark module's own imports.
import timm_moejet  # noqa: F401
