"""FTM / FAM: shapes, no parameters or gradient on the teacher side, shift invariance, the fast SCA order, and
that each switch changes what it names."""
import pytest
import torch
import torch.nn.functional as F

from uhkd.errors import UserError
from uhkd.frequency import (BANDS, FAM, FTM, SRA, band_fits, dft_tokens, level_grid, mirror_bins, spectral_tokens,
                            token_norm)
from uhkd.methods import build_method
from uhkd.config import build_config
from uhkd.models import create_stage_model

torch.manual_seed(0)
X = torch.randn(2, 5, 12, 10)


@pytest.mark.parametrize("spectrum,width", [("amplitude", 5), ("log_amplitude", 5), ("complex", 10), ("none", 5)])
@pytest.mark.parametrize("band", BANDS)
def test_ftm_shape_no_parameters_no_gradient(spectrum, width, band):
    ftm = FTM(k=3, spectrum=spectrum, band=band)
    x = X.clone().requires_grad_(True)
    out = ftm(x)
    assert out.shape == (2, 9, width) and out.dtype == torch.float32
    assert list(ftm.parameters()) == [] and not out.requires_grad
    # SRT: every token is normalised over its channels
    assert torch.allclose(out.mean(-1), torch.zeros(2, 9), atol=1e-5)


def test_low_band_is_the_centred_lowest_frequencies():
    """k = 3, low band: bins -1, 0, 1 of each axis = the 3×3 centre of the fftshifted orthonormal spectrum."""
    spec = torch.fft.fftshift(torch.fft.fft2(X, norm="ortho"), dim=(-2, -1)).abs()
    expected = spec[..., 6 - 1:6 + 2, 5 - 1:5 + 2].flatten(2).transpose(1, 2)
    assert torch.allclose(FTM(3)(X), F.layer_norm(expected, (5,)), atol=1e-5)


@pytest.mark.parametrize("h,w,k", [(12, 10, 3), (7, 7, 7), (9, 8, 4), (1, 1, 1)])
@pytest.mark.parametrize("band", ["low", "high"])
def test_dft_tokens_equal_fft2_then_crop(h, w, k, band):
    x = torch.randn(2, 3, h, w)
    spec = torch.fft.fft2(x, norm="ortho")
    centre = (0, 0) if band == "low" else (h // 2, w // 2)
    rows = [(centre[0] + i - k // 2) % h for i in range(k)]
    cols = [(centre[1] + j - k // 2) % w for j in range(k)]
    expected = torch.view_as_real(spec[:, :, rows][:, :, :, cols].flatten(2)).permute(0, 2, 3, 1)
    assert torch.allclose(dft_tokens(x, k, band), expected, atol=1e-5)


@pytest.mark.parametrize("h,w,k", [(12, 10, 3), (7, 7, 7), (8, 8, 4), (9, 5, 5)])
@pytest.mark.parametrize("band", ["low", "high"])
def test_conjugate_bins_share_their_amplitude(h, w, k, band):
    """`mirror_bins`: computing one token per conjugate pair and expanding gives every token of the block."""
    x = torch.randn(2, 3, h, w)
    full = spectral_tokens(x, k, "amplitude", band)
    pairs = mirror_bins(h, w, k, band)
    if (h, w, k, band) == (7, 7, 7, "low"):
        assert len(pairs[0]) == 25  # 49 bins: DC and 24 conjugate pairs
    if pairs is not None:
        reps, expand = pairs
        assert torch.allclose(spectral_tokens(x, k, "amplitude", band, tokens=reps)[:, list(expand)], full, atol=1e-5)


@pytest.mark.parametrize("spectrum", ["amplitude", "log_amplitude"])
@pytest.mark.parametrize("band", BANDS)
def test_amplitude_is_invariant_to_circular_shift(spectrum, band):
    ftm = FTM(k=5, spectrum=spectrum, band=band)
    shifted = torch.roll(X, shifts=(3, -4), dims=(2, 3))
    assert torch.allclose(ftm(X), ftm(shifted), atol=1e-4)


def test_complex_and_spatial_forms_see_the_shift():
    shifted = torch.roll(X, shifts=(3, -4), dims=(2, 3))
    for spectrum in ("complex", "none"):
        ftm = FTM(k=5, spectrum=spectrum)
        assert not torch.allclose(ftm(X), ftm(shifted), atol=1e-2)


def test_ftm_is_float32_under_autocast():
    x = X.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FTM(k=3)(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, FTM(k=3)(x.float()), atol=1e-6)


@pytest.mark.parametrize("spectrum", ["amplitude", "log_amplitude", "complex", "none"])
@pytest.mark.parametrize("band", BANDS)
def test_fast_sca_equals_projecting_the_full_map_first(spectrum, band):
    """SCA projects the cropped complex block; the result equals projecting the whole map, then the DFT."""
    fam = FAM(5, 4, k=3, spectrum=spectrum, band=band, sra=False)
    fast = spectral_tokens(X, 3, spectrum, band, project=fam.project)
    slow = spectral_tokens(fam.proj(X), 3, spectrum, band)
    assert torch.allclose(fast, slow, atol=1e-5)


@pytest.mark.parametrize("spectrum", ["amplitude", "complex"])
@pytest.mark.parametrize("band", ["low", "high"])
def test_fam_equals_its_definition_on_every_token(spectrum, band):
    """FAM = token_norm(token mixing(channel Linear(SRR(projection)))), whether or not it shares conjugate bins."""
    torch.manual_seed(0)  # the two orders differ by rounding that token_norm scales up, by how much the init decides
    fam = FAM(5, 4, k=3, spectrum=spectrum, band=band)
    z = spectral_tokens(X, 3, spectrum, band, project=fam.project)
    assert torch.allclose(fam(X), token_norm(fam.sra.mix(fam.sra.channel(z))), atol=1e-5)


def test_fam_and_its_input_get_gradients():
    fam = FAM(5, 4, k=3)
    x = X.clone().requires_grad_(True)
    target = FTM(k=3)(torch.randn(2, 4, 7, 7))
    F.mse_loss(fam(x), target).backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fam.parameters())


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_fam_switches_change_only_what_they_name():
    base = FAM(5, 4, k=3)
    assert base.bn is None and isinstance(base.sra, SRA)
    no_sra = FAM(5, 4, k=3, sra=False)
    assert no_sra.sra is None and _count(base) - _count(no_sra) == _count(base.sra)
    conv_bn = FAM(5, 4, k=3, sca="conv_bn")
    assert isinstance(conv_bn.bn, torch.nn.BatchNorm2d) and _count(conv_bn) - _count(base) == _count(conv_bn.bn)
    # without SRA the output is the normalised SCA result: the teacher's FTM applied to the projected map
    assert torch.allclose(no_sra(X), FTM(k=3)(no_sra.proj(X)), atol=1e-4)
    # conv_bn: the BN (in eval mode with fresh statistics, identity) is the only difference from the linear order
    no_sra_bn = FAM(5, 4, k=3, sca="conv_bn", sra=False).eval()
    no_sra_bn.proj.load_state_dict(no_sra.proj.state_dict())
    assert torch.allclose(no_sra_bn(X), no_sra(X), atol=1e-4)
    assert FAM(5, 4, k=3, spectrum="complex").sra.channel.in_features == 8


def test_bands_differ():
    outs = [FTM(k=3, band=band)(X) for band in BANDS]
    assert all(not torch.allclose(a, b, atol=1e-3) for i, a in enumerate(outs) for b in outs[i + 1:])


@pytest.mark.parametrize("kwargs,match", [
    (dict(spectrum="phase"), "method.uhkd.spectrum 'phase'; valid choices: amplitude, complex, log_amplitude, none"),
    (dict(band="mid"), "method.uhkd.band 'mid'; valid choices: full, high, low"),
    (dict(k=0), "method.uhkd.k must be >= 1"),
])
def test_bad_switches(kwargs, match):
    with pytest.raises(UserError, match=match):
        FTM(**kwargs)


def test_bad_sca():
    with pytest.raises(UserError, match=r"method.uhkd.sca 'conv' \(did you mean conv_bn\?\); valid choices: "
                                         r"conv_bn, linear"):
        FAM(5, 4, sca="conv")


def _band_limited(side: int, channels: int = 6, max_cycles: int = 6, seed: int = 0) -> torch.Tensor:
    """One random image of frequencies up to `max_cycles` cycles per image per axis, sampled on a side×side grid
    (the same continuous picture at every size)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.arange(-max_cycles, max_cycles + 1, dtype=torch.float64)
    amp = torch.randn(channels, len(f), len(f), generator=g, dtype=torch.float64)
    phase = torch.rand(channels, len(f), len(f), generator=g, dtype=torch.float64) * 2 * torch.pi
    t = torch.arange(side, dtype=torch.float64) / side
    arg = 2 * torch.pi * (f[:, None, None, None] * t[None, None, :, None] + f[None, :, None, None] * t[None, None, None, :])
    x = (amp[..., None, None] * torch.cos(arg[None] + phase[..., None, None])).sum((1, 2))
    return x[None].float()


@pytest.mark.parametrize("band", BANDS)
@pytest.mark.parametrize("spectrum", ["amplitude", "complex"])
def test_bands_select_the_same_cycles_per_image_on_56_and_14_maps(band, spectrum):
    """A 56×56 student map and a 14×14 teacher map of one picture: on their common 14×14 grid every band gives the
    same tokens on both sides (the orthonormal DFT scales each map's spectrum by its own size; SRT's per-token
    normalisation removes the scale). Without the grid, `high` on the 56 map would read 25–31 cycles against 4–10
    and `full` would pool 0–28 cycles against 0–7."""
    small, large = _band_limited(14), _band_limited(56)
    k, grid = level_grid(7, (14, 14), (56, 56))
    assert (k, grid) == (7, (14, 14)) and band_fits(band, k, grid)
    # the picture has nothing at the Nyquist frequency (7 cycles): `high` tokens on that row/column are only noise
    nyquist = torch.arange(k * k).reshape(k, k)[k // 2]
    keep = [t for t in range(k * k) if band != "high" or not (t in nyquist or t % k == k // 2)]
    teacher = FTM(k, spectrum, band, grid)(small)[:, keep]
    assert torch.allclose(FTM(k, spectrum, band, grid)(large)[:, keep], teacher, atol=2e-3)
    if band != "low":
        assert not torch.allclose(FTM(k, spectrum, band)(large)[:, keep], teacher, atol=0.1)
    # the student side (FAM's fast SCA on the restricted block, shared conjugate bins) reads the same frequencies
    fam = FAM(6, 6, k, spectrum, band, sra=False, grid=grid)
    with torch.no_grad():
        fam.proj.weight.copy_(torch.eye(6)[..., None, None])
        assert torch.allclose(fam(large)[:, keep], teacher, atol=2e-3)


def test_high_band_bins_are_signed_cycles_of_the_grid():
    """k = 5 on a 14-point grid: 5, 6, −7 (Nyquist, fftshift's sign), −6, −5 cycles; on a 56-point axis those are
    bins 5, 6, 49, 50, 51."""
    from uhkd.frequency import _band_bins

    assert _band_bins(14, 5, "high").tolist() == [5, 6, 7, 8, 9]
    assert _band_bins(56, 5, "high", 14).tolist() == [5, 6, 49, 50, 51]
    assert _band_bins(56, 5, "low", 14).tolist() == _band_bins(56, 5, "low").tolist() == [54, 55, 0, 1, 2]


@pytest.mark.parametrize("side,k,fits", [(7, 7, False), (7, 9, False), (7, 5, True), (14, 7, True), (56, 7, True)])
def test_a_band_exists_only_below_the_grid_side(side, k, fits):
    """With k_eff = the side (a 7×7 stage-4 map at k = 7) `high` is a permutation of `low` and `full` equals it."""
    k_eff, grid = level_grid(k, (side, side), (side, side))
    x = torch.randn(2, 3, side, side)
    low = spectral_tokens(x, k_eff, "amplitude", "low")
    for band in ("high", "full"):
        assert band_fits(band, k_eff, grid) == fits
        other = spectral_tokens(x, k_eff, "amplitude", band)
        same_set = torch.allclose(other.sort(1).values, low.sort(1).values, atol=1e-5)
        assert same_set != fits
    assert band_fits("low", k_eff, grid)


def _pair(student, teacher, **overrides):
    cfg = build_config(None, {"method.name": "uhkd", "model.student": student, "model.teacher": teacher,
                              "model.scale": "tiny", "data.img_size": 32, "data.protocol": "cifar100", **overrides})
    torch.manual_seed(0)
    models = [create_stage_model(n, num_classes=10, img_size=32, scale="tiny") for n in (student, teacher)]
    return build_method(cfg, *models), models


def test_heterogeneous_pair_skips_the_levels_a_band_cannot_form(capsys):
    """ResNet18 (maps 8, 4, 2, 1) under a Swin teacher: with k = 3, `high` and `full` exist on the 8×8 and 4×4
    grids only; the run says so once and matches those two stages, each with the grid both sides share."""
    low, (student, teacher) = _pair("resnet18", "swin_tiny_patch4_window7_224", **{"method.uhkd.k": 3})
    grids = [level_grid(3, s, t)[1] for s, t in zip(student.stage_sizes, teacher.stage_sizes)]
    assert low.stages == (1, 2, 3, 4) and [f.grid for f in low.ftm] == grids
    assert "cannot be formed" not in capsys.readouterr().out
    for band in ("high", "full"):
        distiller, _ = _pair("resnet18", "swin_tiny_patch4_window7_224", **{"method.uhkd.k": 3, "method.uhkd.band": band})
        out = capsys.readouterr().out
        assert out.count("cannot be formed") == 1 and "stage 3 (k_eff 2 on a 2x2 grid)" in out and "stage 4" in out
        assert distiller.stages == (1, 2) and len(distiller.fam) == 2 and distiller.stage_weights == (0.25, 0.25)
        assert [f.grid for f in distiller.fam] == grids[:2]
        x = torch.rand(2, 3, 32, 32)
        _, terms = distiller(x, torch.tensor([1, 2]))
        assert torch.isfinite(terms["feat"]) and terms["feat"] > 0


def test_a_band_formable_nowhere_is_one_error():
    with pytest.raises(UserError, match="method.uhkd.band=high cannot be formed at any matched stage with method.uhkd.k=7"):
        _pair("resnet18", "swin_tiny_patch4_window7_224", **{"method.uhkd.band": "high", "method.uhkd.stages": "3,4"})


@pytest.mark.parametrize("spectrum,band", [("amplitude", "low"), ("log_amplitude", "high"), ("complex", "low"),
                                           ("amplitude", "full"), ("none", "low")])
def test_constants_built_for_the_map_size_give_the_same_tokens_in_one_graph(spectrum, band):
    """FTM/FAM built with `size` hold the restricted DFT (and the conjugate-bin expansion) as buffers: the same
    numbers as computing them per call, out of checkpoints, and no graph break when the step is compiled."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 9, 9)
    ftm, ftm_sized = FTM(3, spectrum, band), FTM(3, spectrum, band, size=(9, 9))
    fam = FAM(5, 4, k=3, spectrum=spectrum, band=band)
    fam_sized = FAM(5, 4, k=3, spectrum=spectrum, band=band, size=(9, 9))
    fam_sized.load_state_dict(fam.state_dict())  # the buffers are not persistent: the same keys load
    assert torch.allclose(ftm_sized(x), ftm(x), atol=1e-6)
    assert torch.allclose(fam_sized(x), fam(x), atol=1e-6)
    assert torch.allclose(fam_sized(torch.randn(2, 5, 7, 7)).std(), torch.tensor(1.0), atol=0.2)  # other sizes work
    for module in (ftm_sized, fam_sized):
        assert torch._dynamo.explain(module)(x).graph_break_count == 0
