"""Scheme presets: `--scheme w4a16` (the default), `w4a16-r4`, `w8a8`, `w4a8` (servable compressed-tensors
exports), `w4a4` (the paper), `w4a4kv4`, so one name replaces six flags.

A preset fills only the options the user did not give; an explicit `--w-bits`, `--a-bits`, `--kv-bits`,
`--weights`, `--group-size`, `--w-asym`/`--w-sym`, `--act-order`/`--no-act-order`, `--w-clip`/`--no-w-clip`,
`--hessians`, `--calib-acts`, `--o-online`/`--no-o-online`, `--asym-calib`/`--no-asym-calib`, `--asym-targets`,
`--refit-scales`, `--r1-lr` or `--method` always wins, so a command that names every option does exactly what it did
before presets existed.
Without `--scheme`, the preset is the first whose bits agree with the bits given (so `--a-bits 4` alone means w4a4,
per-channel weights as in the paper, not w4a16's groups), else w4a16.
The result is a RunConfig of concrete values: nothing downstream knows presets exist.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from streamquant.errors import UserError
from streamquant.preflight import RunConfig, asym_calib_applies
from streamquant.rotate.dart import R1_CONFIG

HESSIANS_AUTO = "auto"              # preset marker: one-pass GPTQ Hessians with a rotation, sequential without
W_CLIP_AUTO = "auto"                # preset marker: the MSE clip search for GPTQ weights without a rotation only
O_ONLINE_AUTO = "auto"              # preset marker: o_proj's online Hadamard with a rotation, in the streamquant format
ASYM_CALIB_AUTO = "auto"            # preset marker: asymmetric calibration where GPTQ weights meet quantized activations
ASYM_TARGETS_AUTO = "auto"          # preset marker: the inputs before the activation quantizer if there is one, else the
                                    # full-precision model's
REFIT_AUTO = "auto"                 # preset marker: one round of GPTQ's scale refit for weight-only GPTQ, else none
AUTO_GROUP = 0                      # preset marker: the largest of GROUP_CHOICES that divides every linear input
GROUP_CHOICES = (128, 64, 32)
PRESET_KEYS = ("method", "w_bits", "a_bits", "kv_bits", "weights", "group_size", "w_symmetric", "act_order", "w_clip",
               "hessians", "calib_acts", "o_online", "asym_calib", "asym_targets", "refit_scales", "r1_lr")


@dataclass(frozen=True)
class Scheme:
    name: str
    method: str
    w_bits: int
    a_bits: int
    kv_bits: int
    weights: str
    group_size: int
    summary: str
    export: dict[str, Any] = field(default_factory=dict)   # what the scheme's serving format requires, applied as is
    w_symmetric: bool = True
    act_order: bool = False
    w_clip: bool | str = False
    hessians: str = "sequential"
    calib_acts: str = "quantized"
    o_online: bool | str = False
    asym_calib: bool | str = False
    asym_targets: str = ASYM_TARGETS_AUTO
    refit_scales: int | str = 0
    r1_lr: float = R1_CONFIG.lr   # R1's SGD step (the reference code's)


SCHEMES = {s.name: s for s in (
    # Weight-only presets, by measurement on the quality protocol (benchmarks/RESULTS.md, issue 17):
    # - QuaRot's random Hadamards, not DartQuant's learned R1/R2: over seeds 0/1/2 dart 30.37/29.82/30.47 PPL,
    #   QuaRot 29.90/30.24/30.73. The Whip loss shapes activations, which a weight-only scheme does not quantize;
    #   QuaRot skips the capture pass and R1/R2 training. --method dart is one flag away; w4a4 keeps it (it wins there).
    # - one-pass Hessians (HESSIANS_AUTO): with a rotation no worse than sequential (dart 30.59 → 30.37 and 29.82,
    #   QuaRot 30.82 → 29.90) at half the block forwards; without one worse (none 33.66 → 34.35), so sequential.
    # - act-order (static groups, so the export needs no g_idx): GPTQ g64 without rotation 38.42 → 33.66.
    # - the MSE clip search (W_CLIP_AUTO) where outliers are left in the weights: GPTQ act-order without rotation
    #   33.66 → 31.25. After a rotation it gains nothing (QuaRot 29.90 → 30.02) and RTN loses (none 39.21 → 40.09).
    # - symmetric weights although zero points measured better (--w-asym: 30.36 with act-order, no rotation):
    #   plain transformers 5.24/5.25 with compressed-tensors 0.20.1 refuses packed zero points (a size mismatch;
    #   streamquant.load and vLLM load them), and these exports must load in plain transformers.
    # - one round of GPTQ's least-squares scale refit (REFIT_AUTO: GPTQ weights, 16-bit activations): seeds 0/1/2
    #   w4a16 29.90/30.28/30.70 → 29.64/30.00/30.32, w4a16-r4 29.64/29.77/29.87 → 29.43/29.60/29.59, better on
    #   every seed, at ~+15-20 % of the README run on a CPU. Three rounds gained no more on w4a16 (29.85 mean, one
    #   seed worse) at +70 %; at W4A4 one seed measured worse (38.55 → 39.61), so W4A4 presets keep it off.
    Scheme("w4a16", "quarot", 4, 16, 16, "gptq", AUTO_GROUP, "INT4 GPTQ weights, 16-bit activations (servable)",
           act_order=True, w_clip=W_CLIP_AUTO, hessians=HESSIANS_AUTO, refit_scales=REFIT_AUTO),
    Scheme("w4a16-r4", "quarot", 4, 16, 16, "gptq", AUTO_GROUP, "w4a16 with R4 online on down_proj's input "
           "(compressed-tensors transform_config: vLLM, or streamquant.load)", {"r4_online": True}, act_order=True,
           w_clip=W_CLIP_AUTO, hessians=HESSIANS_AUTO, refit_scales=REFIT_AUTO),
    Scheme("w8a8", "dart", 8, 8, 16, "gptq", -1, "INT8 per-channel weights, dynamic symmetric per-token INT8 "
           "activations (int-quantized)", {"a_symmetric": True, "a_clip": 1.0}),
    Scheme("w4a8", "dart", 4, 8, 16, "gptq", AUTO_GROUP, "INT4 weights, dynamic symmetric per-token INT8 "
           "activations (pack-quantized)", {"a_symmetric": True, "a_clip": 1.0}),
    # W4A4: the MSE clip search, as in the rotation papers' W4A4 results: per-channel GPTQ dart 43.91 → 40.92 and
    # 46.01 → 44.84 (two code versions), QuaRot 48.97 → 43.22, QuaRot RTN 220.1 → 135.6; ~160 s of one CPU core
    # per 100M weights. Calibration on full-precision activations (--calib-acts full, QuaRot's GPTQ) measured within
    # noise of quantized ones over five seeds (42.96 against 43.13), and act-order with the clip too (43.47 against
    # 43.30 over three): both off. o_proj's online Hadamard across heads (--o-online, O_ONLINE_AUTO: with a rotation)
    # measured better for both methods on every seed: dart 43.30 → 41.88 and QuaRot 44.00 → 43.10 over three.
    # The asymmetric calibration (--asym-calib, ASYM_CALIB_AUTO: GPTQ weights, quantized activations) measured
    # better again on every seed: dart 41.88 → 39.13 and QuaRot 43.10 → 40.41 over three (dart 41.97 → 38.76 over
    # five); its shrunk variant (a quarter of the least-squares step, GPTAQ's alpha) gained less (dart seed 0: 40.87
    # against 37.57), and act-order on top nothing (seeds 0/1: 39.43/40.12 against 37.57/40.17).
    # w4a8/w8a8 keep it off: not measured there. Its targets there are the inputs before the activation quantizer;
    # the full-precision model's (--asym-targets model, sequential Hessians) measured within noise of them (dart seed 0
    # 37.24 against 37.57) at ~1.5x the time, and weight-only (dart W4A16 30.10 -> 29.37 over five seeds) at ~2x the
    # block passes of sequential GPTQ, so no preset turns that on.
    # R1's SGD step 1e-2 instead of the reference's 1e-3: better on each of seeds 0-4 (38.55/39.62/38.25/38.21/38.67
    # → 37.86/39.17/37.23/36.90/37.85; QuaRot 39.79/42.14/40.00/40.16/39.97, so dart/QuaRot 0.957 → 0.935) at no
    # extra time; at seed 0, 3e-4 39.81, 3e-3 38.54, 3e-2 39.68. w4a4kv4 keeps 1e-3: with 1e-2 seeds 0/1/2 went
    # 40.44/41.38/40.83 → 41.78/41.27/40.29 (worse on the mean), and weight-only dart worse at seed 0 (29.07 → 29.32
    # with the best W4A16 options); w4a8/w8a8 are not measured.
    Scheme("w4a4", "dart", 4, 4, 16, "gptq", -1,
           "the paper: per-channel INT4 GPTQ weights, asymmetric per-token INT4 activations", w_clip=True,
           o_online=O_ONLINE_AUTO, asym_calib=ASYM_CALIB_AUTO, r1_lr=1e-2),
    Scheme("w4a4kv4", "dart", 4, 4, 4, "gptq", -1, "w4a4 plus an INT4 KV cache", w_clip=True, o_online=O_ONLINE_AUTO,
           asym_calib=ASYM_CALIB_AUTO),
)}
DEFAULT = "w4a16"


@dataclass(frozen=True)
class Choice:
    """What a preset decided, in words for the dry run and the log."""

    scheme: str
    source: str          # "--scheme", "default", or the flags it was inferred from
    group_note: str
    refit_optional: bool = False   # the preset turned the scale refit on (prepare may turn it off to fit the GPU)

    def line(self, cfg: RunConfig) -> str:
        group = "per channel" if cfg.group_size == -1 else f"group {cfg.group_size}"
        options = [name for name, on in (("asymmetric", not cfg.w_symmetric),
                                         ("act-order", cfg.act_order and cfg.weights == "gptq"),
                                         ("MSE-clipped", cfg.w_clip),
                                         ("one-pass Hessians", cfg.hessians == "one-pass" and cfg.weights == "gptq"),
                                         (f"asymmetric calibration ({cfg.asym_targets} targets)", cfg.asym_calib),
                                         (f"scales refitted ({cfg.refit_scales} round{'s' * (cfg.refit_scales != 1)})",
                                          cfg.refit_scales > 0),
                                         ("full-precision calibration", cfg.calib_acts == "full" and cfg.a_bits < 16))
                   if on]
        w = "16-bit weights" if cfg.w_bits >= 16 else " ".join([f"W{cfg.w_bits} {cfg.weights.upper()} {group}", *options])
        rotations = f"{cfg.method} rotations" + (" + o_proj's Hadamard online" if cfg.o_online else "")
        return (f"scheme {self.scheme} ({self.source}): {rotations}, {w}, A{cfg.a_bits}, KV{cfg.kv_bits}"
                + (f"; {self.group_note}" if self.group_note else ""))


def pick_scheme(name: str | None, given: dict[str, Any]) -> tuple[Scheme, str]:
    """The preset named, or inferred from the bits given; refuses unknown and not-yet-available names."""
    if name is not None:
        if name not in SCHEMES:
            raise UserError(f"--scheme must be one of {', '.join(SCHEMES)} (got {name!r})")
        return SCHEMES[name], "--scheme"
    bits = {k: v for k, v in given.items() if k in ("w_bits", "a_bits", "kv_bits") and v is not None}
    for scheme in SCHEMES.values():
        if bits and all(getattr(scheme, k) == v for k, v in bits.items()):
            return scheme, "from " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in bits.items())
    return SCHEMES[DEFAULT], "default"


def auto_group_size(inputs: dict[str, int]) -> tuple[int, str]:
    """The largest of 128, 64, 32 that divides every quantized linear's input size, else per channel (-1)."""
    for g in GROUP_CHOICES:
        if all(n % g == 0 for n in inputs.values()):
            return g, f"group {g} divides every linear input"
    sizes = ", ".join(f"{k}={v}" for k, v in sorted(inputs.items()))
    return -1, f"per channel: no group of {'/'.join(map(str, GROUP_CHOICES))} divides every linear input ({sizes})"


def linear_inputs(model: str) -> dict[str, int]:
    """Input size of every quantized linear, from config.json (spec.dims() and the architecture's linears)."""
    from streamquant.source import resolve_model
    from streamquant.spec import read_spec

    spec = read_spec(resolve_model(model))
    dims = spec.dims()
    return {lin.inp: dims[lin.inp] for lin in spec.arch.linears}


def build_config(cfg: RunConfig, scheme: str | None, given: dict[str, Any]) -> tuple[RunConfig, Choice]:
    """`cfg` with the preset's values for every option in `given` that is None (explicit values kept as given)."""
    preset, source = pick_scheme(scheme, given)
    values = {k: (given[k] if given.get(k) is not None else getattr(preset, k)) for k in PRESET_KEYS}
    note = ""
    if given.get("group_size") is None and preset.group_size == AUTO_GROUP:   # an explicit 0 stays 0 (refused)
        values["group_size"], note = auto_group_size(linear_inputs(cfg.model)) if values["w_bits"] < 16 else (-1, "")
    if values["hessians"] == HESSIANS_AUTO:
        values["hessians"] = "sequential" if values["method"] == "none" else "one-pass"
    if values["w_clip"] == W_CLIP_AUTO:
        values["w_clip"] = values["method"] == "none" and values["weights"] == "gptq"
    if values["asym_targets"] == ASYM_TARGETS_AUTO:
        values["asym_targets"] = "input" if values["a_bits"] < 16 else "model"
    if values["asym_calib"] == ASYM_CALIB_AUTO:   # (measured with the inputs before the activation quantizer)
        values["asym_calib"] = (asym_calib_applies(values["weights"], values["w_bits"], values["a_bits"], "input")
                                and values["asym_targets"] == "input"
                                and values["calib_acts"] == "quantized")
    refit_optional = values["refit_scales"] == REFIT_AUTO
    if refit_optional:   # (measured worse at W4A4; refused with RTN)
        values["refit_scales"] = int(values["weights"] == "gptq" and values["w_bits"] < 16 and values["a_bits"] >= 16)
    if values["o_online"] == O_ONLINE_AUTO:   # (no rotation: the plain model; compressed-tensors: not expressible)
        values["o_online"] = values["method"] != "none" and cfg.format in ("auto", "streamquant")
    r1_train = replace(cfg.r1_train, lr=values.pop("r1_lr"))
    return (replace(cfg, **values, r1_train=r1_train, **(preset.export if source == "--scheme" else {})),
            Choice(preset.name, source, note, refit_optional))


def model_name(model: str) -> str:
    """The last part of a local path or Hub id ('meta-llama/Llama-2-7b-hf' -> 'Llama-2-7b-hf')."""
    return Path(model.rstrip("/")).name or "model"


def default_out(model: str, scheme: str) -> Path:
    """./<model-name>-<scheme>, the output directory when --out is not given."""
    return Path(f"{model_name(model)}-{scheme}")
