from .entmax import entmax15, entmax15_threshold
from .experts import BatchedExperts, BatchedLinear
from .sphero_moe import COMBINE_MODES, SpheroMoE
