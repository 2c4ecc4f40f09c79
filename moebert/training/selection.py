"""Which model training keeps: the evaluation that scored best on valid (and when patience runs out), and, with
the shared weights frozen, each domain's best expert. Both travel with checkpoints (Accelerate's
`register_for_checkpointing`)."""

import math

from moebert.training.state import CheckpointError


class BestModel:
    """Which evaluation scored best on the pooled valid metric, and how many evaluations passed since."""

    def __init__(self, metric: str, patience: int | None):
        self.metric, self.patience = metric, patience
        self.value, self.step, self.stale = -math.inf, None, 0

    def update(self, results: dict, step: int) -> bool:
        pooled, name = self.metric.startswith("pooled_"), self.metric.removeprefix("pooled_")
        value = results.get("all" if pooled else "mean", {}).get(name)
        if value is not None and value > self.value:
            self.value, self.step, self.stale = value, step, 0
            return True
        self.stale += 1
        return False

    def should_stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def state_dict(self) -> dict:
        return {"metric": self.metric, "value": self.value, "step": self.step, "stale": self.stale}

    def load_state_dict(self, state: dict):
        check_same_metric(state["metric"], self.metric)
        self.value, self.step, self.stale = state["value"], state["step"], state["stale"]


class BestExperts:
    """Per-domain selection: each domain's expert as it was at the evaluation that scored best on that domain's own
    valid metric, the untrained start included. When training changes the experts alone, a domain's valid score
    depends on its own expert only, so the model assembled from these snapshots scores each domain's best."""

    def __init__(self, metric: str):
        self.metric = metric.removeprefix("pooled_")  # a pooled metric has no per-domain value: its per-domain form
        self.best = {}  # domain -> {"value", "step"}
        self.experts = {}  # domain -> that expert's tensors (dense BERT names), on the CPU

    def update(self, model, results: dict, step: int) -> list[str]:
        """Snapshot the experts of the domains that just scored their best; returns those domains."""
        improved = []
        for index, domain in enumerate(model.config.domains):
            value = results.get(domain, {}).get(self.metric)
            if value is not None and value > self.best.get(domain, {}).get("value", -math.inf):
                self.best[domain] = {"value": value, "step": step}
                expert = model.expert_state(model.config.expert_of_domain(index))
                self.experts[domain] = {k: v.detach().to("cpu", copy=True) for k, v in expert.items()}
                improved.append(domain)
        return improved

    def assemble(self, model):
        """Load every domain's best expert into `model`."""
        for domain, expert in self.experts.items():
            model.load_expert_state(model.config.expert_of_domain(model.config.domain_index(domain)), expert)

    def state_dict(self) -> dict:
        return {"metric": self.metric, "best": self.best, "experts": self.experts}

    def load_state_dict(self, state: dict):
        check_same_metric(state["metric"], self.metric)
        self.best, self.experts = state["best"], state["experts"]


def check_same_metric(checkpoint: str, run: str):
    """A resumed run goes on comparing scores of the metric it started with, or stops: scores of two metrics do not
    compare."""
    if checkpoint != run:
        raise CheckpointError(f"the checkpoint kept its best model by valid {checkpoint}, this run by {run}: resume "
                              f"with --metric_for_best_model {checkpoint}, or start a new run")
