"""Checkpoint I/O: reading weights however they are named (files, folders, Hub ids, official checkpoints) and
writing every output atomically."""
from .read import *
