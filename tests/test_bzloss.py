"""bzloss: the balance and router-z terms equal the paper's formulas computed by hand, and reach the routers."""

import math

import pytest
import torch

from conftest import random_pixels, tiny_model
from modeling_cumo.moe_cumo import CuMoTopKRouter, router_losses
from test_modeling import image_prompt


def balance_by_hand(logits_per_sample):
    """E * sum_e P_e * f_e for each sample (list of token lists of logit lists), top-1 densities."""
    values = []
    for tokens in logits_per_sample:
        num_experts = len(tokens[0])
        probs = [[math.exp(x) / sum(math.exp(y) for y in tok) for x in tok] for tok in tokens]
        mean_prob = [sum(p[e] for p in probs) / len(tokens) for e in range(num_experts)]
        top1 = [max(range(num_experts), key=lambda e: tok[e]) for tok in tokens]
        fraction = [top1.count(e) / len(tokens) for e in range(num_experts)]
        values.append(num_experts * sum(p * f for p, f in zip(mean_prob, fraction)))
    return values


def z_by_hand(logits_per_sample):
    return [sum(math.log(sum(math.exp(x) for x in tok)) ** 2 for tok in tokens) / len(tokens) for tokens in logits_per_sample]


def test_router_losses_match_the_formulas_on_a_small_case():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], [[0.0, 0.0, 3.0], [1.0, -2.0, 0.5]]])
    balance, z = router_losses(logits)
    assert balance.tolist() == pytest.approx(balance_by_hand(logits.tolist()), rel=1e-6)
    assert z.tolist() == pytest.approx(z_by_hand(logits.tolist()), rel=1e-6)
    # perfectly balanced routing gives balance 1 (the minimum), as in the paper's normalisation
    uniform = torch.tensor([[[5.0, 0.0], [0.0, 5.0]]])
    assert router_losses(uniform)[0].item() == pytest.approx(1.0, rel=1e-3)


def record_router_logits(model):
    """Hook every router: returns a list that fills with (name, logits) in call order."""
    records = []
    for name, module in model.named_modules():
        if isinstance(module, CuMoTopKRouter) or type(module).__name__ == "MixtralTopKRouter":
            module.register_forward_hook(lambda mod, args, out, name=name: records.append((name, out[0].detach())))
    return records


def test_model_losses_follow_the_original_accounting():
    model = tiny_model(vision_experts=4, projector_experts=4, text="mixtral")
    for module in model.modules():  # decisive routing, so that the losses are far from their minima
        if isinstance(module, CuMoTopKRouter):
            module.weight.data.normal_(0, 2.0)
    records = record_router_logits(model)
    input_ids, attention_mask = image_prompt([1, 2])
    labels = input_ids.masked_fill(input_ids == 384, -100).masked_fill(attention_mask == 0, -100)
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=random_pixels(3), labels=labels)

    num_images, scales, num_layers = 3, model.config.scales, model.config.vision_config.num_hidden_layers
    crops = [s * s * num_images for s in scales]
    vision = [logits for name, logits in records if "vision_tower" in name]
    assert len(vision) == num_layers  # every CLIP layer's router runs in the loss pass, the last one included
    per_scale_balance, per_scale_z = [], []
    for layer_logits in vision:
        samples = layer_logits.reshape(sum(crops), -1, 4).split(crops)  # per crop, CLS token included
        per_scale_balance.append([sum(balance_by_hand(s.tolist())) / len(s) for s in samples])
        per_scale_z.append([sum(z_by_hand(s.tolist())) / len(s) for s in samples])
    vision_balance = sum(sum(layer[i] for layer in per_scale_balance) / num_layers for i in range(len(scales))) / len(scales)
    vision_z = sum(sum(layer[i] for layer in per_scale_z) / num_layers for i in range(len(scales))) / len(scales)
    assert out.vision_balance_loss.item() == pytest.approx(vision_balance, rel=1e-5)
    assert out.vision_router_z_loss.item() == pytest.approx(vision_z, rel=1e-5)

    projector = [logits for name, logits in records if "multi_modal_projector" in name][0].reshape(num_images, -1, 4)
    assert out.projector_balance_loss.item() == pytest.approx(sum(balance_by_hand(projector.tolist())) / num_images, rel=1e-5)
    assert out.projector_router_z_loss.item() == pytest.approx(sum(z_by_hand(projector.tolist())) / num_images, rel=1e-5)

    real = attention_mask.reshape(-1).bool()
    text = [logits[real] for name, logits in records if "language_model" in name]
    assert len(text) == model.config.text_config.num_hidden_layers
    assert not real.all()  # the batch is padded: the LM's balance is global over its real tokens, padding left out
    assert out.text_balance_loss.item() == pytest.approx(
        sum(balance_by_hand([t.tolist()])[0] for t in text) / len(text), rel=1e-5
    )
    assert out.text_router_z_loss.item() == pytest.approx(sum(z_by_hand([t.tolist()])[0] for t in text) / len(text), rel=1e-5)

    balances = out.vision_balance_loss + out.projector_balance_loss + out.text_balance_loss
    zs = out.vision_router_z_loss + out.projector_router_z_loss + out.text_router_z_loss
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    cross_entropy = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert out.loss.item() == pytest.approx((cross_entropy + 0.1 * balances + 0.01 * zs).item(), rel=1e-5)


def test_routers_get_gradient_from_the_aux_losses():
    model = tiny_model(vision_experts=4, projector_experts=4, text="mixtral").train()
    input_ids, attention_mask = image_prompt([1])
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=random_pixels(1))
    assert out.aux_loss is not None and out.loss is out.aux_loss  # training mode without labels: the aux loss
    out.aux_loss.backward()
    routers = {
        name: module.weight.grad for name, module in model.named_modules()
        if isinstance(module, CuMoTopKRouter) or type(module).__name__ == "MixtralTopKRouter"
    }
    assert len(routers) == 3 + 1 + 2
    for name, grad in routers.items():
        assert grad is not None and grad.abs().sum() > 0, name


def test_no_losses_at_inference_and_no_text_losses_for_a_dense_lm():
    model = tiny_model(vision_experts=4, projector_experts=4)
    input_ids, attention_mask = image_prompt([1])
    with torch.no_grad():
        plain = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=random_pixels(1))
        labelled = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=random_pixels(1), labels=input_ids)
    assert plain.loss is None and plain.aux_loss is None and plain.vision_balance_loss is None
    assert labelled.vision_balance_loss is not None and labelled.projector_router_z_loss is not None
    assert labelled.text_balance_loss is None and labelled.text_router_z_loss is None


def test_the_aux_loss_stays_reachable_from_the_hidden_states():
    """DDP looks for unused parameters from a forward's outputs, and TRL's fused LM head adds the aux loss outside the
    model: the last CLIP layer's router, which only the aux loss reaches, must be on the hidden states' graph, with
    no gradient flowing to it from there."""
    model = tiny_model(vision_experts=4).train()
    input_ids, attention_mask = image_prompt([1])
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=random_pixels(1))
    router = model.model.vision_tower.encoder.layers[-1].mlp.gate.weight
    reached, seen, nodes = False, set(), [out.last_hidden_state.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        reached = reached or getattr(node, "variable", None) is router
        nodes.extend(next_node for next_node, _ in node.next_functions)
    assert reached
    (grad,) = torch.autograd.grad(out.last_hidden_state.sum(), router, allow_unused=True)
    assert grad is None or grad.abs().max() == 0
