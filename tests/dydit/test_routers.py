import torch

from maskdit_fast.models.routers import TokenRouter, WidthRouter, decide, gumbel_sigmoid


def test_gumbel_sigmoid_is_hard_forward_soft_backward():
    logits = torch.randn(64, 5, requires_grad=True)
    torch.manual_seed(1)
    hard = gumbel_sigmoid(logits, temperature=5.0)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    hard.sum().backward()
    torch.manual_seed(1)
    soft_logits = logits.detach().clone().requires_grad_(True)
    gumbel_sigmoid(soft_logits, temperature=5.0, hard=False).sum().backward()
    torch.testing.assert_close(logits.grad, soft_logits.grad)
    assert logits.grad.abs().min() > 0


def test_gumbel_sigmoid_fires_with_probability_sigmoid_of_logit():
    logits = torch.tensor([-2.0, 0.0, 1.5]).expand(20000, 3)
    rate = gumbel_sigmoid(logits, temperature=5.0).mean(0)
    torch.testing.assert_close(rate, torch.sigmoid(logits[0]), atol=0.015, rtol=0)


def test_decide_thresholds_at_inference_and_samples_in_training():
    logits = torch.tensor([[-0.1, 0.2, 30.0, -30.0]])
    assert decide(logits, training=False, temperature=5.0).tolist() == [[0.0, 1.0, 1.0, 0.0]]
    # The clamped uniform bounds the logistic noise by ~13.8: a +-30 logit is always decided by its sign.
    assert decide(logits.expand(1000, 4), training=True, temperature=5.0)[:, 2:].tolist() == [[1.0, 0.0]] * 1000


def test_routers_start_all_on_whatever_the_input():
    width = WidthRouter(16, 4, bias=15.0)
    assert torch.equal(width(torch.randn(3, 16) * 100), torch.full((3, 4), 15.0))
    token = TokenRouter(32, ratio=16, bias=35.0)
    assert token.hidden == 2
    assert torch.equal(token(torch.randn(2, 7, 32) * 100), torch.full((2, 7), 35.0))
    assert TokenRouter(8, ratio=16).hidden == 1
