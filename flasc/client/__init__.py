"""The client side of a round: client work, the one local-training loop, clients trained together,
client optimizers, the statistics strategies need, and the store of client states."""
