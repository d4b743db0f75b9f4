"""PromptMR+ (Xin et al., ECCV 2024), image-domain unrolled version ("v2"), docs/promptmr.md section 1.

Tensor convention at the boundary (checked, ``ValueError`` otherwise):

* ``masked_kspace``: native complex ``(B, A, C, H, W)``, ``A = num_adj_slices`` (slice-major), centred k-space
  (DC at ``(H // 2, W // 2)``), ``complex64`` with float32 weights or ``complex128`` with float64 weights;
* ``mask``: ``(B, W)`` (or ``(1, W)``) column mask, bool or 0/1 float, the same for every slice and coil;
* ``num_low_frequencies``: ACS width per sample, an int or an int tensor ``(B,)``; -1 = detect from the mask.

Output: :class:`PromptMROutput` with the magnitude image of the centre slice ``(B, H, W)`` (not cropped) and its
maps ``(B, C, H, W)``.

Per cascade (each with its own weights and learned step ``dc_weight``)::

    ffx    = AᴴA x                                   (expand, column mask, reduce)
    buffer = [ffx, latent, x0, (ffx - x0) * (n_buffer - 3)]
    m, latent, history = U-Net([x, buffer], history)  (output blocks 0 and 2; 1, 3, 4 are never computed)
    x      = x - dc_weight * (ffx - x0) - m

Deliberate differences from upstream (same function, less work or fixed pitfalls; P1-P14 are the pitfalls of
docs/promptmr.md section 4): history is an immutable tuple (P1); the PReLU slope is shared within one model only
(P3); ``reduction`` is a setting (P2); ``AᴴA`` uses 1-D FFTs along W only (see :mod:`recon.models.ops`); the output
image is ``|x_c|``, equal to upstream's ``RSS_c |x_c S_c|`` because the maps have unit RSS; clamped divisors
instead of NaN on all-zero input (P6); the sensitivity U-Net in per-coil mode checkpoints each coil separately;
ACS detection is per sample.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from recon.fft import ifft2c
from recon.models.blocks import ActFactory, PromptBlock
from recon.models.checkpointing import run_region
from recon.models.config import PromptMRConfig
from recon.models.ops import column_multiplier, expand_reduce, low_frequency_columns
from recon.models.sens import SensitivityNet
from recon.models.unet import History, NormPromptUnet

_REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64}


class PromptMROutput(NamedTuple):
    """Result of :meth:`PromptMR.forward`.

    Attributes:
        image: ``(B, H, W)`` real magnitude of the centre slice, not cropped.
        sens_maps: ``(B, C, H, W)`` complex unit-RSS maps of the centre slice.
    """

    image: torch.Tensor
    sens_maps: torch.Tensor


class Cascade(nn.Module):
    """One unrolled cascade: gradient step on the data term with a learned step size, plus a prompt U-Net term.

    Args:
        cfg: the model configuration.
        act: PReLU factory.
    """

    def __init__(self, cfg: PromptMRConfig, act: ActFactory) -> None:
        super().__init__()
        a = cfg.num_adj_slices
        self.num_adj_slices = a
        self.n_buffer = cfg.n_buffer if cfg.adaptive_input else 0
        blocks = 1 + self.n_buffer
        self.unet = NormPromptUnet(
            a * blocks, a * blocks, n_feat0=cfg.n_feat0, feature_dim=cfg.feature_dim, prompt_dim=cfg.prompt_dim,
            len_prompt=cfg.len_prompt, prompt_size=cfg.prompt_size, n_enc_cab=cfg.n_enc_cab,
            n_dec_cab=cfg.n_dec_cab, n_skip_cab=cfg.n_skip_cab, n_bottleneck_cab=cfg.n_bottleneck_cab,
            kernel_size=cfg.kernel_size, reduction=cfg.reduction, act=act, use_ca=cfg.use_ca,
            learnable_prompt=cfg.learnable_prompt, n_history=cfg.n_history)
        self.dc_weight = nn.Parameter(torch.ones(1))
        self._model_term = list(range(a))
        self._with_latent = list(range(a)) + list(range(2 * a, 3 * a))  # blocks 0 and 2 (docs/promptmr.md P4)

    def forward(self, x: torch.Tensor, latent: torch.Tensor, x0: torch.Tensor, sens: torch.Tensor,
                multiplier: torch.Tensor, history: History | None,
                need_latent: bool) -> tuple[torch.Tensor, torch.Tensor | None, History | None]:
        """Update the image estimate.

        Args:
            x: current image ``(B, A, H, W)`` complex.
            latent: latent image of the previous cascade (``x0`` in the first one).
            x0: zero-filled image ``AᴴY`` ``(B, A, H, W)``.
            sens: maps ``(B, A, C, H, W)``.
            multiplier: uncentred column mask ``(B, 1, 1, 1, W)``.
            history: decoder history of earlier cascades, or None.
            need_latent: compute the next latent (False in the last cascade).

        Returns:
            ``(new x, new latent or None, new history)``.
        """
        ffx = expand_reduce(x, sens, multiplier)
        dc = ffx - x0
        a = self.num_adj_slices
        if self.n_buffer > 0:
            parts = [x, ffx, latent, x0] + [dc] * (self.n_buffer - 3)
            wanted = self._with_latent if need_latent else self._model_term
        else:
            parts, wanted, need_latent = [x], self._model_term, False
        out, history = self.unet(parts, history, wanted)
        new_latent = out[:, a:2 * a] if need_latent else None
        return x - self.dc_weight * dc - out[:, :a], new_latent, history


class PromptMR(nn.Module):
    """PromptMR+ with a learned sensitivity network and ``num_cascades`` image-domain cascades.

    Construction is deterministic from ``cfg.seed`` (weights with torch's default initialisation, fixed prompts
    from ``torch.rand``, see :func:`initialise`) and leaves every global generator untouched: the weights are
    the same on every device (drawn on the CPU and copied). Move it to float64 with ``.double()`` for
    complex128 inputs.

    Args:
        cfg: the configuration.
    """

    def __init__(self, cfg: PromptMRConfig) -> None:
        super().__init__()
        if not isinstance(cfg, PromptMRConfig):
            raise TypeError(f"PromptMR expects a PromptMRConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        target = torch.get_default_device()
        # Built on the meta device (no draws, no memory), then every draw comes from one local CPU generator in
        # construction order, so no global generator (CPU or CUDA) is read, seeded or advanced.
        with torch.device("meta"):
            act = ActFactory(nn.PReLU() if cfg.shared_prelu else None)
            self.sens_net = SensitivityNet(cfg, act)
            self.cascades = nn.ModuleList([Cascade(cfg, act) for _ in range(cfg.num_cascades)])
        self.to_empty(device=target)
        initialise(self, torch.Generator().manual_seed(cfg.seed))

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor,
                num_low_frequencies: int | torch.Tensor = -1) -> PromptMROutput:
        """Reconstruct the centre slice.

        Args:
            masked_kspace: ``(B, A, C, H, W)`` complex centred k-space, zero where not sampled.
            mask: ``(B, W)`` or ``(1, W)`` column mask (bool or 0/1).
            num_low_frequencies: ACS width, int or ``(B,)`` int tensor; -1 detects it from the mask.

        Returns:
            :class:`PromptMROutput` (image ``(B, H, W)``, maps ``(B, C, H, W)``).

        Raises:
            ValueError: a shape, dtype or value does not follow the convention above.
        """
        kspace, mask, nlf = self._check_inputs(masked_kspace, mask, num_low_frequencies)
        cfg = self.cfg
        acs = low_frequency_columns(mask, nlf)
        multiplier = column_multiplier(mask, kspace.real.dtype)
        sens, x0 = run_region("sens", self._maps_and_zero_filled, kspace, acs,
                              checkpoint=cfg.sens_use_checkpoint)
        x, latent, history = x0, x0, None
        for i, cascade in enumerate(self.cascades):
            need_latent = i < len(self.cascades) - 1
            x, latent, history = run_region("cascade", cascade, x, latent, x0, sens, multiplier, history,
                                            need_latent, checkpoint=cfg.use_checkpoint)
        centre = cfg.num_adj_slices // 2
        return PromptMROutput(x[:, centre].abs(), sens[:, centre])

    def _maps_and_zero_filled(self, kspace: torch.Tensor,
                              acs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sens = self.sens_net(kspace, acs)
        x0 = (ifft2c(kspace) * sens.conj()).sum(dim=2)
        return sens, x0

    def _check_inputs(self, kspace: torch.Tensor, mask: torch.Tensor,
                      nlf: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.cfg.num_adj_slices
        if not isinstance(kspace, torch.Tensor) or not torch.is_complex(kspace) or kspace.dim() != 5:
            got = f"{tuple(kspace.shape)} {kspace.dtype}" if isinstance(kspace, torch.Tensor) else type(kspace)
            raise ValueError(f"PromptMR: masked_kspace must be complex (B, A, C, H, W), got {got}")
        b, a_in, _, _, w = kspace.shape
        if a_in != a:
            raise ValueError(f"PromptMR: masked_kspace has {a_in} adjacent slices, the model expects {a}")
        param = next(self.parameters())
        if _REAL_OF.get(kspace.dtype) != param.dtype:
            raise ValueError(f"PromptMR: masked_kspace dtype {kspace.dtype} does not match weights {param.dtype} "
                             "(complex64 with float32, complex128 with float64)")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] not in (1, b) \
                or mask.shape[1] != w:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask)
            raise ValueError(f"PromptMR: mask must be a ({b}, {w}) column mask, got {got}")
        mask = (mask != 0).expand(b, w)
        if isinstance(nlf, torch.Tensor):
            if nlf.dim() > 1 or (nlf.dim() == 1 and nlf.shape[0] not in (1, b)) or nlf.is_floating_point() \
                    or nlf.is_complex():
                raise ValueError(f"PromptMR: num_low_frequencies must be an int or an int tensor ({b},), "
                                 f"got {tuple(nlf.shape)} {nlf.dtype}")
            nlf = nlf.to(device=kspace.device, dtype=torch.long).reshape(-1).expand(b)
        elif isinstance(nlf, int) and not isinstance(nlf, bool):
            nlf = torch.full((b,), nlf, dtype=torch.long, device=kspace.device)
        else:
            raise ValueError(f"PromptMR: num_low_frequencies must be an int or an int tensor, got {nlf!r}")
        if not kspace.is_meta:
            bad = (nlf == 0) | (nlf < -1) | (nlf > w)
            if bool(bad.any()):
                raise ValueError(f"PromptMR: num_low_frequencies must be -1 or in 1..{w}, got {nlf.tolist()}")
        return kspace, mask, nlf


def initialise(model: nn.Module, generator: torch.Generator) -> None:
    """Draw every parameter of ``model`` from ``generator`` as torch's default initialisation would, in order.

    The order of the draws is the order of construction (each module's own parameters before its children's),
    and each draw is the one ``reset_parameters`` makes (``kaiming_uniform_(a=sqrt(5))`` for the weights of
    convolutions and linear layers, ``uniform(±1/sqrt(fan_in))`` for their biases, ``rand`` for the prompts),
    so the weights equal those of the same modules built after ``torch.manual_seed(seed)``. Draws happen on the
    CPU and are copied to the parameter's device (nothing is drawn for the ``meta`` device). A shared module is
    initialised once.

    Args:
        model: a module built from Conv2d, Linear, PReLU, :class:`PromptBlock` and plain parameters (``ones``).
        generator: a CPU generator, consumed.

    Raises:
        TypeError: a module with parameters of an unknown kind (its initialisation would be guessed).
    """
    seen: set[int] = set()
    for module in model.modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, PromptBlock):
            _fill(module.prompt, torch.rand(module.prompt.shape, generator=generator))
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            weight = torch.empty(module.weight.shape)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            _fill(module.weight, weight)
            if module.bias is not None:
                fan_in = weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                _fill(module.bias, torch.empty(module.bias.shape).uniform_(-bound, bound, generator=generator))
        elif isinstance(module, nn.PReLU):
            _fill(module.weight, torch.full(module.weight.shape, module.init))
        elif isinstance(module, Cascade):
            _fill(module.dc_weight, torch.ones(module.dc_weight.shape))
        elif any(True for _ in module.parameters(recurse=False)):
            raise TypeError(f"initialise: no rule for the parameters of {type(module).__name__}")


def _fill(param: torch.Tensor, value: torch.Tensor) -> None:
    if param.is_meta:
        return
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Count unique parameters (a shared PReLU is counted once).

    Args:
        model: any module.

    Returns:
        ``(trainable, fixed)``: elements of parameters with and without ``requires_grad`` (the fixed random
        prompts are "fixed").
    """
    trainable = fixed = 0
    for p in model.parameters():  # parameters() yields each shared tensor once
        if p.requires_grad:
            trainable += p.numel()
        else:
            fixed += p.numel()
    return trainable, fixed
