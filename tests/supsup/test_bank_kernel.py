"""The packed-bit products of supsup.bank against a float64 reference over unpacked masks.

Tolerance. Both kernels compute float32-accurate products, not exact ones: the integer kernel
rounds each operand value to a fixed-point step of at most 2**-24 of the operand's largest value
(exact int32 sums after that), the float32 kernel rounds its partial sums. Each result i must lie
within TOL * (sum_j |x_j| M_ij + max_j |x_j|) of the float64 reference: float32's unit roundoff
(6e-8) with a margin of 16 for the rounding of the final float32 result and of partial sums. A
row's error grows with its own mass, so rows of very different densities are all held to it.
"""

from __future__ import annotations

import math

import pytest
import torch

import supsup.packed
from supsup.bank import MaskBank
from supsup.masks import pack_bits, packed_size, unpack_bits
from supsup.packed import KernelPlan, kernel_plan, rows_dot, weighted_rows

TOL = 2.0**-20  # ~1e-6

# Block sizes small enough that every size below spans several row and column blocks; the
# integer plan takes every row count and batch, so it is exercised at k = 1 and B = 20 too.
TINY_INTEGER = KernelPlan(True, 512, 512, 16, 0, 64)
TINY_FLOAT = KernelPlan(False, 512, 512, 16, 0, 0)
CPU_PLANS = {"integer": TINY_INTEGER, "float": TINY_FLOAT, "default": None}

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


def _plan(name: str, device: str) -> KernelPlan:
    """The named plan; on CUDA (no integer kernel at these shapes) "float" is the tiny float plan,
    so the block loop runs on the device too, and "integer" is skipped rather than run twice."""
    if device != "cpu" and name == "integer":
        pytest.skip("CUDA products use float planes: the integer plan is CPU-only")
    plan = CPU_PLANS[name]
    return kernel_plan(torch.device(device)) if plan is None else plan


def _packed(k: int, n: int, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(k, ceil(n/8)) packed random masks of densities 0.05..0.95 and their float64 (k, n)."""
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(k, 1, generator=g) * 0.9 + 0.05
    masks = (torch.rand(k, n, generator=g) < density).double()
    return pack_bits(masks, group_dims=1).to(device), masks


def _bound(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, k) allowed |error|: TOL * (sum_j |x_bj| M_ij + max_j |x_bj|)."""
    return TOL * (x.abs() @ masks.T + x.abs().amax(1, keepdim=True))


def _assert_within(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    err = (got.double().cpu() - exact).abs()
    ratio = torch.where(err == 0, 0.0, err / bound)  # an exact zero needs no room
    worst = float(ratio.max()) if err.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.3g}x the tolerance (max |error| {float(err.max()):.3g})"


# Sizes: 1 and 7 weights (a part byte), multiples of 8 and not, and a layer wider than one block.
SIZES = [(1, 1), (3, 7), (5, 8), (17, 65), (48, 1000), (130, 4099)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", sorted(CPU_PLANS))
@pytest.mark.parametrize(("k", "n"), SIZES)
def test_rows_dot_equals_float64_reference(k: int, n: int, plan: str, device: str) -> None:
    packed, masks = _packed(k, n, seed=k * n)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, n, generator=g) * 10.0 ** torch.empty(1, n).uniform_(-3, 3, generator=g)
    got = rows_dot(packed.to(device), None, x.to(device), _plan(plan, device))
    assert got.shape == (1, k) and got.dtype == torch.float32
    _assert_within(got, x.double() @ masks.T, _bound(x.double(), masks))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", sorted(CPU_PLANS))
def test_rows_dot_of_a_subset_in_any_order_with_repeats(plan: str, device: str) -> None:
    packed, masks = _packed(70, 2051, seed=3)
    x = torch.randn(1, 2051, generator=torch.Generator().manual_seed(4))
    rows = torch.tensor([69, 0, 33, 33, 5, 68, 1] * 9)  # 63 rows: enough for the integer path
    got = rows_dot(packed.to(device), rows.to(device), x.to(device), _plan(plan, device))
    _assert_within(got, x.double() @ masks[rows].T, _bound(x.double(), masks[rows]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", sorted(CPU_PLANS))
@pytest.mark.parametrize("batch", [6, 20])  # the default plan's limit for digits is 16
def test_rows_dot_batched_equals_reference(batch: int, plan: str, device: str) -> None:
    packed, masks = _packed(60, 1003, seed=5)
    x = torch.randn(batch, 1003, generator=torch.Generator().manual_seed(6))
    x[2] *= 1e-5  # examples of very different scales: each has its own fixed-point step
    x[4] = 0.0
    got = rows_dot(packed.to(device), None, x.to(device), _plan(plan, device))
    assert got.shape == (batch, 60)
    _assert_within(got, x.double() @ masks.T, _bound(x.double(), masks))
    assert torch.equal(got[4].cpu(), torch.zeros(60))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", sorted(CPU_PLANS))
@pytest.mark.parametrize(("k", "n"), SIZES)
def test_weighted_rows_equals_float64_reference(k: int, n: int, plan: str, device: str) -> None:
    packed, masks = _packed(k, n, seed=k + n)
    w = torch.randn(k, generator=torch.Generator().manual_seed(2))
    got = weighted_rows(packed.to(device), None, w.to(device), n, _plan(plan, device))
    assert got.shape == (n,) and got.dtype == torch.float64
    exact = w.double() @ masks
    bound = TOL * (w.double().abs() @ masks + w.abs().max())
    _assert_within(got.unsqueeze(0), exact.unsqueeze(0), bound.unsqueeze(0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", sorted(CPU_PLANS))
def test_weighted_rows_with_equal_weights_counts_exactly(plan: str, device: str) -> None:
    packed, masks = _packed(90, 777, seed=8)
    rows = torch.tensor(list(range(89, -1, -3)) * 2)  # 60 rows, in reverse, each twice
    got = weighted_rows(packed.to(device), rows.to(device), torch.ones(60, device=device), 777,
                        _plan(plan, device))
    assert torch.equal(got.cpu(), masks[rows].sum(0))  # integer counts, however the blocks fall


def test_digits_reconstruct_every_integer_exactly() -> None:
    q = torch.cat([torch.tensor([0, 1, -1, 127, 128, -128, -129, 2**23, -(2**23), 2**30,
                                 -(2**30), 2**30 - 1, 255 * 65793]),
                   torch.randint(-(2**30), 2**30 + 1, (10_000,))]).double()
    digits = supsup.packed._digits(q)
    assert digits.dtype == torch.int8 and digits.shape == (4, q.numel())
    weights = torch.tensor([[256**d] for d in range(4)], dtype=torch.int64)
    assert torch.equal((digits.long() * weights).sum(0), q.long())


def test_products_keep_no_state_in_the_bank() -> None:
    """Blocks are transient: after every product the bank holds exactly the tensors it held."""
    shapes = {"a": (37, 41), "b": (9,)}
    bank = MaskBank(shapes)
    g = torch.Generator().manual_seed(0)
    bank.extend_packed(list(range(64)), {
        k: torch.randint(0, 256, (64, packed_size(math.prod(s))), dtype=torch.uint8, generator=g)
        for k, s in shapes.items()})

    def held() -> list[tuple[str, int, int]]:
        return sorted((name, t.data_ptr(), t.numel() * t.element_size())
                      for name, store in vars(bank).items() if isinstance(store, dict)
                      for t in store.values() if isinstance(t, torch.Tensor))

    before, nbytes = held(), bank.nbytes()
    rows = bank.rows(None)
    for key, s in shapes.items():
        bank.alpha_gradient(key, rows, torch.randn(s))
        bank.alpha_gradient(key, rows[:50].flip(0), torch.randn(s))
        bank.alpha_gradient_batched(key, rows, torch.randn(3, math.prod(s)))
        bank.mixture(key, rows, torch.rand(64))
        bank.mixture(key, rows[:49], torch.full((49,), 0.5))
    assert held() == before and bank.nbytes() == nbytes


def test_counts_are_exact_after_chunked_adds() -> None:
    shapes = {"w": (13, 29)}
    bank = MaskBank(shapes)
    bank.reserve(200)
    masks = (torch.rand(200, 13 * 29, generator=torch.Generator().manual_seed(3)) < 0.3).float()
    ptr = bank._store["w"].data_ptr()
    for start in (0, 1, 50, 120):  # chunks of 1, 49, 70 and 80 tasks: float and integer paths
        stop = {0: 1, 1: 50, 50: 120, 120: 200}[start]
        bank.extend_packed(list(range(start, stop)), {"w": pack_bits(masks[start:stop], 1)})
    assert bank._store["w"].data_ptr() == ptr  # reserved: no growth copy
    counts = bank.mixture("w", bank.rows(None), torch.ones(200))
    assert torch.equal(counts.reshape(-1), masks.sum(0))
    assert bank.nbytes() == 200 * packed_size(13 * 29) + 13 * 29 * 4  # live rows only


def test_cpu_plan_is_integer_where_int_mm_works_and_can_be_forced_to_float(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = torch.device("cpu")
    plan = kernel_plan(cpu)
    assert plan.integer == supsup.packed._integer_kernel_works(cpu)
    assert plan.block_bytes >= plan.float_block_bytes > 0 and plan.integer_min_rows > 0
    monkeypatch.setenv("SUPSUP_BANK_KERNEL", "float")
    kernel_plan.cache_clear()
    try:
        assert not kernel_plan(cpu).integer
    finally:
        monkeypatch.delenv("SUPSUP_BANK_KERNEL")
        kernel_plan.cache_clear()
    assert kernel_plan(cpu) == plan


def test_planes_follow_pack_bits_order() -> None:
    """Plane i of byte b is the bit of weight 8b + i (pack_bits is MSB first), worth the plane's
    value when set: a check of the layout every kernel relies on."""
    masks = (torch.rand(5, 21, generator=torch.Generator().manual_seed(9)) < 0.5).double()
    packed = pack_bits(masks, group_dims=1)
    plan = KernelPlan(True, 1 << 20, 1 << 20, 16, 0, 1)
    ((r0, r1, c0, c1, planes),) = list(supsup.packed._plane_blocks(packed, None, plan))
    assert (r0, r1, c0, c1) == (0, 5, 0, 3)
    values = torch.tensor(supsup.packed._PLANE_VALUE, dtype=torch.float64).reshape(1, 8, 1)
    bits = (planes.double().reshape(5, 8, 3) / values).transpose(1, 2).reshape(5, 24)
    assert torch.equal(bits[:, :21], masks) and not bits[:, 21:].any()
    assert torch.equal(unpack_bits(packed, 21, torch.float64), masks)


@cuda
def test_cuda_bank_matches_cpu_bank() -> None:
    """One bank on both devices: the CUDA (float32) and CPU (integer) kernels agree."""
    shapes = {"a": (300, 784), "b": (10, 100)}
    g = torch.Generator().manual_seed(0)
    packed = {k: torch.randint(0, 256, (256, packed_size(math.prod(s))), dtype=torch.uint8,
                               generator=g) for k, s in shapes.items()}
    cpu = MaskBank(shapes)
    cpu.extend_packed(list(range(256)), packed)
    gpu = MaskBank(shapes, device="cuda")
    gpu.extend_packed(list(range(256)), packed)
    for key, s in shapes.items():
        grad = torch.randn(s, generator=g)
        masks = unpack_bits(packed[key], math.prod(s), torch.float64)
        exact = masks @ grad.double().reshape(-1)
        bound = TOL * (masks @ grad.double().abs().reshape(-1) + grad.abs().max())
        for bank in (cpu, gpu):
            got = bank.alpha_gradient(key, bank.rows(None), grad.to(bank.device))
            _assert_within(got.unsqueeze(0), exact.unsqueeze(0), bound.unsqueeze(0))
        assert torch.equal(gpu._counts[key].cpu(), cpu._counts[key])


@pytest.mark.parametrize("plan", sorted(CPU_PLANS))
def test_nan_and_inf_operands_propagate_like_the_float_reference(plan: str) -> None:
    """Fixed point has no digits for inf/nan: the products fall back to floats, where they
    spread as in the float32 reference (0 * nan is nan), never to silent finite numbers."""
    packed, masks = _packed(60, 300, seed=11)
    nan, inf = float("nan"), float("inf")
    for bad in ({(0, 17): nan}, {(1, 5): inf}, {(0, 17): nan, (1, 5): -inf}):
        x = torch.randn(2, 300, generator=torch.Generator().manual_seed(12))
        for (b, j), value in bad.items():
            x[b, j] = value
        got = rows_dot(packed, None, x, _plan(plan, "cpu"))
        reference = x @ masks.float().T
        assert torch.equal(got.isnan(), reference.isnan())
        assert torch.equal(got.isinf(), reference.isinf())
        assert got.isfinite().any() == reference.isfinite().any()
    w = torch.rand(60)
    w[3] = float("nan")
    mixed = weighted_rows(packed, None, w, 300, _plan(plan, "cpu"))
    assert torch.equal(mixed.isnan(), (w @ masks.float()).isnan())


def test_weighted_rows_stays_exact_past_the_int32_bound_of_one_block() -> None:
    """Row blocks stop at `_MAX_ROWS`: one taller block of (digit x plane) products would wrap
    int32. Weights whose top digit is 64 in every row and a full byte (the -128 plane) make each
    term 2**13, so 300,000 rows in one block would sum past 2**31."""
    k = supsup.packed._MAX_ROWS + 5
    plan = KernelPlan(True, 1 << 30, 1 << 18, 8192, 0, 16)  # blocks as tall as the rows allow
    packed = torch.full((k, 1), 255, dtype=torch.uint8)
    w = torch.ones(k, dtype=torch.float64)
    w[0] = 0.999  # not all equal: the digit path, not the exact count of ones
    got = weighted_rows(packed, None, w, 8, plan)
    assert torch.allclose(got, torch.full((8,), float(w.sum()), dtype=torch.float64),
                          rtol=1e-9), got


def test_moving_a_bank_leaves_the_original_where_it_was() -> None:
    """`MaskBank.to` returns a new bank: a shared bank (a test fixture, a cached load) is never
    moved under another user. `meta` stands in for an accelerator on a CPU-only machine."""
    shapes = {"fc": (4, 9)}
    bank = MaskBank(shapes)
    bank.add(3, {"fc": torch.ones(4, 9)})
    moved = bank.to("meta")
    assert moved is not bank and moved.device.type == "meta" and moved.task_ids == [3]
    assert bank.device.type == "cpu" and bank.packed("fc").device.type == "cpu"
    assert torch.equal(bank.mask(3, "fc"), torch.ones(4, 9))
    assert bank.to("cpu") is bank
