"""What every family of ``anyattn bench model --family`` shares: the :class:`Family` interface,
:class:`Unavailable`, and the helpers that build and load HF reference models (``families.py``
lists the families)."""

from __future__ import annotations


import torch

__all__ = ["Family", "Unavailable"]


class Unavailable(Exception):
    """A row that cannot run here (no such model in this transformers, no port written)."""


def _transformers():
    import transformers

    return transformers


def _strict_load(model, sd: dict, what: str, *, ignore=(), assign=False) -> None:
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    res = model.load_state_dict(sd, strict=False, assign=assign)
    missing = [k for k in res.missing_keys if not k.endswith("inv_freq")]
    if missing or res.unexpected_keys:
        raise ValueError(f"{what}: the run's weights do not fit: missing {missing[:5]}, unexpected {res.unexpected_keys[:5]}")


def _hf_check_impl(hf, impl: str) -> None:
    got = str(getattr(hf.config, "_attn_implementation", "?"))
    if got != impl:
        raise RuntimeError(f"transformers chose attn_implementation={got!r}, not {impl!r}")


def _hf_build(cls, config, impl: str, device):
    """``cls._from_config(config, attn_implementation=impl)``; transformers refusing the
    implementation for this class (ValueError / ImportError at construction) is Unavailable."""
    try:
        with torch.device(device):
            return cls._from_config(config, attn_implementation=impl)
    except (ValueError, ImportError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Unavailable(f"transformers {_transformers().__version__} {cls.__name__} refuses attn_implementation={impl!r}: {msg[:200]}") from e


def _tf32_off():
    """Context: float32 matmuls without TF32 (the float32 reference)."""

    class _Ctx:
        def __enter__(self):
            self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

        def __exit__(self, *exc):
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved

    return _Ctx()


class Family:
    """One family's adapter. Subclasses fill in the hooks; ``cfg`` is the anyattn config object."""

    name = ""
    presets: tuple = ()
    default_preset = ""
    hf_name = ""  # what the HF row runs, for the notes
    mask_id: int | None = None  # a <mask> token put into the check batch (token dropout paths)
    output_name = "last hidden state"
    flop_formula = ""

    # -- shapes and tokens
    def config(self, preset: str):
        raise NotImplementedError

    def quick_config(self):
        raise NotImplementedError

    def describe(self, cfg) -> dict:
        return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))

    @property
    def pad_id(self) -> int:
        raise NotImplementedError

    def encode(self, seq: str) -> list[int]:
        raise NotImplementedError

    def residues(self, n_tokens: int) -> slice:
        """Where the residues sit in a sequence of ``n_tokens`` tokens (for pooled checks)."""
        return slice(1, n_tokens - 1)

    # -- weights and models
    def template(self, cfg, device, dtype, seed: int) -> dict:
        raise NotImplementedError

    def anyattn(self, cfg, sd: dict, device, dtype, **config):
        raise NotImplementedError

    def output(self, model_out):
        return model_out.last_hidden_state

    def call_anyattn(self, model):
        return lambda x: model(x[0], attention_mask=x[1])

    def hf(self, cfg, sd: dict, device, dtype, impl: str):
        """A callable ``(input_ids, attention_mask) -> model output`` of HF's model."""
        raise Unavailable(f"transformers has no {self.name} model")

    def hf_output(self, out):
        return out.last_hidden_state

    def port(self, cfg, sd: dict, device, dtype):
        """A callable ``(input_ids, attention_mask) -> output tensor``."""
        raise Unavailable(f"no FastPLMs-style port of {self.name} is written here")

    def reference32(self, cfg, sd: dict, device):
        """(kind, description, callable x -> output tensor) of the float32 reference: HF eager
        ("hf"), else the port ("port"), else anyattn's own eager backend ("anyattn": not an
        independent reference). Call it with TF32 off."""
        sd32 = {k: v.float() for k, v in sd.items()}
        try:
            try:
                hf = self.hf(cfg, sd32, device, torch.float32, "eager")
            except Unavailable:
                raise
            except Exception as e:  # noqa: BLE001 - this transformers' model cannot be built here: fall back
                raise Unavailable(f"HF {self.hf_name} could not be built: {type(e).__name__}: {str(e).strip()[:200]}") from e
            return "hf", f"HF {self.hf_name} eager, float32, TF32 off", (lambda x: self.hf_output(hf(*x)))
        except Unavailable as why_hf:
            try:
                p = self.port(cfg, sd32, device, torch.float32)
                return "port", f"the sdpa port in float32, TF32 off (no HF row: {why_hf})", (lambda x: p(*x))
            except Unavailable as why_port:
                m = self.anyattn(cfg, sd32, device, torch.float32, attn_backend="eager")
                call = self.call_anyattn(m)
                what = (f"anyattn's own model on the eager backend, float32, TF32 off: NOT an independent reference "
                        f"(no HF row: {why_hf}; no port: {why_port})")  # fmt: skip
                return "anyattn", what, (lambda x: self.output(call(x)))

    def flops(self, cfg, tokens) -> float:
        raise NotImplementedError
