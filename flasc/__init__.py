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

__version__ = "0.22.0"
