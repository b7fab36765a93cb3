"""Checkpoint I/O: weights read however they are named (``read``: files and folders on timm's loaders, the Hub too;
``hub``: Hub folders and configs; ``donors``: dense donors; ``official``: official MoE Jetpack checkpoints;
``names``: naming), and every output written atomically (``atomic``)."""
from .atomic import *
from .names import parse_source
from .read import *
