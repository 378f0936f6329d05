"""The application protocol: a seeded data generator, a model built on attention sites, a loss and metrics.

    app = APPS.get("hpnet")("hpa", hidden_size=32, num_heads=4)      # a variant of the application
    data = app.data(seed=0)                                           # its generator (AppData)
    model = app.build_model(seed=0)                                   # an AppModel (attnlab.lab.apps.host)
    batch = data.batch(0, 16)                                         # {name: tensor}, pure in (seed, split, step)
    loss = app.loss(model, batch)                                     # scalar, for training
    sums = app.metrics(model, batch)                                  # {metric: (sum, count)} for evaluation

:func:`attnlab.lab.apps.train.train_app` trains one variant and :func:`~attnlab.lab.apps.train.compare_variants`
every variant on the same data; probes run in an :class:`attnlab.Session` over the model's attention sites.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.lab.tasks.base import Split, batch_rng
from attnlab.params import Range, accepted_names, coerce, coerce_arguments

if TYPE_CHECKING:
    from attnlab.lab.apps.host import AppModel

__all__ = ["App", "AppData"]


class AppData:
    """Base class of an application's data generator; subclasses implement :meth:`sample`.

    Subclasses set their own ``name`` (the app's: it names the generator in errors and in ``describe()``; a class
    without one raises ConfigError when it is defined), set ``self.seed`` in a ``@validated`` constructor and keep
    every constructor parameter as an attribute of the same name (:meth:`describe` reads them back). A batch is a
    pure function of ``(seed, split, step, batch_size)``: :meth:`rng` is ``default_rng(SeedSequence([seed, split_id, step]))`` with
    train = 0, eval = 1, as for the lab's tasks (:mod:`attnlab.lab.tasks.base`).
    """

    name: ClassVar[str] = ""
    seed: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            raise ConfigError(f"AppData subclass {cls.__name__}: expected its own name (name = \"app\"), got none")

    def rng(self, step: int, split: Split = "train") -> np.random.Generator:
        """The generator of batch ``step`` of ``split``."""
        return batch_rng(self.seed, step, split, owner=self.name)

    def batch(self, step: int, batch_size: int, *, split: Split = "train") -> dict[str, Tensor]:
        """``{name: tensor}`` of batch ``step`` of ``split``: :meth:`sample`'s arrays as tensors (floating arrays
        as float32, integer arrays as int64, bool arrays as bool). Raises ConfigError for a negative step,
        batch_size < 1 or an unknown split."""
        batch_size = coerce(batch_size, Annotated[int, Range(ge=1, le=1 << 20)], owner=self.name, param="batch_size")
        arrays = self.sample(self.rng(step, split), batch_size)
        return {key: _tensor(value) for key, value in arrays.items()}

    def sample(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
        """Draw ``batch_size`` examples with ``rng``: ``{name: array with leading dim batch_size}``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-ready: ``name`` and every constructor parameter."""
        params = {key: getattr(self, key) for key in accepted_names(type(self))}
        return {"name": self.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}}


def _tensor(value: Any) -> Tensor:
    array = np.asarray(value)
    if array.dtype == np.bool_:
        return torch.from_numpy(np.ascontiguousarray(array))
    if np.issubdtype(array.dtype, np.integer):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


class App:
    """Base class of an application: one mechanism, its task, and the variants that test its claim.

    Subclasses set the class attributes below and implement :meth:`loss` and :meth:`metrics`; the model class
    (an :class:`attnlab.lab.apps.host.AppModel`) reads ``config.variant`` and ``config.model_args``.

    Attributes:
        name: the registered name (set by ``@APPS.register``).
        layer: the registered layer (``attnlab ls layers``) the application introduces.
        data_class: its :class:`AppData` generator (constructor arguments = ``--data-arg``).
        model_class: its :class:`~attnlab.lab.apps.host.AppModel`.
        variants: variant → one-line description; the first is the paper's mechanism, the others its ablations.
        headline: the metric a comparison is judged on; higher_is_better: its direction.
        defaults: training settings of the documented findings run (AppTrainConfig fields: steps, lr, ...).
        model_defaults: the model knobs (``--model-arg``) and their defaults; a value is coerced to its default's type,
            or to its annotation in ``model_hints`` (e.g. ``{"depth": Annotated[int, Range(ge=1)]}``: bounds too).
        shared_args: names that are both a model knob and a generator argument and must agree (hpnet's ``window``):
            :meth:`data` gives the generator the model's value, and :meth:`share_args` (used by
            :class:`~attnlab.lab.apps.train.AppTrainConfig`, so by the CLI) lets a value given on either side set both.

    Args:
        variant: one of ``variants`` (None: the first).
        hidden_size, num_heads: the width and heads of every attention site (head_dim = hidden_size // num_heads).
        **model_args: keys of ``model_defaults``.

    Raises ConfigError for an unknown variant or model argument, a value of the wrong type, or a hidden_size that
    is not a positive multiple of num_heads.
    """

    name: ClassVar[str] = ""
    layer: ClassVar[str] = ""
    data_class: ClassVar[type[AppData]] = AppData
    model_class: ClassVar[type[AppModel]]
    variants: ClassVar[dict[str, str]] = {}
    headline: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {}
    model_defaults: ClassVar[dict[str, Any]] = {}
    model_hints: ClassVar[dict[str, Any]] = {}
    shared_args: ClassVar[tuple[str, ...]] = ()

    def __init__(self, variant: str | None = None, *, hidden_size: int = 32, num_heads: int = 4,
                 **model_args: Any) -> None:
        variant = next(iter(self.variants), "") if variant is None else variant
        if variant not in self.variants:
            raise ConfigError(f"app {self.name}: expected a variant among {', '.join(self.variants)}, got {variant!r}")
        for key, value in (("hidden_size", hidden_size), ("num_heads", num_heads)):
            coerce(value, Annotated[int, Range(ge=1, le=65536)], owner=f"app {self.name}", param=key)
        if int(hidden_size) % int(num_heads):
            raise ConfigError(f"app {self.name}: hidden_size={hidden_size} must be a multiple of num_heads={num_heads}")
        self.variant, self.hidden_size, self.num_heads = variant, int(hidden_size), int(num_heads)
        self.model_args = self.check_model_args(model_args)

    @classmethod
    def check_model_args(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """``model_defaults`` updated by ``values``, each coerced (text is parsed) and bounded by its ``model_hints``
        annotation, else by its default's type.

        Raises ConfigError naming an unknown key and the known ones, or a value out of its bounds."""
        unknown = sorted(set(values) - set(cls.model_defaults))
        if unknown:
            known = ", ".join(cls.model_defaults) or "none"
            raise ConfigError(f"app {cls.name}: no model argument {', '.join(unknown)}; it takes: {known}")
        return {key: coerce(values[key], cls.model_hints.get(key, type(default)), owner=f"app {cls.name}", param=key)
                if key in values else default for key, default in cls.model_defaults.items()}

    @classmethod
    def share_args(cls, model_args: Mapping[str, Any], data_args: Mapping[str, Any]) -> tuple[dict[str, Any],
                                                                                            dict[str, Any]]:
        """``(model_args, data_args)`` with every :attr:`shared_args` name given on one side copied to the other.

        Raises ConfigError when a name is given on both sides with different values (after coercion)."""
        model_args, data_args = dict(model_args), dict(data_args)
        for key in cls.shared_args:
            given = {}  # side → the coerced value given there
            if key in model_args:
                given["model"] = cls.check_model_args({key: model_args[key]})[key]
            if key in data_args:
                given["generator"] = coerce_arguments(cls.data_class, {key: data_args[key]},
                                                      owner=cls.data_class.name)[key]
            if len(set(given.values())) > 1:
                raise ConfigError(f"app {cls.name}: {key} is given as {given['generator']} to the generator and as "
                                  f"{given['model']} to the model; give it once (--data-arg or --model-arg)")
            if given:
                model_args[key] = data_args[key] = next(iter(given.values()))
        return model_args, data_args

    def data(self, **data_args: Any) -> AppData:
        """The generator ``data_class(**data_args)``, each :attr:`shared_args` name taken from the model unless given.

        Raises ConfigError for a bad argument (its ``@validated`` check) or a shared one that differs from the
        model's."""
        data = self.data_class(**{**{key: self.model_args[key] for key in self.shared_args}, **data_args})
        for key in self.shared_args:
            if getattr(data, key) != self.model_args[key]:
                raise ConfigError(f"app {self.name}: the generator's {key}={getattr(data, key)} differs from the "
                                  f"model's {key}={self.model_args[key]}; give it once (--data-arg or --model-arg)")
        return data

    def config(self) -> Any:
        """The :class:`~attnlab.lab.apps.host.AppConfig` of this variant (num_hidden_layers is set by the model)."""
        from attnlab.lab.apps.host import AppConfig

        return AppConfig(app=self.name, variant=self.variant, model_args=dict(self.model_args),
                         hidden_size=self.hidden_size, num_attention_heads=self.num_heads)

    def build_model(self, seed: int = 0) -> AppModel:
        """A freshly initialised model of this variant: torch seeded with ``seed`` in a forked RNG (the global
        generator is left as it was), in training mode."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_class(self.config())
        return model.train()

    def summary_sites(self) -> tuple[int, ...] | None:
        """The attention sites whose probe rows the comparison table summarises (entropy, sink_rate,
        power_law_exponent: :func:`attnlab.lab.apps.results.summary_row`); None = every site. An app overrides it
        when other sites' statistics are set by their layout (e.g. 3 keys, below the sink threshold)."""
        return None

    def loss(self, model: AppModel, batch: Mapping[str, Tensor]) -> Tensor:
        """The scalar training loss of ``batch`` (one forward pass of ``model``)."""
        raise NotImplementedError

    def metrics(self, model: AppModel, batch: Mapping[str, Tensor]) -> dict[str, tuple[float, float]]:
        """``{metric: (sum, count)}`` over ``batch``; the trainer reports ``Σ sum / Σ count`` over eval batches.
        Called in eval mode under ``torch.no_grad()``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-ready: app, layer, variant (and its description), sizes and model arguments."""
        return {"app": self.name, "layer": self.layer, "variant": self.variant,
                "variant_description": self.variants[self.variant], "hidden_size": self.hidden_size,
                "num_heads": self.num_heads, "model_args": dict(self.model_args)}
