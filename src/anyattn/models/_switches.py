"""The run-time switches every protein model of anyattn.models has, as properties over its config
(``save_pretrained`` keeps them; every layer reads them at each call)."""

from __future__ import annotations

from ..errors import bad_value
from ..resolve import check_backend


def backend_value(value, name: str = "attn_backend"):
    """An ``attn_backend`` setting: "auto", a backend name, or a list of names (kept as a tuple,
    what a JSON round trip of a config gives back); the error names ``name`` and lists the valid
    values."""
    if isinstance(value, list):
        value = tuple(value)
    try:
        check_backend(value)
    except ValueError as e:
        raise bad_value(name, str(e).split(": expected ", 1)[-1].split(", got ")[0], repr(value)) from None
    return value


class AttnBackendSwitch:
    """``model.attn_backend = "flex"`` switches every layer."""

    @property
    def attn_backend(self):
        return self.config.attn_backend

    @attn_backend.setter
    def attn_backend(self, value) -> None:
        self.config.attn_backend = backend_value(value)


class PackPaddedSwitch:
    """``model.pack_padded``: "auto", True or False (anyattn.packing.plan_batch)."""

    @property
    def pack_padded(self):
        return self.config.pack_padded

    @pack_padded.setter
    def pack_padded(self, value) -> None:
        if value not in ("auto", True, False):
            raise bad_value("pack_padded", "'auto', True or False", repr(value))
        self.config.pack_padded = value
