from .entmax import entmax15, entmax15_halved, entmax15_settled, entmax15_threshold, entmax15_threshold_newton
from .experts import BatchedExperts, BatchedLinear, ExpertDropout, batched_linear, cast_experts, experts_to_be_loaded
from .router import SpheroRouter
from .sphero_moe import COMBINE_MODES, RoutingRecord, SpheroMoE, SpheroMoESettings, record_routing
