"""UHKD's frequency-domain feature matching (SPEC §1.1): FTM on the teacher, FAM on the student.

Both turn an NCHW map into a sequence B × k² × C of per-token normalised "frequency tokens":
SRR (2-D DFT, orthonormal, float32; a k×k block of bins; a spectrum form) then SRT (flatten, LayerNorm per token).

Frequency bands (`band`), in DFT index space (bin n = n cycles per map side):
- `low`: the k×k block of lowest |frequency| per axis, bins −⌊k/2⌋ … ⌈k/2⌉−1, i.e. centred on DC after fftshift.
- `high`: the k×k block of highest |frequency| per axis, the same shape centred on the Nyquist bin H//2 (W//2):
  the finest detail each map holds.
- `full`: every bin; the fftshifted spectrum (after the spectrum form) is average-pooled to k×k cells, so the
  sequence length stays k² while all frequencies contribute.
`spectrum="none"` skips the DFT ("w/o FTM"): the map is average-pooled to k×k in space.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError, choice_error

SPECTRA = ("amplitude", "log_amplitude", "complex", "none")
BANDS = ("low", "high", "full")
SCAS = ("linear", "conv_bn")


def _band_bins(n: int, k: int, band: str, device: torch.device) -> Tensor:
    centre = 0 if band == "low" else n // 2
    return (torch.arange(k, device=device) - k // 2 + centre) % n


def frequency_block(x: Tensor, k: int, band: str) -> Tensor:
    """The complex bins of `band` of the orthonormal 2-D DFT of NCHW map `x`: B×C×k×k, or the whole fftshifted
    B×C×H×W spectrum for `band="full"`."""
    spec = torch.fft.fft2(x.float(), norm="ortho")
    if band == "full":
        return torch.fft.fftshift(spec, dim=(-2, -1))
    h, w = spec.shape[-2:]
    rows = _band_bins(h, k, band, spec.device)
    cols = _band_bins(w, k, band, spec.device)
    return spec.index_select(-2, rows).index_select(-1, cols)


def spectrum_form(spec: Tensor, spectrum: str) -> Tensor:
    """Real channels of a complex spectrum: |X|, log1p|X|, or real ‖ imag stacked on channels (2C)."""
    if spectrum == "amplitude":
        return spec.abs()
    if spectrum == "log_amplitude":
        return torch.log1p(spec.abs())
    return torch.cat([spec.real, spec.imag], dim=1)


def spectral_map(x: Tensor, k: int, spectrum: str, band: str,
                 project: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """SRR: NCHW map -> float32 B×C'×k×k. `project` is a channel map applied where it is cheapest and still
    equal to projecting `x` first: to the cropped complex block (it commutes with the DFT, cropping and pooling)."""
    project = project or (lambda t: t)
    with torch.autocast(x.device.type, enabled=False):
        if spectrum == "none":
            return project(F.adaptive_avg_pool2d(x.float(), k))
        z = spectrum_form(project(frequency_block(x, k, band)), spectrum)
        return F.adaptive_avg_pool2d(z, k) if band == "full" else z


def to_sequence(z: Tensor) -> Tensor:
    """SRT, first half: B×C×k×k -> B×k²×C (tokens = frequency bins)."""
    return z.flatten(2).transpose(1, 2)


def token_norm(z: Tensor) -> Tensor:
    """SRT, second half: LayerNorm of each token without affine, so heterogeneous magnitudes compare."""
    return F.layer_norm(z, z.shape[-1:])


def _check(spectrum: str, band: str, k: int) -> None:
    if spectrum not in SPECTRA:
        raise choice_error("method.spectrum", spectrum, SPECTRA)
    if band not in BANDS:
        raise choice_error("method.band", band, BANDS)
    if k < 1:
        raise UserError(f"method.k must be >= 1, got {k}")


class FTM(nn.Module):
    """Feature Transformation Module (teacher side): NCHW map -> B×k²×C (2C for `complex`). No parameters, no
    gradient, float32 even under autocast."""

    def __init__(self, k: int = 7, spectrum: str = "amplitude", band: str = "low") -> None:
        super().__init__()
        _check(spectrum, band, k)
        self.k, self.spectrum, self.band = k, spectrum, band

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return token_norm(to_sequence(spectral_map(x, self.k, self.spectrum, self.band)))

    def extra_repr(self) -> str:
        return f"k={self.k}, spectrum={self.spectrum}, band={self.band}"


class SRA(nn.Module):
    """Sequence Representation Alignment: a residual token-mixing MLP over the k² frequency tokens (pre-LayerNorm)
    and a channel Linear."""

    def __init__(self, num_tokens: int, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.token_mlp = nn.Sequential(nn.Linear(num_tokens, 2 * num_tokens), nn.GELU(),
                                       nn.Linear(2 * num_tokens, num_tokens))
        self.channel = nn.Linear(width, width)

    def forward(self, z: Tensor) -> Tensor:
        z = z + self.token_mlp(self.norm(z).transpose(1, 2)).transpose(1, 2)
        return self.channel(z)


class FAM(nn.Module):
    """Feature Alignment Module (student side, learnable): SCA (bias-free C_s -> C_t channel projection, then the
    teacher's SRR), SRA (optional), then the teacher's SRT normalisation. Output B×k²×C_t (2C_t for `complex`).

    `sca="linear"` projects the cropped complex spectrum (same weights on real and imaginary parts): equal to
    projecting the full map, at k²/HW of the cost. `sca="conv_bn"` applies 1×1 conv + BatchNorm to the full map
    before the DFT (the slower ablation; the only order where BN makes sense).
    """

    def __init__(self, in_channels: int, out_channels: int, k: int = 7, spectrum: str = "amplitude",
                 band: str = "low", sca: str = "linear", sra: bool = True) -> None:
        super().__init__()
        _check(spectrum, band, k)
        if sca not in SCAS:
            raise choice_error("method.sca", sca, SCAS)
        self.k, self.spectrum, self.band, self.sca = k, spectrum, band, sca
        self.proj = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels) if sca == "conv_bn" else None
        width = 2 * out_channels if spectrum == "complex" else out_channels
        self.sra = SRA(k * k, width) if sra else None

    def _project(self, z: Tensor) -> Tensor:
        if not z.is_complex():
            return self.proj(z)
        both = self.proj(torch.cat([z.real, z.imag]))  # one conv over real and imaginary parts stacked on batch
        return torch.complex(*both.chunk(2))

    def forward(self, x: Tensor) -> Tensor:
        if self.bn is not None:
            z = spectral_map(self.bn(self.proj(x)), self.k, self.spectrum, self.band)
        else:
            z = spectral_map(x, self.k, self.spectrum, self.band, project=self._project)
        z = to_sequence(z)
        if self.sra is not None:
            z = self.sra(z)
        return token_norm(z)
