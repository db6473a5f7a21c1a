"""E1's batch structure: samples of several sequences, packed or as padded rows.

An E1 sample is a run of sequences (context sequences, then the query); within-sequence layers
attend inside each sequence, global layers across the sample's sequences, causally by sequence
(``block_causal``). Shape legend as in ``e1.py``: B rows, S row length, T real tokens, H/G heads.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from ..errors import bad_type, bad_value
from ..layout import SeqInfo, pad, unpad
from ..packing import batch_info
from ..resolve import facts_of
from ..spec import block_causal, documents, same_segment
from ._inputs import keep_mask

__all__ = ["E1Batch", "e1_batch_structure", "runs_packed"]



class E1Batch(NamedTuple):
    """Everything a forward derives from its inputs once, shared by every layer.

    Two layouts, same numbers: *packed* (the real tokens of all rows in one row (1, T); document
    masks; for flex and varlen kernels, no compute on padding or across samples) and *padded*
    (the input's (B, S) rows; per-row same_segment / block_causal masks; for backends that
    materialize dense masks, which would otherwise build one (T, T) mask for the whole batch).
    Tensors below are in the chosen layout: (1, T) or (B, S).
    """

    rows: SeqInfo | None  # the input's (B, S) structure (None: full rows, no padding)
    packed: bool
    B: int
    S: int
    within_mask: object  # mask term of the within-sequence layers
    global_mask: object  # mask term of the global layers
    seq_ids: torch.Tensor  # sequence index inside its sample (embed_seq_id row), 0 at padding
    within_pos: torch.Tensor  # int64, 0 at padding
    global_pos: torch.Tensor  # int64, 0 at padding
    seq_lengths: tuple  # host: tokens per sequence, all samples in order
    sample_nseq: tuple  # host: sequences per sample

    def layout(self, t_BS: torch.Tensor) -> torch.Tensor:
        """An input-shaped (B, S, ...) tensor in this layout."""
        if not self.packed:
            return t_BS
        if self.rows is None:
            return t_BS.reshape(1, self.B * self.S, *t_BS.shape[2:])
        return self.rows.pack(t_BS)

    def tokens(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor in this layout -> (T, ...) real tokens, in packed (row-major) order."""
        if self.packed:
            return t[0]
        return t.reshape(self.B * self.S, *t.shape[2:]) if self.rows is None else unpad(t, self.rows)

    def to_rows(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor in this layout -> (B, S, ...) with zeros at padding."""
        if self.packed:
            return t[0].view(self.B, self.S, *t.shape[2:]) if self.rows is None else self.rows.unpack(t)
        if self.rows is None:
            return t
        return t * self.rows.keep.view(self.B, self.S, *([1] * (t.dim() - 2))).to(t.dtype)

    def weights_to_rows(self, w: torch.Tensor) -> torch.Tensor:
        """Attention weights in this layout -> (B, H, S, S): each row's tokens among themselves."""
        if not self.packed:
            return w
        B, S, H = self.B, self.S, w.shape[1]
        out = w.new_zeros(B, H, S, S)
        if self.rows is None:
            for r in range(B):
                out[r] = w[0, :, r * S : (r + 1) * S, r * S : (r + 1) * S]
            return out
        pos = self.rows.indices % S
        row = self.rows.indices // S
        for r in range(B):  # a row's real tokens are contiguous in the packed order
            sel = (row == r).nonzero().flatten()
            if sel.numel():
                a, e = int(sel[0]), int(sel[-1]) + 1
                p = pos[a:e]
                out[r][:, p[:, None], p[None, :]] = w[0, :, a:e, a:e]
        return out


def _sample_info(input_ids, attention_mask, seq_info) -> SeqInfo | None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = f"shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise bad_value("input_ids", "a (B, S) integer tensor", got)
    if seq_info is not None and not isinstance(seq_info, SeqInfo):
        raise bad_type("seq_info", "an anyattn.SeqInfo (one document per sample)", type(seq_info).__name__)
    keep = keep_mask(attention_mask, input_ids) if attention_mask is not None else None
    return batch_info(input_ids, keep, seq_info)


def e1_batch_structure(
    input_ids, attention_mask=None, *, seq_info=None, sequence_ids=None, within_seq_position_ids=None,
    global_position_ids=None, bos_token_id: int = 1, packed: bool = True,
) -> E1Batch:  # fmt: skip
    """Derive the packed structure of a batch.

    Samples: one per row (``attention_mask`` = padded batch, left or right padding; nothing = full
    rows) or one per document of ``seq_info`` (packed rows). Sequences inside a sample: from
    ``sequence_ids`` (B, S) (0, 1, ... per sample, any value at padding) when given, else each
    ``<bos>`` token starts a new sequence (the E1 format). Positions: from the optional (B, S)
    position tensors (E1's ``remove_X_tokens`` leaves gaps), else counted per sequence / sample.
    Reads the sequence lengths to the host once. ``packed``: the layout (see :class:`E1Batch`).
    """
    rows = _sample_info(input_ids, attention_mask, seq_info)
    B, S = input_ids.shape
    dev = input_ids.device
    if rows is None:
        samples_cu = torch.arange(0, (B + 1) * S, S, device=dev)
        flat = lambda t: t.reshape(-1)  # noqa: E731
    else:
        samples_cu = rows.cu_seqlens.long()
        flat = lambda t: unpad(t, rows)  # noqa: E731
    ids_T = flat(input_ids)
    T = ids_T.numel()
    n_samples = samples_cu.numel() - 1
    tok = torch.arange(T, device=dev)
    sample_T = torch.searchsorted(samples_cu[1:], tok, right=True)  # sample index per token
    sample_start_T = samples_cu[sample_T]
    if sequence_ids is not None:
        if not isinstance(sequence_ids, torch.Tensor) or sequence_ids.shape != input_ids.shape:
            got = tuple(sequence_ids.shape) if isinstance(sequence_ids, torch.Tensor) else type(sequence_ids).__name__
            raise bad_value("sequence_ids", f"a (B, S) = {tuple(input_ids.shape)} integer tensor like input_ids", got)
        local_T = flat(sequence_ids.to(dev)).long()
        starts = torch.ones(T, dtype=torch.bool, device=dev)
        if T:
            starts[1:] = (local_T[1:] != local_T[:-1]) | (sample_T[1:] != sample_T[:-1])
        starts_l, step_ids = starts.tolist(), local_T[starts].tolist()  # one sync
    else:
        is_bos = ids_T == bos_token_id
        starts = is_bos.clone()
        host = torch.stack((is_bos.long(), (tok == sample_start_T).long())).tolist() if T else [[], []]  # one sync
        bad = [s for s in range(T) if host[1][s] and not host[0][s]]
        if bad:
            b0 = int(sample_T[bad[0]])
            raise bad_value(
                "input_ids", f"every sample to start with <bos> (id {bos_token_id}), or pass sequence_ids=",
                f"sample {b0} starts with token id {int(ids_T[bad[0]])}",
            )  # fmt: skip
        starts_l = [bool(x) for x in host[0]]
    # host bookkeeping: sequence lengths and sequences per sample
    seq_starts = [t for t in range(T) if starts_l[t]]
    seq_lengths = tuple(b - a for a, b in zip(seq_starts, seq_starts[1:] + [T]))
    cu_samples = samples_cu.tolist()
    nseq, j = [], 0
    for s in range(n_samples):
        n0 = j
        while j < len(seq_starts) and seq_starts[j] < cu_samples[s + 1]:
            j += 1
        nseq.append(j - n0)
        if sequence_ids is not None and step_ids[n0:j] != list(range(j - n0)):
            raise bad_value("sequence_ids", "0, 1, 2, ... in order inside each sample", f"{step_ids[n0:j][:16]} in sample {s}")
    gseq_T = torch.cumsum(starts.long(), 0) - 1  # global sequence index per token
    seq_start_T = torch.tensor(seq_starts, dtype=torch.long, device=dev)[gseq_T] if T else gseq_T
    first_seq_of_sample = torch.tensor([0, *itertools.accumulate(nseq)][:n_samples], dtype=torch.long, device=dev)
    seq_ids_T = gseq_T - first_seq_of_sample[sample_T] if T else gseq_T
    within_T = tok - seq_start_T if within_seq_position_ids is None else flat(within_seq_position_ids.to(dev)).long()
    global_T = tok - sample_start_T if global_position_ids is None else flat(global_position_ids.to(dev)).long()
    single = all(n <= 1 for n in nseq)  # one sequence per sample: global layers see the same pairs
    if packed:
        within_mask = documents(SeqInfo.from_lengths([list(seq_lengths)], device=dev))
        if single:
            global_mask = within_mask
        else:
            sample_lengths = [b - a for a, b in zip(cu_samples[:-1], cu_samples[1:])]
            global_mask = documents(SeqInfo.from_lengths([sample_lengths], device=dev)) & block_causal(gseq_T)
        lay = lambda t: t.unsqueeze(0)  # noqa: E731
    else:
        if rows is None:
            lay = lambda t: t.view(B, S)  # noqa: E731
        else:
            lay = lambda t: pad(t, rows)  # noqa: E731
        seg = lay(gseq_T + 1) - 1  # -1 at padding: same_segment gives padding no keys and no queries
        within_mask = same_segment(seg)
        global_mask = within_mask if single else same_segment(lay(sample_T + 1) - 1) & block_causal(seg)
    return E1Batch(
        rows, packed, B, S, within_mask, global_mask, lay(seq_ids_T), lay(within_T), lay(global_T), seq_lengths, tuple(nseq)
    )



def _s_max(q_THD, k_TGD, is_global: bool, batch: E1Batch, scale: float) -> torch.Tensor:
    """(H,) float32: max over visible pairs (i, j) of scale * ||q_i|| * ||k_j||, per query head.

    For a query i, max_j ||q_i|| ||k_j|| = ||q_i|| * max over its visible keys of ||k_j||: the
    per-sequence max of ||k|| (within-sequence layers), or its running max over the sample's
    sequences 0..seq(i) (global layers)."""
    H, G = q_THD.shape[1], k_TGD.shape[1]
    qn = q_THD.float().norm(dim=-1)  # (T, H)
    kn = k_TGD.float().norm(dim=-1).repeat_interleave(H // G, dim=1)  # (T, H)
    T = qn.shape[0]
    if T == 0:
        return qn.new_zeros(H)
    lens = torch.tensor(batch.seq_lengths, device=qn.device)
    seq_T = torch.repeat_interleave(torch.arange(lens.numel(), device=qn.device), lens)
    kmax = torch.zeros(lens.numel(), H, device=qn.device).scatter_reduce_(0, seq_T[:, None].expand(T, H), kn, "amax")
    if is_global:
        parts, s0 = [], 0
        for n in batch.sample_nseq:  # running max over the sample's sequences (host loop, small)
            if n:
                parts.append(torch.cummax(kmax[s0 : s0 + n], dim=0).values)
            s0 += n
        kmax = torch.cat(parts)
    return (qn * kmax[seq_T]).amax(dim=0) * scale


def runs_packed(backend) -> bool:
    """Packed layout unless no requested backend takes packed documents natively (then the padded
    rows keep dense (B, S, S) masks instead of one (T, T) for the whole batch). For "auto": some
    available backend does (flex everywhere), so packed; the backend's facts decide, not a list."""
    return any(f.packed_documents for f in facts_of(backend))


