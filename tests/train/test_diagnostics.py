"""Training diagnostics: order sensitivity is zero for an order-blind model and not for a temporal one."""

import torch

from mugstan_chat.model.dual_encoder import MugStan
from mugstan_train.diagnostics import branch_norms, order_sensitivity
from mugstan_train.params import model_config


def _captions(model, n):
    tokens = model.build_tokenizer()(["a red circle moving left", "a blue square growing", "a green bar"][:n])
    return tokens.input_ids, tokens.attention_mask


def test_order_blind_model_scores_zero_and_stan_does_not():
    torch.manual_seed(0)
    clips = torch.randn(3, 5, 3, 32, 32)
    plain = MugStan(model_config("tiny", no_stan=True)).eval()
    assert order_sensitivity(plain, clips, *_captions(plain, 3)) < 1e-6  # fp32 summation order only
    temporal = MugStan(model_config("tiny", stan_layers=2)).eval()
    with torch.no_grad():
        for module in temporal.stan.cross_frame:  # leave the identity start: a branch that has learnt something
            module.out.weight.normal_(std=0.1)
    assert order_sensitivity(temporal, clips, *_captions(temporal, 3)) > 1e-4
    assert temporal.training is False  # the model's mode is restored


def test_branch_norms_name_every_layer_and_read_gradients():
    model = MugStan(model_config("tiny", stan_layers=2))
    norms = branch_norms(model)
    assert norms["cross_frame0_out"] == 0.0 and norms["cross_frame1_out_grad"] == 0.0  # fresh: zero, no grad yet
    model.stan.temporal_embedding.grad = torch.ones_like(model.stan.temporal_embedding)
    assert branch_norms(model)["temporal_embedding_grad"] > 0
    assert branch_norms(MugStan(model_config("tiny", no_stan=True))) == {}
