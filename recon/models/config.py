"""Typed, validated configuration of the PromptMR+ network (docs/promptmr.md section 1.8).

Every hyper-parameter of the network is a field of the frozen dataclass :class:`PromptMRConfig`; lists are tuples
so that a configuration is hashable and cannot change after construction. Two presets exist:

* ``"smartify"``: the team's reduced model (docs/pipeline.md section 4.1): 8 cascades, widths 8/[24,32,40]/[8,16,24],
  sensitivity widths 8/[12,16,20]/[4,8,12], 3 prompts of size [16,8,4], CA reduction 2, n_history 3, one slice
  (no adjacent slices), checkpointing and per-coil sensitivities on (sized for an 8 GB GPU).
* ``"promptmr-plus"``: the upstream defaults (``configs/model/pmr-plus.yaml``): 12 cascades, 5 adjacent slices,
  widths 48/[72,96,120]/[24,48,72], 5 prompts of size [64,32,16], reduction 4, n_history 11.

The ``sens_*`` structure fields left as ``None`` fall back to the main network's value, as upstream does.
Bad values raise :class:`recon.errors.InputError` naming the key and what was expected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from recon import sections
from recon.errors import InputError
from recon.sections import Section

@dataclass(frozen=True)
class PromptMRConfig(Section):
    """All hyper-parameters of :class:`recon.models.promptmr.PromptMR`.

    Attributes:
        num_cascades: number of unrolled cascades (0 gives the zero-filled image with learned maps).
        num_adj_slices: adjacent slices per sample, odd (the centre one is reconstructed).
        n_feat0: width of the full-resolution level of each cascade U-Net.
        feature_dim: widths of the three down-sampled levels.
        prompt_dim: prompt channels of the three decoder levels (level 1 first).
        sens_n_feat0: like ``n_feat0`` for the sensitivity U-Net.
        sens_feature_dim: like ``feature_dim`` for the sensitivity U-Net.
        sens_prompt_dim: like ``prompt_dim`` for the sensitivity U-Net.
        len_prompt: number of fixed prompt tensors per decoder level.
        prompt_size: spatial size of the prompt tensors per decoder level.
        n_enc_cab: channel-attention blocks per encoder level.
        n_dec_cab: fuse blocks per decoder level (level 1 first).
        n_skip_cab: blocks on each skip connection.
        n_bottleneck_cab: blocks in the bottleneck.
        sens_len_prompt, sens_prompt_size, sens_n_enc_cab, sens_n_dec_cab, sens_n_skip_cab, sens_n_bottleneck_cab,
            sens_use_ca: the sensitivity U-Net's values; ``None`` means "same as the cascades".
        kernel_size: kernel of the 3x3 convolutions (odd).
        reduction: channel-attention reduction (hidden width ``C // reduction``); upstream hard-codes 4.
        use_ca: channel attention in every block (upstream ``no_use_ca=False``).
        learnable_prompt: train the prompt tensors instead of keeping the fixed random ones.
        adaptive_input: feed the buffer ``[AᴴAx, latent, x0, AᴴAx - x0, ...]`` to each cascade.
        n_buffer: buffer blocks (>= 3 with ``adaptive_input``, 0 without).
        n_history: decoder features of earlier cascades fed to the momentum layers (0 = off).
        use_sens_adj: the sensitivity U-Net sees a coil's adjacent slices as channels.
        shared_prelu: one PReLU slope shared by all blocks of the model, except the first block of each encoder,
            as upstream (docs/promptmr.md P3, but per model instance); ``False`` gives every block its own slope.
        mask_center: estimate maps from the ACS columns only (upstream ``mask_center``).
        use_checkpoint: exact (non-reentrant) activation checkpointing of each cascade.
        sens_use_checkpoint: the same for the sensitivity network.
        sens_per_coil: run the sensitivity U-Net one coil at a time (each in its own checkpoint when
            ``sens_use_checkpoint``), trading time for memory.
        seed: seed of the weight initialisation and of the fixed random prompts.
    """

    num_cascades: int = 8
    num_adj_slices: int = 1
    n_feat0: int = 8
    feature_dim: tuple[int, int, int] = (24, 32, 40)
    prompt_dim: tuple[int, int, int] = (8, 16, 24)
    sens_n_feat0: int = 8
    sens_feature_dim: tuple[int, int, int] = (12, 16, 20)
    sens_prompt_dim: tuple[int, int, int] = (4, 8, 12)
    len_prompt: tuple[int, int, int] = (3, 3, 3)
    prompt_size: tuple[int, int, int] = (16, 8, 4)
    n_enc_cab: tuple[int, int, int] = (2, 3, 3)
    n_dec_cab: tuple[int, int, int] = (2, 2, 3)
    n_skip_cab: tuple[int, int, int] = (1, 1, 1)
    n_bottleneck_cab: int = 3
    sens_len_prompt: tuple[int, int, int] | None = None
    sens_prompt_size: tuple[int, int, int] | None = None
    sens_n_enc_cab: tuple[int, int, int] | None = None
    sens_n_dec_cab: tuple[int, int, int] | None = None
    sens_n_skip_cab: tuple[int, int, int] | None = None
    sens_n_bottleneck_cab: int | None = None
    sens_use_ca: bool | None = None
    kernel_size: int = 3
    reduction: int = 2
    use_ca: bool = True
    learnable_prompt: bool = False
    adaptive_input: bool = True
    n_buffer: int = 4
    n_history: int = 3
    use_sens_adj: bool = True
    shared_prelu: bool = True
    mask_center: bool = True
    use_checkpoint: bool = True
    sens_use_checkpoint: bool = True
    sens_per_coil: bool = True
    seed: int = 430

    def validate(self) -> None:
        """Check the values together (types are checked on construction, see :class:`recon.sections.Section`).

        Raises:
            recon.sections.FieldError: a value out of range or inconsistent with another.
        """
        need = self.require
        need(self.num_cascades >= 0, "num_cascades", "must be >= 0")
        need(self.num_adj_slices >= 1 and self.num_adj_slices % 2 == 1, "num_adj_slices", "must be an odd number >= 1")
        for key in ("n_feat0", "sens_n_feat0", "kernel_size", "reduction"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(self.kernel_size % 2 == 1, "kernel_size", "must be an odd kernel size")
        for key in ("feature_dim", "prompt_dim", "sens_feature_dim", "sens_prompt_dim", "len_prompt", "prompt_size",
                    "sens_len_prompt", "sens_prompt_size"):
            value = getattr(self, key)
            need(value is None or min(value) >= 1, key, "must have values >= 1")
        for key in ("n_enc_cab", "sens_n_enc_cab"):
            value = getattr(self, key)
            need(value is None or min(value) >= 1, key, "must have values >= 1 (each encoder level needs a block)")
        for key in ("n_dec_cab", "n_skip_cab", "sens_n_dec_cab", "sens_n_skip_cab"):
            value = getattr(self, key)
            need(value is None or min(value) >= 0, key, "must have values >= 0")
        need(self.n_bottleneck_cab >= 0, "n_bottleneck_cab", "must be >= 0")
        need(self.sens_n_bottleneck_cab is None or self.sens_n_bottleneck_cab >= 0, "sens_n_bottleneck_cab",
             "must be >= 0")
        need(self.n_history >= 0, "n_history", "must be >= 0")
        # With N cascades at most N - 1 earlier features exist; a longer history only repeats the first one.
        need(self.n_history == 0 or self.n_history < self.num_cascades, "n_history",
             f"must be 0 or less than num_cascades ({self.num_cascades})")
        if self.adaptive_input:
            # The buffer is [AᴴAx, latent, x0] plus (n_buffer - 3) copies of AᴴAx - x0 (docs/promptmr.md P12).
            need(self.n_buffer >= 3, "n_buffer", "must be >= 3 when adaptive_input is true")
        else:
            need(self.n_buffer == 0, "n_buffer", "must be 0 when adaptive_input is false (pitfall P12)")
        need(self.seed >= 0, "seed", "must be >= 0")
        # Values that would give zero-channel attention layers (docs/promptmr.md P2) are refused.
        if self.use_ca:
            narrowest = min(self.n_feat0, *self.feature_dim)
            need(self.reduction <= narrowest, "reduction",
                 f"must be <= {narrowest}, the narrowest cascade width (else a 0-channel attention layer)")
        if self.sens_ca:
            narrowest = min(self.sens_n_feat0, *self.sens_feature_dim)
            need(self.reduction <= narrowest, "reduction",
                 f"must be <= {narrowest}, the narrowest sensitivity-net width (else a 0-channel attention layer)")

    # ----- resolved sensitivity-net structure -------------------------------------------------------------
    @property
    def sens_ca(self) -> bool:
        """Channel attention in the sensitivity U-Net (falls back to ``use_ca``)."""
        return self.use_ca if self.sens_use_ca is None else self.sens_use_ca

    def sens_structure(self) -> dict[str, Any]:
        """The sensitivity U-Net's block counts and prompt shapes, with ``None`` resolved to the main values."""
        def pick(name: str) -> Any:
            value = getattr(self, "sens_" + name)
            return getattr(self, name) if value is None else value

        return {name: pick(name) for name in ("len_prompt", "prompt_size", "n_enc_cab", "n_dec_cab", "n_skip_cab",
                                              "n_bottleneck_cab")}

    # ----- serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples become lists) suitable for YAML/JSON and MLflow params."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PromptMRConfig":
        """Build a configuration from a plain mapping; missing keys take the dataclass defaults.

        Args:
            data: mapping of field names to values (lists are accepted for tuple fields).

        Returns:
            The validated configuration.

        Raises:
            InputError: a key is unknown or a value is invalid.
        """
        return sections.from_dict(cls, data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "PromptMRConfig":
        """A named preset with optional overrides.

        Args:
            name: ``"smartify"`` (the team's reduced model) or ``"promptmr-plus"`` (upstream defaults).
            **overrides: field values replacing the preset's.

        Returns:
            The validated configuration.

        Raises:
            InputError: unknown preset, unknown key or invalid value.
        """
        if name not in PRESETS:
            raise InputError(f"PromptMRConfig: unknown preset {name!r} (expected one of {', '.join(PRESETS)})")
        merged = dict(PRESETS[name])
        merged.update(overrides)
        return cls.from_dict(merged)

    def replace(self, **changes: Any) -> "PromptMRConfig":
        """A copy with some fields changed (validated; unknown keys raise :class:`InputError`)."""
        return type(self).from_dict({**self.to_dict(), **changes})


PRESETS: dict[str, dict[str, Any]] = {
    # docs/pipeline.md 4.1: the team's model, sized so that "+1 to any width -> OOM" on an 8 GB GPU.
    "smartify": {},
    # docs/promptmr.md 1.8 (upstream configs/model/pmr-plus.yaml); CA reduction 4 is upstream's hard-coded default.
    "promptmr-plus": {
        "num_cascades": 12, "num_adj_slices": 5, "n_feat0": 48, "feature_dim": (72, 96, 120),
        "prompt_dim": (24, 48, 72), "sens_n_feat0": 24, "sens_feature_dim": (36, 48, 60),
        "sens_prompt_dim": (12, 24, 36), "len_prompt": (5, 5, 5), "prompt_size": (64, 32, 16),
        "reduction": 4, "n_history": 11, "use_checkpoint": False, "sens_use_checkpoint": False,
        "sens_per_coil": False, "seed": 42,
    },
}
