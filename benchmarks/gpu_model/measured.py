""" What was measured on a real H200 (issue 28): torch 2.11+cu130, bf16 autocast, batch 256, eager, commit aa7a8a2
(the layer and models of today's main). The model's constants are fitted to these; nothing here is modeled. """
from typing import Dict, Tuple

__all__ = ['MEASURED_S', 'MEASURED_RATIOS', 'MEASURED_TRAIN_STEP', 'MEASURED_RATES']

# seconds per batch of 256 where the measurement gave an absolute figure ((pair, mode) -> (moe, dense))
MEASURED_S: Dict[Tuple[str, str], Tuple[float, float]] = {
    ('tiny', 'eval'): (256 / 10_951, 256 / 33_504),
    ('tiny', 'train'): (67e-3, 32e-3),
    ('layer', 'eval'): (256 / 86_088, 256 / 941_989),
}
# MoE / dense, eager ((pair, mode) -> ratio)
MEASURED_RATIOS: Dict[Tuple[str, str], float] = {
    ('tiny', 'eval'): 3.06, ('tiny', 'train'): 2.07,
    ('layer', 'eval'): 10.9, ('layer', 'train'): 4.9,
    ('small', 'eval'): 2.36, ('small', 'train'): 1.81,
    ('convnext_femto', 'eval'): 2.38, ('convnext_femto', 'train'): 2.26,
}
# one ViT-T train step (torch.profiler; forward, backward and a fused AdamW step): (moe, dense)
MEASURED_TRAIN_STEP = dict(kernels=(2_244, 822), device_ms=(109.7, 56.9))
# the card's sustained rates: bf16 GEMM (8192^3 matmul) and copy bandwidth
MEASURED_RATES = dict(gemm_macs_per_s=394e12, copy_bytes_per_s=4_190e9)
