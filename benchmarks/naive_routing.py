"""The routing MoE-BERT avoids: every expert runs on every token, then a mask keeps the right output.

Kept as a reference: the benchmark times it against the grouped dispatch, and the tests check the grouped
dispatch against it.
"""

from contextlib import contextmanager
from unittest import mock

import torch

import modeling_moebert


class NaiveExpertRouting:
    def __init__(self, expert_ids: torch.Tensor):
        self.expert_ids = expert_ids

    def dispatch(self, hidden_states, experts):
        output = torch.zeros_like(hidden_states)
        for index, expert in enumerate(experts):
            mask = (self.expert_ids == index).unsqueeze(-1).to(hidden_states.dtype)
            output = output + expert(hidden_states) * mask
        return output


def naive_route(router, input_ids, token_type_ids, domain_ids, shape, device):
    """DomainRouter.route without the grouping: every token keeps its place and its expert id."""
    if router.routes_per_token(domain_ids):
        return NaiveExpertRouting(router.token_expert_ids(token_type_ids, domain_ids, shape, device)), None
    domains = torch.tensor(router.sequence_domains(input_ids, domain_ids, shape[0]), device=device)
    expert_ids = domains[:, None].expand(shape) if router.config.num_experts > 1 else torch.zeros(shape, dtype=torch.long)
    return NaiveExpertRouting(expert_ids), None


@contextmanager
def naive_routing():
    """Within this block, MoE-BERT models run every expert on every token."""
    with mock.patch.object(modeling_moebert.DomainRouter, "route", naive_route):
        yield
