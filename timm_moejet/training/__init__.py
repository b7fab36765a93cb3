"""Training MoE Jetpack models sharded with FSDP2: the trainer, the sharding and the sharded checkpoints."""
from .checkpoint import export_checkpoint, load_checkpoint, save_checkpoint
from .sharding import ShardPlan, init_device_mesh, plan_shards, shard_model
from .trainer import main, parse_args, train
