"""One module per ``armor`` subcommand, each with ``add_arguments(parser)`` and ``run(args) -> int``."""
