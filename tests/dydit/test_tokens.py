import pytest
import torch

import kernels
from maskdit_fast.models.routed_tokens import gated_unpack_add, pack


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("keep", [0.0, 0.37, 1.0])
def test_pack_and_gated_unpack_add(backend, keep):
    n, length, dim = 3, 7, 10
    x, h, gate = torch.randn(n, length, dim), torch.randn(n, length, dim), torch.randn(n, dim)
    on = torch.rand(n, length) < keep
    ids = on.reshape(-1).nonzero().squeeze(1)
    with kernels.backend(backend):
        packed = pack(h, ids)
        assert packed.shape == (ids.numel(), dim)
        torch.testing.assert_close(packed, h[on], rtol=0, atol=0)
        y = torch.randn(ids.numel(), dim)
        out = gated_unpack_add(x, gate, y, ids)
    expected = x.clone()
    expected[on] = x[on] + (gate[:, None, :].expand(n, length, dim)[on] * y)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[~on], x[~on])
