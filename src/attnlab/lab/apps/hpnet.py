"""HPNet (Tang et al., CVPR 2024): forecasts at every time step, refined by Triple Factorized Attention over agents,
the model's own earlier forecasts (historical prediction attention, layer ``historical_prediction``) and modes.

The task (:class:`HPNetData`): several agents per scene move on smooth paths observed with noise; at each of T
successive forecast times the model sees only the last W observed positions of every agent and forecasts the next F
(true) positions, in K modes. With a small W the window alone says little about the path's curvature; the forecasts
made at earlier times saw earlier windows, so attending to them extends the range beyond the visible window (the
paper's claim).

Generator (one scene per example; ``N = num_agents``, ``W = window``, ``T = num_forecasts``, ``F = horizon``,
``L = W − 1 + T + F`` steps). Draws, in this order, from the batch's ``numpy.random.Generator``:

1. the scene's turn rate ω_s ~ U[−turn_max, turn_max] (B,); every agent's turn rate ω_a = ω_s + turn_jitter · z,
   z ~ N(0, 1) (B, N): the agents share a road curvature (the only interaction; they never avoid each other);
2. speeds v_a ~ U[speed_min, speed_max] (B, N), length units per step;
3. initial headings θ_a ~ U[−π, π) (B, N);
4. start positions p_a ~ U[−10, 10]² (B, N, 2);
5. observation noise ε ~ N(0, 1) (B, N, W − 1 + T, 2).

Path (constant speed and curvature): x_0 = p_a, x_{n+1} = x_n + v_a (cos θ_n, sin θ_n), θ_n = θ_a + ω_a n, for
n = 0 … L − 1. Observed: o_n = x_n + noise · ε_n for n < W − 1 + T. Forecast time t = 0 … T − 1 has current step
c = W − 1 + t, sees o_{c−W+1 … c}, and its target is the true path x_{c+1 … c+F}.

Batch: ``observed`` (B, N, W − 1 + T, 2), ``future`` (B, N, T, F, 2) = x_{c+1 … c+F} for each t, ``path``
(B, N, L, 2) (the true path, for plots and tests); float32.

The model (:class:`HPNetModel`), one prediction embedding per (agent, forecast time, mode):
embedding = MLP(the window's offsets (o_{c−j} − o_c) / 2, j = 1 … W − 1) + a learned mode token; then
``num_rounds`` rounds of three attention sites, each in a pre-LayerNorm residual block with a feed-forward (as
the released ``GraphAttention``): agent attention (the scene's agents at the same time and mode; ``masked``, all
visible), historical prediction attention (the same agent and mode at forecast times t − Δ,
0 ≤ Δ ≤ ``pred_duration``; ``historical_prediction``), mode attention (the K modes of the same agent and time;
``masked``, all visible). A decoder maps each embedding to F offsets from o_c (×2).
Site order: round r has sites 3r (agent), 3r + 1 (HPA), 3r + 2 (mode).

Variants: ``hpa`` (the paper's) and ``no_hpa``: the same model and parameters with the HPA site restricted to the
query's own forecast time (``max_distance=0``), so no information from earlier forecasts reaches it.

Loss: winner-takes-all over modes, the mean displacement of the best mode, averaged over agents and forecast times
(the released code trains every historical step the same way, with a Huber loss and a mode-probability head that is
left out here). Metrics: ``min_ade``/``min_fde`` (best mode per agent and forecast time; all times), their values
at the last forecast time (``min_ade_last``, the headline, and ``min_fde_last``: the benchmark setting, where the
most history is available), ``min_ade_first`` (the first forecast time, where no earlier forecast exists, so HPA
has nothing to add), and ``consistency``: the mean distance between mode k's forecasts made at t and t + 1
for the F − 1 future steps both cover (all modes, all t; lower = more stable).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np
import torch
from torch import Tensor, nn

from attnlab.errors import ShapeError
from attnlab.functional.masks import full
from attnlab.lab.apps import APPS
from attnlab.lab.apps.base import App, AppData
from attnlab.lab.apps.host import AppBlock, AppConfig, AppModel
from attnlab.lab.tasks.base import check
from attnlab.layers import LAYERS
from attnlab.params import Range, validated

__all__ = ["HPNetApp", "HPNetData", "HPNetModel", "constant_turn_paths", "forecast_errors"]

MAX_WINDOW, MAX_HORIZON = 64, 64
SCALE = 2.0
"""Length units per model unit: the encoder reads offsets / SCALE and the decoder's offsets are multiplied by it."""


def constant_turn_paths(start: np.ndarray, heading: np.ndarray, speed: np.ndarray, turn: np.ndarray,
                        num_steps: int) -> np.ndarray:
    """Positions (…, num_steps, 2) of constant-speed, constant-turn-rate paths: x_0 = start and
    x_{n+1} = x_n + speed (cos θ_n, sin θ_n), θ_n = heading + turn · n. start (…, 2); heading, speed, turn (…)."""
    n = np.arange(num_steps - 1)
    theta = heading[..., None] + turn[..., None] * n  # (…, num_steps − 1)
    steps = speed[..., None, None] * np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    moved = start[..., None, :] + np.cumsum(steps, axis=-2)
    return np.concatenate([start[..., None, :], moved], axis=-2)


class HPNetData(AppData):
    """Agents on constant-curvature paths with observation noise, forecast at successive times (module docstring)."""

    name = "hpnet"

    @validated
    def __init__(self, num_agents: Annotated[int, Range(ge=1, le=64)] = 3,
                 window: Annotated[int, Range(ge=2, le=MAX_WINDOW)] = 3,
                 num_forecasts: Annotated[int, Range(ge=2, le=256)] = 12,
                 horizon: Annotated[int, Range(ge=2, le=MAX_HORIZON)] = 8,
                 speed_min: Annotated[float, Range(ge=0.0, le=100.0)] = 0.5,
                 speed_max: Annotated[float, Range(ge=0.0, le=100.0)] = 1.5,
                 turn_max: Annotated[float, Range(ge=0.0, le=math.pi)] = 0.12,
                 turn_jitter: Annotated[float, Range(ge=0.0, le=math.pi)] = 0.02,
                 noise: Annotated[float, Range(ge=0.0, le=100.0)] = 0.1,
                 seed: Annotated[int, Range(ge=0)] = 0) -> None:
        """Raises ConfigError for a value out of range or speed_min > speed_max."""
        check(speed_min <= speed_max, self.name, f"speed_min must be <= speed_max, got {speed_min} > {speed_max}")
        self.num_agents, self.window, self.num_forecasts, self.horizon = num_agents, window, num_forecasts, horizon
        self.speed_min, self.speed_max, self.turn_max, self.turn_jitter = speed_min, speed_max, turn_max, turn_jitter
        self.noise, self.seed = noise, seed

    @property
    def num_steps(self) -> int:
        """L = W − 1 + T + F: every step of a path."""
        return self.window - 1 + self.num_forecasts + self.horizon

    def sample(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
        B, N, W, T, F = batch_size, self.num_agents, self.window, self.num_forecasts, self.horizon
        turn = rng.uniform(-self.turn_max, self.turn_max, size=(B, 1)) + self.turn_jitter * rng.normal(size=(B, N))
        speed = rng.uniform(self.speed_min, self.speed_max, size=(B, N))
        heading = rng.uniform(-math.pi, math.pi, size=(B, N))
        start = rng.uniform(-10.0, 10.0, size=(B, N, 2))
        noise = rng.normal(size=(B, N, W - 1 + T, 2))
        path = constant_turn_paths(start, heading, speed, turn, self.num_steps)  # (B, N, L, 2)
        current = W - 1 + np.arange(T)  # (T,) the current step of each forecast time
        future = path[:, :, current[:, None] + 1 + np.arange(F)[None, :]]  # (B, N, T, F, 2)
        observed = path[:, :, : W - 1 + T] + self.noise * noise
        return {"observed": observed, "future": future, "path": path}


class HPNetModel(AppModel):
    """Prediction embeddings (B, N, T, K, C) refined by agent / historical-prediction / mode attention sites
    (module docstring). ``forward(observed)``: observed (B, N, W − 1 + T, 2) with W = ``window`` of the model args.
    Returns forecasts (B, N, T, K, F, 2) in the observation's coordinates."""

    def __init__(self, config: AppConfig) -> None:
        super().__init__(config)
        args = config.model_args
        width, heads = config.hidden_size, config.num_attention_heads
        self.window, self.horizon, self.num_modes = args["window"], args["horizon"], args["num_modes"]
        self.encoder = nn.Sequential(nn.Linear(2 * (self.window - 1), width), nn.GELU(), nn.Linear(width, width))
        self.mode_tokens = nn.Parameter(0.02 * torch.randn(self.num_modes, width))
        blocks = []
        for _ in range(args["num_rounds"]):
            agent = LAYERS.get("masked")(width, heads, mask_mod=full(), rope_base=None)
            history = LAYERS.get("historical_prediction")(width, heads, max_distance=args["pred_duration"])
            mode = LAYERS.get("masked")(width, heads, mask_mod=full(), rope_base=None)
            blocks.append(nn.ModuleList(AppBlock(self.site(layer), width, 2.0) for layer in (agent, history, mode)))
        self.rounds = nn.ModuleList(blocks)
        self.decoder = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                     nn.Linear(2 * width, 2 * self.horizon))
        self.finish_sites()

    def embed(self, observed: Tensor) -> tuple[Tensor, Tensor]:
        """The initial prediction embeddings (B, N, T, K, C) and the current observations o_c (B, N, T, 2)."""
        W = self.window
        if observed.dim() != 4 or observed.shape[-1] != 2 or observed.shape[2] < W:
            raise ShapeError(f"expected observed (batch, agents, steps >= window={W}, 2), got {tuple(observed.shape)}")
        T = observed.shape[2] - W + 1
        windows = observed.unfold(2, W, 1).transpose(-1, -2)  # (B, N, T, W, 2): steps c − W + 1 … c
        current = windows[..., -1, :]  # (B, N, T, 2)
        offsets = (windows[..., :-1, :] - current[..., None, :]).flip(-2)  # o_{c−j} − o_c, j = 1 … W − 1
        hidden = self.encoder(offsets.flatten(-2) / SCALE)  # (B, N, T, C)
        return hidden[:, :, :, None] + self.mode_tokens, current  # (B, N, T, K, C)

    def forward(self, observed: Tensor) -> Tensor:
        hidden, current = self.embed(observed)
        B, N, T, K, C = hidden.shape
        for agent, history, mode in self.rounds:
            # agents: one sequence per (scene, time, mode)
            hidden = agent(hidden.permute(0, 2, 3, 1, 4).reshape(B * T * K, N, C)).view(B, T, K, N, C)
            # forecast times: one sequence per (scene, agent, mode), causal in t
            hidden = history(hidden.permute(0, 3, 2, 1, 4).reshape(B * N * K, T, C)).view(B, N, K, T, C)
            # modes: one sequence per (scene, agent, time)
            hidden = mode(hidden.transpose(2, 3).reshape(B * N * T, K, C)).view(B, N, T, K, C)
        offsets = self.decoder(hidden).view(B, N, T, K, self.horizon, 2)
        return current[:, :, :, None, None, :] + SCALE * offsets  # (B, N, T, K, F, 2)


def forecast_errors(forecasts: Tensor, future: Tensor) -> Tensor:
    """Displacements (B, N, T, K, F) between forecasts (B, N, T, K, F, 2) and the true future (B, N, T, F, 2)."""
    if forecasts.dim() != 6 or future.shape != forecasts.shape[:3] + forecasts.shape[4:]:
        raise ShapeError(f"expected forecasts (B, N, T, K, F, 2) and future (B, N, T, F, 2), got "
                         f"{tuple(forecasts.shape)} and {tuple(future.shape)}")
    return torch.linalg.vector_norm(forecasts - future[:, :, :, None], dim=-1)


@APPS.register("hpnet")
class HPNetApp(App):
    """HPNet's Triple Factorized Attention on synthetic multi-agent forecasting (Tang et al., CVPR 2024).

    Model arguments: ``num_modes`` K (3), ``num_rounds`` of triple attention (1), ``pred_duration`` (20, the
    released default: the largest Δ the HPA site sees in the ``hpa`` variant), ``window`` and ``horizon`` (3 and 8;
    shared with the generator: ``App.shared_args``, a value given on either side sets both).
    """

    layer = "historical_prediction"
    data_class = HPNetData
    model_class = HPNetModel
    variants = {"hpa": "historical prediction attention over the same agent's and mode's earlier forecasts",
                "no_hpa": "the HPA site restricted to the query's own forecast time (max_distance=0)"}
    headline = "min_ade_last"
    higher_is_better = False
    defaults = {"steps": 1000, "lr": 3e-3, "batch_size": 32, "eval_every": 250, "eval_batches": 8}
    model_defaults = {"num_modes": 3, "num_rounds": 1, "pred_duration": 20, "window": 3, "horizon": 8}
    model_hints = {"num_modes": Annotated[int, Range(ge=1, le=64)], "num_rounds": Annotated[int, Range(ge=1, le=8)],
                   "pred_duration": Annotated[int, Range(ge=0, le=4096)],
                   "window": Annotated[int, Range(ge=2, le=MAX_WINDOW)],
                   "horizon": Annotated[int, Range(ge=2, le=MAX_HORIZON)]}
    shared_args = ("window", "horizon")

    def __init__(self, variant: str | None = None, **kwargs: Any) -> None:
        super().__init__(variant, **kwargs)
        if self.variant == "no_hpa":
            self.model_args["pred_duration"] = 0

    def summary_sites(self) -> tuple[int, ...]:
        """The HPA sites (3r + 1): the agent and mode sites have 3 keys, so uniform attention (1/3) already exceeds
        the sink threshold ε = 0.3 and their summaries are set by the layout."""
        return tuple(3 * r + 1 for r in range(self.model_args["num_rounds"]))

    def loss(self, model: HPNetModel, batch: Mapping[str, Tensor]) -> Tensor:
        ade = forecast_errors(model(batch["observed"]), batch["future"]).mean(dim=-1)  # (B, N, T, K)
        return ade.min(dim=-1).values.mean()

    def metrics(self, model: HPNetModel, batch: Mapping[str, Tensor]) -> dict[str, tuple[float, float]]:
        forecasts = model(batch["observed"])
        errors = forecast_errors(forecasts, batch["future"])  # (B, N, T, K, F)
        ade = errors.mean(dim=-1).min(dim=-1).values  # (B, N, T)
        fde = errors[..., -1].min(dim=-1).values
        # forecasts made at t and t + 1 for the same future steps c + 2 … c + F: (B, N, T − 1, K, F − 1)
        drift = torch.linalg.vector_norm(forecasts[:, :, :-1, :, 1:] - forecasts[:, :, 1:, :, :-1], dim=-1)
        per_time = ade.shape[0] * ade.shape[1]
        return {"min_ade": (float(ade.sum()), ade.numel()), "min_fde": (float(fde.sum()), fde.numel()),
                "min_ade_last": (float(ade[:, :, -1].sum()), per_time),
                "min_fde_last": (float(fde[:, :, -1].sum()), per_time),
                "min_ade_first": (float(ade[:, :, 0].sum()), per_time),
                "consistency": (float(drift.sum()), drift.numel())}
