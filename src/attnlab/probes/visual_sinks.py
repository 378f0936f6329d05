"""Visual attention sinks: image tokens with massive activations in the sink dimensions (VAR's detection).

Kang et al. 2025, "See What You Are Told: Visual Attention Sink in Large Multimodal Models" (ICLR 2025; METHODS.md
#8, high confidence; code seilk/VisAttnSink ``src/logic/logic.py``): with φ(x) = |x / √(mean(x²) + ε)| (RMSNorm
without its gain) of the residual stream x entering a decoder layer, a token is a *sink* at that layer when
``max_{d ∈ D_sink} φ(x)[d] > τ`` (τ = 20). VAR fixes D_sink per base model ({1415, 2533} for LLaMA-2-7B, i.e.
LLaVA-1.5-7B); pass them as ``dims``. Without ``dims`` the probe finds them per sequence and layer as the
``top_dims`` dimensions with the largest φ over the sequence's real tokens (:func:`attnlab.functional.sink_dims.
sink_flags`, the detector the ``var`` edit uses too),
and reports how often each dimension was chosen (``sink_dim_rate``): in layers without massive activations the
chosen dimensions are arbitrary, and τ keeps such layers free of sinks.

Visual sinks are the sink tokens inside an image span, text sinks the others (BOS, punctuation, generated tokens).
Per layer the probe counts both; per image (the first ``overlays`` sequences in global order) it keeps, for every
image token and layer, whether the token was a sink, drawn as the fraction of layers on the image.

The hidden states are the decoder layer's input at the call's query tokens (``call.hidden_states``). When the
session does not fill them, the previous layer's output (``on_hidden_states``; the same tensor in a plain decoder)
stands in, so layer 0 then has no data. Padding never counts. Decoding steps (q_len < kv_len) add their new
tokens (role ``generated``: text sinks), judged on the D_sink of the layer's prompt call (as VAR does), and count no
new sequence (sequences, ``sink_dim_rate`` and max φ come from prompt calls). No head enters (GQA does not matter).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.functional.sink_dims import sink_flags, sink_peak
from attnlab.params import IndexList, Range, validated
from attnlab.probes import PROBES
from attnlab.probes.base import AttentionCall, ModelFacts, Probe, Row, RowWriter, SequenceInfo, safe_div
from attnlab.report.sections import Column, ImageOverlay, LayerCurve, Section, Series, Table, Text
from attnlab.roles import IMAGE

_COUNTS = ("image_sinks", "image_tokens", "images", "text_sinks", "text_tokens", "sequences", "phi_image_sum",
           "phi_image_count", "phi_text_sum", "phi_text_count")
logger = logging.getLogger(__name__)


@PROBES.register("visual_sinks")
class VisualSinksProbe(Probe):
    """VAR's sink tokens per layer: visual (image) and text sinks, and each image's sink tokens on the image.

    Args:
        dims: the sink dimensions D_sink (indices into the hidden size); None (default) = found per sequence and
            layer (the ``top_dims`` dimensions with the largest φ over its real tokens, on its prompt call).
        top_dims: how many dimensions are found when ``dims`` is None (default 2, as VAR's D_sink; the ``var``
            edit's parameter of the same name).
        tau: the sink threshold on φ (default 20, VAR's τ).
        overlays: how many sequences (the first ones, in global order) keep per-image-token flags (default 4).
    """

    shardable = True  # export_state/import_state carry the whole state (per-image flags as JSON side parts)
    needs = frozenset({"value", "hidden_states"})  # begin_call on every path; the layer inputs

    sections = (Section("visual-sinks", "Visual attention sinks (VAR)", (
        Text(template="Warning: {tau_note}", when="tau_note"),
        Text(template="A token is a sink at a layer when the largest φ(x) = |x / rms(x)| of its residual stream over "
                      "the sink dimensions exceeds τ = {tau} (Kang et al. 2025, VAR). Sink dimensions: {dims_used}. "
                      "Image tokens that are sinks: {percent.image_sink_fraction} % (mean over layers)."),
        LayerCurve((Series("image_sink_fraction", "image tokens"), Series("text_sink_fraction", "text tokens")),
                   title="sink tokens per layer", ylabel="fraction of tokens that are sinks",
                   alt="Fraction of image and text tokens that are sinks, by layer",
                   caption="Share of image tokens (visual sinks) and of the other real tokens (text sinks) whose φ on "
                           "the sink dimensions exceeds τ = {tau}, by layer (input of the layer)."),
        LayerCurve((Series("max_phi_image", "image tokens"), Series("max_phi_text", "text tokens")),
                   title="largest φ on the sink dimensions", ylabel="φ (RMS-normalised |x|)", logy=True,
                   alt="Largest phi per layer", caption="Largest φ over the sink dimensions per sequence, mean over "
                                                         "sequences; τ = {tau} separates sinks."),
        Table((Column("image_sinks_per_image", "visual sinks per image"),
               Column("text_sinks_per_sequence", "text sinks per sequence"),
               Column("image_sink_fraction", "share of image tokens")), index="picked_layers", index_header="layer",
              title="Sink counts", caption="First, middle and last layer, then the mean over every layer."),
        ImageOverlay(extras="sink_grids", label="share of layers where the token is a sink", vmin=0.0, vmax=1.0,
                     when="sink_grids", alt="Visual sink tokens drawn on each input image",
                     caption="Each image token's share of layers in which it is a visual sink (φ > τ = {tau}), on "
                             "the image; circles mark tokens that are sinks in at least half of the layers."),
    )),)

    @validated
    def __init__(self, dims: IndexList | None = None, top_dims: Annotated[int, Range(ge=1, le=64)] = 2,
                 tau: Annotated[float, Range(gt=0.0)] = 20.0,
                 overlays: Annotated[int, Range(ge=0, le=4096)] = 4) -> None:
        self.dims, self.top_dims, self.tau, self.overlays = dims, top_dims, tau, overlays

    def bind(self, facts: ModelFacts) -> None:
        super().bind(facts)
        D = facts.hidden_size
        if self.dims is not None and max(self.dims) >= D:
            raise ConfigError(f"visual_sinks dims must be below the hidden size {D}, got {max(self.dims)}")
        if self.dims is None and self.top_dims > D:
            raise ConfigError(f"visual_sinks top_dims={self.top_dims} exceeds the hidden size {D}")
        if self.tau_note():
            logger.warning("visual_sinks: %s", self.tau_note())
        L = facts.num_layers
        for name in _COUNTS:
            setattr(self, name, torch.zeros(L, dtype=torch.float64))
        self.dim_count = torch.zeros(L, D, dtype=torch.float64)  # sequences in which each dim was found
        # (global sequence, image index) -> [flags (L, length) float64 (1 = sink), layers seen (L,), rows, cols, frames]
        self.flags: dict[tuple[int, int], list[Any]] = {}
        self._pending: dict[int, Tensor] = {}
        self._dims: dict[int, Tensor] = {}  # layer -> (B, k) D_sink of its last prompt call, for decode calls

    # the layer inputs -----------------------------------------------------------------------------------------
    def on_hidden_states(self, layer_idx: int, hidden_states: Tensor, sequence: SequenceInfo) -> None:
        """Keep block ``layer_idx``'s output: the next layer's input, used when the call has no hidden_states."""
        last = layer_idx + 1 >= self.dim_count.shape[0]  # the last block's output feeds no layer: keep nothing
        self._pending = {} if last else {layer_idx + 1: hidden_states}

    def _inputs(self, call: AttentionCall) -> Tensor | None:
        hidden = call.hidden_states
        if hidden is None:
            hidden = self._pending.pop(call.layer_idx, None)
        if hidden is None or hidden.dim() != 3 or hidden.shape[:2] != call.query_valid.shape:
            return None
        return hidden

    def begin_call(self, call: AttentionCall) -> None:
        """Count the call's sinks: D_sink per sequence on a prompt call (q_len = kv_len), the prompt call's D_sink
        of the same layer on a decode call (q_len < kv_len; found on the call's own tokens only when no prompt call
        of this batch size ran before). Sequences, D_sink counts and max φ count on prompt calls only."""
        hidden = self._inputs(call)
        if hidden is None:
            return
        layer, (B, Lq) = call.layer_idx, call.query_valid.shape
        valid = call.query_valid.to(hidden.device)
        image = valid & (call.query_roles.to(hidden.device) == IMAGE) if call.query_roles is not None \
            else torch.zeros_like(valid)
        other = valid & ~image
        q_offset = call.sequence.valid.shape[1] - Lq  # query row i is mask column q_offset + i
        prompt = q_offset == 0
        stored = self._dims.get(layer)
        dims = self.dims if self.dims is not None else \
            None if prompt or stored is None or stored.shape[0] != B else stored
        flags, dims = sink_flags(hidden, valid, dims, top=self.top_dims, tau=self.tau)  # (B, Lq), (B, k)
        if prompt and self.dims is None:
            self._dims[layer] = dims
        peak = sink_peak(hidden, dims)  # (B, Lq)
        for b in range(B):
            if not bool(valid[b].any()):
                continue
            for mask, sinks, tokens in ((image[b], self.image_sinks, self.image_tokens),
                                        (other[b], self.text_sinks, self.text_tokens)):
                sinks[layer] += float((flags[b] & mask).sum())
                tokens[layer] += float(mask.sum())
            if not prompt:
                continue
            self.sequences[layer] += 1
            if self.dims is None:
                self.dim_count[layer, dims[b].cpu()] += 1
            for mask, phi_sum, phi_count in ((image[b], self.phi_image_sum, self.phi_image_count),
                                             (other[b], self.phi_text_sum, self.phi_text_count)):
                if bool(mask.any()):
                    phi_sum[layer] += float(peak[b][mask].max())
                    phi_count[layer] += 1
            spans = [span for span in call.images if span.sequence == b and span.start >= q_offset
                     and span.end - q_offset <= Lq]  # images whose tokens are queries of this call
            self.images[layer] += len(spans)
            sequence = call.sequence.sequence_offset + b
            if sequence >= self.overlays:
                continue
            L = self.dim_count.shape[0]
            for span in spans:
                entry = self.flags.setdefault((sequence, span.index), [
                    torch.zeros(L, span.length, dtype=torch.float64), torch.zeros(L, dtype=torch.float64),
                    span.rows, span.cols, span.frames])
                entry[0][layer] += flags[b, span.start - q_offset:span.end - q_offset].double().cpu()
                entry[1][layer] += 1

    # state ---------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in (*_COUNTS, "dim_count")}

    def merge(self, other: Probe) -> None:
        super().merge(other)
        for key, (flags, seen, *shape) in other.flags.items():  # type: ignore[attr-defined]
            mine = self.flags.get(key)
            self.flags[key] = [flags.clone(), seen.clone(), *shape] if mine is None else \
                [mine[0] + flags, mine[1] + seen, *shape]

    def export_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``state()`` plus ``flags``: ``[[sequence, image, rows, cols, frames, [[per-layer flags]], [seen]]]``."""
        tensors, side = super().export_state()
        flags = [[s, i, r, c, f, flag.tolist(), seen.tolist()]
                 for (s, i), (flag, seen, r, c, f) in sorted(self.flags.items())]
        return tensors, {**side, "flags": flags}

    def import_state(self, tensors: dict[str, Tensor], side: dict[str, Any]) -> None:
        super().import_state(tensors, side)
        self.flags = {(s, i): [torch.tensor(flag, dtype=torch.float64), torch.tensor(seen, dtype=torch.float64),
                               r, c, f] for s, i, r, c, f, flag, seen in side["flags"]}
        self._pending, self._dims = {}, {}

    # results -------------------------------------------------------------------------------------------------
    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        for stat, numerator, denominator in (
                ("image_sink_fraction", self.image_sinks, self.image_tokens),
                ("image_sinks_per_image", self.image_sinks, self.images),
                ("text_sink_fraction", self.text_sinks, self.text_tokens),
                ("text_sinks_per_sequence", self.text_sinks, self.sequences),
                ("max_phi_image", self.phi_image_sum, self.phi_image_count),
                ("max_phi_text", self.phi_text_sum, self.phi_text_count)):
            out.add_indexed(stat, safe_div(numerator, denominator), denominator > 0, ("layer",))
        if self.dims is None:
            rate = safe_div(self.dim_count, self.sequences[:, None].expand_as(self.dim_count))
            out.add_indexed("sink_dim_rate", rate, self.dim_count > 0, ("layer", "position"))
        return out.rows

    def dims_used(self) -> list[int]:
        """The given dims, or the ``top_dims`` dims found most often (sequences × layers), most frequent first."""
        if self.dims is not None:
            return list(self.dims)
        total = self.dim_count.sum(dim=0)
        found = int((total > 0).sum())
        return total.topk(min(self.top_dims, found)).indices.tolist() if found else []

    def sink_grids(self) -> list[dict[str, Any]]:
        """One record per image: sequence, image_index, rows, cols, frames, ``grid`` (share of the layers seen in
        which each token is a sink, rows × cols, mean over frames), ``markers`` (tokens that are sinks in at least
        half of the layers), ``layers`` ([layer, [[row, col], …]] per layer with a sink: the flags per token and
        layer, frame 0 for videos' first frame only when frames = 1)."""
        records = []
        for (sequence, index), (flags, seen, r, c, f) in sorted(self.flags.items()):
            layers = seen > 0
            if not bool(layers.any()):
                continue
            share = (flags[layers] / seen[layers, None]).mean(dim=0).reshape(f, r, c).mean(dim=0)  # (rows, cols)
            per_layer = []
            for layer in layers.nonzero().flatten().tolist():
                cells = (flags[layer] > 0).nonzero().flatten().tolist()
                if cells:
                    per_layer.append([layer, [[(t % (r * c)) // c, t % c] for t in cells]])
            records.append({"sequence": sequence, "image_index": index, "rows": r, "cols": c, "frames": f,
                            "grid": [[round(v, 6) for v in line] for line in share.tolist()],
                            "markers": (share >= 0.5).nonzero().tolist(), "layers": per_layer,
                            "sinks": int((flags[layers] > 0).sum()),
                            "title": f"sequence {sequence}, image {index}"})
        return records

    def tau_note(self) -> str:
        """Non-empty when no token can be a sink: φ ≤ √D (all of x's RMS in one dimension), so τ ≥ √D is never
        exceeded."""
        bound = self.facts.hidden_size ** 0.5
        if self.tau < bound:
            return ""
        return (f"τ = {self.tau:g} cannot be exceeded on this model (φ ≤ √D = √{self.facts.hidden_size} ≈ "
                f"{bound:.1f}), so no token is a sink; pass --probe-arg visual_sinks.tau=… below {bound:.1f}")

    def extras(self, decode: Any = None) -> dict[str, Any]:
        dims = self.dims_used()
        described = ", ".join(map(str, dims)) if dims else "none found"
        return {"tau": self.tau, "dims": list(self.dims) if self.dims is not None else None, "top_dims": self.top_dims,
                "dims_used": described + ("" if self.dims is not None else " (found per sequence and layer; most "
                                                                             "frequent shown)"),
                "overlays": self.overlays, "sink_grids": self.sink_grids(), "tau_note": self.tau_note()}
