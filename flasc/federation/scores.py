"""What the server's model scores, evaluated as the clients receive it: validation and test, each
tier's model, and (eval_personalized) each client's own model on its held-out examples.

The resident model is loaded with the server vector (masked with the last download mask when
eval_masked) and scored by tasks/evaluation.py; the run loop calls an Evaluation when a round is
due for one, and the shadow strategies score their counterfactual servers through the same door.
"""

from __future__ import annotations

import torch

from flasc.tasks.evaluation import Subset, evaluate


class ServerScores:
    """The metrics of server vectors on the splits of the task, on the resident model."""

    def __init__(self, resident, task, world, eval_batch: int, eval_masked: bool):
        self.resident, self.task, self.world = resident, task, world
        self.eval_batch, self.eval_masked = eval_batch, eval_masked

    def eval_model(self, server_state, params: torch.Tensor | None = None) -> torch.Tensor:
        """The server vector (or `params` in its place) as evaluated: masked with the last download
        mask when eval_masked (what clients actually receive), else dense."""
        mask = server_state.eval_mask if self.eval_masked else None
        params = server_state.params.detach() if params is None else params.detach()
        return params.clone() if mask is None else params * mask

    def load(self, server_state) -> None:
        """The evaluated server model into the resident model (also what the run saves)."""
        self.resident.flat.write(self.eval_model(server_state))

    def on(self, split) -> dict:
        """The objective's metrics of the resident model as it is on a split (sharded over ranks)."""
        r = self.resident
        return evaluate(r.model, split, self.task.objective, self.eval_batch, r.device, r.bf16, self.world)

    def primary(self, server_state, params: torch.Tensor, split) -> float:
        """The primary metric of a server vector on a split, masked as the run's evaluation is."""
        self.resident.flat.write(self.eval_model(server_state, params))
        return self.on(split)[self.task.objective.primary]

    def tiers(self, server_state) -> dict:
        """With tiers: each tier's model (the server as that tier downloads it) on the test split."""
        out = {}
        for i, mask in enumerate(server_state.tier_masks):
            self.resident.flat.write(server_state.masked(mask))
            out.update({f"tier{i}_test_{k}": v for k, v in self.on(self.task.test).items()})
        return out


class PersonalScores:
    """eval_personalized: each client's own model (its download plus its state:
    algorithms' personal_model) and the global model, both on the client's held-out examples; mean
    and spread over the clients that hold any (the primary metric; a client never sampled keeps
    its initial state)."""

    def __init__(
        self, scores: ServerScores, local_tests: list[torch.Tensor], client_tier: list[int], algorithm, client_states
    ):
        """client_states(ids) -> {client: its stored state or None}, on every rank."""
        self.scores, self.local_tests, self.client_tier = scores, local_tests, client_tier
        self.algorithm, self.client_states = algorithm, client_states

    def download_of(self, server_state, client: int) -> torch.Tensor:
        """The global model as this client downloads it (its tier's mask, or the evaluation mask)."""
        if server_state.tier_masks:
            return server_state.masked(server_state.tier_masks[self.client_tier[client]])
        return self.scores.eval_model(server_state)

    def __call__(self, server_state) -> dict:
        scores, flat = self.scores, self.scores.resident.flat
        p = scores.task.objective.primary
        own, glob = [], []
        ids = [c for c, idx in enumerate(self.local_tests) if len(idx)]
        if not ids:
            return {}
        global_model = scores.eval_model(server_state)
        for chunk in range(0, len(ids), 32):  # states come from rank 0 a few at a time
            part = ids[chunk : chunk + 32]
            states = self.client_states(part)
            for c in part:
                split = Subset(scores.task.train, self.local_tests[c])
                personal = self.algorithm.personal_model(c, states.get(c), self.download_of(server_state, c))
                flat.write(personal)
                own.append(scores.on(split)[p])
                if torch.equal(personal, global_model):
                    glob.append(own[-1])
                else:
                    flat.write(global_model)
                    glob.append(scores.on(split)[p])
        own_t, glob_t = torch.tensor(own, dtype=torch.float64), torch.tensor(glob, dtype=torch.float64)
        return {
            f"personal_{p}_mean": float(own_t.mean()),
            f"personal_{p}_std": float(own_t.std(unbiased=False)),
            f"personal_global_{p}_mean": float(glob_t.mean()),
            f"personal_global_{p}_std": float(glob_t.std(unbiased=False)),
            "personal_clients": len(own),
        }


class Evaluation:
    """A round's evaluation: each tier's model, the personalised metrics, then the server model on
    validation and test (left loaded in the resident model)."""

    def __init__(self, scores: ServerScores, personal: PersonalScores | None = None, llm=None):
        """llm: the run's scoring tasks (tasks/llm_eval.RunScores), or None."""
        self.scores, self.personal, self.llm = scores, personal, llm

    def __call__(self, server_state, splits=("val", "test"), rnd: int | None = None) -> dict:
        out = self.scores.tiers(server_state)
        if self.personal is not None:
            out.update(self.personal(server_state))
        self.scores.load(server_state)
        for split in splits:
            out.update({f"{split}_{k}": v for k, v in self.scores.on(getattr(self.scores.task, split)).items()})
        if self.llm is not None and rnd is not None and self.llm.due(rnd):
            out.update(self.llm(self.scores.resident))
        return out
