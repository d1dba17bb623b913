"""``li_out``: the planners write the next ``li`` into a caller's buffer (the DiT state's static
buffer), in place over the current ``li`` too, with the same values as a new tensor."""
import pytest
import torch

import sdtm_kernels as sk

GRID = (8, 8)
N = 64


def metric_and_li(seed=0):
    gen = torch.Generator().manual_seed(seed)
    metric = torch.randn(2, N, 16, generator=gen)
    li = torch.randint(0, 4, (2, N), generator=gen, dtype=torch.int32)
    return metric, li


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("planner", ["ssm", "idm"])
def test_in_place_li_equals_a_new_one(backend, planner):
    metric, li = metric_and_li()
    build = sk.plan_ssm if planner == "ssm" else sk.plan_idm
    want = build(metric, GRID, 40, li=li, backend=backend)
    buffer = li.clone()
    got = build(metric, GRID, 40, li=buffer, li_out=buffer, backend=backend)  # read and written in place
    assert got.li_next.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer, want.li_next)
    assert torch.equal(got.row_of_token, want.row_of_token)


@pytest.mark.parametrize("bad, error", [
    (torch.zeros(2, N, dtype=torch.int64), TypeError),
    (torch.zeros(2, N + 1, dtype=torch.int32), ValueError),
    (torch.zeros(N, 2, dtype=torch.int32).t(), ValueError),  # not contiguous
    ("li", TypeError),
])
def test_bad_li_out(bad, error):
    metric, li = metric_and_li()
    with pytest.raises(error, match="li_out"):
        sk.plan_ssm(metric, GRID, 40, li=li, li_out=bad, backend="reference")
