"""Box: the parameter-space domain every certificate and every projection is about.

What a user relies on: ``Box.around`` always contains the model it was built from, malformed
boxes are refused with a message that names the parameter, ``contains``/``project_``/``distance2``
agree with each other and with Euclidean geometry, casting to a lower precision never shrinks the
box (soundness), and a saved box loads back bit for bit.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lid_engine as le
from lid_engine import Box, DomainMismatchError, InvalidDomainError, LidError, load_parameters_

HYPO = settings(max_examples=200, deadline=None)


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def flat_box(lo: list[float], hi: list[float], dtype=torch.float64) -> Box:
    return Box({"w": torch.tensor(lo, dtype=dtype)}, {"w": torch.tensor(hi, dtype=dtype)})


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def boxes_and_points(draw, n: int = 5):
    """A float64 box over one 1-D parameter plus a point anywhere (inside or outside)."""
    a = draw(st.lists(finite, min_size=n, max_size=n))
    b = draw(st.lists(finite, min_size=n, max_size=n))
    p = draw(st.lists(finite, min_size=n, max_size=n))
    lo = [min(u, v) for u, v in zip(a, b)]
    hi = [max(u, v) for u, v in zip(a, b)]
    return flat_box(lo, hi), torch.tensor(p, dtype=torch.float64)


# ------------------------------------------------------------------------------------ around
def test_around_absolute_radius_gives_every_coordinate_that_width():
    m = small_model()
    box = Box.around(m, 0.25)
    assert box.names == [n for n, _ in m.named_parameters()]
    for n, p in m.named_parameters():
        assert box.lower[n].shape == p.shape
        torch.testing.assert_close(box.radius(n), torch.full_like(p, 0.25))
        torch.testing.assert_close(box.midpoint(n), p.detach())
    assert box.contains(m)
    assert not box.lower["0.weight"].requires_grad  # a box is data, detached from the model


@pytest.mark.parametrize("make", [lambda m: Box.around(m, 0.1, relative=True), lambda m: Box.relative_around(m, 0.1)],
                         ids=["relative=True", "relative_around"])
def test_relative_radius_is_proportional_to_weight_magnitude(make):
    m = small_model()
    with torch.no_grad():
        m[0].weight[0, 0] = 0.0  # a zero weight gets zero width
    box = make(m)
    for n, p in m.named_parameters():
        torch.testing.assert_close(box.radius(n), 0.1 * p.detach().abs())
    assert float(box.width("0.weight")[0, 0]) == 0.0
    assert box.contains(m)


def test_around_names_restricts_width_to_those_parameters():
    m = small_model()
    box = Box.around(m, 0.5, names=["2.weight"])
    assert float(box.width("2.weight").min()) > 0
    for n in ["0.weight", "0.bias", "2.bias"]:
        assert float(box.width(n).abs().max()) == 0.0
    # a single name as a plain string means that name, not its characters
    assert Box.around(m, 0.5, names="2.weight").width_sum() == pytest.approx(box.width_sum())
    with pytest.raises(DomainMismatchError, match="nope"):
        Box.around(m, 0.5, names=["nope"])


@pytest.mark.parametrize("radius", [-1.0, math.nan, math.inf, "0.1"])
def test_around_rejects_bad_radius(radius):
    with pytest.raises(InvalidDomainError, match="radius"):
        Box.around(small_model(), radius)


@given(st.lists(st.floats(min_value=-2.0**100, max_value=2.0**100, allow_nan=False, width=32), min_size=1, max_size=8),
       st.floats(min_value=0, max_value=1e-6, allow_nan=False), st.booleans())
@HYPO
def test_centre_is_always_inside_even_when_centre_plus_radius_rounds_back(values, radius, relative):
    # tiny radii on large weights: centre ± r rounds to the centre (or would round inward)
    m = nn.Sequential(nn.Linear(len(values), 1, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([values]))
    box = Box.around(m, radius, relative=relative)
    assert box.contains(m)
    assert Box.point(m).contains(m)
    assert Box.point(m).width_sum() == 0.0


# ------------------------------------------------------------------------------- construction
def test_explicit_construction_and_derived_quantities():
    box = Box({"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([[2.0]])},
              {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([[2.0]])})
    assert box.numel() == 3
    assert box.width_sum() == pytest.approx(3.0)
    assert box.mean_width() == pytest.approx(1.0)
    torch.testing.assert_close(box.midpoint("a"), torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(box.radius("a"), torch.tensor([0.5, 1.0]))
    assert box.dtype == torch.float32 and box.device.type == "cpu"
    assert "3 coordinates" in repr(box)


def test_log_volume_is_minus_inf_with_a_zero_width_unless_eps():
    box = Box({"a": torch.tensor([0.0, 1.0])}, {"a": torch.tensor([2.0, 1.0])})
    assert box.log_volume() == -math.inf
    assert box.log_volume(eps=1.0) == pytest.approx(math.log(3.0) + math.log(1.0))
    full = Box({"a": torch.tensor([0.0, 0.0])}, {"a": torch.tensor([2.0, 0.5])})
    assert full.log_volume() == pytest.approx(math.log(2.0) + math.log(0.5))


@pytest.mark.parametrize(
    "lower,upper,match",
    [
        ({"a": torch.zeros(2)}, {"a": torch.zeros(2), "b": torch.zeros(1)}, r"only in upper \['b'\]"),
        ({"a": torch.zeros(2), "c": torch.zeros(1)}, {"a": torch.zeros(2)}, r"only in lower \['c'\]"),
        ({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, r"'a'.*shape \(2,\).*\(3,\)"),
        ({"a": torch.tensor([0.0, math.nan])}, {"a": torch.ones(2)}, "'a'.*NaN or infinite"),
        ({"a": torch.zeros(2)}, {"a": torch.tensor([1.0, math.inf])}, "'a'.*NaN or infinite"),
        ({"a": torch.tensor([[0.0, 0.0], [0.0, 5.0]])}, {"a": torch.ones(2, 2)}, r"'a'.*lower > upper at index \(1, 1\)"),
        ({"a": [0.0, 1.0]}, {"a": torch.ones(2)}, r"lower\['a'\] must be a torch.Tensor"),
        ({"a": torch.zeros(2, dtype=torch.long)}, {"a": torch.ones(2, dtype=torch.long)}, "'a'.*floating point"),
        ({"a": torch.zeros(2)}, {"a": torch.ones(2, dtype=torch.float64)}, "'a'.*dtype"),
        ({}, {}, "no parameters"),
        ([torch.zeros(1)], {"a": torch.zeros(1)}, "mapping"),
    ],
    ids=["extra-upper", "extra-lower", "shape", "nan", "inf", "lower>upper", "non-tensor", "int-dtype",
         "mixed-dtype", "empty", "not-a-mapping"],
)
def test_malformed_box_is_refused_naming_the_parameter(lower, upper, match):
    with pytest.raises(InvalidDomainError, match=match):
        Box(lower, upper)


def test_check_matches_names_missing_extra_and_misshaped_parameters():
    m = small_model()
    box = Box.around(m, 0.1)
    box.check_matches(m)  # fits
    lo, hi = dict(box.lower), dict(box.upper)
    missing = Box({k: v for k, v in lo.items() if k != "2.bias"}, {k: v for k, v in hi.items() if k != "2.bias"})
    with pytest.raises(DomainMismatchError, match=r"missing parameters \['2.bias'\]"):
        missing.check_matches(m)
    extra = Box({**lo, "3.weight": torch.zeros(1)}, {**hi, "3.weight": torch.zeros(1)})
    with pytest.raises(DomainMismatchError, match=r"unknown parameters \['3.weight'\]"):
        extra.check_matches(m)
    shaped = Box({**lo, "0.bias": torch.zeros(5)}, {**hi, "0.bias": torch.zeros(5)})
    with pytest.raises(DomainMismatchError, match=r"'0.bias' has shape \(4,\) in the model but \(5,\)"):
        shaped.check_matches(m)
    with pytest.raises(DomainMismatchError, match="'0.bias'"):
        shaped.contains(m)
    with pytest.raises(DomainMismatchError, match="'0.bias'"):
        shaped.project_(m)


# ---------------------------------------------------------------------------------- contains
def test_contains_with_model_or_dict_and_atol():
    m = small_model()
    box = Box.around(m, 0.1)
    assert box.contains(m) and box.contains(params_of(m))
    p = params_of(m)
    p["0.bias"][1] += 0.15
    assert not box.contains(p)
    assert box.contains(p, atol=0.06)
    assert not box.contains(p, atol=0.04)
    load_parameters_(m, p)
    assert not box.contains(m)
    with pytest.raises(DomainMismatchError, match="missing"):
        box.contains({"0.weight": p["0.weight"]})
    with pytest.raises(DomainMismatchError, match=r"'0.bias' has shape \(2,\)"):
        box.contains({**p, "0.bias": torch.zeros(2)})


def test_contains_does_not_round_a_wider_point_into_the_box():
    box32 = Box({"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0])})
    just_outside = {"w": torch.tensor([1.0 + 1e-12], dtype=torch.float64)}  # rounds to 1.0 in float32
    assert not box32.contains(just_outside)
    assert box32.distance2(just_outside) > 0


# --------------------------------------------------------------------------------- distance2
def test_distance2_is_zero_inside_and_squared_gap_outside():
    box = Box({"a": torch.tensor([0.0, 0.0, 0.0]), "b": torch.tensor([1.0])},
              {"a": torch.tensor([1.0, 1.0, 1.0]), "b": torch.tensor([2.0])})
    assert box.distance2({"a": torch.tensor([0.5, 0.0, 1.0]), "b": torch.tensor([1.5])}) == 0.0
    # a: 2 above upper in coordinate 0, 3 below lower in coordinate 2; b: 0.5 below
    d2 = box.distance2({"a": torch.tensor([3.0, 0.5, -3.0]), "b": torch.tensor([0.5])})
    assert d2 == pytest.approx(4.0 + 9.0 + 0.25)


# ---------------------------------------------------------------------------------- project_
def test_project_puts_the_model_back_into_the_box_and_keeps_inside_points():
    m = small_model()
    box = Box.around(m, 0.05)
    inside = params_of(m)
    box.project_(m)
    for n, p in m.named_parameters():  # a point already inside is unchanged, bit for bit
        assert torch.equal(p.detach(), inside[n])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    assert not box.contains(m)
    assert box.project_(m) is m
    assert box.contains(m)
    once = params_of(m)
    box.project_(m)  # idempotent
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), once[n])


def test_project_onto_a_float64_box_lands_inside_a_float32_model():
    # nearest rounding of the bound 1 + 1e-10 to float32 gives 1.0, which is outside the box
    m = nn.Sequential(nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        m[0].weight.fill_(0.0)
    box = Box({"0.weight": torch.full((1, 1), 1 + 1e-10, dtype=torch.float64)},
              {"0.weight": torch.full((1, 1), 2.0, dtype=torch.float64)})
    box.project_(m)
    assert box.contains(m)
    # a box narrower than one float32 ulp holds no float32 value: refused, not silently missed
    sliver = Box({"0.weight": torch.full((1, 1), 1 + 1e-10, dtype=torch.float64)},
                 {"0.weight": torch.full((1, 1), 1 + 2e-10, dtype=torch.float64)})
    with pytest.raises(InvalidDomainError, match="'0.weight'.*no torch.float32 value"):
        sliver.project_(m)


def _as_model(t: torch.Tensor) -> nn.Module:
    m = nn.Module()
    m.w = nn.Parameter(t.clone())
    return m


@given(boxes_and_points(), st.lists(st.floats(0, 1), min_size=5, max_size=5))
@HYPO
def test_project_is_the_euclidean_projection(box_point, u):
    box, p = box_point
    m = _as_model(p)
    box.project_(m)
    proj = m.w.detach()
    assert box.contains(m)
    assert box.distance2({"w": proj}) == 0.0
    # projection distance equals the box's distance function, and no point of the box is closer
    d_proj = float((proj - p).pow(2).sum())
    assert d_proj == pytest.approx(box.distance2({"w": p}), rel=1e-12, abs=1e-300)
    lo, hi = box.lower["w"], box.upper["w"]
    q = torch.minimum(torch.maximum(lo + (hi - lo) * torch.tensor(u, dtype=torch.float64), lo), hi)
    assert box.contains({"w": q})
    assert math.sqrt(d_proj) <= math.sqrt(float((q - p).pow(2).sum())) * (1 + 1e-12) + 1e-300
    # idempotent
    box.project_(m)
    assert torch.equal(m.w.detach(), proj)


# ------------------------------------------------------------------------- set operations
def test_intersection_lies_inside_both_and_empty_raises():
    a = flat_box([0.0, 0.0], [2.0, 2.0])
    b = flat_box([1.0, -1.0], [3.0, 1.0])
    c = a.intersection(b)
    torch.testing.assert_close(c.lower["w"], torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(c.upper["w"], torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert c.is_subset(a) and c.is_subset(b)
    with pytest.raises(InvalidDomainError, match="empty intersection in parameter 'w'"):
        a.intersection(flat_box([5.0, 0.0], [6.0, 1.0]))
    with pytest.raises(DomainMismatchError, match="different parameters"):
        a.intersection(Box({"v": torch.zeros(2)}, {"v": torch.ones(2)}))
    with pytest.raises(DomainMismatchError, match="'w'.*shape"):
        a.intersection(flat_box([0.0], [1.0]))


@given(boxes_and_points(), boxes_and_points())
@HYPO
def test_intersection_property(ab, cd):
    a, b = ab[0], cd[0]
    try:
        c = a.intersection(b)
    except InvalidDomainError:
        assert bool((torch.maximum(a.lower["w"], b.lower["w"]) > torch.minimum(a.upper["w"], b.upper["w"])).any())
        return
    assert c.is_subset(a) and c.is_subset(b)
    for point in (c.lower, c.upper, c.sample(torch.Generator().manual_seed(0))):
        assert a.contains(point) and b.contains(point)


def test_is_subset():
    outer = flat_box([0.0, 0.0], [2.0, 2.0])
    assert flat_box([0.5, 0.0], [1.0, 2.0]).is_subset(outer)
    assert outer.is_subset(outer)
    assert not flat_box([-0.1, 0.0], [1.0, 1.0]).is_subset(outer)
    assert flat_box([-0.1, 0.0], [1.0, 1.0]).is_subset(outer, atol=0.2)
    assert not flat_box([0.0], [1.0]).is_subset(outer)  # different shape
    assert not Box({"v": torch.zeros(2)}, {"v": torch.ones(2)}).is_subset(outer)  # different names
    # a float32 box is compared exactly against a float64 one (no rounding of the outer bound)
    inner32 = Box({"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0])})
    assert not inner32.is_subset(flat_box([1 + 1e-10], [2.0]))


# ---------------------------------------------------------------------------------------- to
@given(st.lists(st.tuples(st.floats(-1e30, 1e30, allow_nan=False), st.floats(-1e30, 1e30, allow_nan=False)),
                min_size=1, max_size=16))
@HYPO
def test_to_float32_rounds_outward(pairs):
    lo = torch.tensor([min(a, b) for a, b in pairs], dtype=torch.float64)
    hi = torch.tensor([max(a, b) for a, b in pairs], dtype=torch.float64)
    b64 = Box({"w": lo}, {"w": hi})
    b32 = b64.to(dtype=torch.float32)
    assert b32.dtype == torch.float32
    assert bool((b32.lower["w"].double() <= lo).all()) and bool((b32.upper["w"].double() >= hi).all())
    assert b64.is_subset(b32)
    # outward by at most one float32 ulp
    assert bool((torch.nextafter(b32.lower["w"], torch.tensor(math.inf)).double() >= lo).all())
    # every point of the float64 box is inside the float32 box
    for point in (b64.lower, b64.upper, b64.sample(torch.Generator().manual_seed(1))):
        assert b32.contains(point)


@pytest.mark.parametrize("bound", [1e39, 3.4028235e38 * (1 + 2**-40)])  # beyond float32; just past its max
def test_to_float32_refuses_bounds_float32_cannot_hold(bound):
    box = Box({"w": torch.tensor([-1.0, 0.0], dtype=torch.float64)}, {"w": torch.tensor([1.0, bound], dtype=torch.float64)})
    with pytest.raises(InvalidDomainError, match=r"Box.to: bounds of 'w' exceed the range of torch.float32"):
        box.to(dtype=torch.float32)


def test_to_device_and_widening_dtype_are_exact_copies():
    m = small_model()
    box = Box.around(m, 0.1)
    same = box.to(device="cpu")
    wide = box.to(dtype=torch.float64)
    assert same.device.type == "cpu" and wide.dtype == torch.float64
    for n in box.names:
        assert torch.equal(same.lower[n], box.lower[n]) and torch.equal(same.upper[n], box.upper[n])
        assert torch.equal(wide.lower[n].float(), box.lower[n]) and torch.equal(wide.upper[n].float(), box.upper[n])
    same.lower["0.bias"].zero_()  # a copy, not a view
    assert not torch.equal(same.lower["0.bias"], box.lower["0.bias"])


# ----------------------------------------------------------------------------- sample/vertex
def test_sample_and_vertex_land_inside():
    m = small_model()
    box = Box.relative_around(m, 0.3)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert box.contains(box.sample(g))
        v = box.vertex(g)
        assert box.contains(v)
        for n in box.names:
            at_bound = (v[n] == box.lower[n]) | (v[n] == box.upper[n])
            assert bool(at_bound.all())
    s1 = box.sample(torch.Generator().manual_seed(7))
    s2 = box.sample(torch.Generator().manual_seed(7))
    assert all(torch.equal(s1[n], s2[n]) for n in box.names)  # reproducible with a generator


# ---------------------------------------------------------------------------------- save/load
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    m = small_model().to(dtype)
    box = Box.relative_around(m, 1 / 3)
    box.save(tmp_path / "d")
    back = Box.load(tmp_path / "d")
    assert back.names == box.names and back.dtype == dtype
    for n in box.names:
        assert torch.equal(back.lower[n], box.lower[n]) and torch.equal(back.upper[n], box.upper[n])
    meta = json.loads((tmp_path / "d" / "domain.json").read_text())
    assert meta["format"] == "lidgate.box/1" and meta["names"] == box.names


def test_load_errors(tmp_path):
    with pytest.raises(InvalidDomainError, match="lacks"):
        Box.load(tmp_path / "nothing-here")
    box = Box.around(small_model(), 0.1)
    d = box.save(tmp_path / "d")
    meta_path = d / "domain.json"
    meta = json.loads(meta_path.read_text())

    meta_path.write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(InvalidDomainError, match="format 'other/9'"):
        Box.load(d)
    meta_path.write_text("{not json")
    with pytest.raises(InvalidDomainError, match="not valid JSON"):
        Box.load(d)
    meta_path.write_text(json.dumps({**meta, "names": meta["names"][:-1]}))
    with pytest.raises(InvalidDomainError, match="not named"):
        Box.load(d)  # an extra tensor in the file
    meta_path.write_text(json.dumps({**meta, "names": meta["names"] + ["9.weight"]}))
    with pytest.raises(InvalidDomainError, match="9.weight"):
        Box.load(d)  # a tensor missing from the file
    meta_path.write_text(json.dumps(meta))
    (d / "domain.safetensors").write_bytes(b"garbage")
    with pytest.raises(InvalidDomainError, match="safetensors"):
        Box.load(d)


def test_load_parameters_copies_values_and_names_what_is_wrong():
    m, other = small_model(0), small_model(1)
    load_parameters_(m, params_of(other))
    for (n, p), (_, q) in zip(m.named_parameters(), other.named_parameters()):
        assert torch.equal(p, q)
    box = Box.around(m, 0.2)
    s = box.sample(torch.Generator().manual_seed(0))
    load_parameters_(m, {n: t.double() for n, t in s.items()})  # cast to the model's dtype
    assert box.contains(m)
    with pytest.raises(DomainMismatchError, match="2.bias"):
        load_parameters_(m, {n: t for n, t in s.items() if n != "2.bias"})
    with pytest.raises(DomainMismatchError, match=r"'0.bias' has shape \(4,\) in the model but \(3,\)"):
        load_parameters_(m, {**s, "0.bias": torch.zeros(3)})


def test_errors_are_lid_errors():
    assert issubclass(InvalidDomainError, LidError) and issubclass(DomainMismatchError, LidError)
    assert le.Box is Box
