"""Temporal Fourier layers of DSNO (Zheng et al., "Fast Sampling of Diffusion Models via Operator
Learning", ICML 2023).

DSNO runs a diffusion U-Net on B*M items (M output times of one trajectory per example) and, after
chosen blocks, mixes the M copies with a temporal convolution layer (paper Sec. 3, Fig. 1):

    (T u)(t) = u(t) + LeakyReLU((K u)(t)),     K u = F^-1(R . F u)  over the time axis,

where F is the DFT over time, only the J lowest rfft modes are kept and R[j] is a complex C_in x C_out
matrix per mode, shared by every pixel. Because K acts on Fourier coefficients it can be evaluated on a
different time grid than it was fed (paper App. A.3).

Public API
----------
* :func:`spectral_time_conv` -- the pure spectral math (one implementation of the multiply).
* :func:`fourier_resample` -- band-limited (trigonometric) resampling along one axis.
* :class:`TemporalSpectralConv` -- K on (N, C, M) tensors; a drop-in ``conv_module`` for neuralop's FNO.
* :class:`TemporalBlock` -- T on U-Net feature maps, (B*M, C, H, W) or (B, M, C, H, W).

Note: importing this module imports ``neuralop`` (whose package ``__init__`` pulls tensorly, tltorch and
wandb; ~0.7 s on top of torch on a warm CPU box), so import it only where the layers are needed.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from neuralop.layers.base_spectral_conv import BaseSpectralConv
from torch import nn

__all__ = ["spectral_time_conv", "fourier_resample", "TemporalSpectralConv", "TemporalBlock"]

_INITS = ("zero", "small")


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------
def _fft_context(device: torch.device):
    """Autocast disabled for the FFT region (bf16/fp16 FFTs fail or lose accuracy, esp. on CUDA)."""
    available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if available(device.type) if available else device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. "meta" tensors: autocast does not apply


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 unless something is float64 (half/bf16 are upcast, float64 is never downcast)."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


@functools.lru_cache(maxsize=64)
def _mix_equation(ndim: int, time_dim: int, channel_dim: int) -> str:
    """einsum equation contracting `channel_dim` with R[j, i, o], batched over the mode axis `time_dim`."""
    spare = iter("abcdefghklmnpqrstuvwxyz")  # batch-like dims avoid "i", "j", "o"
    letters = ["j" if k == time_dim else "i" if k == channel_dim else next(spare) for k in range(ndim)]
    out = list(letters)
    out[channel_dim] = "o"
    return f"{''.join(letters)},jio->{''.join(out)}"


def _check_modes(n_modes: int, n_time: int, who: str) -> None:
    if n_modes > n_time // 2 + 1:
        raise ValueError(
            f"{who}: n_modes={n_modes} exceeds the {n_time // 2 + 1} rfft modes of a length-{n_time} time "
            f"axis (max M//2+1); use n_modes <= {n_time // 2 + 1} or feed at least {2 * (n_modes - 1)} times."
        )


def spectral_time_conv(
    u: torch.Tensor,
    weight: torch.Tensor,
    *,
    time_dim: int,
    channel_dim: int,
    n_out: int | None = None,
) -> torch.Tensor:
    """DSNO kernel operator ``K u = F^-1(R . F u)`` along ``time_dim`` (paper Sec. 3; App. A.3).

    ``u`` is real with its time axis at ``time_dim`` and channels at ``channel_dim``; ``weight`` is the
    real view ``(J, C_in, C_out, 2)`` of the complex ``R``. The lowest ``J`` rfft modes are mixed
    (``norm="forward"``, so results do not depend on the grid size) and the dropped modes are zero.
    ``n_out`` (default: input length) synthesises the output on another equispaced grid; this equals
    ``fourier_resample(K u, n_out)``, i.e. plain zero-padding / truncation of the spectrum as in the DSNO
    reference except for the one unpaired Nyquist bin. Runs in float32 (float64 if an operand is
    float64) with autocast off and returns that dtype; callers cast back.
    """
    ndim = u.dim()
    time_dim, channel_dim = time_dim % ndim, channel_dim % ndim
    n_in = u.shape[time_dim]
    n_modes = weight.shape[0]
    _check_modes(n_modes, n_in, "spectral_time_conv")
    n_out = n_in if n_out is None else int(n_out)
    if n_out < 1:
        raise ValueError(f"spectral_time_conv: n_out must be >= 1, got {n_out}.")
    dtype = _compute_dtype(u.dtype, weight.dtype)
    with _fft_context(u.device):
        u_hat = torch.fft.rfft(u.to(dtype), dim=time_dim, norm="forward")  # M -> M//2+1 modes
        u_hat = u_hat.narrow(time_dim, 0, n_modes)  # keep the J lowest modes
        r = torch.view_as_complex(weight.to(dtype))  # (J, C_in, C_out) complex
        y_hat = torch.einsum(_mix_equation(ndim, time_dim, channel_dim), u_hat, r)
        y_hat = _regrid_spectrum(y_hat, n_in, n_out, time_dim)
        # irfft zero-pads the kept modes up to n_out//2+1 (the dropped modes are zero).
        return torch.fft.irfft(y_hat, n=n_out, dim=time_dim, norm="forward")


@functools.lru_cache(maxsize=64)
def _real_dft_bases(m: int, n_modes: int) -> tuple[torch.Tensor, torch.Tensor, tuple[tuple[int, bool], ...]]:
    """The kept rfft modes of a length-M signal as R real rows (float64, CPU):

    analysis A (R, M): row (j, re) = cos(2πjk/M)/M, row (j, im) = −sin(2πjk/M)/M  (rfft, norm="forward");
    synthesis S (M, R): column (j, re) = c_j cos(2πjk/M), (j, im) = −c_j sin(2πjk/M), c_j = 1 for the DC and
    Nyquist modes and 2 otherwise (irfft, norm="forward"). DC and Nyquist have no imaginary row: irfft
    ignores those parts. ``parts`` lists (j, is_imaginary) per row."""
    k = torch.arange(m, dtype=torch.float64)
    parts = []
    for j in range(n_modes):
        parts.append((j, False))
        if 0 < j and 2 * j != m:
            parts.append((j, True))
    rows, cols = [], []
    for j, imag in parts:
        theta = 2 * torch.pi * j * k / m
        c = 1.0 if j == 0 or 2 * j == m else 2.0
        rows.append((-torch.sin(theta) if imag else torch.cos(theta)) / m)
        cols.append(c * (-torch.sin(theta) if imag else torch.cos(theta)))
    return torch.stack(rows), torch.stack(cols, dim=1), tuple(parts)


def spectral_mixing_matrix(weight: torch.Tensor, parts: Sequence[tuple[int, bool]]) -> torch.Tensor:
    """The complex per-mode mixing y_j = Σ_c û_j[c] R_j[c, :] on the real rows of ``_real_dft_bases``, as one
    real block matrix (R·C_out, R·C_in) for a 1×1 convolution: Re y = Rr^T Re û − Ri^T Im û, Im y = Ri^T Re û
    + Rr^T Im û (rows without an imaginary part keep only the first term)."""
    rr, ri = weight[..., 0], weight[..., 1]  # (J, C_in, C_out)
    index = {p: n for n, p in enumerate(parts)}
    c_in, c_out = weight.shape[1], weight.shape[2]
    blocks = [[weight.new_zeros(c_out, c_in) for _ in parts] for _ in parts]
    for (j, imag), n in index.items():
        re_in = index[(j, False)]
        im_in = index.get((j, True))
        if not imag:
            blocks[n][re_in] = rr[j].T
            if im_in is not None:
                blocks[n][im_in] = -ri[j].T
        else:
            blocks[n][re_in] = ri[j].T
            blocks[n][im_in] = rr[j].T
    return torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)


def _regrid_spectrum(z: torch.Tensor, n_in: int, n_out: int, dim: int) -> torch.Tensor:
    """Move the lowest rfft modes ``z`` of a length-``n_in`` signal to a length-``n_out`` grid.

    Only the one unpaired bin needs care (same convention as ``scipy.signal.resample``): upsampling from
    even ``n_in`` splits its (real) Nyquist bin into a +-n_in/2 pair (x 0.5); downsampling to even
    ``n_out`` merges the +-n_out/2 pair into the new Nyquist bin (x 2). Modes above ``n_out//2`` are
    dropped (anti-aliasing). Then ``irfft(z, n=n_out)`` is the trigonometric interpolant on the new grid.
    """
    if n_out == n_in:
        return z
    n_modes = z.shape[dim]
    if n_out > n_in:
        h = n_in // 2
        if n_in % 2 == 0 and n_modes == h + 1:  # the Nyquist bin of the input grid is present
            nyq = z.narrow(dim, h, 1)
            # Only its real part exists on the n_in grid (irfft ignores the imaginary part).
            z = torch.cat([z.narrow(dim, 0, h), torch.complex(0.5 * nyq.real, torch.zeros_like(nyq.real))], dim)
        return z
    h = n_out // 2
    if n_modes > h:
        z = z.narrow(dim, 0, h + 1)  # modes above the output Nyquist cannot be represented
        if n_out % 2 == 0:
            z = torch.cat([z.narrow(dim, 0, h), 2.0 * z.narrow(dim, h, 1)], dim)
    return z


def fourier_resample(x: torch.Tensor, n_out: int, dim: int = -1) -> torch.Tensor:
    """Trigonometric (band-limited, periodic) resampling of ``x`` to ``n_out`` points along ``dim``.

    Same convention as ``scipy.signal.resample``: upsampling interpolates exactly (the original samples
    are reproduced), downsampling drops the modes above the new Nyquist. Returns ``x`` itself when the
    length does not change. Computed in float32 (float64 for float64 input), returned in ``x.dtype``.
    """
    n_in = x.shape[dim]
    n_out = int(n_out)
    if n_out == n_in:
        return x
    if n_out < 1:
        raise ValueError(f"fourier_resample: n_out must be >= 1, got {n_out}.")
    with _fft_context(x.device):
        x_hat = torch.fft.rfft(x.to(_compute_dtype(x.dtype)), dim=dim, norm="forward")
        y = torch.fft.irfft(_regrid_spectrum(x_hat, n_in, n_out, dim), n=n_out, dim=dim, norm="forward")
    return y.to(x.dtype)


def _as_length(value, name: str) -> int | None:
    """Accept None, an int, or a 1-sequence (neuralop passes tuples/lists)."""
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 1:
            raise ValueError(f"{name} must be an int or a 1-tuple for a 1-D (time) operator, got {value!r}.")
        value = value[0]
    if value is None:
        return None
    return int(value)


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------
class TemporalSpectralConv(BaseSpectralConv):
    """DSNO kernel operator K on ``(N, C_in, M)`` tensors (time last); neuralop ``conv_module``-compatible.

    ``K u = F^-1(R . F u)`` with the ``n_modes`` lowest rfft modes kept (paper Sec. 3). ``n_modes``
    counts rfft modes directly (neuralop's SpectralConv instead keeps ``n_modes//2+1``). The complex
    weight ``R`` is stored as a real parameter ``weight`` of shape ``(max_n_modes, C_in, C_out, 2)``.

    init: ``"small"`` = DSNO reference init (real and imaginary parts ~ U[0, 1/(C_in*C_out)]),
    ``"zero"`` = K u = 0. ``bias`` adds a learned per-output-channel constant (off by default).
    FNO's extra kwargs are accepted: ``max_n_modes`` and ``resolution_scaling_factor`` are honoured;
    ``rank``/``implementation``/``fixed_rank_modes``/``decomposition_kwargs``/``fno_block_precision``
    are ignored (dense weight, FFT always >= float32); ``factorization``/``separable`` warn and fall back
    to a dense weight; ``complex_data=True`` raises.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_modes,
        bias: bool = False,
        init: str = "small",
        *,
        max_n_modes=None,
        resolution_scaling_factor=None,
        complex_data: bool = False,
        separable: bool = False,
        factorization=None,
        rank=None,
        implementation=None,
        fixed_rank_modes=None,
        decomposition_kwargs=None,
        fno_block_precision: str = "full",
        device=None,
        dtype=None,
        **kwargs,
    ):
        super().__init__(device=device, dtype=dtype)
        if kwargs:
            warnings.warn(f"TemporalSpectralConv ignores unknown keyword arguments {sorted(kwargs)}.", stacklevel=2)
        if complex_data:
            raise ValueError("TemporalSpectralConv handles real data only (complex_data=True is unsupported).")
        if separable:
            warnings.warn(
                "TemporalSpectralConv ignores separable=True (uses a dense C_in x C_out weight).", stacklevel=2
            )
        if factorization is not None:
            warnings.warn(
                f"TemporalSpectralConv ignores factorization={factorization!r} (uses a dense weight).", stacklevel=2
            )
        if init not in _INITS:
            raise ValueError(f"TemporalSpectralConv: init must be one of {_INITS}, got {init!r}.")
        del rank, implementation, fixed_rank_modes, decomposition_kwargs  # only meaningful with factorization
        self.fno_block_precision = fno_block_precision  # kept for introspection; FFT always runs >= float32

        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        n = _as_length(n_modes, "n_modes")
        n_max = _as_length(max_n_modes, "max_n_modes")
        n_max = n if n_max is None else n_max
        if n is None or n < 1 or n_max < n:
            raise ValueError(
                f"TemporalSpectralConv: need 1 <= n_modes <= max_n_modes, got n_modes={n_modes!r}, "
                f"max_n_modes={max_n_modes!r}."
            )
        self.max_n_modes = n_max
        self._n_modes = n

        factor = resolution_scaling_factor
        if isinstance(factor, Sequence):
            if len(factor) != 1:
                raise ValueError(f"resolution_scaling_factor must be a number or a 1-list, got {factor!r}.")
            factor = factor[0]
        self.resolution_scaling_factor = None if factor is None else float(factor)

        # R as a real tensor (J, C_in, C_out, [re, im]); complex parameters break safetensors/DDP/some optimisers.
        self.weight = nn.Parameter(
            torch.empty(n_max, self.in_channels, self.out_channels, 2, device=device, dtype=dtype)
        )
        self.bias = nn.Parameter(torch.zeros(self.out_channels, 1, device=device, dtype=dtype)) if bias else None
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise ``weight`` per ``self.init`` (bias, if any, to zero)."""
        with torch.no_grad():
            if self.init == "zero":
                self.weight.zero_()
            else:  # DSNO reference init: scale * rand for real and imaginary parts
                self.weight.uniform_(0.0, 1.0 / (self.in_channels * self.out_channels))
            if self.bias is not None:
                self.bias.zero_()

    @property
    def n_modes(self) -> int:
        """Number of rfft modes in use (FNOBlocks' ``n_modes`` setter may lower it, up to ``max_n_modes``)."""
        return self._n_modes

    @n_modes.setter
    def n_modes(self, value) -> None:
        n = _as_length(value, "n_modes")
        if n is None or not 1 <= n <= self.max_n_modes:
            raise ValueError(
                f"TemporalSpectralConv: n_modes must be in [1, max_n_modes={self.max_n_modes}], got {value!r}; "
                "pass a larger max_n_modes at construction to grow it."
            )
        self._n_modes = n

    def _target_length(self, n_in: int, output_shape) -> int:
        n_out = _as_length(output_shape, "output_shape")
        if n_out is not None:
            return n_out
        if self.resolution_scaling_factor is not None:
            return round(n_in * self.resolution_scaling_factor)
        return n_in

    def forward(self, x: torch.Tensor, output_shape=None) -> torch.Tensor:
        """``(N, C_in, M) -> (N, C_out, M_out)``; ``M_out`` = ``output_shape`` (int or 1-tuple), else M
        scaled by ``resolution_scaling_factor``, else M."""
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"TemporalSpectralConv expects (N, C_in={self.in_channels}, M), got shape {tuple(x.shape)}."
            )
        _check_modes(self.n_modes, x.shape[-1], "TemporalSpectralConv")
        n_out = self._target_length(x.shape[-1], output_shape)
        y = spectral_time_conv(x, self.weight[: self.n_modes], time_dim=-1, channel_dim=1, n_out=n_out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def transform(self, x: torch.Tensor, output_shape=None) -> torch.Tensor:
        """Bring a skip branch to the grid of :meth:`forward`'s output (Fourier resampling, App. A.3)."""
        return fourier_resample(x, self._target_length(x.shape[-1], output_shape), dim=-1)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, n_modes={self.n_modes}, init={self.init!r}"
        if self.max_n_modes != self.n_modes:
            s += f", max_n_modes={self.max_n_modes}"
        return s + f", bias={self.bias is not None}"


class TemporalBlock(nn.Module):
    """DSNO temporal convolution layer ``T u = u + LeakyReLU(K u)`` on U-Net feature maps (paper Sec. 3).

    Input ``(B*M, C, H, W)`` (item ``b*M + i`` is example ``b`` at time ``i``, as a U-Net hook sees it) or
    ``(B, M, C, H, W)``; output has the same layout. Pixels act as batch for K. ``init="zero"`` makes the
    block exactly the identity (safe to insert into a pretrained U-Net); ``init="small"`` is the DSNO init.
    ``forward(x, output_times=M')`` evaluates T on M' equispaced times instead (App. A.3): K is synthesised
    on the new grid and the residual ``u`` is Fourier-resampled.
    """

    def __init__(
        self,
        channels: int,
        n_modes: int,
        num_times: int,
        init: str = "zero",
        negative_slope: float = 0.01,
    ):
        super().__init__()
        if num_times < 1:
            raise ValueError(f"TemporalBlock: num_times must be >= 1, got {num_times}.")
        n_modes = _as_length(n_modes, "n_modes")
        if n_modes > num_times // 2 + 1:
            raise ValueError(
                f"TemporalBlock: n_modes={n_modes} exceeds num_times//2+1={num_times // 2 + 1} rfft modes "
                f"for num_times={num_times}; lower n_modes."
            )
        self.channels = int(channels)
        self.num_times = int(num_times)
        self.negative_slope = float(negative_slope)
        self.conv = TemporalSpectralConv(channels, channels, n_modes, bias=False, init=init)
        # Up to this many frames the layer runs as real DFT matmuls + a 1×1 convolution (``_dft_path``); the
        # FFT path remains for longer grids and for output_times (App. A.3 resampling).
        self.dft_max_times = 32

    @property
    def n_modes(self) -> int:
        return self.conv.n_modes

    def forward(self, x: torch.Tensor, output_times: int | None = None) -> torch.Tensor:
        if x.dim() == 4:  # (B*M, C, H, W)
            n, c, h, w = x.shape
            if n % self.num_times != 0:
                raise ValueError(
                    f"TemporalBlock: first dim {n} is not divisible by num_times={self.num_times}; expected "
                    "(B*M, C, H, W) with item b*M+i = example b at time i."
                )
            m = self.num_times
            u = x.reshape(n // m, m, c, h * w)  # (B*M, C, H, W) -> (B, M, C, H*W), a view if contiguous
        elif x.dim() == 5:  # (B, M, C, H, W)
            b, m, c, h, w = x.shape
            u = x.reshape(b, m, c, h * w)  # (B, M, C, H, W) -> (B, M, C, H*W)
        else:
            raise ValueError(f"TemporalBlock expects (B*M, C, H, W) or (B, M, C, H, W), got shape {tuple(x.shape)}.")
        if c != self.channels:
            raise ValueError(f"TemporalBlock: expected {self.channels} channels, got {c} (input {tuple(x.shape)}).")
        _check_modes(self.conv.n_modes, m, "TemporalBlock")
        m_out = m if output_times is None else int(output_times)
        if m_out == m and m <= self.dft_max_times:
            out = self._dft_path(u, m)
            return out.reshape(x.shape)

        # (B, M, C, P) -> (B, M_out, C, P): time on dim 1, channels on dim 2, pixels act as batch.
        ku = spectral_time_conv(u, self.conv.weight[: self.conv.n_modes], time_dim=1, channel_dim=2, n_out=m_out)
        res = fourier_resample(u, m_out, dim=1)  # identity (same tensor) when m_out == m
        out = res + F.leaky_relu(ku, self.negative_slope).to(x.dtype)

        if x.dim() == 4:
            return out.reshape(-1, c, h, w)  # (B, M_out, C, H*W) -> (B*M_out, C, H, W)
        return out.reshape(out.shape[0], m_out, c, h, w)  # (B, M_out, C, H*W) -> (B, M_out, C, H, W)

    def _dft_path(self, u: torch.Tensor, m: int) -> torch.Tensor:
        """T u on (B, M, C, P) with the kept modes as real DFT rows: analysis (a matmul over the M frames),
        the complex mixing as one block 1×1 convolution, synthesis (a matmul over frames). The same numbers
        as the FFT path (tested), without FFTs of length 4 or complex tensors: on CPU and GPU alike the
        cost is that of a 1×1 convolution from R·C to R·C channels (R = 2J−1 real rows, 3 for J = 2)."""
        b, _, c, p = u.shape
        a, s, parts = _real_dft_bases(m, self.conv.n_modes)
        dtype = _compute_dtype(u.dtype, self.conv.weight.dtype)
        with _fft_context(u.device):  # analysis, mixing weights and synthesis in float32 (as the FFT)
            a, s = a.to(u.device, dtype), s.to(u.device, dtype)
            v = torch.matmul(a, u.to(dtype).reshape(b, m, c * p))  # (B, R, C·P): the kept modes
            w = spectral_mixing_matrix(self.conv.weight[: self.conv.n_modes].to(dtype), parts)
        v = v.reshape(b, len(parts) * c, p, 1)
        y = F.conv2d(v, w.to(v.dtype)[:, :, None, None])  # autocast applies here like to any 1×1 conv
        with _fft_context(u.device):
            ku = torch.matmul(s, y.to(dtype).reshape(b, len(parts), c * p))  # (B, M, C·P)
        return u + F.leaky_relu(ku, self.negative_slope).to(u.dtype).reshape(u.shape)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_times={self.num_times}, negative_slope={self.negative_slope}"
