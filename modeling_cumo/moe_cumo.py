"""CuMo's sparse MoE block: top-k router, fused experts, co-upcycling from a dense MLP, and the bzloss terms."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward, use_experts_implementation


class CuMoTopKRouter(nn.Module):
    """Linear router (no bias) -> softmax in fp32 -> top-k -> the k weights renormalised to sum to 1."""

    def __init__(self, in_features: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, in_features))

    def forward(self, hidden_states: torch.Tensor):
        router_logits = F.linear(hidden_states, self.weight)  # (tokens, experts)
        router_probs = torch.softmax(router_logits.float(), dim=-1)
        top_k_weights, top_k_index = torch.topk(router_probs, self.top_k, dim=-1)
        top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return router_logits, top_k_weights, top_k_index


class CuMoExperts(nn.Module):
    """`num_experts` two-layer MLPs (`down(act(up(x)))`, with biases) stored as fused `[experts, out, in]` tensors.

    The layout is transformers' non-gated experts layout (`up_proj`, `down_proj`, `*_bias`). The eager forward
    groups the tokens by expert and runs one matmul per expert; the contributions are added onto zeros in
    expert-index order, as the original implementation does."""

    def __init__(self, config, num_experts: int, in_features: int, hidden_features: int, out_features: int,
                 hidden_act: str):
        super().__init__()
        self.num_experts = num_experts
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden_features, in_features))
        self.up_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_features))
        self.down_proj = nn.Parameter(torch.empty(num_experts, out_features, hidden_features))
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, out_features))
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        num_tokens, top_k = top_k_index.shape
        out = hidden_states.new_zeros(num_tokens, self.down_proj.shape[1])
        expert_ids = top_k_index.reshape(-1)
        order = torch.argsort(expert_ids, stable=True)
        token_ids = order // top_k
        weights = top_k_weights.reshape(-1)[order]
        counts = torch.bincount(expert_ids, minlength=self.num_experts).tolist()
        # the banks are unbound once: the backward then stacks each bank's gradient once instead of zero-filling
        # a whole bank for every expert
        banks = zip(*(p.unbind(0) for p in (self.up_proj, self.up_proj_bias, self.down_proj, self.down_proj_bias)))
        start = 0
        for count, (up, up_bias, down, down_bias) in zip(counts, banks):
            if count == 0:
                continue
            tokens = token_ids[start : start + count]
            h = F.linear(self.act_fn(F.linear(hidden_states[tokens], up, up_bias)), down, down_bias)
            out.index_add_(0, tokens, (h * weights[start : start + count, None]).to(out.dtype))
            start += count
        return out


def per_device_experts_kernel(hidden_states: torch.Tensor) -> str:
    """The kernel `experts_implementation="auto"` runs: on the CPU the eager grouped loop, which beats `grouped_mm`
    there (benchmarks/moe_block.py measures both), elsewhere transformers' `grouped_mm`, its own default."""
    return "eager" if hidden_states.device.type == "cpu" else "grouped_mm"


class CuMoExpertsKernelDefault:
    """For the models that hold CuMo's MoE blocks: transformers' experts interface is available (transformers decides
    that by reading the model's source otherwise), and unset or "auto" means CuMo's per-device choice
    (`per_device_experts_kernel`); a named kernel is honoured."""

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        if requested_experts in (None, "auto"):
            return "auto"
        return super().get_correct_experts_implementation(requested_experts)


def _per_device_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    if per_device_experts_kernel(hidden_states) == "eager":
        return CuMoExperts.forward(self, hidden_states, top_k_index, top_k_weights)
    return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)


# transformers' experts kernels plus CuMo's default, "auto" (a local mapping: the library-wide registry is untouched).
CUMO_EXPERTS_FUNCTIONS = ExpertsInterface()
CUMO_EXPERTS_FUNCTIONS["auto"] = _per_device_experts_forward


@use_experts_implementation(experts_interface=CUMO_EXPERTS_FUNCTIONS, has_gate=False, has_bias=True)
class CuMoVisionExperts(CuMoExperts):
    """Experts that keep the width (an encoder's MLPs), so transformers' experts kernels (`grouped_mm`, `batched_mm`,
    ...) apply; `config._experts_implementation` picks one ("eager": the forward above; "auto": per device)."""


class CuMoSparseMLP(nn.Module):
    """CuMo's one sparse MoE block (each encoder layer's MLP, and the projector): route each token to its top-k
    experts and mix their outputs. A drop-in for a two-layer MLP `down(act(up(x)))`; the projector changes the width,
    which the experts kernels cannot, so it passes `experts_class=CuMoExperts` (the eager loop)."""

    def __init__(self, config, in_features: int, hidden_features: int, out_features: int, hidden_act: str,
                 num_experts: int, num_experts_per_tok: int, experts_class: type[CuMoExperts] = CuMoVisionExperts):
        super().__init__()
        self.gate = CuMoTopKRouter(in_features, num_experts, num_experts_per_tok)
        self.experts = experts_class(config, num_experts, in_features, hidden_features, out_features, hidden_act)

    def forward(self, hidden_states: torch.Tensor, output_router_logits: bool = False):
        """Returns the mixed outputs, and with `output_router_logits` also the router logits `(tokens, experts)`
        (an encoder's are recorded by its `OutputRecorder` on the router instead)."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        router_logits, top_k_weights, top_k_index = self.gate(flat)
        out = self.experts(flat, top_k_index, top_k_weights).reshape(*hidden_states.shape[:-1], -1)
        return (out, router_logits) if output_router_logits else out

    @torch.no_grad()
    def co_upcycle_(self, up: nn.Linear, down: nn.Linear, router_std: float) -> "CuMoSparseMLP":
        """Co-upcycling, in place: every expert becomes a copy of the dense MLP `down(act(up(x)))`; the router starts
        fresh. Since the k routing weights sum to 1, the block then computes exactly what the dense MLP did."""
        experts = self.experts
        for bank, dense in zip((experts.up_proj, experts.up_proj_bias, experts.down_proj, experts.down_proj_bias),
                               (up.weight, up.bias, down.weight, down.bias)):
            bank.copy_(dense.expand_as(bank))
        self.gate.weight.normal_(0.0, router_std)
        return self


def init_moe_weights(module: nn.Module, std: float) -> None:
    """Initialise CuMo's MoE parameters (called from each `_init_weights` that may own them)."""
    if isinstance(module, CuMoTopKRouter):
        init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, CuMoExperts):
        init.normal_(module.up_proj, mean=0.0, std=std)
        init.normal_(module.down_proj, mean=0.0, std=std)
        init.zeros_(module.up_proj_bias)
        init.zeros_(module.down_proj_bias)


def router_losses(router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample bzloss terms from router logits of shape `(samples, tokens, experts)`.

    balance = E * sum_e P_e * f_e = E^2 * mean_e(P_e * f_e), with P_e the mean router probability of expert e and f_e
    the fraction of tokens whose top-1 expert is e (top-1 even for top-k routing, as in the paper's code);
    z = mean over tokens of logsumexp(logits)^2. Returns two tensors of shape `(samples,)`."""
    logits = router_logits.float()
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    top1 = F.one_hot(logits.argmax(dim=-1), num_experts).to(probs.dtype)
    balance = num_experts * (probs.mean(dim=1) * top1.mean(dim=1)).sum(dim=-1)
    z = torch.logsumexp(logits, dim=-1).square().mean(dim=1)
    return balance, z


def moe_losses(router_logits: tuple[torch.Tensor, ...], samples: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """bzloss terms of one MoE module, as the original accounts them. `router_logits` holds one
    `(sum(samples) * tokens, experts)` tensor per layer, its samples in order and split into groups of `samples`
    (the S2 scales' crops; the images; one sample of all tokens): per sample and layer, then averaged over each
    group's samples, over layers, and over groups."""
    logits = torch.stack(tuple(router_logits))  # (layers, samples * tokens, experts)
    num_layers, _, num_experts = logits.shape
    num_samples = sum(samples)
    balance, z = router_losses(logits.reshape(num_layers * num_samples, -1, num_experts))
    groups = [loss.view(num_layers, num_samples).split(samples, dim=1) for loss in (balance, z)]
    # (groups, layers) means over each group's samples, then the mean over layers, then over groups
    return tuple(torch.stack([part.mean(dim=1) for part in parts]).mean(dim=1).mean() for parts in groups)


def count_inactive_expert_parameters(model: nn.Module) -> int:
    """Parameters of the experts a token does not visit: (E - k) / E of every routed expert bank in `model`."""
    inactive = 0
    for module in model.modules():
        experts, gate = getattr(module, "experts", None), getattr(module, "gate", None)
        num_experts, top_k = getattr(experts, "num_experts", None), getattr(gate, "top_k", None)
        if num_experts and top_k:
            total = sum(p.numel() for p in experts.parameters())
            inactive += total * (num_experts - top_k) // num_experts
    return inactive
