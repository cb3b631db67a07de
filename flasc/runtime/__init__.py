"""What a run needs from its process: ranks (torchrun), seeded random streams, interrupts,
checkpoints and the run folder."""
