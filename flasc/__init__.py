"""flasc: federated fine-tuning of LoRA adapters with sparse communication, simulated in one process.

The library behind train_lora.py, cut along the data's way through a round:

    federation/   what the server plans, sends, receives and keeps (masks, tiers, uploads, privacy,
                  server state and optimizers)
    client/       local training (one loop for one client or a group trained together), client
                  optimizers and statistics, the client-state store
    algorithms/   one file per federated-LoRA algorithm
    diagnostics/  counterfactual (shadow) aggregation, client drift, convergence
    models/       base models, LoRA through peft, the flat trainable vector
    tasks/        objectives (loss, hits, metrics) and evaluation
    runtime/      ranks, seeding, interrupts, checkpoints, the run folder
    studies/      a study's runs, local / SLURM / Ray launchers, study tables

The aggregation strategies (merging.py), the config (config.py) and the data sets (data/) sit at
the top level of the repository, beside the entry scripts.
"""

import logging

__version__ = "0.22.0"

# bitsandbytes' CPU backend, on a CPU with AVX512-BF16, fetches a kernel from the Hugging Face hub
# when it is imported and warns on stderr when it cannot (offline); it then runs its own kernels.
# The warning would be a second line before any one-line error of flasc's.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
