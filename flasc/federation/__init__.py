"""The server side of a round: who the clients are, plans and masks, the upload chain, privacy,
the server state and its optimizers, base-weight deltas, and what the server model scores."""
