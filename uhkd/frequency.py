"""UHKD's frequency-domain feature matching (docs/method.md): FTM on the teacher, FAM on the student.

Both turn an NCHW map into a sequence B × k² × C of per-token normalised "frequency tokens":
SRR (2-D DFT, orthonormal, float32; a k×k block of bins; a spectrum form) then SRT (flatten, LayerNorm per token).

Frequency bands (`band`), in cycles per image (DFT bin n of a map = n cycles across it), defined on the common
`grid` of a matched level (per axis the smaller of the teacher's and the student's map side; default the map's own
size), so a 56×56 student map and a 14×14 teacher map select the same frequencies:
- `low`: the k lowest |frequency| per axis, −⌊k/2⌋ … ⌈k/2⌉−1 cycles (centred on DC after fftshift).
- `high`: the k highest per axis that both maps hold, the same shape centred on the grid's Nyquist frequency
  (grid side // 2 cycles).
- `full`: every frequency of the grid; the fftshifted spectrum (after the spectrum form) cropped to the grid's
  band and average-pooled to k×k cells, so the sequence length stays k² while all frequencies contribute.
With k ≥ a grid side, `high` would be a permutation of `low` and `full` equal to it: `band_fits` says when a band
is a band of its own (UHKD skips the levels where it is not).
`spectrum="none"` skips the DFT ("w/o FTM"): the map is average-pooled to k×k in space.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError, choice_error

SPECTRA = ("amplitude", "log_amplitude", "complex", "none")
BANDS = ("low", "high", "full")
SCAS = ("linear", "conv_bn")
Grid = tuple[int, int] | None  # a level's common grid (H, W); None: the map's own size


def _band_bins(n: int, k: int, band: str, grid: int | None = None) -> Tensor:
    """DFT bin indices (mod n) of the k frequencies of `band` along an axis of length n, in fftshift order; the band
    is taken on a `grid`-point axis (default n) and mapped to this axis by its signed frequency (cycles per image)."""
    g = grid or n
    bins = (torch.arange(k) - k // 2 + (0 if band == "low" else g // 2)) % g
    return torch.where(bins > (g - 1) // 2, bins - g, bins) % n


def level_grid(k: int, *sizes: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """(k_eff, grid) of a level whose maps have these (H, W) sizes: the common grid is the smallest side per axis."""
    grid = (min(h for h, _ in sizes), min(w for _, w in sizes))
    return min(k, *grid), grid


def band_fits(band: str, k: int, grid: tuple[int, int]) -> bool:
    """Whether `band` with k_eff = k is a band of its own on `grid`: for k ≥ a side, `high` is a permutation of `low`
    and `full` equals it."""
    return band == "low" or k < min(grid)


@functools.lru_cache(maxsize=64)
def _dft_matrix(h: int, w: int, k: int, band: str, tokens: tuple[int, ...] | None, grid: Grid,
                device: torch.device) -> Tensor:
    """Real (h·w) × 2T matrix M: for a map x, `x.flatten(-2) @ M` holds (real, imaginary) of T bins of its
    orthonormal 2-D DFT, interleaved. The bins are the k×k block of `band` on `grid`, row-major, or its `tokens`."""
    gh, gw = grid or (h, w)
    rows = _band_bins(h, k, band, gh).repeat_interleave(k)
    cols = _band_bins(w, k, band, gw).repeat(k)
    if tokens is not None:
        rows, cols = rows[list(tokens)], cols[list(tokens)]
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    angle = -2 * torch.pi * (torch.outer(y.flatten(), rows) / h + torch.outer(x.flatten(), cols) / w).double()
    matrix = torch.stack([angle.cos(), angle.sin()], dim=-1).flatten(1) / (h * w) ** 0.5
    return matrix.to(device=device, dtype=torch.float32)


def dft_tokens(x: Tensor, k: int, band: str, tokens: tuple[int, ...] | None = None, grid: Grid = None,
               matrix: Tensor | None = None) -> Tensor:
    """The k×k block of `band` on `grid` (or its `tokens`) of the orthonormal 2-D DFT of NCHW map `x`, as float32
    B×T×2×C: tokens (bins, row-major) × (real, imaginary) × channels. `matrix`: that restricted DFT, precomputed.

    One matrix product with the DFT restricted to those bins: the same numbers as `fft2` followed by the crop,
    without transforming (and back-propagating through) the bins that are thrown away.
    """
    if matrix is None:
        matrix = _dft_matrix(*x.shape[-2:], k, band, tokens, grid, x.device)
    return (x.float().flatten(2) @ matrix).unflatten(-1, (-1, 2)).permute(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def mirror_bins(h: int, w: int, k: int, band: str,
                grid: Grid = None) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The DFT of a real map is Hermitian: bins (f, g) and (−f, −g) are conjugate and share one amplitude. For the
    k×k block of `band` (on `grid`) of an h×w map: `reps` (the tokens to compute) and `expand` (token t = reps-result
    `expand[t]`), or None when every token is distinct."""
    gh, gw = grid or (h, w)
    bins = [(r, c) for r in _band_bins(h, k, band, gh).tolist() for c in _band_bins(w, k, band, gw).tolist()]
    first: dict[tuple[int, int], int] = {}
    reps: list[int] = []
    expand: list[int] = []
    for i, (r, c) in enumerate(bins):
        twin = first.get((r, c), first.get((-r % h, -c % w)))
        if twin is None:
            first[(r, c)] = i
            expand.append(len(reps))
            reps.append(i)
        else:
            expand.append(expand[twin])
    return None if len(reps) == len(bins) else (tuple(reps), tuple(expand))


@functools.lru_cache(maxsize=64)
def _index(values: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, device=device)


def spectrum_form(z: Tensor, spectrum: str) -> Tensor:
    """Real channels of a spectrum held as (..., 2, C) = (real, imaginary) × channels: |X|, log1p|X|, or
    real ‖ imag stacked on channels (..., 2C)."""
    if spectrum == "complex":
        return z.flatten(-2)
    re, im = z.unbind(-2)
    # the tiny floor keeps the gradient finite at |X| = 0 (changes |X| by < 1e-6); vector_norm is 100x slower here
    amplitude = torch.sqrt(re * re + im * im + 1e-12)
    return torch.log1p(amplitude) if spectrum == "log_amplitude" else amplitude


def to_sequence(z: Tensor) -> Tensor:
    """B×C×k×k -> B×k²×C (tokens = bins or positions)."""
    return z.flatten(2).transpose(1, 2)


def spectral_tokens(x: Tensor, k: int, spectrum: str, band: str,
                    project: Callable[[Tensor], Tensor] | None = None,
                    tokens: tuple[int, ...] | None = None, grid: Grid = None,
                    matrix: Tensor | None = None) -> Tensor:
    """SRR + the flattening of SRT: NCHW map -> float32 B×k²×C' (B×len(tokens)×C' with `tokens`, a subset of
    a low/high block's tokens, see `mirror_bins`), the band taken on `grid` (default the map's size). `matrix`: the
    restricted DFT of a low/high block (`dft_tokens`), precomputed.

    `project` is a channel map (on the last axis) applied where it is cheapest and still equal to projecting `x`
    first: to the cropped complex block, as it commutes with the DFT, cropping and pooling.
    """
    project = project or (lambda t: t)
    with torch.autocast(x.device.type, enabled=False):
        if spectrum == "none":
            return project(to_sequence(F.adaptive_avg_pool2d(x.float(), k)))
        if band != "full":
            return spectrum_form(project(dft_tokens(x, k, band, tokens, grid, matrix)), spectrum)
        spec = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="ortho"), dim=(-2, -1))
        if grid is not None:  # the grid's frequencies: the centred grid-sized block (DC sits at index side // 2)
            (h, w), (gh, gw) = x.shape[-2:], grid
            spec = spec[..., h // 2 - gh // 2:h // 2 - gh // 2 + gh, w // 2 - gw // 2:w // 2 - gw // 2 + gw]
        z = spectrum_form(project(torch.view_as_real(spec).permute(0, 2, 3, 4, 1)), spectrum)  # B×H×W×C'
        return to_sequence(F.adaptive_avg_pool2d(z.permute(0, 3, 1, 2), k))


def token_norm(z: Tensor) -> Tensor:
    """SRT, second half: LayerNorm of each token without affine, so heterogeneous magnitudes compare."""
    return F.layer_norm(z, z.shape[-1:])


class _Constants(nn.Module):
    """The restricted DFT matrix (and FAM's conjugate-bin expansion) of a map size known at construction, built once
    as non-persistent buffers: they follow the module's device, stay out of checkpoints, and keep the Python-side
    bin arithmetic (lru_cache, `.tolist()`) out of a compiled step, which would otherwise break its graph there."""

    def __init__(self, size: tuple[int, int] | None, k: int, spectrum: str, band: str, grid: Grid,
                 mirror: bool = False) -> None:
        super().__init__()
        self.size = tuple(size) if size else None
        self.mirrored = None
        if self.size is None or spectrum == "none" or band == "full":
            return
        if mirror and spectrum != "complex":
            self.mirrored = mirror_bins(*self.size, k, band, grid)
        tokens = self.mirrored and self.mirrored[0]
        self.register_buffer("dft", _dft_matrix(*self.size, k, band, tokens, grid, torch.device("cpu")),
                             persistent=False)
        if self.mirrored is not None:
            self.register_buffer("expand", torch.tensor(self.mirrored[1]), persistent=False)

    def matrix(self, x: Tensor) -> Tensor | None:
        """The precomputed matrix when `x` has the size it was built for, else None (computed and cached per call)."""
        return getattr(self, "dft", None) if tuple(x.shape[-2:]) == self.size else None


def _check(spectrum: str, band: str, k: int) -> None:
    if spectrum not in SPECTRA:
        raise choice_error("method.uhkd.spectrum", spectrum, SPECTRA)
    if band not in BANDS:
        raise choice_error("method.uhkd.band", band, BANDS)
    if k < 1:
        raise UserError(f"method.uhkd.k must be >= 1, got {k}")


class FTM(nn.Module):
    """Feature Transformation Module (teacher side): NCHW map -> B×k²×C (2C for `complex`). No parameters, no
    gradient, float32 even under autocast. `grid`: the level's common grid (the band's frequencies; default the
    map's own size). `size`: the (H, W) of the maps it will see, to build the DFT matrix once (other sizes still
    work)."""

    def __init__(self, k: int = 7, spectrum: str = "amplitude", band: str = "low", grid: Grid = None,
                 size: tuple[int, int] | None = None) -> None:
        super().__init__()
        _check(spectrum, band, k)
        self.k, self.spectrum, self.band, self.grid = k, spectrum, band, grid
        self.constants = _Constants(size, k, spectrum, band, grid)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return token_norm(spectral_tokens(x, self.k, self.spectrum, self.band, grid=self.grid,
                                          matrix=self.constants.matrix(x)))

    def extra_repr(self) -> str:
        return f"k={self.k}, spectrum={self.spectrum}, band={self.band}, grid={self.grid}"


class SRA(nn.Module):
    """Sequence Representation Alignment: a channel Linear, then a residual token-mixing MLP (pre-LayerNorm,
    hidden width k²) over the k² frequency tokens. FAM runs the two halves apart so that the channel Linear sees
    each distinct token once."""

    def __init__(self, num_tokens: int, width: int) -> None:
        super().__init__()
        self.channel = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.token_mlp = nn.Sequential(nn.Linear(num_tokens, num_tokens), nn.GELU(), nn.Linear(num_tokens, num_tokens))

    def mix(self, z: Tensor) -> Tensor:
        return z + self.token_mlp(self.norm(z).transpose(1, 2)).transpose(1, 2)


class FAM(nn.Module):
    """Feature Alignment Module (student side, learnable): SCA (bias-free C_s -> C_t channel projection, then the
    teacher's SRR), SRA (optional), then the teacher's SRT normalisation. Output B×k²×C_t (2C_t for `complex`).

    `sca="linear"` projects the cropped complex spectrum (same weights on real and imaginary parts): equal to
    projecting the full map, at k²/HW of the cost. `sca="conv_bn"` applies 1×1 conv + BatchNorm to the full map
    before the DFT (the slower ablation; the only order where BN makes sense). `grid` and `size` as in FTM. With an
    amplitude spectrum of a low/high block, SCA and SRA's channel Linear run once per conjugate pair of bins
    (`mirror_bins`).
    """

    def __init__(self, in_channels: int, out_channels: int, k: int = 7, spectrum: str = "amplitude",
                 band: str = "low", sca: str = "linear", sra: bool = True, grid: Grid = None,
                 size: tuple[int, int] | None = None) -> None:
        super().__init__()
        _check(spectrum, band, k)
        if sca not in SCAS:
            raise choice_error("method.uhkd.sca", sca, SCAS)
        self.k, self.spectrum, self.band, self.sca, self.grid = k, spectrum, band, sca, grid
        self.constants = _Constants(size, k, spectrum, band, grid, mirror=True)
        self.proj = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels) if sca == "conv_bn" else None
        width = 2 * out_channels if spectrum == "complex" else out_channels
        self.sra = SRA(k * k, width) if sra else None

    def project(self, z: Tensor) -> Tensor:
        """The SCA projection on channels-last input (the 1×1 conv's weights as a Linear)."""
        return F.linear(z, self.proj.weight.flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        matrix, mirrored, expand = self.constants.matrix(x), None, None
        if matrix is not None:
            mirrored = self.constants.mirrored
            expand = mirrored and self.constants.expand
        elif self.spectrum in ("amplitude", "log_amplitude") and self.band != "full":
            mirrored = mirror_bins(x.shape[-2], x.shape[-1], self.k, self.band, self.grid)
            expand = mirrored and _index(mirrored[1], x.device)
        if self.bn is not None:
            x, project = self.bn(self.proj(x)), None
        else:
            project = self.project
        z = spectral_tokens(x, self.k, self.spectrum, self.band, project, mirrored and mirrored[0], self.grid, matrix)
        if self.sra is not None:
            z = self.sra.channel(z)
        if expand is not None:
            z = z[:, expand]
        if self.sra is not None:
            z = self.sra.mix(z)
        return token_norm(z)
