"""What a task predicts and how it is scored: objectives and the evaluation loop."""
