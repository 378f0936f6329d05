"""The ``astar`` probe (A-STAR's segregation loss per layer) against maps recomputed from the modules' inputs."""

from __future__ import annotations

import pytest
import torch
from diffusion.maps_oracle import captured_probs

from attnlab.diffusion import DiffusionSession
from attnlab.errors import ConfigError
from attnlab.functional.cross_maps import segregation_loss, spatial_maps
from attnlab.probes.astar import AStarProbe
from attnlab.testing import tiny_diffusers


@pytest.mark.parametrize("block_size", [5, 128])  # 16 patch rows: blocks that split them, and one block
def test_segregation_per_layer_matches_recomputed_maps(block_size):
    model, inputs = tiny_diffusers("pixart")
    modules = {1: model.transformer_blocks[0].attn2, 3: model.transformer_blocks[1].attn2}
    with torch.no_grad(), captured_probs(modules) as seen, DiffusionSession(
            model, probes=[AStarProbe(concepts=(1, 3, 4))], block_size=block_size, probe_kernel="blocked") as session:
        model(**inputs(batch=2, text=5))
    frame = session.results()
    for layer in (1, 3):
        maps = spatial_maps(seen[layer][0].double(), (1, 4, 4))  # (B, T, 1, 4, 4), mean over heads
        expected = float(segregation_loss(maps, [1, 3, 4]).mean())
        row = frame[(frame.statistic == "segregation") & (frame.layer == layer)]
        assert float(row["value"].iloc[0]) == pytest.approx(expected, rel=1e-6)
        shares = frame[(frame.statistic == "concept_share") & (frame.layer == layer)].sort_values("position")
        text = seen[layer][0].double().mean(dim=1)  # (B, P, T): each row sums to 1 over the text keys
        assert shares["value"].tolist() == pytest.approx(text[..., [1, 3, 4]].mean(dim=(0, 1)).tolist(), rel=1e-6)
    assert set(frame[frame.statistic == "segregation"]["layer"]) == {1, 3}  # self calls skipped


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_joint_calls_use_their_image_to_text_block(kind):
    model, inputs = tiny_diffusers(kind)
    with torch.no_grad(), DiffusionSession(model, probes=[AStarProbe(concepts=(0, 2))]) as session:
        model(**inputs(text=5))
    values = session.results().query("statistic == 'segregation'")["value"]
    assert len(values) == session.facts.num_layers and ((values >= 0) & (values <= 1)).all()


def test_padded_caption_tokens_count_as_zero_attention():
    model, inputs = tiny_diffusers("pixart")
    x = inputs(batch=2, text=5)
    x["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad(), DiffusionSession(model, probes=[AStarProbe(concepts=(1, 4))], probe_kernel="blocked") as s:
        model(**x)
    alone = {**x, "hidden_states": x["hidden_states"][:1], "timestep": x["timestep"][:1],
             "encoder_hidden_states": x["encoder_hidden_states"][:1], "encoder_attention_mask": x["encoder_attention_mask"][:1]}
    with torch.no_grad(), DiffusionSession(model, probes=[AStarProbe(concepts=(1, 4))], probe_kernel="blocked") as one:
        model(**alone)
    both, first = s.results(), one.results()  # row 1's token 4 is padding: row 1 is left out of every statistic
    assert both["value"].tolist() == pytest.approx(first["value"].tolist(), rel=1e-6)


def test_sampled_query_rows_do_not_change_the_maps():
    model, inputs = tiny_diffusers("pixart")
    x = inputs(batch=2, text=5)

    def segregation(fraction):
        with torch.no_grad(), DiffusionSession(model, probes=[AStarProbe(concepts=(1, 3))],
                                               query_fraction=fraction) as session:
            model(**x)
        return session.results().query("statistic == 'segregation'")["value"].tolist()

    assert segregation(0.5) == pytest.approx(segregation(1.0), rel=1e-6)


def test_bad_concepts():
    with pytest.raises(ConfigError, match="at least 2"):
        AStarProbe(concepts=(3,))
    model, inputs = tiny_diffusers("pixart")
    with pytest.raises(ConfigError, match="text tokens"), torch.no_grad(), DiffusionSession(
            model, probes=[AStarProbe(concepts=(1, 9))]):
        model(**inputs(text=5))
