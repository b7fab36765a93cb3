"""One module per weights_tools command, each with ``add_parser(subparsers, parent, formatter)`` and ``run(args)``."""
