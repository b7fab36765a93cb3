"""Checkpoint I/O: weights read however they are named (``read``: files and folders, ``hub``: the Hugging Face Hub,
``donors``: dense donors, ``official``: official MoE Jetpack checkpoints, ``names``: naming), and every output
written atomically (``atomic``)."""
from .atomic import *
from .names import is_expert_key, is_moe_key, is_moe_state_dict, parse_source
from .read import *
