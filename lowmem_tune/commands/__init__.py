"""What each command of `lowmem-tune` does, once `cli` has parsed its arguments: one module per
command, each calling into the package's components (planner, training, evaluation, compress)."""
